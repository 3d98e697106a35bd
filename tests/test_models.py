""" The registered tcnn_* models: registry, pretrained loading (offline Hub cache, files) and timm features. """
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg

import timm_tcnn  # registers the models
from timm_tcnn import attention_layers
from helpers import attention_path, relative_error

DEPTHS = (50, 101, 152, 200, 270, 350, 420)
RESNETRS = [f'tcnn_resnet{d}rs' for d in DEPTHS]


def test_registry_lists_all_variants_and_tags():
    assert set(timm.list_models('tcnn_*')) == set(timm_tcnn.VARIANTS) >= set(RESNETRS)
    for name, row in timm_tcnn.VARIANTS.items():
        cnn_tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{row.cnn}.*')]
        assert [n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*')] == cnn_tags, name
        assert get_pretrained_cfg(name).tag == get_pretrained_cfg(row.cnn).tag  # same default tag
        for tag in cnn_tags:
            cfg = get_pretrained_cfg(f'{name}.{tag}').to_dict()
            cnn_cfg = get_pretrained_cfg(f'{row.cnn}.{tag}').to_dict()
            assert cfg['hf_hub_id'] == f'timm/{row.cnn}.{tag}'
            for key in ('input_size', 'test_input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'pool_size',
                        'classifier', 'first_conv', 'num_classes'):
                assert cfg.get(key) == cnn_cfg.get(key), (name, tag, key)
            assert 'arXiv:2106.05795' in cfg['paper_ids']
    assert get_pretrained_cfg('tcnn_resnet50rs').tag == 'tf_in1k'


@pytest.fixture(scope='session')
def cnn_and_tcnn_from_hub(offline_hub):
    cnn = timm.create_model('resnetrs50', pretrained=True).eval()
    tcnn = timm.create_model('tcnn_resnet50rs', pretrained=True).eval()
    return cnn, tcnn


@pytest.mark.parametrize('size', [160, 224])
def test_pretrained_from_offline_hub_equals_cnn(cnn_and_tcnn_from_hub, size):
    cnn, tcnn = cnn_and_tcnn_from_hub
    assert len(list(attention_layers(tcnn))) == 3
    x = torch.randn(2, 3, size, size)
    assert relative_error(attention_path(tcnn, x), cnn(x).detach()) <= 1e-4


def test_deeper_variant_from_offline_hub(offline_hub):
    cnn = timm.create_model('resnetrs101', pretrained=True).eval()
    tcnn = timm.create_model('tcnn_resnet101rs', pretrained=True, tcnn_stages=(3, 4)).eval()
    x = torch.randn(1, 3, 128, 96)
    assert relative_error(attention_path(tcnn, x), cnn(x).detach()) <= 1e-4


@pytest.mark.parametrize('source', ['checkpoint_path_pth', 'checkpoint_path_safetensors', 'overlay_file'])
def test_cnn_weights_from_file(offline_hub, tmp_path, source):
    state_dict = offline_hub.state_dicts['timm/resnetrs50.tf_in1k']
    cnn = timm.create_model('resnetrs50')
    cnn.load_state_dict(state_dict)
    cnn.eval()
    if source == 'checkpoint_path_pth':
        path = tmp_path / 'cnn.pth'
        torch.save({'state_dict': state_dict, 'epoch': 3}, path)  # as train.py writes it
        tcnn = timm.create_model('tcnn_resnet50rs', checkpoint_path=str(path))
    elif source == 'checkpoint_path_safetensors':
        path = tmp_path / 'cnn.safetensors'
        save_file(state_dict, str(path))
        tcnn = timm.create_model('tcnn_resnet50rs', checkpoint_path=str(path))
    else:
        path = tmp_path / 'cnn.safetensors'
        save_file(state_dict, str(path))
        tcnn = timm.create_model('tcnn_resnet50rs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    tcnn.eval()
    x = torch.randn(2, 3, 96, 128)
    assert relative_error(attention_path(tcnn, x), cnn(x).detach()) <= 1e-4


def test_converted_checkpoint_passes_through(offline_hub, tmp_path):
    tcnn = timm.create_model('tcnn_resnet50rs', pretrained=True).eval()
    for _, layer in attention_layers(tcnn):
        with torch.no_grad():
            # as after fine-tuning
            layer.set_attention_values(content_gate=torch.empty_like(layer.content_gate).uniform_(0.1, 0.5))
    path = tmp_path / 'tcnn.safetensors'
    save_file(tcnn.state_dict(), str(path))
    reloaded = timm.create_model('tcnn_resnet50rs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), tcnn(x))


def test_num_classes_in_chans_and_no_weight_decay(offline_hub):
    model = timm.create_model('tcnn_resnet50rs', pretrained=True, num_classes=7, in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)
    decay_free = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert decay_free and decay_free <= set(names)
    assert all(n.rsplit('.', 1)[-1] in ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center')
               for n in decay_free)


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError):
        timm.create_model('tcnn_resnet50rs', tcnn_stagez=(4,))
