""" `timm-tcnn experiment` with stand-in train.py / validate.py (tests/standin_scripts): command lines, the full
pipeline on a tiny T-CNN, resume, refusal to mix recipes, a failed arm, the report's arithmetic, bad input. """
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_tcnn.cli import main
from timm_tcnn.models.options import GATE_LR_SCALE
from timm_tcnn.tools.experiment import ExperimentSpec, Step, start_step
from timm_tcnn.tools.experiment.report import compare
from timm_tcnn.tools.experiment.runner import POLL_SECONDS, run_step
from timm_tcnn.tools.relational_shapes import write_dataset
from helpers import attention_path, randomize_batchnorm, relative_error

STANDIN = Path(__file__).parent / 'standin_scripts'
KWARGS = dict(layers=(1, 1, 1, 1))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny relational-shapes dataset, a CNN checkpoint of a 4-block resnetrs50 and a 2-epoch recipe."""
    root = tmp_path_factory.mktemp('experiment')
    write_dataset(root / 'data', seed=31, train_images=20, val_images=20, size=64)  # every class in both splits
    cnn = randomize_batchnorm(timm.create_model('resnetrs50', num_classes=10, zero_init_last=False, **KWARGS),
                              torch.Generator().manual_seed(0))
    # as train.py leaves it: args.yaml at the start of the run, the checkpoint after its 4th epoch (index 3), 500 s
    # later
    (root / 'args.yaml').write_text('model: resnetrs50\nepochs: 10\npretrained: true\ndata_dir: /elsewhere\n'
                                    'lr: 0.1\nbatch_size: 4\nopt: sgd\n')
    torch.save({'state_dict': cnn.state_dict(), 'epoch': 3}, root / 'cnn.pth.tar')
    os.utime(root / 'args.yaml', (1e9, 1e9))
    os.utime(root / 'cnn.pth.tar', (1e9 + 500, 1e9 + 500))
    (root / 'recipe.yaml').write_text('epochs: 2\nbatch_size: 4\nopt: adamw\n')
    return root


def experiment_args(setup: Path, out: Path, *extra: str) -> list:
    return [
        'experiment', '--model', 'tcnn_resnet50rs', '--data-dir', str(setup / 'data'), '--out', str(out),
        '--config', str(setup / 'recipe.yaml'), '--scripts-dir', str(STANDIN), '--seeds', '0', '1',
        '--cnn-checkpoint', str(setup / 'cnn.pth.tar'), '--model-kwargs', 'layers=(1,1,1,1)', '--num-classes', '10',
        '--train-size', '64', '--test-size', '64', '--corruptions', 'contrast', '--severities', '3',
        '--analyze-images', '4', '--workers', '0', *extra,
    ]


def run_cli(args: list, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'timm_tcnn', *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


ALL_ARMS = ('--arms', 'tcnn', 'cnn', 'scratch')


@pytest.fixture(scope='module')
def finished(setup):
    """One full experiment (2 seeds; tcnn and cnn 2 epochs, scratch 4 + 2) with the stand-in scripts."""
    out = setup / 'run'
    log = setup / 'standin.log'
    # epochs of 1 s, longer than the 0.25 s between looks at last.pth.tar: every epoch's gates and weights recorded
    result = run_cli(experiment_args(setup, out, *ALL_ARMS),
                     env={'STANDIN_LOG': str(log), 'STANDIN_EPOCH_SECONDS': '1'})
    assert result.returncode == 0, result.stdout + result.stderr
    return out, [json.loads(line) for line in log.read_text().splitlines()]


def test_dry_run_prints_every_command(setup, capsys):
    assert main(experiment_args(setup, setup / 'dry', '--dry-run', '--', '--lr', '0.1')) == 0
    out = capsys.readouterr().out
    assert not (setup / 'dry').exists()
    train = [line for line in out.splitlines() if 'train.py' in line]
    assert len(train) == 4  # 2 arms x 2 seeds
    for line in train:  # identical recipe, epochs and passed-through arguments for both arms
        assert f'--config {setup / "recipe.yaml"}' in line and line.endswith('--lr 0.1')
        assert f'--initial-checkpoint {setup / "cnn.pth.tar"}' in line
    assert sum('--model tcnn_resnet50rs' in line and '--seed 1' in line for line in train) == 1
    assert sum('--model resnetrs50' in line and '--seed 1' in line for line in train) == 1
    assert sum('validate.py' in line for line in out.splitlines()) == 2 * 2 * 2  # arms, seeds, checkpoints
    assert out.count('timm_tcnn robustness tcnn_resnet50rs') == 2 and out.count('timm_tcnn analyze') == 2
    assert '--epochs' not in ' '.join(train)  # the recipe's


def test_dry_run_plans_the_scratch_arm_with_the_same_total_epochs(setup, capsys):
    """The checkpoint records 4 epochs (index 3) and the recipe 2: the scratch arm trains 6, from its own
    initialisation, with the CNN's recipe (its args.yaml without the options of that run)."""
    out = setup / 'dry-scratch'
    assert main(experiment_args(setup, out, '--dry-run', *ALL_ARMS)) == 0
    printed = capsys.readouterr().out
    train = [line for line in printed.splitlines() if 'train.py' in line]
    scratch = [line for line in train if '--experiment scratch-seed' in line]
    assert len(train) == 6 and len(scratch) == 2
    for line in scratch:
        assert f'--config {out / "scratch" / "recipe.yaml"}' in line and line.endswith('--epochs 6')
        assert '--model tcnn_resnet50rs' in line and "tcnn_qk_dim" not in line  # no --tcnn-kwargs given
        assert '--initial-checkpoint' not in line and '--pretrained' not in line and '--num-classes 10' in line
    assert sum(f'--initial-checkpoint {setup / "cnn.pth.tar"}' in line for line in train) == 4
    assert '# scratch/recipe\n' in printed and not out.exists()
    # with --epochs 3 the scratch arm trains 4 + 3
    assert main(experiment_args(setup, out, '--dry-run', '--epochs', '3', *ALL_ARMS)) == 0
    assert capsys.readouterr().out.count('--epochs 7\n') == 2


def test_full_run_writes_report(finished, setup):
    out, calls = finished
    identity = json.loads((out / 'identity' / 'identity.json').read_text())
    assert identity['passed'] and identity['max_relative_error'] <= 1e-4 and identity['top1_agreement'] == 1
    results = json.loads((out / 'results.json').read_text())
    table = results['comparisons']['tcnn - cnn']
    # stand-in validation: CNN 50 + seed + epoch, T-CNN 52 + 2 seed + epoch, scratch 40 + seed + epoch
    assert table['top1_last_64px']['cnn']['mean'] == pytest.approx(51.5)
    assert table['top1_last_64px']['tcnn']['mean'] == pytest.approx(54.0)
    assert table['top1_best_64px']['difference']['mean'] == pytest.approx(2.5)
    assert table['top1_best_64px']['paired'] == [2.0, 3.0]
    scratch = results['comparisons']['tcnn - scratch']['top1_last_64px']
    assert scratch['scratch']['mean'] == pytest.approx(45.5) and scratch['paired'] == [8.0, 9.0]  # last epoch 5
    assert scratch['verdict'] == 'too few seeds (2 < 3)'
    assert 'corrupted_accuracy' in table and 'part/relation' in table and 'part/shape (far)' in table
    assert 'corrupted_accuracy' not in results['comparisons']['tcnn - scratch']  # robustness: tcnn and cnn only
    gates = json.loads((out / 'gates' / 'tcnn-seed0.json').read_text())
    assert sorted(gates) == ['0', '1']  # recorded after each epoch
    assert gates['1']['layer4.0.conv2']['content_share'] == pytest.approx([min(1., 0.02 * GATE_LR_SCALE)] * 9, rel=1e-4)
    assert sorted(json.loads((out / 'gates' / 'scratch-seed1.json').read_text()), key=int) == [str(e) for e in range(6)]
    report = (out / 'report.md').read_text()
    assert '| top1_last_64px | 51.50 +- 0.71 | 54.00 +- 1.41 | +2.50 +- 0.71 |' in report
    assert '### tcnn (T-CNN from the CNN) against scratch (T-CNN from scratch)' in report
    for name in ('learning_curves.png', 'accuracy_time.png', 'corruption_accuracy.png', 'gates.png',
                 'attention_by_layer.png'):
        assert (out / name).stat().st_size > 0
    assert sum(c['script'] == 'train' for c in calls) == 6 and sum(c['script'] == 'validate' for c in calls) == 12
    recipe = (out / 'scratch' / 'recipe.yaml').read_text()
    assert 'lr: 0.1' in recipe and 'opt: sgd' in recipe
    assert not any(f'\n{key}:' in recipe for key in ('model', 'epochs', 'pretrained', 'data_dir'))


def _image_se(a: list, b: list) -> float:
    """Hand computation: SE of the mean over images of (a - b) averaged over seeds, in points."""
    per_image = [100 * sum(x[i] - y[i] for x, y in zip(a, b)) / len(a) for i in range(len(a[0]))]
    mean = sum(per_image) / len(per_image)
    return (sum((v - mean) ** 2 for v in per_image) / (len(per_image) - 1) / len(per_image)) ** 0.5


def test_report_verdicts_and_curves_from_every_image(finished):
    """The interval of a metric with per-image predictions, recomputed by hand from the predictions files; per-epoch
    curves from the recorded weights; the starting CNN's accuracy."""
    out, _ = finished
    results = json.loads((out / 'results.json').read_text())
    row = results['comparisons']['tcnn - cnn']['part/relation']
    predictions = {arm: [json.loads((out / 'predictions' / f'{arm}-seed{s}.json').read_text()) for s in (0, 1)]
                   for arm in ('tcnn', 'cnn')}
    parts = json.loads((setup_data(out) / 'dataset.json').read_text())['label_parts']
    classes = sorted(parts)

    def relation_hits(record: dict) -> list:
        return [int(parts[record['classes'][t]]['relation'] == parts[classes[p]]['relation'])
                for t, p in zip(record['targets'], record['predicted']['best'])]

    hits = {arm: [relation_hits(r) for r in predictions[arm]] for arm in predictions}
    paired = [100 * (sum(t) - sum(c)) / len(t) for t, c in zip(hits['tcnn'], hits['cnn'])]
    assert row['paired'] == pytest.approx(paired)
    assert row['image_error'] == 'paired per image'
    assert row['se_images'] == pytest.approx(_image_se(hits['tcnn'], hits['cnn']))
    se_seeds = abs(paired[0] - paired[1]) / 2**0.5 / 2**0.5  # std of two values / sqrt(2)
    half = 2 * (se_seeds**2 + row['se_images'] ** 2) ** 0.5
    assert row['interval'] == pytest.approx([sum(paired) / 2 - half, sum(paired) / 2 + half])
    corrupted = results['comparisons']['tcnn - cnn']['corrupted_accuracy']
    assert corrupted['image_error'] == 'unpaired bound'
    pa, pb = corrupted['tcnn']['mean'] / 100, corrupted['cnn']['mean'] / 100
    assert corrupted['se_images'] == pytest.approx(100 * ((pa * (1 - pa) + pb * (1 - pb)) / 20) ** 0.5)
    curves = results['results']['runs']['scratch-seed0']['curves']
    assert sorted(curves, key=int) == [str(e) for e in range(1, 7)]  # epochs done
    assert (
        curves['6']['validation_top1'] == 45
        and 'part/relation (near)' in curves['6']
        and 'content_share' in curves['6']
    )
    assert 'content_share' not in results['results']['runs']['cnn-seed0']['curves']['2']
    last = predictions['tcnn'][0]['predicted']
    assert last['epoch1'] == last['last']  # the last epoch's recorded weights are the last checkpoint's
    assert 0 <= results['results']['start_parts']['top1'] <= 100


def setup_data(out: Path) -> Path:
    return Path(json.loads((out / 'experiment.json').read_text())['spec']['data_dir'])


def test_report_times_against_hand_computation(finished, setup, tmp_path):
    """Training times per arm and route (the starting CNN's 500 s counted for tcnn and cnn), from the step records."""
    out, _ = finished
    state_file = out / 'experiment.json'
    state = json.loads(state_file.read_text())
    seconds = {'tcnn': (100.0, 120.0), 'cnn': (60.0, 70.0), 'scratch': (300.0, 340.0)}
    for arm, values in seconds.items():
        for seed, value in enumerate(values):
            state['steps'][f'train/{arm}/seed{seed}']['seconds'] = value
    state_file.write_text(json.dumps(state))
    assert main(experiment_args(setup, out, *ALL_ARMS)) == 0
    times = json.loads((out / 'results.json').read_text())['results']['times']
    assert times['tcnn']['train_seconds']['mean'] == 110 and times['tcnn']['route_seconds'] == 610
    assert times['cnn']['route_seconds'] == 565 and times['scratch']['route_seconds'] == 320
    assert times['scratch']['before_seconds'] is None
    assert times['tcnn']['route_device_hours'] == pytest.approx(610 / 3600)
    report = (out / 'report.md').read_text()
    assert '| tcnn | 2 | 110 +- 14 | 500 | 610 | 0.169 |' in report
    assert '| scratch | 6 | 320 +- 28 | - | 320 | 0.089 |' in report


def test_rerun_skips_finished_steps(finished, setup, capsys):
    out, _ = finished
    before = (out / 'experiment.json').read_text()
    assert main(experiment_args(setup, out, *ALL_ARMS)) == 0
    printed = capsys.readouterr().out
    assert '[run]' not in printed and printed.count('[done]') == len(json.loads(before)['steps'])


def test_other_recipe_is_refused(finished, setup, capsys):
    out, _ = finished
    assert main(experiment_args(setup, out, '--epochs', '3', *ALL_ARMS)) == 2
    err = capsys.readouterr().err
    assert 'error:' in err and 'another recipe' in err and 'epochs' in err


def test_interrupted_training_resumes_from_last_checkpoint(finished, setup, tmp_path):
    out, _ = finished
    state_file = out / 'experiment.json'
    state = json.loads(state_file.read_text())
    del state['steps']['train/tcnn/seed1']  # as if killed during training, after it saved last.pth.tar
    state_file.write_text(json.dumps(state))
    log = tmp_path / 'standin.log'
    result = run_cli(experiment_args(setup, out, *ALL_ARMS), env={'STANDIN_LOG': str(log)})
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c['script'] for c in calls] == ['train']  # nothing else reran
    assert calls[0]['argv'][-2:] == ['--resume', str(out / 'train' / 'tcnn-seed1' / 'last.pth.tar')]
    assert json.loads(state_file.read_text())['steps']['train/tcnn/seed1']['status'] == 'done'


def test_failed_arm_keeps_the_other(setup, tmp_path):
    out = tmp_path / 'run'
    args = experiment_args(setup, out)
    args[args.index('--seeds') + 1 : args.index('--seeds') + 3] = ['0']
    result = run_cli(args, env={'STANDIN_FAIL': 'resnetrs50'})
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'error:' in result.stderr and 'train/cnn/seed0' in result.stderr
    steps = json.loads((out / 'experiment.json').read_text())['steps']
    assert steps['train/cnn/seed0']['status'] == 'failed' and Path(steps['train/cnn/seed0']['log']).exists()
    assert steps['train/tcnn/seed0']['status'] == 'done' and steps['validate/tcnn/seed0/last/64px']['status'] == 'done'
    assert steps['robustness/seed0']['status'] == 'blocked'
    report = (out / 'report.md').read_text()
    assert 'train/cnn/seed0: failed' in report and 'top1_last_64px' in report


def _runs(values: dict, hits: dict = None) -> dict:
    return {
        f'{arm}-seed{s}': dict(metrics={'top1': v}, hits={'top1': hits[arm][s]} if hits else {})
        for arm, vs in values.items()
        for s, v in enumerate(vs)
    }


def test_step_seconds_are_its_commands(tmp_path):
    """A command's step ends when the command does, not at the next look at it."""
    spec = ExperimentSpec(model='tcnn_resnet50rs', cnn_model='resnetrs50', data_dir='', out=str(tmp_path), recipe='',
                          recipe_sha256='', scripts_dir='', seeds=(0,))
    polls = []
    entry = run_step(spec, Step('validate/x', 'validate', (sys.executable, '-c', 'import time; time.sleep(1.2)')), {},
                     poll=lambda: polls.append(1))
    assert entry['status'] == 'done' and entry['returncode'] == 0
    assert 1.2 <= entry['seconds'] < 1.2 + POLL_SECONDS + 0.5 and len(polls) >= 2  # while it ran, and once after


def test_short_epochs_are_all_recorded(tmp_path):
    """Epochs of a second (timm's train.py on tiny data): every last.pth.tar train.py leaves is recorded."""
    spec = ExperimentSpec(model='tcnn_resnet50rs', cnn_model='resnetrs50', data_dir='', out=str(tmp_path), recipe='',
                          recipe_sha256='', scripts_dir='', seeds=(0,))
    run = spec.run_dir('cnn', 0)
    train = (f'import os, time, torch\nos.chdir({str(tmp_path)!r})\nos.makedirs({str(run)!r})\n'
             f'for epoch in range(4):\n    time.sleep(0.8)\n'
             f'    torch.save(dict(epoch=epoch, state_dict=dict(w=torch.full((2,), float(epoch)))), "t")\n'
             f'    os.replace("t", {str(run / "last.pth.tar")!r})  # as train.py replaces it\n')
    entry = run_step(spec, Step('train/cnn/seed0', 'train', (sys.executable, '-c', train), arm='cnn', seed=0), {},
                     record_weights=True)
    assert entry['status'] == 'done', Path(entry['log']).read_text()
    saved = sorted(spec.epoch_weights('cnn', 0).glob('epoch*.safetensors'))
    assert [p.name for p in saved] == [f'epoch{i}.safetensors' for i in range(4)]


def test_report_arithmetic():
    """Seed spread, image error, interval and verdict by hand: 3 seeds, 4 images."""
    hits = {'cnn': [[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]], 'tcnn': [[1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1]]}
    values = {arm: [100 * sum(h) / 4 for h in hs] for arm, hs in hits.items()}  # cnn 50 50 50, tcnn 75 75 100
    row = compare(_runs(values, hits), [0, 1, 2])['top1']
    assert row['cnn']['mean'] == pytest.approx(50.0) and row['paired'] == [25.0, 25.0, 50.0]
    mean, std = 100 / 3, (((25 - 100 / 3) ** 2 * 2 + (50 - 100 / 3) ** 2) / 2) ** 0.5
    assert row['difference']['mean'] == pytest.approx(mean) and row['difference']['std'] == pytest.approx(std)
    assert row['se_seeds'] == pytest.approx(std / 3**0.5)
    # per image, tcnn - cnn averaged over seeds: 1/3, 1/3, 1/3, 1/3 (x 100): no spread over images
    assert row['se_images'] == pytest.approx(0.0) and row['image_error'] == 'paired per image'
    assert row['interval'] == pytest.approx([mean - 2 * std / 3**0.5, mean + 2 * std / 3**0.5])
    assert row['verdict'] == 'tcnn better, beyond the noise'  # 33.3 - 19.2 > 0
    # without per-image results: the unpaired bound over 4 images
    row = compare(_runs(values), [0, 1, 2], images=4)['top1']
    se_images = 100 * ((0.5 * 0.5 + (250 / 300) * (50 / 300)) / 4) ** 0.5
    assert row['image_error'] == 'unpaired bound' and row['se_images'] == pytest.approx(se_images)
    half = 2 * ((std / 3**0.5) ** 2 + se_images**2) ** 0.5
    assert row['interval'] == pytest.approx([mean - half, mean + half])
    assert row['verdict'] == 'within the noise (seeds and images)'  # 33.3 - 42.5 < 0


def test_one_image_is_not_a_result():
    """One image of 251 right in every seed (+0.40 +- 0.00): not a verdict with two seeds, nor with three."""
    for seeds in (2, 3):
        cnn = [[1] * 100 + [0] * 151 for _ in range(seeds)]
        tcnn = [[1] * 101 + [0] * 150 for _ in range(seeds)]
        values = {'cnn': [100 * 100 / 251] * seeds, 'tcnn': [100 * 101 / 251] * seeds}
        row = compare(_runs(values, {'cnn': cnn, 'tcnn': tcnn}), list(range(seeds)))['top1']
        assert row['difference']['mean'] == pytest.approx(100 / 251) and row['se_seeds'] == pytest.approx(0.0)
        assert row['se_images'] == pytest.approx(_image_se(tcnn, cnn))
        assert row['interval'][0] < 0 < row['interval'][1]
        assert row['verdict'] == ('too few seeds (2 < 3)' if seeds == 2 else 'within the noise (seeds and images)')


def _set(args: list, option: str, *values: str) -> None:
    """Replace the value(s) of `option` in `args` (as many as given)."""
    at = args.index(option) + 1
    args[at : at + len(values)] = values


@pytest.mark.parametrize(
    'problem, expect',
    [
        ('no-scripts', 'clone https://github.com/huggingface/pytorch-image-models'),
        ('empty-data', 'does not exist'),
        ('unlabelled', 'not labelled'),
        ('typo', "Did you mean 'tcnn_resnet50rs'"),
        ('negative-seed', '--seeds must be distinct integers >= 0, got -1 1'),
        ('splits-differ', "have different classes (with images only in train: ['b']"),
        ('fewer-classes-than-data', 'the model would have 3 classes but'),
        ('kwargs-train-py-sets', '--model-kwargs drop_rate: train.py sets these'),
        ('tcnn-checkpoint', 'is a T-CNN checkpoint'),
        ('tcnn-kwargs-for-both-arms', "move ['drop_rate', 'tcnn_qk_dim'] to the other one"),
        ('bad-tcnn-option', '--tcnn-kwargs: tcnn_qk_dim=0: expected an integer >= 1'),
        ('other-architecture', 'does not fit resnetrs50'),
        ('scratch-epochs-unknown', 'does not record its epochs: pass --cnn-epochs N'),
        ('scratch-recipe-unknown', "has no args.yaml beside it: pass the CNN's train.py recipe with --scratch-config"),
        ('scratch-options-without-scratch', '--cnn-epochs only acts with the scratch arm: add --arms tcnn cnn scratch'),
        ('arms-without-tcnn', '--arms must name the tcnn arm and each arm once, got cnn scratch'),
    ],
)
def test_bad_input(setup, tmp_path, capsys, monkeypatch, problem, expect):
    args = experiment_args(setup, tmp_path / 'out', '--dry-run')
    if problem == 'no-scripts':
        args[args.index('--scripts-dir') + 1] = str(tmp_path)
    elif problem == 'empty-data':
        args[args.index('--data-dir') + 1] = str(tmp_path)
    elif problem == 'unlabelled':
        for split in ('train', 'validation'):
            (tmp_path / 'flat' / split).mkdir(parents=True)
        args[args.index('--data-dir') + 1] = str(tmp_path / 'flat')
    elif problem == 'negative-seed':
        _set(args, '--seeds', '-1', '1')
    elif problem == 'splits-differ':  # a class with training images only
        for split, labels in (('train', 'abc'), ('validation', 'ac')):
            for label in labels:
                (tmp_path / 'data' / split / label).mkdir(parents=True)
                (tmp_path / 'data' / split / label / '0.png').write_bytes(
                    (setup / 'data' / 'validation' / 'disk_same').iterdir().__next__().read_bytes()
                )
        (tmp_path / 'data' / 'validation' / 'b').mkdir()  # empty: ImageFolder skips it
        _set(args, '--data-dir', str(tmp_path / 'data'))
    elif problem == 'fewer-classes-than-data':
        _set(args, '--num-classes', '3')
    elif problem == 'kwargs-train-py-sets':
        args.insert(args.index('layers=(1,1,1,1)') + 1, 'drop_rate=0.1')
    elif problem == 'tcnn-kwargs-for-both-arms':  # one arm would differ from the other; the CNN has no tcnn_*
        args += ['--tcnn-kwargs', 'drop_rate=0.1']
        args.insert(args.index('layers=(1,1,1,1)') + 1, 'tcnn_qk_dim=8')
    elif problem == 'bad-tcnn-option':
        args += ['--tcnn-kwargs', 'tcnn_qk_dim=0']
    elif problem == 'tcnn-checkpoint':
        tcnn = timm.create_model('tcnn_resnet50rs', num_classes=10, **KWARGS)
        torch.save(tcnn.state_dict(), tmp_path / 'tcnn.pth')
        _set(args, '--cnn-checkpoint', str(tmp_path / 'tcnn.pth'))
    elif problem in (
        'scratch-epochs-unknown',
        'scratch-recipe-unknown',
    ):  # a state dict alone, in a folder without args.yaml
        checkpoint = torch.load(setup / 'cnn.pth.tar', weights_only=True)
        torch.save(
            checkpoint if problem == 'scratch-recipe-unknown' else checkpoint['state_dict'], tmp_path / 'cnn.pth'
        )
        _set(args, '--cnn-checkpoint', str(tmp_path / 'cnn.pth'))
        args += list(ALL_ARMS)
    elif problem == 'scratch-options-without-scratch':
        args += ['--cnn-epochs', '4']
    elif problem == 'arms-without-tcnn':
        args += ['--arms', 'cnn', 'scratch']
    elif problem == 'other-architecture':
        args.remove('--model-kwargs')
        args.remove('layers=(1,1,1,1)')
    else:
        args[args.index('--model') + 1] = 'tcnn_resnet50_rs'
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-tcnn experiment: error: ') and expect in err
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def cnn4(setup):
    """A 4-class CNN checkpoint of the same architecture: fine-tuning it on the 10-class data is a transfer."""
    cnn = randomize_batchnorm(
        timm.create_model('resnetrs50', num_classes=4, zero_init_last=False, **KWARGS), torch.Generator().manual_seed(1)
    )
    torch.save({'state_dict': cnn.state_dict()}, setup / 'cnn4.pth.tar')
    return cnn.eval(), setup / 'cnn4.pth.tar'


def test_transfer_steps(setup, cnn4, capsys):
    """Per seed, a start step, then both arms from its file; no accuracy of the start (its classifier is new)."""
    args = experiment_args(setup, setup / 'dry-transfer', '--dry-run')
    _set(args, '--cnn-checkpoint', str(cnn4[1]))
    assert main(args) == 0
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if 'train.py' in line]
    for seed in (0, 1):
        start = setup / 'dry-transfer' / 'start' / f'seed{seed}.safetensors'
        assert f'# start/seed{seed}\n' in out
        assert sum(f'--initial-checkpoint {start}' in line and f'--seed {seed}' in line for line in train) == 2
    assert 'parts/start' not in out and str(cnn4[1]) not in ' '.join(train)


def test_transfer_start_gives_both_arms_one_classifier(setup, cnn4, tmp_path):
    """The start file keeps the checkpoint's body, holds a new 10-class classifier drawn with the seed, and the CNN
    and the T-CNN built from it as train.py builds them compute the same logits."""
    cnn, path = cnn4
    spec = ExperimentSpec(
        model='tcnn_resnet50rs',
        cnn_model='resnetrs50',
        data_dir=str(setup / 'data'),
        out=str(tmp_path),
        recipe='',
        recipe_sha256='',
        scripts_dir='',
        seeds=(0, 1),
        cnn_checkpoint=str(path),
        model_kwargs=KWARGS,
        num_classes=10,
    )
    heads = []
    for seed in (0, 1):
        start = spec.start_checkpoint(seed)
        assert start_step(spec, Step(f'start/seed{seed}', 'start', (), seed=seed, result=str(start)))['passed']
        arms = {
            name: timm.create_model(name, num_classes=10, checkpoint_path=str(start), **KWARGS).eval()
            for name in ('resnetrs50', 'tcnn_resnet50rs')
        }
        for name, value in cnn.state_dict().items():
            if not name.startswith('fc.'):
                assert torch.equal(arms['resnetrs50'].state_dict()[name], value), name
        x = torch.randn(2, 3, 64, 64)
        assert relative_error(attention_path(arms['tcnn_resnet50rs'], x), arms['resnetrs50'](x).detach()) <= 1e-4
        assert arms['resnetrs50'].fc.weight.shape == (10, 2048)
        heads.append(arms['resnetrs50'].fc.weight)
    assert not torch.equal(*heads)  # each seed draws its own classifier


@pytest.mark.slow
def test_transfer_fine_tune(setup, cnn4, tmp_path):
    """The whole experiment on a transfer: both arms of a seed train from the same start file; the identity check
    still runs."""
    cnn, path = cnn4
    out, log = tmp_path / 'run', tmp_path / 'standin.log'
    args = experiment_args(setup, out)
    _set(args, '--cnn-checkpoint', str(path))
    result = run_cli(args, env={'STANDIN_LOG': str(log)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / 'identity' / 'identity.json').read_text())['passed']
    for seed in (0, 1):
        last = {
            arm: torch.load(out / 'train' / f'{arm}-seed{seed}' / 'last.pth.tar', weights_only=True)['state_dict']
            for arm in ('cnn', 'tcnn')
        }
        assert last['cnn']['fc.weight'].shape == (10, 2048)
        assert torch.equal(last['cnn']['fc.weight'], last['tcnn']['fc.weight'])
        for name, value in cnn.state_dict().items():  # the body is the checkpoint's, in both arms
            if not name.startswith('fc.'):
                assert torch.equal(last['cnn'][name], value) and torch.equal(last['tcnn'][name], value), name
    assert 'transfer: the classifier of the starting weights replaced' in (out / 'report.md').read_text()


def test_imagenet_checkpoint_on_three_classes_is_a_transfer(setup, tmp_path, capsys):
    """A 1000-class CNN checkpoint with --num-classes 3 on 3-class data: a transfer, checked up front."""
    image = next((setup / 'data' / 'validation' / 'disk_same').iterdir()).read_bytes()
    for split in ('train', 'validation'):
        for label in 'abc':
            (tmp_path / 'data' / split / label).mkdir(parents=True)
            (tmp_path / 'data' / split / label / '0.png').write_bytes(image)
    torch.save(timm.create_model('resnetrs50', **KWARGS).state_dict(), tmp_path / 'cnn1000.pth')
    args = experiment_args(setup, tmp_path / 'out', '--dry-run')
    _set(args, '--data-dir', str(tmp_path / 'data'))
    _set(args, '--cnn-checkpoint', str(tmp_path / 'cnn1000.pth'))
    _set(args, '--num-classes', '3')
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '# start/seed0\n' in out and out.count(f'--initial-checkpoint {tmp_path / "out" / "start"}') == 4
