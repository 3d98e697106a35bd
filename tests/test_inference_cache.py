""" What a layer keeps between inference calls can never serve a stale result, and stays within its byte budget. """
import pytest
import torch
import torch.nn as nn

from timm_tcnn import conv_to_attention
from timm_tcnn.layers import GatedPositionalAttention2d
from timm_tcnn.layers.positional import TABLES
from helpers import relative_error


def open_layer(stride: int = 1) -> GatedPositionalAttention2d:
    layer = conv_to_attention(nn.Conv2d(6, 5, 3, stride, 1), gate_lr_scale=30.)
    with torch.no_grad():
        layer.set_attention_values(
            content_gate=torch.linspace(0., 0.6, 9) * (torch.arange(9) % 2),  # open and closed heads
            locality_gate=torch.linspace(0.1, 0.5, 9))
        layer.qk.weight.normal_(std=0.5)
    return layer.eval()


def fresh_copy(layer: GatedPositionalAttention2d) -> GatedPositionalAttention2d:
    copy = GatedPositionalAttention2d(6, 5, 3, layer.stride, gate_lr_scale=30.).eval()
    copy.load_state_dict(layer.state_dict())
    return copy


def data_write(layer, name):
    layer.get_parameter(name).data.add_(0.05)


def copy_write(layer, name):
    param = layer.get_parameter(name)
    with torch.no_grad():
        param.copy_(param + 0.05)


def state_dict_write(layer, name):
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state[name] = state[name] + 0.05
    layer.load_state_dict(state)


def foreach_write(layer, name):
    with torch.no_grad():
        torch._foreach_add_([layer.get_parameter(name)], 0.05)


def optimizer_write(layer, name):
    param = layer.get_parameter(name)
    optimizer = torch.optim.SGD([param], lr=1.)
    param.grad = torch.full_like(param, -0.05)
    optimizer.step()


WRITES = [data_write, copy_write, state_dict_write, foreach_write, optimizer_write]
PARAMS = ['weight', 'bias', 'content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center', 'qk.weight']


@pytest.mark.parametrize('write', WRITES)
@pytest.mark.parametrize('name', PARAMS)
def test_inference_follows_every_kind_of_write(write, name):
    """Each parameter changed in place by each kind of write, between two inference calls (eval, no grad): the
    second call equals a fresh layer built from the new state dict."""
    layer = open_layer()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        before = layer(x)
        write(layer, name)
        after = layer(x)
        expected = fresh_copy(layer)(x)
    assert relative_error(after, expected) <= 1e-6
    assert relative_error(after, before) > 1e-4  # the write changed the output


@pytest.mark.parametrize('write', WRITES)
def test_gates_opened_through_writes_leave_the_convolution_shortcut(write):
    """A freshly converted layer runs as its convolution in inference; opening its gates in place, by any kind of
    write, must end that at once."""
    conv = nn.Conv2d(6, 5, 3, 1, 1)
    layer = conv_to_attention(conv, gate_lr_scale=30.).eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))
        write(layer, 'content_gate')
        assert relative_error(layer(x), fresh_copy(layer)(x)) <= 1e-6
        assert relative_error(layer(x), conv(x)) > 1e-3


def test_hand_written_ema_of_a_model():
    """An EMA written with `.data` (as many training scripts do) evaluates as its weights say."""
    ema, model = open_layer(stride=2), open_layer(stride=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        ema(x)  # builds the inference plan
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.data.mul_(0.5).add_(p.data, alpha=0.5)
        assert relative_error(ema(x), fresh_copy(ema)(x)) <= 1e-6


def test_cache_is_bounded_by_bytes():
    """Plans for many map sizes stay within `inference_cache_bytes`; the most recent are kept, a plan larger than
    the budget only while it is the newest (else every call at that size would rebuild it), and results never depend
    on what was kept."""
    layer = open_layer()
    budget = 600_000
    layer.inference_cache_bytes = budget
    with torch.no_grad():
        for size in range(6, 30, 2):
            x = torch.randn(1, 6, size, size)
            out = layer(x)
            assert layer._plans.nbytes <= budget or len(layer._plans) == 1  # within the budget, or the newest alone
            assert relative_error(out, fresh_copy(layer)(x)) <= 1e-6
        assert len(layer._plans) >= 1  # the latest plans fit
        layer.inference_cache_bytes = 1000  # smaller than any plan
        assert len(layer._plans) == 1  # the newest alone
        plan = layer._inference_plan(x.shape[-2], x.shape[-1], x.device)
        assert relative_error(layer(x), fresh_copy(layer)(x)) <= 1e-6
        assert layer._inference_plan(x.shape[-2], x.shape[-1], x.device) is plan  # reused, not rebuilt
        layer(torch.randn(1, 6, 9, 9))
        assert len(layer._plans) == 1 and layer._inference_plan(x.shape[-2], x.shape[-1], x.device) is not plan
    default = GatedPositionalAttention2d(6, 5)
    assert default.inference_cache_bytes == 64 * 2 ** 20


def test_shape_tables_are_bounded_by_bytes():
    """The one-hot and offset tables every layer shares, per map size, stay within their budget."""
    layer = open_layer()
    budget = TABLES.max_bytes
    try:
        TABLES.max_bytes = 1_000_000
        TABLES.trim()
        with torch.no_grad():
            for size in range(6, 30, 2):
                layer(torch.randn(1, 6, size, size))
                assert TABLES.nbytes <= 1_000_000
        assert len(TABLES) >= 1
    finally:
        TABLES.max_bytes = budget
