""" Model-level conversion against timm's own CNNs, state-dict conversion and error messages. """
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import StdConv2d

from timm_tcnn import (
    attention_layers,
    conv_stages,
    conv_to_attention,
    convert_cnn_state_dict,
    transform_cnn,
)
from helpers import randomize_batchnorm, relative_error


@pytest.mark.parametrize('model_name', ['resnet18', 'resnet50d', 'resnetrs50'])
def test_transform_cnn_keeps_logits(model_name):
    generator = torch.Generator().manual_seed(0)
    cnn = randomize_batchnorm(timm.create_model(model_name, num_classes=10), generator).eval()
    inputs = [torch.randn(2, 3, 64, 64, generator=generator), torch.randn(2, 3, 96, 72, generator=generator)]
    refs = [cnn(x) for x in inputs]
    tcnn = transform_cnn(cnn, stages=(3, 4))
    assert tcnn is cnn
    layers = dict(attention_layers(tcnn))
    assert layers and all(name.startswith(('layer3', 'layer4')) for name in layers)
    for x, ref in zip(inputs, refs):
        assert relative_error(tcnn(x), ref) <= 1e-4


def test_transform_cnn_basic_block_converts_both_convs_and_strided_option():
    model = transform_cnn(timm.create_model('resnet18'), stages=(4,), convert_strided=False)
    assert sorted(dict(attention_layers(model))) == ['layer4.0.conv2', 'layer4.1.conv1', 'layer4.1.conv2']
    model = transform_cnn(timm.create_model('resnet18'), stages=(4,))
    assert sorted(dict(attention_layers(model))) == [
        'layer4.0.conv1', 'layer4.0.conv2', 'layer4.1.conv1', 'layer4.1.conv2']


def test_state_dict_converter_and_strict_loading_of_cnn_weights():
    cnn = randomize_batchnorm(timm.create_model('resnet18', num_classes=5), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 3, 48, 40)
    ref = cnn(x)
    tcnn = transform_cnn(timm.create_model('resnet18', num_classes=5), stages=(3, 4)).eval()
    cnn_state = cnn.state_dict()
    converted = convert_cnn_state_dict(cnn_state, tcnn)
    assert set(converted) == set(tcnn.state_dict())
    assert convert_cnn_state_dict(converted, tcnn) == converted  # already converted: unchanged
    tcnn.load_state_dict(converted)
    assert relative_error(tcnn(x), ref) <= 1e-4
    # a trained T-CNN loading CNN weights strictly is reset to the exact conversion
    for _, layer in attention_layers(tcnn):
        with torch.no_grad():
            layer.set_attention_values(content_gate=0.5)
    tcnn.load_state_dict(cnn_state, strict=True)
    assert relative_error(tcnn(x), ref) <= 1e-4


@pytest.mark.parametrize('conv,reason', [
    (StdConv2d(4, 4, 3, padding=1), 'StdConv2d is not nn.Conv2d'),
    (nn.Conv2d(4, 4, 3, padding=(2, 1), dilation=(2, 1)), 'dilation=(2, 1)'),
    (nn.Conv2d(4, 4, 3, padding=1, dilation=2), 'padding=(1, 1)'),
    (nn.Conv2d(4, 4, 2, padding=1), 'kernel 2x2'),
    (nn.Conv2d(4, 4, 3, padding=0), 'padding=(0, 0)'),
    (nn.Conv2d(4, 4, 3, stride=3, padding=1), 'stride=(3, 3)'),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), 'padding_mode'),
])
def test_unsupported_convolutions_raise(conv, reason):
    with pytest.raises(ValueError, match='my.conv: ') as info:
        conv_to_attention(conv, name='my.conv')
    assert reason in str(info.value)


def test_transform_cnn_errors_and_skip():
    with pytest.raises(ValueError, match=r'ResNet has no stage \[5\]: its stages are \[0, 1, 2, 3, 4\]'):
        transform_cnn(timm.create_model('resnet18'), stages=(3, 5))
    with pytest.raises(ValueError, match='has no stage'):
        transform_cnn(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))  # full resolution: no stage
    dilated = timm.create_model('resnet18', output_stride=8)  # layer3 and layer4 are dilated, at reduction 8
    with pytest.raises(ValueError, match=r'has no stage \[5\]: its stages are \[0, 1, 2, 3, 4\]'):
        transform_cnn(dilated, stages=(5,))  # the stages at output_stride 32
    strided_and_reflect = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    with pytest.raises(ValueError, match=r'No convertible convolution'):
        transform_cnn(strided_and_reflect, stages=0, convert_strided=False, unsupported='skip')


def test_transform_cnn_is_all_or_nothing():
    model = timm.create_model('resnet18')
    model.layer4[1].conv2.padding_mode = 'reflect'  # one convolution without an exact attention form
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2: cannot convert .*padding_mode.*unsupported='skip'"):
        transform_cnn(model, stages=(4,))
    assert not list(attention_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    transform_cnn(model, stages=(4,), unsupported='skip')
    assert sorted(dict(attention_layers(model))) == ['layer4.0.conv1', 'layer4.0.conv2', 'layer4.1.conv1']


def test_stages_follow_reduction_on_every_family():
    """Stage i = output reduction 2^(i+1), checked against timm's feature_info of each family."""
    for name in ('resnet18', 'convnext_atto', 'efficientnet_b0', 'regnety_002', 'cspresnet50'):
        model = timm.create_model(name, device='meta')
        stages = conv_stages(model)
        modules = dict(model.named_modules())
        for info in model.feature_info:
            inside = [n for n in stages if n.startswith(info['module'] + '.')]
            stage = int(math.log2(info['reduction'])) - 1
            # every spatial conv of a feature stage sits at its reduction, but a strided first conv of the next
            assert all(stages[n] == stage or modules[n].stride != (1, 1) for n in inside), (name, info)


def test_building_a_tcnn_draws_what_its_cnn_draws():
    """Same seed, same classifier initialisation and the same generator state afterwards (train.py's data order)."""
    torch.manual_seed(3)
    cnn = timm.create_model('resnet18', num_classes=7)
    after_cnn = torch.randn(4)
    torch.manual_seed(3)
    tcnn = timm.create_model('tcnn_resnet18', num_classes=7)
    after_tcnn = torch.randn(4)
    assert torch.equal(after_cnn, after_tcnn)
    assert torch.equal(cnn.fc.weight, tcnn.fc.weight) and torch.equal(
        cnn.layer4[1].conv2.weight, tcnn.layer4[1].conv2.weight
    )


def test_transform_cnn_refuses_a_vision_transformer():
    """A ViT has no spatial convolution (its patch embedding's kernel equals its stride): said so, not timm's
    assertion about the input size of the probing forward pass; the model is left as it was."""
    from timm_tcnn.errors import InputError

    vit = timm.create_model('vit_tiny_patch16_224')
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(InputError, match=r'VisionTransformer has no spatial convolution .* not vision transformers'):
        transform_cnn(vit, stages=(4,))
    assert vit.state_dict().keys() == before.keys()
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in before.items())
