""" Helpers shared by the tests: imported as `from helpers import ...` (pytest puts tests/ on the path). """
import torch
import torch.nn as nn
from reference import reference_forward  # tests/reference.py: the test oracle

from timm_tcnn import GatedPositionalAttention2d, conv_to_attention
from timm_tcnn.utils.numerics import relative_error

__all__ = [
    'relative_error', 'attention_path', 'randomize_batchnorm', 'OfflineHub', 'plain_forward', 'fine_tuned_layer',
    'grads', 'assert_same_grads', 'assert_matches_plain_reference', 'reference_forward',
]


def attention_path(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` through the attention computation: with autograd on, converted layers never take
    their inference shortcut to `F.conv2d`."""
    with torch.enable_grad():
        return model(x).detach()


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator, in_chans: int = 3) -> torch.nn.Module:
    """Give every BatchNorm random affine parameters and running statistics measured on random
    images, so that eval-mode outputs depend on them and the network stays well conditioned."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        was_training = model.training
        model.train()
        model(torch.randn(4, in_chans, 64, 64, generator=generator))
        model.train(was_training)
        for m in norms:
            m.momentum = 0.1
    return model


class OfflineHub:
    """A Hugging Face cache holding random CNN weights under timm's Hub ids, used in offline mode."""

    def __init__(self, cache_dir, state_dicts):
        self.cache_dir = cache_dir
        self.state_dicts = state_dicts  # hub id -> CNN state dict stored in the cache

    def add(self, repo_id: str, state_dict, filename: str = 'model.safetensors', revision: str = 'a' * 40):
        """Store `state_dict` as `repo_id`'s weights in the cache layout huggingface_hub reads."""
        from safetensors.torch import save_file
        repo_dir = self.cache_dir / f'models--{repo_id.replace("/", "--")}'
        snapshot = repo_dir / 'snapshots' / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo_dir / 'refs').mkdir(exist_ok=True)
        (repo_dir / 'refs' / 'main').write_text(revision)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / filename))
        self.state_dicts[repo_id] = state_dict


# the layer's definition written plainly (`tests/reference.py`): unfolded one-hot taps, separable Gaussian
# (`tools.analysis.positional_attention`, checked against the dense definition in test_attention.py), content
# attention by an explicit softmax over all keys, then the tap projection (within each group)
plain_forward = reference_forward


def fine_tuned_layer(in_chs=6, out_chs=5, kernel_size=3, stride=1, bias=True, groups=1) -> GatedPositionalAttention2d:
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=bias, groups=groups)
    layer = conv_to_attention(conv)
    with torch.no_grad():
        layer.set_attention_values(content_gate=torch.empty_like(layer.content_gate).uniform_(0.1, 0.9))
        layer.set_attention_values(locality_gate=torch.empty_like(layer.locality_gate).uniform_(0.1, 0.9))
        layer.set_attention_values(pos_log_alpha=torch.empty_like(layer.pos_log_alpha).uniform_(-1.5, 0.5))
        center = layer.attention_values()['pos_center'] + torch.randn_like(layer.pos_center) * 0.3
        layer.set_attention_values(pos_center=center)
        layer.qk.weight.normal_(std=0.3)
    return layer


def grads(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, target: torch.Tensor):
    params = [x] + list(layer.parameters())
    return torch.autograd.grad((out * target).sum(), params)


def assert_same_grads(got, ref, tol: float = 1e-4):
    for g, g_ref in zip(got, ref):
        assert (g - g_ref).abs().max() <= tol * g_ref.abs().max().clamp_min(1e-6), (g, g_ref)


def assert_matches_plain_reference(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's output and gradients (autograd path) and its inference output equal `plain_forward`'s;
    returns the reference output. `x` requires grad."""
    ref, out = plain_forward(layer, x), layer(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-5
    target = torch.randn_like(ref)
    assert_same_grads(grads(layer, x, out, target), grads(layer, x, ref, target))
    with torch.no_grad():
        assert relative_error(layer(x), ref) <= 1e-5
    return ref
