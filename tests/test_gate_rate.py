""" The learning-rate multiplier of the gates and positional parameters (`gate_lr_scale`). """

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_tcnn import conv_to_attention
from timm_tcnn.layers import RATE_SCALED_PARAMS
from helpers import attention_path, relative_error


@pytest.mark.parametrize('scale', [0.5, 1., 30., 1000.])
@pytest.mark.parametrize('stride', [1, 2])
def test_identity_and_gradient_at_conversion(scale, stride):
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=1)
    layer = conv_to_attention(conv, gate_lr_scale=scale)
    x = torch.randn(2, 5, 9, 6)
    out = layer(x)  # autograd on: the attention computation itself
    assert relative_error(out.detach(), F.conv2d(x, conv.weight, conv.bias, stride, 1)) <= 1e-5
    assert (layer.content_share() == 0).all() and (layer.locality_share() == 0).all()
    out.pow(2).mean().backward()
    assert layer.content_gate.grad.abs().min() > 0 and layer.locality_gate.grad.abs().min() > 0


def _train(layer: nn.Module, make_optimizer, steps: int = 6) -> dict:
    """Values of the gates and positional parameters after `steps` optimizer steps on a fixed regression."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, 6, generator=generator)
    target = torch.randn(4, 4, 6, 6, generator=generator)
    optimizer = make_optimizer(layer)
    for _ in range(steps):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {**layer.attention_values(), 'weight': layer.weight.detach().clone()}


def _groups(layer: nn.Module, lr: float, scale: float) -> list:
    scaled = [layer.get_parameter(name) for name in RATE_SCALED_PARAMS]
    ids = {id(p) for p in scaled}
    return [
        dict(params=[p for p in layer.parameters() if id(p) not in ids], lr=lr),
        dict(params=scaled, lr=lr * scale),
    ]


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_scale_is_a_learning_rate_multiplier(optimizer):
    """A layer with gate_lr_scale S and one learning rate follows the same trajectory as a layer with scale 1
    whose gate and positional parameters have their own learning rate S x lr (a separate parameter group)."""
    lr, scale = 1e-2, 30.
    conv = nn.Conv2d(4, 4, 3, padding=1)
    torch.manual_seed(0)
    scaled = conv_to_attention(conv, gate_lr_scale=scale)
    reference = conv_to_attention(conv, gate_lr_scale=1.)
    reference.load_state_dict(scaled.state_dict())  # same Q/K; values kept across scales
    make = {
        'sgd': lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        'adamw': lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.),
    }[optimizer]
    got = _train(scaled, lambda layer: make(layer.parameters(), lr))
    ref = _train(reference, lambda layer: make(_groups(layer, lr, scale), lr))
    for name, value in ref.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-6), name
    moved = got['content_gate'].abs().max()
    assert moved > 0
    # and not what one learning rate gives without the scale
    plain = _train(conv_to_attention(conv, gate_lr_scale=1.), lambda layer: make(layer.parameters(), lr))
    assert not torch.allclose(plain['content_gate'], got['content_gate'], rtol=0.1)


def test_adam_moves_gates_scale_times_lr_per_step():
    """Adam's first step moves every parameter by lr (sign of its gradient): a gate by exactly scale x lr."""
    lr, scale = 1e-3, 30.
    layer = conv_to_attention(nn.Conv2d(4, 4, 3, padding=1), gate_lr_scale=scale)
    values = _train(layer, lambda layer: torch.optim.Adam(layer.parameters(), lr=lr), steps=1)
    assert torch.allclose(values['content_gate'].abs(), torch.full((9,), scale * lr), rtol=1e-4)


def test_state_dict_keeps_values_across_scales():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    source = conv_to_attention(conv, gate_lr_scale=10.)
    source.set_attention_values(content_gate=torch.linspace(0, 0.8, 9), locality_gate=0.25, pos_log_alpha=-0.5)
    x = torch.randn(2, 4, 7, 5)
    for scale in (1., 10., 100.):
        target = conv_to_attention(conv, gate_lr_scale=scale)
        target.load_state_dict(source.state_dict())
        assert float(target.gate_lr_scale) == scale  # the layer keeps its own rate
        for name, value in source.attention_values().items():
            assert torch.allclose(target.attention_values()[name], value, rtol=1e-6), name
        assert relative_error(attention_path(target, x), attention_path(source, x)) <= 1e-6


def test_state_dict_without_scale_was_saved_with_scale_one():
    """Attention entries saved before the scale existed hold the values themselves."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    old = conv_to_attention(conv, gate_lr_scale=1.)
    old.set_attention_values(content_gate=0.4)
    state = {k: v for k, v in old.state_dict().items() if k != 'gate_lr_scale'}
    layer = conv_to_attention(conv, gate_lr_scale=30.)
    layer.load_state_dict(state)
    assert torch.allclose(layer.content_share(), torch.full((9,), 0.4))


def test_bad_scale():
    with pytest.raises(ValueError, match='gate_lr_scale must be > 0'):
        conv_to_attention(nn.Conv2d(4, 4, 3, padding=1), gate_lr_scale=0.)
    with pytest.raises(ValueError, match='content_gate'):
        conv_to_attention(nn.Conv2d(4, 4, 3, padding=1)).set_attention_values(weight=1.)


@pytest.mark.parametrize('stride', [1, 2])
def test_grad_floor_lets_closed_heads_learn(stride):
    """With a linear loss the gradient of the content attention does not depend on the forward state, so Q/K,
    alpha and centre of a closed head (gate 0, floor f) get exactly the gradients of a head open at f; the
    forward pass and the gates' gradients are those of the layer without a floor."""
    floor = 0.1
    conv = nn.Conv2d(4, 5, 3, stride=stride, padding=1)
    x = torch.randn(2, 4, 7, 6)
    weights = torch.randn(2, 5, *conv(x).shape[-2:])

    def grads(grad_floor: float, content: float, locality: float):
        torch.manual_seed(0)  # same Q/K
        layer = conv_to_attention(conv, grad_floor=grad_floor)
        layer.set_attention_values(content_gate=content, locality_gate=locality, pos_log_alpha=-0.5)
        out = layer(x)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    closed_out, closed = grads(floor, 0., 0.)
    plain_out, plain = grads(0., 0., 0.)
    assert torch.equal(closed_out, plain_out)  # the forward pass is untouched
    assert relative_error(closed_out, F.conv2d(x, conv.weight, conv.bias, stride, 1)) <= 1e-5
    assert plain['qk.weight'].abs().max() == 0 and plain['pos_log_alpha'].abs().max() == 0  # nothing learns
    for name in ('content_gate', 'locality_gate', 'weight'):
        assert torch.allclose(closed[name], plain[name], rtol=1e-5, atol=1e-7), name
    _, content_open = grads(0., floor, 0.)
    for part in (0, 1):  # queries, keys
        got, want = (grads['qk.weight'].view(9, 2, -1)[:, part] for grads in (closed, content_open))
        assert got.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9), part
    _, locality_open = grads(0., 0., floor)
    for name in ('pos_log_alpha', 'pos_center'):
        assert closed[name].abs().max() > 0
        assert torch.allclose(closed[name], locality_open[name], rtol=1e-4, atol=1e-9), name
