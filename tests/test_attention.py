""" The attention layer against torch.nn.functional.conv2d, and its training behaviour. """
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same

from timm_tcnn import GatedPositionalAttention2d, attention_to_conv, conv_to_attention
from timm_tcnn.tools.analysis import positional_attention
from helpers import relative_error

SIZES = [(1, 1), (2, 2), (3, 3), (7, 7), (14, 14), (1, 7), (2, 14), (3, 7), (14, 3), (7, 2)]


@pytest.mark.parametrize('kernel_size,stride,bias', list(itertools.product((3, 5), (1, 2), (True, False))))
@pytest.mark.parametrize('train', [False, True])
def test_conversion_equals_conv(kernel_size, stride, bias, train):
    conv = nn.Conv2d(6, 10, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    layer = conv_to_attention(conv).train(train)
    for height, width in SIZES:
        x = torch.randn(2, 6, height, width)
        ref = F.conv2d(x, conv.weight, conv.bias, stride, kernel_size // 2)
        out = layer(x)
        assert out.shape == ref.shape
        assert relative_error(out, ref) <= 1e-5, (height, width)


def test_batch_of_one_and_channels_last():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = conv_to_attention(conv)
    x = torch.randn(1, 4, 5, 9).to(memory_format=torch.channels_last)
    assert relative_error(layer(x), conv(x)) <= 1e-5


def test_attention_to_conv_round_trip():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    back = attention_to_conv(conv_to_attention(conv))
    assert type(back) is nn.Conv2d
    assert (back.stride, back.padding, back.kernel_size) == (conv.stride, conv.padding, conv.kernel_size)
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)


def test_attention_to_conv_refuses_open_gate():
    layer = conv_to_attention(nn.Conv2d(3, 3, 3, padding=1))
    with torch.no_grad():
        layer.set_attention_values(content_gate=torch.tensor([0.] * 4 + [0.1] + [0.] * 4))
    with pytest.raises(ValueError, match='no longer a convolution'):
        attention_to_conv(layer)


def test_open_gates_change_output_and_stay_in_unit_interval():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = conv_to_attention(conv)
    with torch.no_grad():
        layer.set_attention_values(content_gate=1.7)
        layer.set_attention_values(locality_gate=-0.3)
    assert torch.equal(layer.content_share(), torch.ones(9))
    assert torch.equal(layer.locality_share(), torch.zeros(9))
    x = torch.randn(2, 4, 6, 5)
    assert relative_error(layer(x), conv(x)) > 1e-2


def dense_gaussian_reference(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """x G_h^T for every head, from the 2D definition: softmax over all offsets of the window of
    -alpha |r - c|^2, zero outside the image; (B, C, heads, Nq)."""
    B, C, H, W = x.shape
    s = layer.stride
    values = layer.attention_values()
    alpha = values['pos_log_alpha'].exp()
    dy = torch.arange(-(H - 1), H, dtype=torch.float32)
    dx = torch.arange(-(W - 1), W, dtype=torch.float32)
    out = []
    for h in range(layer.num_heads):
        cy, cx = values['pos_center'][h]
        logits = -alpha[h] * ((dy[:, None] - cy) ** 2 + (dx[None, :] - cx) ** 2)
        kernel = logits.flatten().softmax(0).view(len(dy), len(dx))
        rows = []
        for i in range(0, H, s):
            for j in range(0, W, s):
                window = kernel[H - 1 - i:2 * H - 1 - i, W - 1 - j:2 * W - 1 - j]  # key offsets k - q
                rows.append((x * window).sum((-2, -1)))  # B, C
        out.append(torch.stack(rows, -1))
    return torch.stack(out, 2)


@pytest.mark.parametrize('stride', [1, 2])
def test_separable_gaussian_matches_dense_definition(stride):
    layer = GatedPositionalAttention2d(3, 3, 3, stride=stride)
    with torch.no_grad():
        layer.set_attention_values(pos_log_alpha=torch.empty_like(layer.pos_log_alpha).uniform_(-1.5, 0.5))
        layer.set_attention_values(pos_center=layer.attention_values()['pos_center'] + torch.randn(9, 2) * 0.5)
    x = torch.randn(2, 3, 5, 4)
    assert relative_error(positional_attention(layer, x), dense_gaussian_reference(layer, x)) <= 1e-5


def test_fine_tuning_opens_gates_and_trains_every_parameter():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = conv_to_attention(conv)
    x = torch.randn(16, 8, 7, 6)
    target = torch.randn(16, 8, 7, 6)  # not a convolution of x: attention has something to learn
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    got_grad = {name: False for name, _ in layer.named_parameters()}
    losses = []
    for _ in range(30):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        for name, p in layer.named_parameters():
            got_grad[name] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (layer.content_share() > 0).any()
    assert (layer.locality_share() > 0).any()
    assert all(got_grad.values()), got_grad


def test_gate_gradient_is_nonzero_at_conversion():
    layer = conv_to_attention(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(4, 4, 6, 6)
    layer(x).pow(2).mean().backward()
    assert layer.content_gate.grad.abs().min() > 0
    assert layer.locality_gate.grad.abs().min() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_factory_kwargs(dtype):
    layer = GatedPositionalAttention2d(4, 6, 3, stride=2, device='meta', dtype=dtype)
    assert all(p.device.type == 'meta' and p.dtype == dtype for p in layer.parameters())
    layer = GatedPositionalAttention2d(4, 6, 3, dtype=dtype)
    assert all(p.dtype == dtype for p in layer.parameters())
    assert layer(torch.randn(1, 4, 5, 5, dtype=dtype)).dtype == dtype


GROUPED = [
    # (C_in, C_out, groups, K): grouped, depthwise, depthwise with channel multiplier 2, ConvNeXt's 7x7 depthwise
    (8, 12, 4, 3),
    (6, 6, 6, 5),
    (4, 8, 4, 3),
    (5, 5, 5, 7),
]


@pytest.mark.parametrize('in_chs,out_chs,groups,kernel_size', GROUPED)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('train', [False, True])
def test_grouped_conversion_equals_grouped_conv(in_chs, out_chs, groups, kernel_size, stride, train):
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups)
    layer = conv_to_attention(conv).train(train)
    assert layer.weight.shape == conv.weight.shape and layer.tap_major_weight().shape[0] == groups
    for height, width in SIZES:
        x = torch.randn(2, in_chs, height, width)
        ref = F.conv2d(x, conv.weight, conv.bias, stride, kernel_size // 2, 1, groups)
        with torch.enable_grad():
            out = layer(x)  # the attention computation
        assert out.shape == ref.shape
        assert relative_error(out.detach(), ref) <= 1e-5, (height, width)


@pytest.mark.parametrize('in_chs,out_chs,groups,kernel_size', [(4, 6, 1, 3), (6, 6, 6, 5), (4, 8, 2, 3)])
@pytest.mark.parametrize('stride', [1, 2])
def test_same_padding_conversion_equals_timm_conv2d_same(in_chs, out_chs, groups, kernel_size, stride):
    """timm's dynamic TF 'SAME' padding: for stride 2 the zeros before a dimension depend on its parity."""
    conv = Conv2dSame(in_chs, out_chs, kernel_size, stride=stride, groups=groups)
    layer = conv_to_attention(conv)
    assert layer.same_padding
    for height, width in SIZES + [(8, 8), (6, 9)]:
        x = torch.randn(2, in_chs, height, width)
        ref = F.conv2d(pad_same(x, [kernel_size] * 2, [stride] * 2), conv.weight, conv.bias, stride, 0, 1, groups)
        with torch.enable_grad():
            out = layer(x)
        with torch.no_grad():
            fast = layer(x)  # inference shortcut
        assert out.shape == ref.shape
        assert relative_error(out.detach(), ref) <= 1e-5 and relative_error(fast, ref) <= 1e-5, (height, width)
    back = attention_to_conv(layer)
    assert type(back) is Conv2dSame and back.groups == groups and torch.equal(back.weight, conv.weight)


def test_grouped_gradients_match_grouped_conv():
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=3)
    layer = conv_to_attention(conv)
    x = torch.randn(2, 6, 7, 5)
    target = torch.randn(2, 12, 4, 3)
    ((conv(x) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    assert relative_error(layer.weight.grad, conv.weight.grad) <= 1e-5
    assert relative_error(layer.bias.grad, conv.bias.grad) <= 1e-5


def test_grouped_tap_projection_costs_the_grouped_conv():
    """The projection GEMM's multiply-adds are those of the grouped convolution, not of a dense one."""
    from torch.utils.flop_counter import FlopCounterMode
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    layer = conv_to_attention(conv)
    mixed = torch.randn(1, 49, 9, 64)
    with FlopCounterMode(display=False) as counter:
        layer._project(mixed, layer.tap_major_weight())
    assert counter.get_total_flops() == 2 * 49 * 9 * 64  # = the depthwise conv's, 64x less than dense
