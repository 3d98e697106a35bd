""" Model-level conversion against timm's own CNNs, state-dict conversion and error messages. """
import pytest
import timm
import torch
import torch.nn as nn

from timm_tcnn import (
    GatedPositionalAttention2d, attention_layers, conv_to_attention, convert_cnn_state_dict, transform_cnn,
)
from conftest import randomize_batchnorm, relative_error


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
    (nn.Conv2d(4, 4, 3, padding=1, groups=2), 'groups=2'),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), 'dilation'),
    (nn.Conv2d(4, 4, 2, padding=1), 'kernel 2x2'),
    (nn.Conv2d(4, 4, 3, padding=0), 'padding=(0, 0)'),
    (nn.Conv2d(4, 4, 3, stride=3, padding=1), 'stride=(3, 3)'),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), 'padding_mode'),
])
def test_unsupported_convolutions_raise(conv, reason):
    with pytest.raises(ValueError, match='my.conv: cannot convert') as info:
        conv_to_attention(conv, name='my.conv')
    assert reason in str(info.value)


def test_transform_cnn_errors_and_skip():
    with pytest.raises(ValueError, match=r'stage index \[5\] out of range: this model has stages \[1, 2, 3, 4\]'):
        transform_cnn(timm.create_model('resnet18'), stages=(3, 5))
    with pytest.raises(ValueError, match='has no stages layer1'):
        transform_cnn(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    dilated = timm.create_model('resnet18', output_stride=8)  # layer3 and layer4 are dilated
    with pytest.raises(ValueError, match='No convertible convolution'):
        transform_cnn(dilated, stages=(4,), unsupported='skip')
    with pytest.raises(ValueError, match=r"layer4.0.conv2: cannot convert .* groups=32 .*unsupported='skip'"):
        transform_cnn(timm.create_model('resnext50_32x4d'), stages=(4,))
