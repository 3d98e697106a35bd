""" Every registered T-CNN against timm's own CNN: pretrained identity from an offline Hub cache with generated
weights, checkpoints, features, options and error messages. """
import time

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm_tcnn
from timm_tcnn import TcnnOptions, attention_layers, tcnn_class, transform_cnn
from timm_tcnn.errors import InputError
from timm_tcnn.models.state_dicts import checkpoint_options, describe_mismatch
from timm_tcnn.utils.hub import HubWeightsUnavailable
from helpers import OfflineHub, attention_path, randomize_batchnorm, relative_error

RESNETRS = {f'tcnn_resnet{d}rs' for d in (50, 101, 152, 200, 270, 350, 420)}  # covered in test_models.py
# full-size CNNs take 5-25 s each on 2 CPU cores: the default run keeps one per family, grouped and depthwise included
FAST = {'tcnn_resnet18', 'tcnn_resnet26d', 'tcnn_regnety_032', 'tcnn_convnext_atto', 'tcnn_efficientnet_b0',
        'tcnn_mobilenetv3_large_100'}
NEW = sorted(set(timm_tcnn.VARIANTS) - RESNETRS)


def random_cnn(name: str, generator: torch.Generator, **kwargs) -> nn.Module:
    """timm's CNN with random weights in which every block matters: random norms and layer scales."""
    cnn = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for param_name, param in cnn.named_parameters():
            if param_name.endswith('gamma'):  # ConvNeXt layer scale, 1e-6 at init
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return randomize_batchnorm(cnn, generator).eval()


@pytest.fixture(scope='module')
def variant_hub(tmp_path_factory):
    """Offline mode with an (initially empty) Hub cache; `add(variant)` stores its CNN's default-tag weights."""
    import huggingface_hub.constants as hf_constants
    hub = OfflineHub(tmp_path_factory.mktemp('hf_cache_variants'), {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
        mp.setattr(hf_constants, 'HF_HUB_CACHE', str(hub.cache_dir))
        yield hub


def _identity(variant_hub, variant: str, size: tuple) -> float:
    row = timm_tcnn.VARIANTS[variant]
    cnn = random_cnn(row.cnn, torch.Generator().manual_seed(0))
    hf_hub_id = timm.models.get_pretrained_cfg(variant).hf_hub_id
    assert hf_hub_id == timm.models.get_pretrained_cfg(row.cnn).hf_hub_id
    variant_hub.add(hf_hub_id, cnn.state_dict())
    tcnn = timm.create_model(variant, pretrained=True).eval()
    assert list(attention_layers(tcnn)) and tcnn.tcnn_options == row.options
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = cnn(x)
    return relative_error(attention_path(tcnn, x), ref)


@pytest.mark.parametrize('variant', [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in NEW])
def test_pretrained_variant_equals_cnn(variant_hub, variant):
    """The T-CNN built from the CNN's Hub weights computes the CNN's logits (attention path, odd non-square size)."""
    assert _identity(variant_hub, variant, (72, 40)) <= 1e-4


def test_checkpoint_path_features_and_intermediates(tmp_path):
    """A CNN checkpoint via checkpoint_path, features_only and forward_intermediates, against the CNN's own."""
    cnn = random_cnn('convnext_atto', torch.Generator().manual_seed(1))
    path = tmp_path / 'cnn.safetensors'
    save_file(cnn.state_dict(), str(path))
    tcnn = timm.create_model('tcnn_convnext_atto', checkpoint_path=str(path), tcnn_stages=(3, 4)).eval()
    x = torch.randn(1, 3, 64, 96)
    assert relative_error(attention_path(tcnn, x), cnn(x).detach()) <= 1e-4
    final, inter = tcnn.forward_intermediates(x)
    ref_final, ref_inter = cnn.forward_intermediates(x)
    assert all(relative_error(a.detach(), b.detach()) <= 1e-4 for a, b in zip(inter + [final], ref_inter + [ref_final]))
    for name in ('convnext_atto', 'efficientnet_b0'):
        path = tmp_path / f'{name}.safetensors'
        save_file(random_cnn(name, torch.Generator().manual_seed(2)).state_dict(), str(path))
        weights = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True)
        features = timm.create_model(f'tcnn_{name}', **weights).eval()
        reference = timm.create_model(name, **weights).eval()
        assert features.feature_info.channels() == reference.feature_info.channels()
        assert features.feature_info.reduction() == reference.feature_info.reduction()
        assert list(attention_layers(features))
        with torch.enable_grad():  # the attention computation, not the inference shortcut
            outs = [t.detach() for t in features(x)]
        refs = reference(x)
        assert len(outs) == len(refs) and all(relative_error(a, b.detach()) <= 1e-4 for a, b in zip(outs, refs))


def test_options_validated_where_they_enter():
    assert TcnnOptions(stages=4).stages == (4,)
    assert TcnnOptions(stages=[4, 3, 4]).stages == (3, 4)
    for kwargs, message in [
        (dict(stages='34'), "tcnn_stages='34'"),
        (dict(stages=()), 'tcnn_stages=()'),
        (dict(stages=(3.0,)), 'tcnn_stages'),
        (dict(qk_dim=0), 'tcnn_qk_dim=0: expected an integer >= 1'),
        (dict(qk_init_std=-1.0), 'tcnn_qk_init_std'),
        (dict(locality_init=0), 'tcnn_locality_init=0: expected a number > 0'),
        (dict(convert_strided='no'), 'tcnn_convert_strided'),
        (dict(gate_lr_scale=0), 'tcnn_gate_lr_scale'),
        (dict(grad_floor=2), 'tcnn_grad_floor=2: expected a number in \\[0, 1\\]'),
    ]:
        with pytest.raises(InputError, match=message):
            TcnnOptions(**kwargs)
    with pytest.raises(InputError, match='tcnn_qk_dim=0'):
        timm.create_model('tcnn_resnet18', tcnn_qk_dim=0)
    with pytest.raises(TypeError, match='Unknown T-CNN options'):
        timm.create_model('tcnn_resnet18', tcnn_stagez=4)
    model = timm.create_model('tcnn_resnet18', tcnn_stages=3, tcnn_convert_strided=False)
    assert sorted(dict(attention_layers(model))) == ['layer3.0.conv2', 'layer3.1.conv1', 'layer3.1.conv2']
    with pytest.raises(InputError, match=r'has no stage \[5\]: its stages are \[0, 1, 2, 3, 4\]'):
        timm.create_model('tcnn_resnet18', tcnn_stages=(4, 5))


def test_checkpoint_options_and_mismatch_message():
    trained = timm.create_model(
        'tcnn_resnet18', tcnn_stages=(3, 4), tcnn_convert_strided=False, tcnn_qk_dim=8, num_classes=7
    )
    state_dict = trained.state_dict()
    model = timm.create_model('tcnn_resnet18')
    assert checkpoint_options(state_dict, model) == dict(
        num_classes=7, tcnn_stages=(3, 4), tcnn_convert_strided=False, tcnn_qk_dim=8, tcnn_gate_lr_scale=30.0
    )
    assert checkpoint_options(timm.create_model('resnet18').state_dict(), model) == dict(num_classes=1000)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state_dict)
    assert "--model-kwargs num_classes=7 'tcnn_stages=(3, 4)' tcnn_convert_strided=False tcnn_qk_dim=8" in str(
        info.value
    )
    rebuilt = timm.create_model(
        'tcnn_resnet18', num_classes=7, tcnn_stages=(3, 4), tcnn_convert_strided=False, tcnn_qk_dim=8
    )
    rebuilt.load_state_dict(state_dict)  # the kwargs the message names fit
    other = timm.create_model('convnext_atto', device='meta').state_dict()
    assert describe_mismatch(other, model).endswith('It fits tcnn_convnext_atto.')


def test_pretrained_without_weights_fails_fast(variant_hub):
    start = time.perf_counter()
    # a tag the cache does not hold (test_pretrained_variant_equals_cnn caches the default tags)
    with pytest.raises(HubWeightsUnavailable, match='hf download timm/mobilenetv3_large_100.miil_in21k_ft_in1k'):
        timm.create_model('tcnn_mobilenetv3_large_100.miil_in21k_ft_in1k', pretrained=True)
    assert time.perf_counter() - start < 5


def test_no_weight_decay_merges_the_cnn_set():
    class Net(nn.Sequential):
        def no_weight_decay(self):
            return {'1.weight'}

    model = transform_cnn(Net(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)), stages=0)
    model.__class__ = tcnn_class(Net)
    assert model.no_weight_decay() == {
        '1.weight',
        '0.content_gate',
        '0.locality_gate',
        '0.pos_log_alpha',
        '0.pos_center',
    }
