""" No subnormal number in any tensor the attention computes, forward or backward, in hard states (strong
and weak locality, sharp content logits, closed and open gates, large maps), in float32 and under bf16 /
fp16 autocast; the result still equals the plain reference. """
import math
from typing import List

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from timm_tcnn import GatedPositionalAttention2d, conv_to_attention
from timm_tcnn.layers import functions as functions_module
from timm_tcnn.tools.analysis import content_logits
from helpers import assert_matches_plain_reference


def count_subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


class SubnormalRecorder(TorchDispatchMode):
    """Records every op whose output (of one of `dtypes`) holds a value that is nonzero and below its dtype's
    smallest normal. Allocations (`empty*`) and views compute no values and are skipped (a view of a buffer not
    yet written holds whatever memory it was given): what an op writes into them with `out=` is recorded as that
    op's output."""

    def __init__(self, dtypes=(torch.float32, torch.bfloat16)):
        super().__init__()
        self.dtypes = dtypes
        self.found: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.startswith(('empty', 'new_empty')) or func.is_view:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype in self.dtypes and t.numel():
                count = count_subnormals(t)
                if count:
                    self.found.append(f'{func}: {count} of {t.numel()} {t.dtype} values')
        return out


def hard_layer(
        content: str, stride: int, logit_std: float, x: torch.Tensor, grad_floor: float = 0.1,
) -> GatedPositionalAttention2d:
    """A layer with per-head locality strengths over [0.05, 20] (1, the conversion value, among them),
    centres off the taps, content logits of std `logit_std` on `x`, and content gates 'closed' (all 0, the
    Gaussian open), 'open' (all in (0, 1)) or 'mixed' (half still at 0)."""
    channels = x.shape[1]
    layer = conv_to_attention(nn.Conv2d(channels, channels, 3, stride, 1), gate_lr_scale=30., grad_floor=grad_floor)
    heads = layer.num_heads
    content_gate = {
        'closed': torch.zeros(heads),
        'open': torch.linspace(0.02, 0.9, heads),
        'mixed': torch.linspace(0.02, 0.9, heads) * (torch.arange(heads) % 2),
    }[content]
    with torch.no_grad():
        layer.set_attention_values(
            content_gate=content_gate,
            locality_gate=torch.linspace(0.01, 1., heads),
            pos_log_alpha=torch.linspace(math.log(0.05), math.log(20.), heads),
            pos_center=layer.attention_values()['pos_center'] + torch.randn(heads, 2) * 0.4,
        )
        std = content_logits(layer, x).std()
        layer.qk.weight.mul_((logit_std / std).sqrt())
    with torch.no_grad():
        assert math.isclose(float(content_logits(layer, x).std()), logit_std, rel_tol=1e-3)
    return layer


@pytest.mark.parametrize('content', ['closed', 'open', 'mixed'])
@pytest.mark.parametrize('stride,size', [(1, 28), (2, 32)])
def test_no_subnormal_forward_and_backward_float32(content, stride, size):
    x = torch.randn(2, 8, size, size)
    layer = hard_layer(content, stride, 10., x)
    x.requires_grad_()
    recorder = SubnormalRecorder()
    with recorder:
        out = layer(x)
        torch.autograd.grad((out * torch.randn_like(out)).sum(), [x] + list(layer.parameters()), allow_unused=True)
        with torch.no_grad():
            layer(x.detach())  # the inference path (cached positional matrix, shortcuts)
    assert not recorder.found, recorder.found


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('content', ['closed', 'mixed'])
def test_no_subnormal_under_autocast(dtype, content, monkeypatch):
    """float32 and bfloat16 tensors: none anywhere, forward and backward (float16: forward; its activations
    are subnormal wherever they are below 6.1e-5, attention or not, and the content softmax's backward,
    p * (g - sum(p * g)), can cancel to subnormal float32 values on float16 gradients). The attention weights
    blended in the mixing GEMM's dtype (in the forward pass; for bf16 also their recomputation in the backward
    pass) hold none."""
    mixed_attention = []

    def recording_blend(*args):
        mixed_attention.append(blend(*args))
        return mixed_attention[-1]

    blend = functions_module._blended
    monkeypatch.setattr(functions_module, '_blended', recording_blend)
    x = torch.randn(2, 8, 28, 28)
    layer = hard_layer(content, 1, 10., x)
    x.requires_grad_()
    recorder = SubnormalRecorder()
    with torch.autocast('cpu', dtype=dtype):
        with recorder:
            out = layer(x)
        if dtype == torch.bfloat16:
            with recorder:
                torch.autograd.grad(out.float().sum(), [x] + list(layer.parameters()), allow_unused=True)
    assert not recorder.found, recorder.found
    assert mixed_attention and all(a.dtype == dtype for a in mixed_attention)  # one per block of queries
    assert sum(count_subnormals(a) for a in mixed_attention) == 0


def test_plain_attention_has_subnormals_in_these_states():
    """The states above are hard: written plainly, the same attention holds subnormal numbers."""
    x = torch.randn(2, 8, 28, 28)
    layer = hard_layer('mixed', 1, 10., x)
    with torch.no_grad():
        probs = content_logits(layer, x).softmax(-1)
        alpha = layer.attention_values()['pos_log_alpha'].exp()
    offsets = torch.arange(-27., 28.)
    gauss = torch.exp(-alpha[:, None] * offsets ** 2)
    for t in (probs, gauss[:, :, None] * gauss[:, None, :]):
        assert ((t > 0) & (t < torch.finfo(torch.float32).tiny)).any()


@pytest.mark.parametrize('content', ['closed', 'mixed'])
@pytest.mark.parametrize('stride', [1, 2])
def test_hard_states_match_plain_reference(content, stride):
    x = torch.randn(2, 8, 16, 16)
    layer = hard_layer(content, stride, 10., x, grad_floor=0.)  # the reference has no gradient floor
    assert_matches_plain_reference(layer, x.requires_grad_())
