""" timm's feature APIs on a T-CNN, for what timm's suite selects by module name and so skips for plugins:
forward_intermediates vs feature_info, prune_intermediate_layers, features_only, grad checkpointing,
reset_classifier, group_matcher and layer-wise optimizer groups.

The references are forward hooks on the modules `feature_info` names and hand pooling. The model is the
registered `tcnn_resnet50rs`, made small (fewer blocks, half width) with attention in two stages, random
BatchNorm and half-open gates, so the attention layers matter.
"""
import copy
import math
import re

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

import timm_tcnn  # noqa: F401  registers the models
from timm_tcnn import attention_layers
from helpers import randomize_batchnorm

MODEL = 'tcnn_resnet50rs'
MODEL_ARGS = dict(layers=(1, 1, 2, 2), channels=(32, 64, 128, 256), tcnn_stages=(3, 4))
INPUT_HW = (96, 80)  # non-square; layer4 maps are 3x3, layer3 maps 6x5


@pytest.fixture(scope='module')
def model() -> torch.nn.Module:
    """Eval-mode small tcnn_resnet50rs whose attention layers are no longer convolutions."""
    generator = torch.Generator().manual_seed(0)
    model = randomize_batchnorm(timm.create_model(MODEL, **MODEL_ARGS), generator)
    with torch.no_grad():
        for _, layer in attention_layers(model):
            layer.set_attention_values(content_gate=torch.rand(layer.num_heads, generator=generator) * 0.6 + 0.2)
            layer.set_attention_values(locality_gate=torch.rand(layer.num_heads, generator=generator) * 0.6 + 0.2)
            layer.set_attention_values(
                pos_center=layer.attention_values()['pos_center']
                + torch.randn(layer.pos_center.shape, generator=generator) * 0.3
            )
    assert {n.split('.')[0] for n, _ in attention_layers(model)} == {'layer3', 'layer4'}
    assert not any(layer.is_convolution() for _, layer in attention_layers(model))
    return model.eval()


@pytest.fixture(scope='module')
def x() -> torch.Tensor:
    return torch.randn(2, 3, *INPUT_HW, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def taps(model, x):
    """(outputs of the modules named in feature_info, forward_features output), recorded with forward hooks."""
    outputs = {}
    hooks = [
        model.get_submodule(info['module']).register_forward_hook(
            lambda mod, inp, out, name=info['module']: outputs.__setitem__(name, out.clone())
        )
        for info in model.feature_info
    ]
    try:
        with torch.no_grad():
            features = model.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[info['module']] for info in model.feature_info], features


def _expected_shape(info: dict, batch_size: int = 2):
    return (batch_size, info['num_chs'], *(math.ceil(s / info['reduction']) for s in INPUT_HW))


def test_forward_intermediates_agree_with_feature_info(model, x, taps):
    references, features = taps
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        logits = model(x)
    assert len(intermediates) == len(model.feature_info) == 5
    assert [info['reduction'] for info in model.feature_info] == [2, 4, 8, 16, 32]
    for info, tap, ref in zip(model.feature_info, intermediates, references):
        assert tap.shape == _expected_shape(info), info
        torch.testing.assert_close(tap, ref, rtol=0, atol=0)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(final), logits)


@pytest.mark.parametrize(
    'indices,expected',
    [
        (None, [0, 1, 2, 3, 4]),
        (2, [3, 4]),
        ([0, 2], [0, 2]),
        ([-1], [4]),
        ((1, 3), [1, 3]),
    ],
)
def test_forward_intermediates_indices(model, x, taps, indices, expected):
    references, _ = taps
    with torch.no_grad():
        for stop_early in (False, True):
            for norm in (False, True):  # a ResNet has no final norm: norm=True changes nothing
                out = model.forward_intermediates(
                    x, indices=indices, stop_early=stop_early, norm=norm, intermediates_only=True
                )
                assert isinstance(out, list) and len(out) == len(expected)
                for tap, i in zip(out, expected):
                    torch.testing.assert_close(tap, references[i], rtol=0, atol=0)
        if max(expected) < 4:
            # stopping early returns the last tap as the final features
            final, _ = model.forward_intermediates(x, indices=indices, stop_early=True)
            torch.testing.assert_close(final, references[max(expected)], rtol=0, atol=0)


def test_prune_intermediate_layers(model, x, taps):
    references, _ = taps
    last = len(model.feature_info) - 1
    with torch.no_grad():
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), model(x), msg='prune_head=False at the last index changed the output')
    for i in range(last + 1):
        pruned = copy.deepcopy(model)
        take_indices = pruned.prune_intermediate_layers([i], prune_norm=True)
        assert take_indices == [i]
        with torch.no_grad():
            selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
            torch.testing.assert_close(selected[0], references[i], rtol=0, atol=0, msg=f'pruned tap {i}')
            features = pruned.forward_features(x)
            torch.testing.assert_close(features, references[i], rtol=0, atol=0, msg=f'pruned features {i}')
            torch.testing.assert_close(pruned(x), features, rtol=0, atol=0)  # head and pooling pruned
        kept_attention = [n for n, _ in attention_layers(model) if int(n[len('layer')]) <= i]  # stages 1..i stay
        assert [n for n, _ in attention_layers(pruned)] == kept_attention
        pruned.train()
        sum(f.sum() for f in pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)).backward()
        unused = [n for n, p in pruned.named_parameters() if p.grad is None]
        assert not unused, f'pruned to {i}, unused params: {unused}'


@pytest.mark.parametrize('feature_cls', [None, 'getter', 'hook'])
def test_features_only(model, x, taps, feature_cls):
    references, _ = taps
    out_indices = (1, 3, 4)
    extra = {} if feature_cls is None else dict(feature_cls=feature_cls)
    features = timm.create_model(
        MODEL,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=model.state_dict()),
        features_only=True,
        out_indices=out_indices,
        **MODEL_ARGS,
        **extra,
    ).eval()
    assert features.feature_info.channels() == [model.feature_info[i]['num_chs'] for i in out_indices]
    assert features.feature_info.reduction() == [model.feature_info[i]['reduction'] for i in out_indices]
    assert len(list(attention_layers(features))) == len(list(attention_layers(model)))
    with torch.no_grad():
        outputs = features(x)
    assert len(outputs) == len(out_indices)
    for out, i in zip(outputs, out_indices):
        torch.testing.assert_close(out, references[i], rtol=0, atol=0)


def _outputs_and_grads(model, x, grad_checkpointing: bool):
    model = copy.deepcopy(model)
    model.set_grad_checkpointing(grad_checkpointing)
    out = model(x)
    final, intermediates = model.forward_intermediates(x)
    (out.square().mean() + sum(t.square().mean() for t in intermediates)).backward()
    return out.detach(), [t.detach() for t in intermediates], {n: p.grad for n, p in model.named_parameters()}


def test_grad_checkpointing_same_outputs_and_grads(model, x):
    out, intermediates, grads = _outputs_and_grads(model, x, grad_checkpointing=False)
    out_ckpt, intermediates_ckpt, grads_ckpt = _outputs_and_grads(model, x, grad_checkpointing=True)
    torch.testing.assert_close(out_ckpt, out)
    for tap, tap_ckpt in zip(intermediates, intermediates_ckpt):
        torch.testing.assert_close(tap_ckpt, tap)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads_ckpt.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    gate_grads = [grads[f'{name}.content_gate'].abs().sum() for name, _ in attention_layers(model)]
    assert all(g > 0 for g in gate_grads)  # the attention is in the checked graph


def test_features_only_grad_checkpointing_backward(model, x):
    grads = []
    for grad_checkpointing in (False, True):
        features = timm.create_model(
            MODEL,
            pretrained=True,
            pretrained_cfg_overlay=dict(state_dict=model.state_dict()),
            features_only=True,
            out_indices=(3, 4),
            **MODEL_ARGS,
        ).eval()
        features.set_grad_checkpointing(grad_checkpointing)
        sum(f.square().mean() for f in features(x)).backward()
        grads.append({n: p.grad for n, p in features.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_reset_classifier(model, x, taps):
    _, features = taps
    model = copy.deepcopy(model)
    with torch.no_grad():
        pre_logits = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pre_logits, features.mean((2, 3)))

        model.reset_classifier(7)
        assert model.num_classes == 7 and model.fc.in_features == model.num_features == features.shape[1]
        assert model(x).shape == (2, 7)
        torch.testing.assert_close(model(x), features.mean((2, 3)) @ model.fc.weight.T + model.fc.bias)

        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre_logits)

        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), features, rtol=0, atol=0)

        model.reset_classifier(3, 'max')
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.amax((2, 3)))
        model.reset_classifier(5)  # keeps the pooling
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.amax((2, 3)))


@pytest.mark.parametrize('coarse', [False, True])
def test_group_matcher_covers_every_parameter(model, coarse):
    matcher = model.group_matcher(coarse=coarse)
    names = [n for n, _ in model.named_parameters()]
    # every parameter but the classifier is claimed by a pattern (the classifier joins the last group)
    unmatched = [n for n in names if not any(re.match(p, n) for p in matcher.values())]
    assert unmatched == ['fc.weight', 'fc.bias']

    groups = group_parameters(model, matcher)  # group id -> parameter names
    assert sorted(n for members in groups.values() for n in members) == sorted(names)
    group_of = {n: g for g, members in groups.items() for n in members}
    assert group_of['conv1.0.weight'] == 0 and group_of['fc.weight'] == max(groups)
    for name, _ in attention_layers(model):
        block = name.rsplit('.', 1)[0]  # layer4.1.conv2 -> layer4.1
        for param in ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center', 'qk.weight'):
            assert group_of[f'{name}.{param}'] == group_of[f'{block}.conv1.weight'], (name, param)
    expected_groups = 1 + (4 if coarse else sum(len(getattr(model, f'layer{i}')) for i in range(1, 5))) + 1
    assert len(groups) == expected_groups


def test_layer_decay_optimizer_groups(model):
    """timm's layer-wise lr decay puts every parameter in exactly one group, gates without weight decay."""
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    params = {id(p): n for n, p in model.named_parameters()}
    seen = [params[id(p)] for g in optimizer.param_groups for p in g['params']]
    assert sorted(seen) == sorted(params.values())
    setting = {params[id(p)]: (g['weight_decay'], g['lr_scale']) for g in optimizer.param_groups for p in g['params']}
    no_decay = model.no_weight_decay()
    assert no_decay and all(setting[n][0] == 0 for n in no_decay)
    for name, _ in attention_layers(model):
        block = name.rsplit('.', 1)[0]
        assert setting[f'{name}.weight'] == setting[f'{block}.conv1.weight']  # same block, same lr scale and decay
        assert setting[f'{name}.content_gate'][1] == setting[f'{block}.conv1.weight'][1]
    assert setting['conv1.0.weight'][1] < setting['layer4.0.conv1.weight'][1] < setting['fc.weight'][1]
