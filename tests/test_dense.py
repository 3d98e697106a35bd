""" T-CNNs as dense-prediction backbones: stage numbers independent of `output_stride`, the layers every registered
variant converts, `features_only` at output_stride 16 and 8 against timm's own CNN with converted Hub weights, and
the CNN's own error for an output_stride it refuses. """
import math

import pytest
import timm
import torch
import torch.nn as nn

import timm_tcnn
from timm_tcnn import attention_layers, conv_stages, transform_cnn
from helpers import OfflineHub, randomize_batchnorm, relative_error

FAMILIES = sorted({row.cnn for row in timm_tcnn.VARIANTS.values()}
                  - {f'resnetrs{d}' for d in (101, 152, 200, 270, 350, 420)})
FAST = {'tcnn_resnet18', 'tcnn_convnext_atto', 'tcnn_efficientnet_b0', 'tcnn_mobilenetv3_large_100'}
FEATURES_ONLY_OUTPUT_STRIDE = {'mobilenetv3_large_100'}  # output_stride only in its features class, MobileNetV3Features


def _dense(cnn: str) -> dict:
    """Kwargs of a CNN that takes `output_stride`: its features model where its classifier does not take it."""
    return dict(features_only=True) if cnn in FEATURES_ONLY_OUTPUT_STRIDE else {}


def measured_stages(model: nn.Module, size: int = 64) -> dict:
    """The rule before output_stride was taken into account, written from its definition: every KxK (K > 1)
    convolution with kernel larger than stride, at stage log2(output reduction) - 1, measured with forward hooks."""
    heights, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            heights.setdefault(name, output.shape[-2])
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and module.kernel_size[0] > module.stride[0]:
            hooks.append(module.register_forward_hook(record(name)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device='meta'))
    for hook in hooks:
        hook.remove()
    return {name: round(math.log2(size / h)) - 1 for name, h in heights.items() if size // h >= 2}


@pytest.mark.parametrize('cnn', FAMILIES)
def test_stages_do_not_depend_on_output_stride(cnn):
    kwargs = dict(_dense(cnn), device='meta')
    reference = conv_stages(timm.create_model(cnn, **kwargs))
    assert sorted(set(reference.values()))[-1] == 4
    for output_stride in (16, 8):
        dilated = timm.create_model(cnn, output_stride=output_stride, **kwargs)
        assert any(m.dilation != (1, 1) for m in dilated.modules() if isinstance(m, nn.Conv2d)) or cnn == 'regnety_032'
        assert conv_stages(dilated) == reference, output_stride
        for convert_strided in (True, False):  # strides judged as at output_stride 32: the same layers convert
            names = [n for n, _ in attention_layers(transform_cnn(
                timm.create_model(cnn, output_stride=output_stride, **kwargs), (3, 4), convert_strided))]
            expected = [n for n, _ in attention_layers(transform_cnn(
                timm.create_model(cnn, **kwargs), (3, 4), convert_strided))]
            assert names == expected, (output_stride, convert_strided)


@pytest.mark.parametrize('variant', sorted(timm_tcnn.VARIANTS))
def test_variant_converts_the_layers_it_always_converted(variant):
    row = timm_tcnn.VARIANTS[variant]
    stage_of = measured_stages(timm.create_model(row.cnn, device='meta'))
    modules = dict(timm.create_model(row.cnn, device='meta').named_modules())
    expected = {n for n, s in stage_of.items() if s in row.options.stages
                and (row.options.convert_strided or modules[n].stride == (1, 1))}
    assert expected and {n for n, _ in attention_layers(timm.create_model(variant, device='meta'))} == expected


@pytest.fixture(scope='module')
def dense_hub(tmp_path_factory):
    """Offline mode with an (initially empty) Hub cache of generated CNN weights."""
    import huggingface_hub.constants as hf_constants
    hub = OfflineHub(tmp_path_factory.mktemp('hf_cache_dense'), {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
        mp.setattr(hf_constants, 'HF_HUB_CACHE', str(hub.cache_dir))
        yield hub


def _variants():
    for variant in sorted(timm_tcnn.VARIANTS):
        yield pytest.param(variant, marks=[] if variant in FAST else [pytest.mark.slow])


@pytest.mark.parametrize('variant', list(_variants()))
def test_features_only_at_output_stride_16_and_8_equal_the_cnn(dense_hub, variant):
    row = timm_tcnn.VARIANTS[variant]
    generator = torch.Generator().manual_seed(0)
    cnn = randomize_batchnorm(timm.create_model(row.cnn), generator)
    with torch.no_grad():
        for name, param in cnn.named_parameters():
            if name.endswith('gamma'):  # ConvNeXt layer scale, 1e-6 at init
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    dense_hub.add(timm.models.get_pretrained_cfg(row.cnn).hf_hub_id, cnn.state_dict())
    # float64: a randomized 350-layer net amplifies float32 rounding past 1e-4 (tcnn_resnet350rs: 2e-4), and a
    # float64 layer computes in float64 throughout
    x = torch.randn(2, 3, 80, 64, generator=generator, dtype=torch.float64)
    for output_stride in (16, 8):
        reference = timm.create_model(row.cnn, pretrained=True, features_only=True, output_stride=output_stride)
        features = timm.create_model(variant, pretrained=True, features_only=True, output_stride=output_stride)
        reference, features = reference.double().eval(), features.double().eval()
        assert isinstance(features, type(reference))  # the CNN's features class, or timm's wrapper as for the CNN
        assert features.feature_info.channels() == reference.feature_info.channels()
        assert features.feature_info.reduction() == reference.feature_info.reduction()
        assert max(reference.feature_info.reduction()) == output_stride
        layers = dict(attention_layers(features))
        single_block = variant == 'tcnn_regnety_032' and output_stride == 16  # its one stage-4 block: dilation 1
        assert layers and any(layer.dilation > 1 for layer in layers.values()) != single_block
        with torch.no_grad():
            expected = reference(x)
        with torch.enable_grad():  # the attention computation, not the inference shortcut
            got = [t.detach() for t in features(x)]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.shape == b.shape and relative_error(a, b) <= 1e-9, output_stride


@pytest.mark.parametrize('cnn', FAMILIES)
def test_output_stride_the_cnn_refuses_is_the_cnns_error(cnn):
    """Every output_stride and form (classifier, features_only) the CNN refuses, the T-CNN refuses with the CNN's
    own exception (type and message); every one it accepts, the T-CNN gives with the CNN's feature reductions."""
    variant = next(row.name for row in timm_tcnn.VARIANTS.values() if row.cnn == cnn)
    for output_stride in (2, 4, 12, 16, 64):
        for features_only in (False, True):
            kwargs = dict(output_stride=output_stride, features_only=features_only, device='meta')
            try:
                reference = timm.create_model(cnn, **kwargs)
            except Exception as e:  # the CNN's error, whatever it is
                with pytest.raises(type(e)) as got:
                    timm.create_model(variant, **kwargs)
                assert type(got.value) is type(e) and str(got.value) == str(e), kwargs
                continue
            model = timm.create_model(variant, **kwargs)
            assert list(attention_layers(model)), kwargs
            if features_only:
                assert model.feature_info.reduction() == reference.feature_info.reduction(), kwargs
