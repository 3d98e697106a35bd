""" Every computation path of the layer against its definition written independently (`tests/reference.py`):
outputs and every gradient (input, tap weight, bias, Q/K, gates, alpha, centre), in states fine-tuning reaches,
over strides, 'same' padding, dilation, groups, depthwise, 5x5 kernels, non-square and one-row maps; float64 layers
computed in float64 (gradcheck passes). """
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

from timm_tcnn import GatedPositionalAttention2d, conv_to_attention
from timm_tcnn.layers import choose
from timm_tcnn.tools.analysis import content_logits
from helpers import reference_forward, relative_error

# in_chs, out_chs, kernel, stride, groups, dilation, same padding
GEOMETRIES = [
    (6, 5, 3, 1, 1, 1, False), (6, 4, 3, 2, 1, 1, False), (6, 6, 3, 2, 1, 1, True), (6, 6, 5, 1, 1, 1, False),
    (6, 9, 3, 1, 3, 1, False), (6, 6, 3, 1, 6, 1, False), (6, 5, 3, 1, 1, 2, False), (6, 6, 3, 2, 2, 2, True),
]
SIZES = [(7, 7), (6, 9), (1, 5)]


def convolution(in_chs, out_chs, kernel, stride, groups, dilation, same) -> nn.Module:
    if same:
        return Conv2dSame(in_chs, out_chs, kernel, stride, dilation=dilation, groups=groups)
    return nn.Conv2d(in_chs, out_chs, kernel, stride, dilation * (kernel // 2), dilation=dilation, groups=groups)


def fine_tuned(geometry, state: str, grad_floor: float = 0., dtype=torch.float32) -> GatedPositionalAttention2d:
    """A converted layer moved to `state`: 'open' (every gate open), 'mixed' (half the content gates closed), or
    'sharp' (every head open, content logits of std ~4)."""
    layer = conv_to_attention(convolution(*geometry), grad_floor=grad_floor).to(dtype)
    heads = layer.num_heads
    generator = torch.Generator().manual_seed(sum(geometry[:6]) + len(state))
    with torch.no_grad():
        gate = torch.rand(heads, generator=generator) * 0.8 + 0.1
        if state == 'mixed':
            gate[::2] = -0.05  # closed: clamped to 0, still learning through the straight-through clamp
        layer.set_attention_values(
            content_gate=gate, locality_gate=torch.rand(heads, generator=generator) * 0.8 + 0.1,
            pos_log_alpha=torch.linspace(-1.5, 0.7, heads),
            pos_center=layer.conversion_values()['pos_center'] + torch.randn(heads, 2, generator=generator) * 0.4)
        layer.qk.weight.copy_(
            torch.randn(layer.qk.weight.shape, generator=generator) * (1.0 if state == 'sharp' else 0.3)
        )
    return layer


def outputs_and_grads(forward, layer, x, target):
    x = x.detach().requires_grad_()
    out = forward(x)
    return [out.detach()] + list(torch.autograd.grad((out * target).sum(), [x] + list(layer.parameters())))


def assert_close(got, ref, forward_tol, grad_tol):
    assert got[0].shape == ref[0].shape
    assert relative_error(got[0], ref[0]) <= forward_tol
    for index, (g, r) in enumerate(zip(got[1:], ref[1:])):
        assert relative_error(g, r) <= grad_tol, index


def test_reference_is_the_convolution_at_conversion():
    """The reference's own one-hot taps and positions against F.conv2d (via the convolution modules)."""
    for geometry in GEOMETRIES:
        conv = convolution(*geometry)
        layer = conv_to_attention(conv)
        for size in SIZES:
            x = torch.randn(2, geometry[0], *size)
            assert relative_error(reference_forward(layer, x), conv(x)) <= 1e-6, (geometry, size)


def test_reference_gaussian_is_a_tap_when_sharp():
    """A Gaussian of locality gate 1, alpha 1e4 and centre on the dilated tap reads that tap: the convolution."""
    conv = convolution(6, 5, 3, 1, 1, 2, False)
    layer = conv_to_attention(conv)
    with torch.no_grad():
        layer.set_attention_values(locality_gate=1.0, pos_log_alpha=torch.full((9,), 9.2))
    x = torch.randn(2, 6, 8, 7)
    assert relative_error(reference_forward(layer, x), conv(x)) <= 1e-6


def _trace(layer, x):
    return torch.jit.trace(layer, x.detach(), check_trace=False)


def cuda_choices(layer: GatedPositionalAttention2d) -> GatedPositionalAttention2d:
    """The layer computing as it does on CUDA (its projection choices), on CPU tensors (the kernels apart)."""
    layer.choices = choose(torch.device('cuda'), layer.weight.dtype, layer.stride, layer.groups)._replace(
        positional_kernels=False
    )
    return layer


def query_blocks_of_one(layer: GatedPositionalAttention2d) -> GatedPositionalAttention2d:
    layer.attention_block_bytes = 1
    return layer


EAGER_PATHS = {'training': lambda layer: layer, 'blocks of one query': query_blocks_of_one, "CUDA's": cuda_choices}


@pytest.mark.parametrize(
    'state,grad_floor',
    [
        pytest.param('open', 0.0, marks=pytest.mark.slow),
        ('mixed', 0.3),
        pytest.param('sharp', 0.0, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_eager_and_standard_operations_match_the_reference(geometry, state, grad_floor):
    for size in SIZES:
        layer = fine_tuned(geometry, state, grad_floor)
        x = torch.randn(2, geometry[0], *size)
        target = torch.randn_like(reference_forward(layer, x))
        ref = outputs_and_grads(lambda x: reference_forward(layer, x), layer, x, target)
        for name, make in EAGER_PATHS.items():
            path = make(copy.deepcopy(layer))
            assert_close(outputs_and_grads(path, path, x, target), ref, 2e-5, 1e-4)
        traced = _trace(layer, x)  # the standard-operations form of scripted, traced, exported, compiled graphs
        assert_close(outputs_and_grads(traced, layer, x, target), ref, 2e-5, 1e-4)
        with torch.no_grad():  # the inference plans, on CPU's and on CUDA's projection choices
            assert relative_error(layer(x), ref[0]) <= 2e-5
            assert relative_error(cuda_choices(layer)(x), ref[0]) <= 2e-5
            for blocked in (query_blocks_of_one(copy.deepcopy(layer)), query_blocks_of_one(cuda_choices(layer))):
                assert relative_error(blocked(x), ref[0]) <= 2e-5  # the plans' parts in blocks of one query


@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_float64_layers_compute_in_float64(geometry):
    for state, grad_floor in (('open', 0.0), ('mixed', 0.3), ('sharp', 0.0)):
        layer = fine_tuned(geometry, state, grad_floor, torch.float64)
        x = torch.randn(2, geometry[0], 6, 5, dtype=torch.float64)
        target = torch.randn_like(reference_forward(layer, x))
        ref = outputs_and_grads(lambda x: reference_forward(layer, x), layer, x, target)
        assert_close(outputs_and_grads(layer, layer, x, target), ref, 1e-11, 1e-9)
        with torch.no_grad():
            assert relative_error(layer(x), ref[0]) <= 1e-11


def test_gradient_floor_changes_only_the_learning_of_nearly_closed_heads():
    """With a floor, the forward pass and the gates' gradients are unchanged; Q/K, alpha and the centre learn as
    the definition says (the reference), and more than without the floor."""
    geometry = GEOMETRIES[0]
    x, target = torch.randn(2, 6, 7, 7), torch.randn(2, 5, 7, 7)
    without = fine_tuned(geometry, 'mixed', 0.0)
    floored = copy.deepcopy(without)
    floored.grad_floor = 0.5
    a, b = (outputs_and_grads(layer, layer, x, target) for layer in (without, floored))
    names = [name for name, _ in without.named_parameters()]
    assert torch.equal(a[0], b[0])
    for name in ('content_gate', 'locality_gate', 'weight', 'bias'):
        index = 2 + names.index(name)
        assert relative_error(b[index], a[index]) <= 1e-5, name
    closed = torch.arange(0, without.num_heads, 2)  # heads whose content gate is 0
    qk = 2 + names.index('qk.weight')
    assert a[qk].view(without.num_heads, -1)[closed].abs().max() == 0
    assert b[qk].view(without.num_heads, -1)[closed].abs().max() > 0


@pytest.mark.parametrize('geometry', [GEOMETRIES[1], GEOMETRIES[7]])
def test_gradcheck_on_a_fine_tuned_float64_layer(geometry):
    layer = fine_tuned(geometry, 'open', 0.0, torch.float64)
    x = torch.randn(1, geometry[0], 5, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.content_gate, layer.locality_gate, layer.pos_log_alpha, layer.pos_center, layer.qk.weight]

    def forward(x, *values):
        state = dict(zip(['content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center', 'qk.weight'], values))
        return torch.func.functional_call(layer, state, (x,), strict=False)

    assert torch.autograd.gradcheck(forward, (x, *params))


def test_float32_layers_keep_float32_attention():
    layer = fine_tuned(GEOMETRIES[0], 'open')
    assert layer.attention_dtype() == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert content_logits(layer, torch.randn(1, 6, 5, 5)).dtype == torch.float32
    assert layer.double().attention_dtype() == torch.float64
