""" timm's own train.py, validate.py and benchmark.py on T-CNNs through `timm-tcnn run`, on CPU.

Needs TIMM_SCRIPTS_DIR: a checkout of https://github.com/huggingface/pytorch-image-models. Every run
uses a generated 2-class ImageFolder at 64 px and the offline Hub cache of conftest.py (random weights).
"""
import argparse
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch

import timm_tcnn  # noqa: F401  registers the models
from timm_tcnn import attention_layers

SCRIPTS_DIR = os.environ.get('TIMM_SCRIPTS_DIR', '')
pytestmark = pytest.mark.skipif(
    not SCRIPTS_DIR,
    reason='TIMM_SCRIPTS_DIR is not set: point it at a checkout of https://github.com/huggingface/'
           'pytorch-image-models (holding train.py, validate.py, benchmark.py) to run these tests.')

NUM_TRAIN = 4  # images per class
DATA_ARGS = ['--num-classes', '2', '--img-size', '64', '--device', 'cpu', '--workers', '0']
# one epoch = 2 steps of 4 images; no warm-up so that --lr is the rate actually used
TRAIN_ARGS = [*DATA_ARGS, '--batch-size', '4', '--epochs', '1', '--opt', 'sgd', '--warmup-epochs', '0']
FROZEN_LR = ['--lr', '1e-9']  # trains, but leaves the loaded weights in place
BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def script(name: str) -> str:
    path = Path(SCRIPTS_DIR) / name
    assert path.is_file(), f'TIMM_SCRIPTS_DIR={SCRIPTS_DIR} has no {name}: it must be a pytorch-image-models checkout'
    return str(path)


def run(name: str, *args: str, cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m timm_tcnn run SCRIPTS_DIR/name args...` in a subprocess (inherits the offline Hub env)."""
    out = subprocess.run([sys.executable, '-m', 'timm_tcnn', 'run', script(name), *args],
                         cwd=cwd, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert out.returncode == 0, f'{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}'
    return out


def result_json(stdout: str):
    """The JSON timm's scripts print after their `--result` line."""
    return json.loads(stdout.split('--result\n', 1)[1])


def load_train_checkpoint(path: Path) -> Dict:
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args Namespace
        return torch.load(path, map_location='cpu', weights_only=True)


def assert_weights_loaded(trained: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor], skip=('fc.',)):
    """Every parameter of the (CNN) `source` reappears unchanged in the `trained` T-CNN checkpoint."""
    keys = [k for k in source if not k.endswith(BN_BUFFERS) and not k.startswith(skip)]
    assert keys and set(keys) <= set(trained)
    for k in keys:
        torch.testing.assert_close(trained[k], source[k], rtol=1e-5, atol=1e-6, msg=k)
    gates = [v for k, v in trained.items() if k.endswith('content_gate')]
    assert gates and all(g.abs().max() < 1e-6 for g in gates)  # still at the conversion state


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """train/ and validation/ with 2 classes of noisy coloured 72x72 images."""
    from PIL import Image
    root = tmp_path_factory.mktemp('imagefolder')
    generator = torch.Generator().manual_seed(0)
    for split, count in (('train', NUM_TRAIN), ('validation', 2)):
        for label, colour in (('red', (200, 30, 30)), ('blue', (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randn(72, 72, 3, generator=generator) * 30
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def cnn_checkpoint(offline_hub, image_folder, workdir) -> Path:
    """A train.py checkpoint of the CNN resnetrs50 after one epoch (a 'partially trained CNN')."""
    run('train.py', '--data-dir', str(image_folder), '--model', 'resnetrs50', '--pretrained', *TRAIN_ARGS,
        '--lr', '0.01', '--output', str(workdir), '--experiment', 'cnn', cwd=workdir)
    return workdir / 'cnn' / 'last.pth.tar'


@pytest.fixture(scope='module')
def tcnn_checkpoint(offline_hub, image_folder, workdir) -> Path:
    """train.py: tcnn_resnet50rs --pretrained, i.e. the Hub CNN weights converted on load, one epoch."""
    run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--pretrained', *TRAIN_ARGS,
        *FROZEN_LR, '--output', str(workdir), '--experiment', 'tcnn', cwd=workdir)
    return workdir / 'tcnn' / 'last.pth.tar'


def test_train_tcnn_pretrained_from_hub(tcnn_checkpoint, offline_hub):
    checkpoint = load_train_checkpoint(tcnn_checkpoint)
    assert checkpoint['arch'] == 'tcnn_resnet50rs' and checkpoint['epoch'] == 0
    assert checkpoint['args'].pretrained and checkpoint['args'].model_kwargs == {}
    state_dict = checkpoint['state_dict']
    assert sorted({k.rsplit('.', 1)[0] for k in state_dict if k.endswith('content_gate')}) == [
        'layer4.0.conv2', 'layer4.1.conv2', 'layer4.2.conv2']
    assert state_dict['fc.weight'].shape == (2, 2048)
    assert_weights_loaded(state_dict, offline_hub.state_dicts['timm/resnetrs50.tf_in1k'])
    summary = (tcnn_checkpoint.parent / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2 and summary[1].startswith('0,')


def test_train_tcnn_from_partially_trained_cnn(cnn_checkpoint, image_folder, workdir):
    """--initial-checkpoint: a CNN train.py checkpoint loads strictly into the T-CNN, converted."""
    run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--initial-checkpoint',
        str(cnn_checkpoint), *TRAIN_ARGS, *FROZEN_LR, '--output', str(workdir), '--experiment', 'from_cnn',
        cwd=workdir)
    trained = load_train_checkpoint(workdir / 'from_cnn' / 'last.pth.tar')['state_dict']
    assert_weights_loaded(trained, load_train_checkpoint(cnn_checkpoint)['state_dict'], skip=())


def test_resume_tcnn_run(tcnn_checkpoint, image_folder, workdir):
    """--resume restores model, optimizer and schedule: the learning rate continues from the checkpoint's
    `initial_lr` (the first run's --lr); a --lr given on resume does not change it."""
    out = run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--resume',
              str(tcnn_checkpoint), *TRAIN_ARGS, '--epochs', '2', '--lr', '0.01', '--output', str(workdir),
              '--experiment', 'resumed', cwd=workdir)
    assert 'Restoring optimizer state from checkpoint' in out.stdout + out.stderr
    checkpoint = load_train_checkpoint(workdir / 'resumed' / 'last.pth.tar')
    assert checkpoint['epoch'] == 1
    rows = (workdir / 'resumed' / 'summary.csv').read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith('1,')  # only the second epoch ran
    lr = float(rows[1].split(',')[-1])
    assert lr == pytest.approx(0.5e-9)  # cosine over 2 epochs at its midpoint, from the first run's 1e-9
    assert math.isfinite(float(rows[1].split(',')[1]))


def _validation_loss(output: str) -> float:
    """Average loss of validate.py's last progress line."""
    return float(re.findall(r'Loss:\s+[\d.]+\s+\(\s*([\d.]+)\)', output)[-1])


def test_validate_checkpoint_and_local_dir(tcnn_checkpoint, image_folder, workdir):
    """validate.py on the train.py checkpoint, and on a `local-dir:` export of the same weights: same numbers."""
    val_dir = str(image_folder / 'validation')
    out_ckpt = run('validate.py', '--data-dir', val_dir, '--model', 'tcnn_resnet50rs', '--checkpoint',
                   str(tcnn_checkpoint), *DATA_ARGS, '--batch-size', '4', cwd=workdir)
    model = timm.create_model('tcnn_resnet50rs', num_classes=2, checkpoint_path=str(tcnn_checkpoint))
    export = workdir / 'export'
    timm.models.save_for_hf(model, export, model_args=dict(num_classes=2))
    out_dir = run('validate.py', '--data-dir', val_dir, '--model', f'local-dir:{export}', *DATA_ARGS,
                  '--batch-size', '4', cwd=workdir)
    from_ckpt, from_dir = result_json(out_ckpt.stdout), result_json(out_dir.stdout)
    assert from_ckpt['model'] == 'tcnn_resnet50rs' and from_ckpt['param_count'] == from_dir['param_count']
    assert from_ckpt['top1'] == from_dir['top1'] and from_ckpt['img_size'] == 64
    assert _validation_loss(out_ckpt.stdout + out_ckpt.stderr) == _validation_loss(out_dir.stdout + out_dir.stderr)


def test_benchmark(workdir):
    out = run('benchmark.py', '--model', 'tcnn_resnet50rs', '--device', 'cpu', '--bench', 'inference',
              '--num-bench-iter', '5', '--num-warm-iter', '1', '--batch-size', '2', '--img-size', '64', cwd=workdir)
    result = result_json(out.stdout)
    assert result['model'] == 'tcnn_resnet50rs' and result['infer_img_size'] == 64
    assert result['infer_samples_per_sec'] > 0 and result['param_count'] == pytest.approx(36.58, abs=0.01)


def test_model_name_typo_suggests_the_right_name(image_folder, workdir):
    out = run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50_rs', *TRAIN_ARGS,
              cwd=workdir, expect_ok=False)
    assert out.returncode == 1
    assert 'RuntimeError: Unknown model (tcnn_resnet50_rs)' in out.stderr
    assert "Did you mean 'tcnn_resnet50rs'?" in out.stderr


@pytest.mark.slow
def test_train_pretrained_path_cnn_and_tcnn_checkpoints(cnn_checkpoint, tcnn_checkpoint, image_folder, workdir):
    """--pretrained --pretrained-path FILE goes through the conversion filter; timm drops the head (num_classes=-1)."""
    for name, source in (('path_cnn', cnn_checkpoint), ('path_tcnn', tcnn_checkpoint)):
        run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--pretrained',
            '--pretrained-path', str(source), *TRAIN_ARGS, *FROZEN_LR, '--output', str(workdir),
            '--experiment', name, cwd=workdir)
        trained = load_train_checkpoint(workdir / name / 'last.pth.tar')['state_dict']
        assert_weights_loaded(trained, load_train_checkpoint(source)['state_dict'])


@pytest.mark.slow
def test_train_options(offline_hub, image_folder, workdir):
    """--model-kwargs, --layer-decay, --grad-checkpointing, --model-ema, bf16 --amp, --channels-last together."""
    run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--pretrained', *TRAIN_ARGS,
        '--lr', '0.01', '--model-kwargs', 'tcnn_stages=(3, 4)', 'tcnn_qk_dim=16', '--layer-decay', '0.8',
        '--grad-checkpointing', '--model-ema', '--amp', '--amp-dtype', 'bfloat16', '--channels-last',
        '--output', str(workdir), '--experiment', 'options', cwd=workdir)
    checkpoint = load_train_checkpoint(workdir / 'options' / 'last.pth.tar')
    assert checkpoint['args'].model_kwargs == {'tcnn_stages': (3, 4), 'tcnn_qk_dim': 16}
    model = timm.create_model('tcnn_resnet50rs', num_classes=2, **checkpoint['args'].model_kwargs)
    converted = [name for name, _ in attention_layers(model)]
    assert len(converted) == 6 + 3 and converted[0] == 'layer3.0.conv2'
    assert model.layer3[0].conv2.qk.weight.shape[0] == 2 * 9 * 16
    for key in ('state_dict', 'state_dict_ema'):
        model.load_state_dict(checkpoint[key])  # strict: the EMA copy is a full T-CNN too
        assert all(torch.isfinite(v).all() for v in checkpoint[key].values())
    scales = sorted({group['lr_scale'] for group in checkpoint['optimizer']['param_groups']})
    assert len(scales) == 18 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.8 ** 17)  # stem .. head
    no_decay = [g for g in checkpoint['optimizer']['param_groups'] if g['weight_decay'] == 0]
    assert no_decay  # gates, positional parameters, biases and norms


@pytest.mark.slow
def test_torchrun_two_cpu_processes(offline_hub, image_folder, workdir):
    """`torchrun --nproc_per_node=2 -m timm_tcnn run train.py` (gloo) trains a T-CNN for one epoch on two
    CPU processes (the runner lets DistributedDataParallel take the `device_ids=[cpu]` train.py passes)."""
    out = subprocess.run(
        ['torchrun', '--standalone', '--nproc_per_node=2', '-m', 'timm_tcnn', 'run', script('train.py'),
         '--data-dir', str(image_folder), '--model', 'tcnn_resnet50rs', '--pretrained', *TRAIN_ARGS,
         '--batch-size', '2', '--lr', '0.01', '--output', str(workdir), '--experiment', 'ddp'],
        cwd=workdir, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert 'Training in distributed mode with multiple processes' in log
    assert 'Model tcnn_resnet50rs created' in log
    assert out.returncode == 0, log[-4000:]
    assert load_train_checkpoint(workdir / 'ddp' / 'last.pth.tar')['arch'] == 'tcnn_resnet50rs'


RECIPES = Path(__file__).resolve().parent.parent / 'timm_tcnn' / 'tools' / 'experiment' / 'recipes'


def test_recipe_configs_use_only_train_py_options():
    """train.py silently ignores unknown keys of a --config file: every key must be one of its options."""
    import yaml
    train_globals = runpy.run_path(script('train.py'), run_name='train_module')
    options = {action.dest for action in train_globals['parser']._actions}
    tcnn = yaml.safe_load((RECIPES / 'tcnn_resnet50rs_in1k_ft50.yaml').read_text())
    cnn = yaml.safe_load((RECIPES / 'resnet50rs_in1k_ft50_control.yaml').read_text())
    assert set(tcnn) <= options and set(cnn) == set(tcnn)
    assert {k for k in tcnn if tcnn[k] != cnn[k]} == {'model', 'experiment'}
    assert (tcnn['model'], cnn['model'], tcnn['epochs']) == ('tcnn_resnet50rs', 'resnetrs50', 50)


@pytest.mark.slow
def test_recipe_config_with_plain_python_train_py(offline_hub, image_folder, workdir):
    """No runner: `python train.py --config RECIPE` imports timm_tcnn through the config's device_modules."""
    out = subprocess.run(
        [sys.executable, script('train.py'), '--config', str(RECIPES / 'tcnn_resnet50rs_in1k_ft50.yaml'),
         '--data-dir', str(image_folder), *TRAIN_ARGS, '--workers', '1',  # the checkout's timm needs >= 1 here
         '--output', str(workdir), '--experiment', 'recipe'],
        cwd=workdir, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    checkpoint = load_train_checkpoint(workdir / 'recipe' / 'last.pth.tar')
    assert checkpoint['arch'] == 'tcnn_resnet50rs' and 'state_dict_ema' in checkpoint
    assert checkpoint['args'].aa == 'rand-m9-mstd0.5-inc1' and checkpoint['args'].amp_dtype == 'bfloat16'  # from YAML


def test_experiment_transfer_start_in_train_py(offline_hub, image_folder, workdir):
    """An experiment's transfer start (the Hub CNN with a new 2-class classifier) loads into both arms through
    train.py's --initial-checkpoint: the same classifier and the CNN's body in both."""
    from safetensors.torch import load_file

    from timm_tcnn.tools.experiment import ExperimentSpec, Step, start_step
    spec = ExperimentSpec(model='tcnn_resnet50rs', cnn_model='resnetrs50', data_dir=str(image_folder),
                          out=str(workdir / 'transfer'), recipe='', recipe_sha256='', scripts_dir=SCRIPTS_DIR,
                          seeds=(0,), num_classes=2)
    start = spec.start_checkpoint(0)
    start_step(spec, Step('start/seed0', 'start', (), seed=0, result=str(start)))
    heads = {}
    for model in ('resnetrs50', 'tcnn_resnet50rs'):
        run('train.py', '--data-dir', str(image_folder), '--model', model, '--initial-checkpoint', str(start),
            *TRAIN_ARGS, *FROZEN_LR, '--output', str(workdir), '--experiment', f'transfer-{model}', cwd=workdir)
        trained = load_train_checkpoint(workdir / f'transfer-{model}' / 'last.pth.tar')['state_dict']
        if model == 'tcnn_resnet50rs':  # the Hub CNN's body, converted
            assert_weights_loaded(trained, offline_hub.state_dicts['timm/resnetrs50.tf_in1k'])
        heads[model] = trained['fc.weight']
    torch.testing.assert_close(heads['resnetrs50'], heads['tcnn_resnet50rs'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads['resnetrs50'], load_file(str(start))['fc.weight'], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_with_torchcompile(offline_hub, image_folder, workdir):
    """train.py --torchcompile (inductor): one epoch of tcnn_resnet18 and its validation, whose last batch is
    smaller than the others (a new batch size: one recompilation, then the dynamic graph)."""
    out = run('train.py', '--data-dir', str(image_folder), '--model', 'tcnn_resnet18', *TRAIN_ARGS,
              '--lr', '0.01', '--validation-batch-size', '3', '--model-kwargs', 'tcnn_qk_dim=8', '--torchcompile',
              'inductor', '--output', str(workdir), '--experiment', 'compiled', cwd=workdir)
    summary = (workdir / 'compiled' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2 and math.isfinite(float(summary[1].split(',')[1])), out.stdout[-2000:]
