""" `timm-tcnn convert`: offline Hub cache, local checkpoints, reloading, fast failure and errors. """
import json
import subprocess
import sys
import time

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_tcnn  # noqa: F401
from timm_tcnn.cli import main
from timm_tcnn.utils.hub import HubWeightsUnavailable
from helpers import attention_path, relative_error


def _reload_and_compare(out_dir, cnn):
    tcnn = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
    x = torch.randn(2, 3, 96, 64)
    assert relative_error(attention_path(tcnn, x), cnn(x).detach()) <= 1e-4
    return tcnn


def test_convert_from_offline_hub_cache(offline_hub, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(images / f'{i}.png')
    (images / 'broken.jpg').write_bytes(b'not an image')
    out = tmp_path / 'out'
    assert main(['convert', 'tcnn_resnet50rs', '--out', str(out), '--images', str(images), '--batch-size', '1']) == 0
    printed = capsys.readouterr().out
    assert 'hf-hub:timm/resnetrs50.tf_in1k' in printed and '3 images, 1 unreadable skipped' in printed
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == 'tf_in1k'
    cnn = timm.create_model('resnetrs50', pretrained=True).eval()
    tcnn = _reload_and_compare(out, cnn)
    assert tcnn.tcnn_stages == (4,)
    # an existing output folder is never replaced silently
    assert main(['convert', 'resnetrs50', '--out', str(out)]) == 2
    assert 'already exists: choose another folder or pass --overwrite' in capsys.readouterr().err


@pytest.mark.parametrize('suffix', ['.pth.tar', '.safetensors'])
def test_convert_from_local_checkpoint_with_options(offline_hub, tmp_path, suffix):
    cnn = timm.create_model('resnetrs50', num_classes=4)
    cnn.load_state_dict({k: v for k, v in offline_hub.state_dicts['timm/resnetrs50.tf_in1k'].items()
                         if not k.startswith('fc.')}, strict=False)
    path = tmp_path / f'cnn{suffix}'
    if suffix == '.safetensors':
        save_file(cnn.state_dict(), str(path))
    else:
        torch.save({'epoch': 2, 'state_dict': cnn.state_dict()}, path)
    out = tmp_path / 'out'
    code = main(['convert', 'resnetrs50', '--checkpoint', str(path), '--out', str(out),
                 '--batch-size', '1', '--model-kwargs', 'tcnn_stages=(3, 4)', 'tcnn_convert_strided=False'])
    assert code == 0
    tcnn = _reload_and_compare(out, cnn.eval())
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']  # not labelled as timm's tf_in1k weights
    assert cfg['tag'] == 'converted'
    assert cfg['notes'] == [f'T-CNN converted from CNN checkpoint cnn{suffix} by timm-tcnn convert.']
    assert tcnn.num_classes == 4 and tcnn.tcnn_stages == (3, 4) and not tcnn.tcnn_convert_strided


def test_convert_fails_fast_without_weights(tmp_path):
    env_script = (
        'import sys, timm_tcnn.cli as c; sys.exit(c.main(["convert", "tcnn_resnet101rs", "--out", sys.argv[1]]))')
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-c', env_script, str(tmp_path / 'out')], capture_output=True, text=True, timeout=120,
        env={'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'empty_cache'), 'PATH': '/usr/bin:/bin'},
    )
    assert time.perf_counter() - start < 60
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'Cannot get the weights of timm/resnetrs101.tf_in1k' in result.stderr
    assert '--random-weights' in result.stderr and not (tmp_path / 'out').exists()


def test_create_model_offline_without_cache_says_how_to_get_weights(offline_hub, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    with pytest.raises(HubWeightsUnavailable, match='hf download timm/resnetrs50.tf_in1k'):
        timm.create_model('tcnn_resnet50rs', pretrained=True)


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(RuntimeError, match=r"Unknown pretrained tag 'in22k' .* \['tf_in1k'\]"):
        timm.create_model('tcnn_resnet50rs.in22k', pretrained=True)
    for args, message in [
        (['resnet50'], 'neither a registered T-CNN nor its CNN'),
        (['resnetrs50', '--model-kwargs', 'tcnn_stage=4'], 'Unknown T-CNN options'),
        (['resnetrs50', '--model-kwargs', "tcnn_stages='34'"], "tcnn_stages='34': expected a stage number"),
        (['resnetrs50', '--model-kwargs', 'tcnn_qk_dim=0'], 'tcnn_qk_dim=0: expected an integer >= 1'),
    ]:
        assert main(['convert', *args, '--random-weights']) == 2  # InputError: exit code 2, no traceback
        assert message in capsys.readouterr().err
    cnn = timm.create_model('resnetrs101', num_classes=10)
    path = tmp_path / 'cnn.safetensors'
    save_file(cnn.state_dict(), str(path))
    with pytest.raises(RuntimeError, match=r'a CNN of another architecture than tcnn_resnet50rs .* It fits '
                                           r'tcnn_resnet101rs\.'):
        timm.create_model('tcnn_resnet50rs', checkpoint_path=str(path))


def test_console_script_and_module_entry_points():
    for command in (['timm-tcnn', '--help'], [sys.executable, '-m', 'timm_tcnn', 'convert', '--help']):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert 'convert' in result.stdout


def test_model_kwargs_reach_the_converted_model(tmp_path, capsys):
    """num_classes other than the checkpoint's replaces the classifier (said, same in both models); other
    create_model arguments reach the model and its config.json."""
    cnn = timm.create_model('resnet18', num_classes=7).eval()
    path = tmp_path / 'cnn7.pth'
    torch.save(cnn.state_dict(), path)
    out = tmp_path / 'out'
    assert main(['convert', 'resnet18', '--checkpoint', str(path), '--out', str(out), '--batch-size', '1',
                 '--model-kwargs', 'num_classes=3', 'drop_rate=0.5']) == 0
    assert 'classifier replaced: the weights have 7 classes' in capsys.readouterr().out
    tcnn = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert tcnn.num_classes == 3 and tcnn.fc.weight.shape == (3, 512) and tcnn.drop_rate == 0.5
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['drop_rate'] == 0.5
    assert config['pretrained_cfg']['notes'] == [
        'T-CNN converted from CNN checkpoint cnn7.pth, its 7-class classifier replaced by a random 3-class one '
        '(seed 0) by timm-tcnn convert.']
    body = {k: v for k, v in cnn.state_dict().items() if not k.startswith('fc.')}
    assert all(torch.equal(tcnn.state_dict()[k], v) for k, v in body.items())  # the body is the checkpoint's
    assert main(['convert', 'resnet18', '--random-weights', '--out', str(tmp_path / 'random'), '--batch-size', '1',
                 '--model-kwargs', 'num_classes=3']) == 0
    assert json.loads((tmp_path / 'random' / 'config.json').read_text())['num_classes'] == 3


def test_hub_weights_with_another_class_count_are_not_labelled_as_timms(offline_hub, tmp_path):
    out = tmp_path / 'out'
    argv = ['convert', 'resnetrs50', '--out', str(out), '--batch-size', '1', '--model-kwargs', 'num_classes=3']
    assert main(argv) == 0
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'converted' and cfg['num_classes'] == 3 and cfg.get('hf_hub_id') is None
    assert cfg['notes'] == ['T-CNN converted from hf-hub:timm/resnetrs50.tf_in1k, its 1000-class classifier replaced '
                            'by a random 3-class one (seed 0) by timm-tcnn convert.']
    hub = offline_hub.state_dicts['timm/resnetrs50.tf_in1k']
    tcnn = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(tcnn.state_dict()['conv1.0.weight'], hub['conv1.0.weight'])  # the Hub body, a new head
