""" The attention paths (`timm_tcnn.layers.config`): each equals the layer's plain definition, outputs and every
gradient; the switch is explicit, process-wide, and refuses unknown paths. The `fused` path runs here through
SDPA's math backend, the code CUDA runs through its fused kernels. """
import pytest
import torch
import torch.nn as nn

from timm_tcnn import conv_to_attention
from timm_tcnn.layers import attention_path, get_attention_path, reference_forward, set_attention_path
from helpers import relative_error


def layer_with_heads(heads: str, stride: int, grad_floor: float) -> nn.Module:
    layer = conv_to_attention(nn.Conv2d(8, 6, 3, stride, 1), gate_lr_scale=30., grad_floor=grad_floor)
    content = {'open': torch.linspace(0.05, 0.9, 9), 'closed': torch.zeros(9),
               'mixed': torch.linspace(0.05, 0.9, 9) * (torch.arange(9) % 2)}[heads]
    with torch.no_grad():
        layer.set_attention_values(
            content_gate=content, locality_gate=torch.linspace(0.1, 0.6, 9),
            pos_log_alpha=torch.linspace(-1., 1., 9),
            pos_center=layer.attention_values()['pos_center'] + torch.randn(9, 2) * 0.3)
        layer.qk.weight.normal_(std=0.5)
    return layer


def outputs_and_grads(layer, x, target, path):
    with attention_path(path):
        xi = x.detach().clone().requires_grad_()
        out = layer(xi)
        grads = torch.autograd.grad((out.float() * target).sum(), [xi] + list(layer.parameters()))
        with torch.no_grad():
            inference = layer(x)
    return out, grads, inference


@pytest.mark.parametrize('heads', ['open', 'closed', 'mixed'])
@pytest.mark.parametrize('stride,size', [(1, (7, 5)), (2, (9, 6)), (2, (1, 3))])
@pytest.mark.parametrize('grad_floor', [0., 0.1])
def test_fused_path_equals_explicit_path(heads, stride, size, grad_floor):
    layer = layer_with_heads(heads, stride, grad_floor)
    x = torch.randn(2, 8, *size)
    target = torch.randn_like(layer(x))
    explicit, fused = (outputs_and_grads(layer, x, target, path) for path in ('explicit', 'fused'))
    assert relative_error(fused[0], explicit[0]) <= 1e-5
    assert relative_error(fused[2], explicit[2]) <= 1e-5
    for name, got, ref in zip(['x'] + [n for n, _ in layer.named_parameters()], fused[1], explicit[1]):
        assert relative_error(got, ref) <= 1e-4 or ref.abs().max() <= 1e-7, name


def test_fused_path_under_bf16_autocast():
    layer = layer_with_heads('mixed', 2, 0.1)
    x = torch.randn(2, 8, 9, 8)
    target = torch.randn(2, 6, 5, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        explicit, fused = (outputs_and_grads(layer, x, target, path) for path in ('explicit', 'fused'))
    assert fused[0].dtype == explicit[0].dtype == torch.bfloat16
    assert relative_error(fused[0].float(), explicit[0].float()) <= 3e-2
    for got, ref in zip(fused[1], explicit[1]):
        assert relative_error(got.float(), ref.float()) <= 6e-2


@pytest.mark.parametrize('path', ['explicit', 'fused', 'reference'])
def test_every_path_equals_the_definition(path):
    layer = layer_with_heads('mixed', 1, 0.)  # the definition has no gradient floor
    x = torch.randn(2, 8, 6, 7)
    target = torch.randn(2, 6, 6, 7)
    out, grads, inference = outputs_and_grads(layer, x, target, path)
    ref_x = x.clone().requires_grad_()
    ref = reference_forward(layer, ref_x)
    ref_grads = torch.autograd.grad((ref * target).sum(), [ref_x] + list(layer.parameters()))
    assert relative_error(out, ref) <= 1e-5 and relative_error(inference, ref) <= 1e-5
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) <= 1e-4


def test_switch_is_explicit_and_checked(monkeypatch):
    assert get_attention_path() == 'auto'
    with attention_path('fused'):
        assert get_attention_path() == 'fused'
    assert get_attention_path() == 'auto'
    with pytest.raises(ValueError, match='unknown attention path'):
        set_attention_path('flash')
    assert get_attention_path() == 'auto'
