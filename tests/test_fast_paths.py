""" The fast computation of GatedPositionalAttention2d against a plain reference of the same maths:
same outputs and gradients, for every path (autograd, inference cache, conv and no-content shortcuts). """
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from timm_tcnn import GatedPositionalAttention2d, conv_to_attention
from timm_tcnn.layers import default_block_bytes
from timm_tcnn.layers.functions import AttentionMix, MixGeometry, content_mix_reference
from timm_tcnn.layers.positional import ClosedFormPositional, positional_mixing, positional_tables
from timm_tcnn.tools.analysis import attention_map, content_attention, content_logits, positional_attention
from helpers import (
    assert_matches_plain_reference,
    assert_same_grads,
    fine_tuned_layer,
    grads,
    plain_forward,
    relative_error,
)


@pytest.mark.parametrize('kernel_size,stride,bias', [(3, 1, True), (3, 2, False), (5, 1, False), (5, 2, True)])
@pytest.mark.parametrize('size', [(7, 7), (6, 9), (1, 4), (2, 2)])
def test_forward_and_gradients_match_plain_reference(kernel_size, stride, bias, size):
    layer = fine_tuned_layer(kernel_size=kernel_size, stride=stride, bias=bias)
    x = torch.randn(3, 6, *size, requires_grad=True)
    ref, out = plain_forward(layer, x), layer(x)
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-5
    target = torch.randn_like(ref)
    assert_same_grads(grads(layer, x, out, target), grads(layer, x, ref, target))


@pytest.mark.parametrize('block_bytes', [1, 3000])
@pytest.mark.parametrize('stride', [1, 2])
def test_query_blocks_match_plain_reference(block_bytes, stride):
    """Attention processed in blocks of 1 query and of a few queries (ragged last block)."""
    layer = fine_tuned_layer(stride=stride)
    layer.attention_block_bytes = block_bytes
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    assert_matches_plain_reference(layer, x)
    with torch.no_grad():
        layer.set_attention_values(content_gate=0.)  # positional-only inference path, in blocks too
        assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5


@pytest.mark.parametrize('amp', [False, True])
@pytest.mark.parametrize('stride,block,everywhere', [(1, 100, True), (1, 2, True), (2, 100, True), (2, 3, True),
                                                     (2, 100, False), (2, 3, False)])
def test_attention_mix_function_matches_its_composition(amp, stride, block, everywhere):
    """The attention mixing (positional attention, Q/K projection, softmax, blend and mixing GEMM as one autograd
    function that recomputes the attention in its backward pass) equals its composition in standard operations,
    forward and the gradients of all four inputs, with a gradient floor above some gates (one at 0) and a Gaussian
    off its tap, in one block of queries and in several, in float32 and under bf16 autocast (there against the
    composition in float64: bf16 rounds both ways of computing by about 2%); no double backward."""
    d, floor, kernel = 3, 0.1, 3
    heads = kernel * kernel
    x = torch.randn(2, 6, 6, 7, requires_grad=True)
    qk_weight = torch.randn(heads * 2 * d, 6, requires_grad=True)
    values = torch.cat([
        torch.linspace(0, 0.9, heads), torch.linspace(0.05, 1, heads), torch.linspace(-1, 2, heads),
        torch.randn(2 * heads)]).requires_grad_()
    inputs = (x, qk_weight, values)
    geometry = MixGeometry(6, 7, stride, (stride - 1, 0), d, d ** -0.5, block, everywhere)  # 'same' padding's start
    same = stride == 2

    def fused():
        builder = ClosedFormPositional(positional_tables(kernel, stride, 6, 7, same))
        return AttentionMix.apply(*inputs, builder, geometry, floor)

    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        got = fused()
    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs) if amp else inputs
    tables = positional_tables(kernel, stride, 6, 7, same, dtype=ref_inputs[-1].dtype)
    positional = positional_mixing(ref_inputs[-1], tables, floor)
    ref = content_mix_reference(*ref_inputs[:2], positional, ref_inputs[-1], geometry, floor)
    num_queries = positional.shape[0]
    assert got.dtype == (torch.bfloat16 if amp else torch.float32)
    tol = 5e-2 if amp else 1e-5  # bf16 GEMMs round their outputs to 8 bits
    assert got.shape == ref.shape == (2, num_queries, heads, 6) and relative_error(got.double(), ref.double()) <= tol
    target = torch.randn(got.shape)
    assert_same_grads([g.double() for g in torch.autograd.grad((got.float() * target).sum(), inputs)],
                      torch.autograd.grad((ref * target.to(ref.dtype)).sum(), ref_inputs), tol=tol)
    grad_q, = torch.autograd.grad((fused() * target).sum(), qk_weight, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_q.sum().backward()


def test_gpu_block_size_runs_on_cpu_with_the_same_results():
    """The GPU's default blocks (one block for a batch that a CPU splits into many), run on CPU."""
    layer = fine_tuned_layer(in_chs=8, out_chs=8, stride=2)
    x = torch.randn(4, 8, 40, 40, requires_grad=True)
    cpu_bytes, cuda_bytes = default_block_bytes(torch.device('cpu')), default_block_bytes(torch.device('cuda'))
    assert cuda_bytes > 4 * 20 * 20 * 9 * 40 * 40 * 4 > cpu_bytes / 8
    layer.attention_block_bytes = cpu_bytes // 8  # several blocks
    blocked = layer(x)
    layer.attention_block_bytes = cuda_bytes
    whole = layer(x)
    ref = plain_forward(layer, x)
    assert relative_error(whole, ref) <= 1e-5 and relative_error(blocked, ref) <= 1e-5
    target = torch.randn_like(ref)
    assert_same_grads(grads(layer, x, whole, target), grads(layer, x, ref, target))


def test_gradients_match_at_conversion():
    """Gates at 0: the straight-through gate gradients must still equal the reference's."""
    layer = conv_to_attention(nn.Conv2d(6, 5, 3, padding=1))
    x = torch.randn(2, 6, 5, 6, requires_grad=True)
    target = torch.randn(2, 5, 5, 6)
    assert_same_grads(grads(layer, x, layer(x), target), grads(layer, x, plain_forward(layer, x), target))


def test_channels_last_in_channels_last_out():
    layer = fine_tuned_layer(stride=2)
    x = torch.randn(2, 6, 9, 8)
    x_cl = x.to(memory_format=torch.channels_last)
    out, out_cl = layer(x), layer(x_cl)
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out_cl, out) <= 1e-6


def test_inference_path_matches_autograd_path_and_follows_updates():
    layer = fine_tuned_layer(stride=2)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        for _ in range(2):  # second call reads the cache
            assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).mean().backward()
    optimizer.step()  # in-place updates must invalidate the cache
    with torch.no_grad():
        assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5
        layer.load_state_dict(fine_tuned_layer(stride=2).state_dict())
        assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5


def test_inference_cache_follows_map_size():
    layer = fine_tuned_layer()
    with torch.no_grad():
        for size in [(5, 5), (7, 3), (5, 5)]:
            x = torch.randn(1, 6, *size)
            assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5


def test_inference_shortcuts_match_reference():
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = conv_to_attention(conv)
    x = torch.randn(2, 6, 8, 7)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))  # still the convolution: runs it
        layer.set_attention_values(locality_gate=torch.eye(9)[3] * 0.5)  # positional only: content attention skipped
        assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5
        layer.set_attention_values(content_gate=torch.eye(9)[2])  # one content head: the full path
        assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5


@pytest.mark.parametrize('groups,stride', [(1, 1), (2, 2)])
@pytest.mark.parametrize('block_bytes', [None, 3000])
def test_inference_with_closed_heads_matches_plain_reference(groups, stride, block_bytes):
    """Inference mixes the heads whose content gate is 0 with one positional matrix for the whole batch and
    the others with their content, then sums both projections; in one block and in several."""
    layer = fine_tuned_layer(out_chs=4, stride=stride, groups=groups)
    layer.attention_block_bytes = block_bytes
    with torch.no_grad():
        layer.set_attention_values(content_gate=layer.content_share() * (torch.arange(9) % 3 == 0))
    assert 0 < int((layer.content_share() > 0).sum()) < layer.num_heads
    for x in (torch.randn(3, 6, 7, 9), torch.randn(3, 6, 7, 9).to(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert relative_error(layer(x), plain_forward(layer, x)) <= 1e-5


@pytest.mark.parametrize('stride', [1, 2])
def test_flops_are_conv_plus_attention_without_expansion(stride):
    """Multiply-adds: tap projection at the queries (= the conv), Q/K projections (on CPU the queries at their
    positions only; on CUDA stride 2 projects them everywhere: `test_attention_mix_function_matches_its_composition`),
    logits and one full-width mixing of the input per head; the positional matrix is built once for the batch from
    outer products of row and column factors (no matrix products); nothing is expanded per head or per sample."""
    B, C, C_out, H, d, heads = 2, 16, 24, 8, 4, 9
    layer = GatedPositionalAttention2d(C, C_out, 3, stride=stride, qk_dim=d)
    with torch.no_grad():
        layer.set_attention_values(content_gate=0.5)
    Nq, N = (H // stride) ** 2, H * H
    per_sample = C_out * C * heads * Nq + heads * d * C * (Nq + N) + heads * Nq * N * (d + C)
    expected = 2 * B * per_sample
    x = torch.randn(B, C, H, H)
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled), FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == expected


def test_public_attention_outputs():
    layer = fine_tuned_layer(stride=2)
    x = torch.randn(2, 6, 7, 5)
    assert content_attention(layer, x).shape == positional_attention(layer, x).shape == (2, 6, 9, 12)
    attn = attention_map(layer, x)
    assert attn.shape == (2, 12, 9, 35) and attn.dtype == torch.float32
    # rows sum to at most 1 (zero tokens outside the image) and at least the content share (a softmax)
    rows = attn.sum(-1)
    assert (rows <= 1 + 1e-5).all() and (rows >= layer.content_share() - 1e-6).all()


def test_benchmark_state_is_fine_tuned_like():
    """The benchmark's T-CNN state: every gate strictly inside (0, 1) and all attention parameters
    moved off their set values by the optimiser steps, so no conversion-state shortcut applies."""
    import timm

    from timm_tcnn.models.convert import attention_layers
    from timm_tcnn.tools.bench import fine_tune_like
    model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), num_classes=10)
    fine_tune_like(model, steps=2, gate=0.3, alpha=0.5, img_size=64, batch_size=2)
    assert not model.training
    for _, layer in attention_layers(model):
        for gate in (layer.content_share(), layer.locality_share()):
            assert ((gate > 0) & (gate < 1)).all() and not torch.equal(gate, torch.full_like(gate, 0.3))
        alpha = layer.attention_values()['pos_log_alpha']
        assert not torch.equal(alpha, torch.full_like(alpha, -0.6931471805599453))
        assert not layer.is_convolution()


def test_benchmark_spread_state():
    """The default benchmark state: per-head strengths over [0.25, 4] with 1 among them, half the content gates
    closed (exactly 0 after clamping) and the rest open, content logits of std 4 on each layer's own inputs;
    the content branch runs in inference, so no shortcut of the conversion state applies."""
    import math

    import timm

    from timm_tcnn.models.convert import attention_layers
    from timm_tcnn.tools.bench import _layer_inputs, spread_state
    model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), num_classes=10)
    spread_state(model, img_size=64, seed=0)
    assert not model.training
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for layer, layer_input in _layer_inputs(model, x):
        alpha = layer.attention_values()['pos_log_alpha'].exp()
        assert math.isclose(alpha.min(), 0.25, rel_tol=1e-5) and math.isclose(alpha.max(), 4., rel_tol=1e-5)
        assert (alpha == 1).sum() == 1
        content = layer.content_share()
        assert (content == 0).sum() == layer.num_heads // 2
        assert ((content[content > 0] >= 0.05) & (content[content > 0] <= 0.3)).all()
        locality = layer.locality_share()
        assert ((locality >= 0.05) & (locality <= 0.3)).all()
        with torch.no_grad():
            assert math.isclose(content_logits(layer, layer_input).std(), 4., rel_tol=1e-3)
    assert len(list(attention_layers(model))) == 1  # stage 4 of a one-block-per-stage ResNet


@pytest.mark.parametrize('bias', [True, False])
def test_channels_first_projection_equals_the_projection(bias):
    """The projection CUDA's inference takes for NCHW maps (one GEMM per sample, channels first) equals the one
    GEMM over every sample followed by the transposing copy, alone and added to a first part."""
    layer = fine_tuned_layer(bias=bias)
    x = torch.randn(3, 6, 5, 4)
    mixed, first = torch.randn(2, 3, 20, 9, 6).unbind(0)
    weight = layer.tap_major_weight()
    with torch.no_grad():
        for add_to in (None, layer._project(first, weight)):
            got = layer._project_channels_first(mixed, weight, layer.bias, None if add_to is None else
                                                add_to.view(3, 5, 4, 5).permute(0, 3, 1, 2).reshape(3, 5, 20))
            ref = layer._project(mixed, weight, layer.bias, add_to)
            assert relative_error(layer._to_map(got, x), layer._to_map(ref, x)) <= 1e-6
