""" Every command on bad inputs: exit code, a message naming the problem and the fix, no traceback, and no
partial output; interrupted and killed runs; the helpers behind them (checkpoint reading, finiteness,
relative error, atomic writes with the umask). """
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_tcnn  # noqa: F401
from timm_tcnn.cli import COMMANDS, main
from timm_tcnn.utils.io import atomic_directory, remove_stale_partials
from timm_tcnn.utils.numerics import relative_error
from timm_tcnn.weights.checkpoint import CheckpointError, load_checkpoint_state_dict

TINY = ['--model-kwargs', 'layers=(1, 1, 1, 1)', 'num_classes=3']  # a one-block-per-stage T-CNN: cheap


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    """Bad input files, a CNN checkpoint with NaN weights, one of another variant and a tiny T-CNN's."""
    root = tmp_path_factory.mktemp('bad_inputs')
    cnn = timm.create_model('resnetrs50').state_dict()
    save_file(cnn, str(root / 'resnetrs50.safetensors'))
    nan = dict(cnn, **{'layer4.0.conv2.weight': cnn['layer4.0.conv2.weight'].clone()})
    nan['layer4.0.conv2.weight'][0, 0, 0, 0] = float('nan')
    save_file(nan, str(root / 'nan.safetensors'))
    tiny = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), num_classes=3).state_dict()
    torch.save({'state_dict': tiny, 'epoch': 1}, root / 'tiny.pth.tar')
    inf = dict(tiny, **{'layer3.0.bn2.running_var': torch.full_like(tiny['layer3.0.bn2.running_var'], math.inf)})
    torch.save(inf, root / 'inf.pth')
    (root / 'empty.pth').write_bytes(b'')
    (root / 'random.pth').write_bytes(b'\x00' + os.urandom(4095))
    full = (root / 'tiny.pth.tar').read_bytes()
    (root / 'truncated.pth.tar').write_bytes(full[:len(full) // 2])
    (root / 'corrupt.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": nonsense}')
    torch.save(torch.nn.Linear(2, 2), root / 'module.pth')
    (root / 'a_file').write_text('not a folder')
    images = root / 'images'
    images.mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(images / f'{i}.png')
    (root / 'val' / 'n01440764').mkdir(parents=True)  # an ImageNet class folder
    Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(root / 'val' / 'n01440764' / '0.png')
    (root / 'no_images').mkdir()
    for split in ('train', 'validation'):  # a labelled ImageFolder for `experiment`
        for label in ('a', 'b'):
            (root / 'data' / split / label).mkdir(parents=True)
            Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(root / 'data' / split / label / '0.png')
    (root / 'scripts').mkdir()
    for script in ('train.py', 'validate.py'):
        (root / 'scripts' / script).write_text('raise SystemExit(3)\n')
    (root / 'existing').mkdir()
    folder = root / 'folder'  # a local-dir: model folder, then a truncated and an incomplete copy
    tiny_model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), num_classes=3)
    timm.models.save_for_hf(tiny_model, str(folder), model_args=dict(layers=(1, 1, 1, 1)), safe_serialization=True)
    for name in ('truncated_folder', 'no_config_folder'):
        shutil.copytree(folder, root / name)
    weights = (folder / 'model.safetensors').read_bytes()
    (root / 'truncated_folder' / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
    (root / 'no_config_folder' / 'config.json').unlink()
    return root


def _cases():
    """(id, argv with {root} and {out} placeholders, exit code, fragments the message must hold)."""
    convert = ['convert', 'tcnn_resnet50rs', '--out', '{out}']
    analyze = ['analyze', 'tcnn_resnet50rs', *TINY, '--images', '{root}/images', '--out', '{out}', '--no-plots']
    return [
        ('convert-typo', ['convert', 'tcnn_resnet50_rs', '--random-weights'], 2,
         ['neither a registered T-CNN nor its CNN', 'tcnn_resnet50rs']),
        ('convert-missing', [*convert, '--checkpoint', '{root}/missing.pth'], 2, ['does not exist', 'check the path']),
        ('convert-empty', [*convert, '--checkpoint', '{root}/empty.pth'], 2, ['empty (0 bytes)', 'complete file']),
        ('convert-random-bytes', [*convert, '--checkpoint', '{root}/random.pth'], 2,
         ['corrupt, truncated or not a PyTorch file', 'torch.save or safetensors']),
        ('convert-truncated', [*convert, '--checkpoint', '{root}/truncated.pth.tar'], 2,
         ['corrupt, truncated', 'complete file']),
        ('convert-corrupt-safetensors', [*convert, '--checkpoint', '{root}/corrupt.safetensors'], 2,
         ['not a safetensors file']),
        ('convert-pickled-module', [*convert, '--checkpoint', '{root}/module.pth'], 2,
         ['not loaded for safety', 'torch.nn.modules.linear.Linear', 'model.state_dict()']),
        ('convert-nan', [*convert, '--checkpoint', '{root}/nan.safetensors'], 2,
         ['NaN or Inf', 'layer4.0.conv2.weight', 'earlier checkpoint']),
        ('convert-other-variant', ['convert', 'tcnn_resnet101rs', '--out', '{out}', '--checkpoint',
                                   '{root}/resnetrs50.safetensors'], 2,
         ['does not fit resnetrs101', 'It fits tcnn_resnet50rs']),
        ('convert-no-ema', [*convert, '--checkpoint', '{root}/resnetrs50.safetensors', '--ema'], 2,
         ['no EMA weights', 'leave out --ema']),
        ('convert-ema-alone', [*convert, '--random-weights', '--ema'], 2, ['--ema', 'pass --checkpoint FILE']),
        ('convert-existing-out', ['convert', 'tcnn_resnet50rs', '--random-weights', '--out', '{root}/existing'], 2,
         ['already exists', '--overwrite']),
        ('convert-out-under-file', ['convert', 'tcnn_resnet50rs', '--random-weights', '--out', '{root}/a_file/out'],
         2, ['is a file', 'choose another path']),
        ('convert-no-images', [*convert, '--random-weights', '--images', '{root}/no_images'], 2,
         ['holds no image file']),
        ('convert-bad-options', [*convert, '--random-weights', '--model-kwargs', 'tcnn_stage=4'], 2,
         ['Unknown T-CNN options', 'tcnn_stages']),
        ('convert-tcnn-checkpoint', [*convert, '--checkpoint', '{root}/tiny.pth.tar'], 2,
         ['is a T-CNN checkpoint', 'convert takes CNN weights']),
        ('convert-bad-tag', ['convert', 'tcnn_resnet18.bogus', '--random-weights'], 2,
         ["no pretrained tag 'bogus'", 'a1_in1k']),
        ('convert-bad-num-classes', [*convert, '--random-weights', '--model-kwargs', 'num_classes=-3'], 2,
         ['num_classes=-3: expected an integer >= 0']),
        ('analyze-no-weights', analyze, 2, ['has no weights', '--pretrained, --checkpoint FILE, --random-weights']),
        ('analyze-inf', [*analyze, '--checkpoint', '{root}/inf.pth'], 2, ['NaN or Inf', 'layer3.0.bn2.running_var']),
        ('analyze-existing-out', ['analyze', 'tcnn_resnet50rs', '--random-weights', '--images', '{root}/images',
                                  '--out', '{root}/existing'], 2, ['already exists', '--overwrite']),
        ('analyze-other-classes', [*analyze[:2], '--model-kwargs', 'layers=(1, 1, 1, 1)', *analyze[5:],
                                   '--checkpoint', '{root}/tiny.pth.tar'], 2,
         ['does not fit tcnn_resnet50rs', 'It has 3 classes, this model 1000: pass num_classes=3']),
        *[(f'{command}-{folder}', [command, f'local-dir:{{root}}/{folder}', '--pretrained', *data, '{out}'], 2,
           fragments) for command, data in (('analyze', ['--images', '{root}/images', '--no-plots', '--out']),
                                            ('robustness', ['--corrupt', '{root}/data/train', '--out']))
          for folder, fragments in (('truncated_folder', ['weights do not load', 'incomplete metadata',
                                                          'write or copy the folder again']),
                                    ('no_config_folder', ['has no config.json', 'copy it completely']))],
        ('robustness-no-weights', ['robustness', 'resnet18', '--imagenet-val', '{root}/images', '--out', '{out}'],
         2, ['has no weights', '--pretrained']),
        ('robustness-output-under-file', ['robustness', 'resnet18', '--pretrained', '--imagenet-val',
                                          '{root}/images', '--out', '{root}/a_file/out'], 2, ['is a file']),
        ('robustness-bad-device', ['robustness', 'resnet18', '--pretrained', '--imagenet-val', '{root}/images',
                                   '--out', '{out}', '--device', 'gpu0'], 2, ['not a torch device', 'cpu']),
        ('publish-missing', ['publish', '{root}/missing.pth', '--repo-id', 'acme/x', '--model', 'tcnn_resnet50rs',
                             '--dry-run', '--out', '{out}'], 2, ['does not exist']),
        ('publish-existing-out', ['publish', '{root}/tiny.pth.tar', '--repo-id', 'acme/x', '--dry-run', '--out',
                                  '{root}/existing'], 2, ['already exists', '--overwrite']),
        ('bench-gate', ['bench', '--quick', '--gate', '1'], 2, ['--gate must be in (0, 1)']),
        ('bench-out-is-folder', ['bench', '--quick', '--out', '{root}/existing'], 2, ['is a folder']),
        ('bench-no-cuda', ['bench', '--quick', '--device', 'cuda'], 2, ['no CUDA device', '--device cpu']),
        ('bench-fp16-on-cpu', ['bench', '--quick', '--amp', 'fp16'], 2, ['--amp fp16 is for GPUs', 'bf16']),
        ('experiment-no-scripts', ['experiment', '--model', 'tcnn_resnet50rs', '--data-dir', '{root}/data',
                                   '--out', '{out}', '--scripts-dir', '{root}'], 2,
         ['has no train.py and validate.py', 'pytorch-image-models']),
        ('experiment-nan-checkpoint', ['experiment', '--model', 'tcnn_resnet50rs', '--data-dir', '{root}/data',
                                       '--out', '{out}', '--scripts-dir', '{root}/scripts', '--cnn-checkpoint',
                                       '{root}/nan.safetensors'], 2, ['NaN or Inf', 'layer4.0.conv2.weight']),
        ('experiment-bad-device', ['experiment', '--model', 'tcnn_resnet50rs', '--data-dir', '{root}/data',
                                   '--out', '{out}', '--scripts-dir', '{root}/scripts', '--device', 'gpu0'], 2,
         ['not a torch device']),
        ('relational-shapes-not-empty', ['relational-shapes', '--out', '{root}/images'], 2,
         ['is not empty', 'new or empty --out']),
        ('relational-shapes-class-without-images', ['relational-shapes', '--out', '{out}', '--val-images', '10'], 2,
         ['--val-images 10 leaves 3 classes without a validation image', 'ring_different', '--val-images 61 or more']),
        ('convert-max-images-alone', [*convert, '--random-weights', '--max-images', '3'], 2,
         ['--max-images only acts with --images DIR']),
        ('convert-overwrite-alone', ['convert', 'tcnn_resnet50rs', '--random-weights', '--overwrite'], 2,
         ['--overwrite only acts with --out DIR']),
        ('analyze-query-pixel-no-plots', [*analyze, '--random-weights', '--query-pixel', '1', '1', '--plot-heads', '2'],
         2, ['--query-pixel, --plot-heads only act with the figures: drop --no-plots or leave them out']),
        ('robustness-compare-options-alone', ['robustness', 'resnet18', '--pretrained', '--corrupt',
                                              '{root}/data/train', '--out', '{out}', '--compare-checkpoint',
                                              '{root}/tiny.pth.tar'], 2,
         ['--compare-checkpoint only acts with --compare OTHER_MODEL']),
        ('robustness-class-map-alone', ['robustness', 'resnet18', '--pretrained', '--imagenet-val', '{root}/val',
                                        '--out', '{out}', '--class-map', '{root}/a_file'], 2,
         ['--class-map only acts with --corrupt DIR']),
        ('robustness-corruptions-alone', ['robustness', 'resnet18', '--pretrained', '--imagenet-val', '{root}/val',
                                          '--out', '{out}', '--corruptions', 'fog', '--clean-accuracy', '70'], 2,
         ['--corruptions only acts with --imagenet-c DIR or --corrupt DIR']),
        ('robustness-clean-accuracy-alone', ['robustness', 'resnet18', '--pretrained', '--corrupt', '{root}/data/train',
                                             '--out', '{out}', '--clean-accuracy', '70'], 2,
         ['--clean-accuracy only acts with --imagenet-c DIR (the relative mCE): add --imagenet-c DIR']),
        ('publish-dry-run-upload-options', ['publish', '{root}/tiny.pth.tar', '--repo-id', 'acme/x', '--dry-run',
                                            '--out', '{out}', '--private', '--revision', 'b'], 2,
         ['--private, --revision only act with an upload: drop --dry-run or leave them out']),
        ('publish-overwrite-alone', ['publish', '{root}/tiny.pth.tar', '--repo-id', 'acme/x', '--overwrite'], 2,
         ['--overwrite only acts with --out DIR']),
        ('experiment-corruptions-without-corrupted-images',
         ['experiment', '--model', 'tcnn_resnet50rs', '--data-dir', '{root}/data', '--out', '{out}', '--scripts-dir',
          '{root}/scripts', '--imagenet-a', '{root}/val', '--severities', '3', '--dry-run'], 2,
         ['--severities only acts with corrupted images: add --imagenet-c DIR']),
        ('experiment-unknown-corruption',
         ['experiment', '--model', 'tcnn_resnet50rs', '--data-dir', '{root}/data', '--out', '{out}', '--scripts-dir',
          '{root}/scripts', '--corruptions', 'fgo', '--dry-run'], 2, ["unknown corruption(s) ['fgo']"]),
        ('run-missing-script', ['run', '{root}/train.py'], 2, ['script not found', 'pytorch-image-models']),
    ]


@pytest.mark.parametrize('argv, code, fragments', [c[1:] for c in _cases()], ids=[c[0] for c in _cases()])
def test_bad_input_table(bad, tmp_path, capsys, argv, code, fragments):
    out = tmp_path / 'out'
    argv = [a.format(root=bad, out=out) for a in argv]
    before = sorted(p.name for p in bad.iterdir())
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(f'timm-tcnn {argv[0]}: error: ') and 'Traceback' not in err
    for fragment in fragments:
        assert fragment in err
    assert not out.exists() and not list(tmp_path.iterdir())  # no output, no partial output
    assert sorted(p.name for p in bad.iterdir()) == before and not any((bad / 'existing').iterdir())


@pytest.mark.parametrize('command', COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, '--help'])
    assert info.value.code == 0 and f'usage: timm-tcnn {command}' in capsys.readouterr().out


def test_unwritable_output_folder(bad, tmp_path, capsys):
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip('running as a user who can write anywhere (root)')
        assert main(['convert', 'tcnn_resnet50rs', '--random-weights', '--out', str(locked / 'out')]) == 2
        err = capsys.readouterr().err
        assert f'cannot write into {locked} (Permission denied); choose a writable folder' in err
    finally:
        locked.chmod(0o700)


def test_failed_identity_check_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['convert', 'tcnn_resnet50rs', '--random-weights', '--batch-size', '1', '--tolerance', '1e-30',
                 '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'error: the identity does not hold: max relative error' in err and 'nothing was written' in err
    assert not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(bad):
    with pytest.raises(CheckpointError, match='empty'):
        main(['convert', 'tcnn_resnet50rs', '--checkpoint', str(bad / 'empty.pth'), '--debug'])
    with pytest.raises(CheckpointError, match='empty'):
        main(['--debug', 'convert', 'tcnn_resnet50rs', '--checkpoint', str(bad / 'empty.pth')])


def test_publish_checks_the_hub_before_any_work(bad, tmp_path, capsys, monkeypatch):
    """With a token but no network: exit 1 within seconds, before the (missing) checkpoint is even read."""
    monkeypatch.setenv('HF_TOKEN', 'hf_notARealToken000')
    monkeypatch.setattr(hf_constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    start = time.perf_counter()
    assert main(['publish', str(bad / 'missing.pth'), '--repo-id', 'acme/x', '--model', 'tcnn_resnet50rs']) == 1
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert 'Cannot reach the Hugging Face Hub' in err and '--dry-run --out DIR' in err and 'Traceback' not in err
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    monkeypatch.setattr(hf_constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no-tokens'))
    assert main(['publish', str(bad / 'missing.pth'), '--repo-id', 'acme/x', '--model', 'tcnn_resnet50rs']) == 2
    assert 'Not logged in' in capsys.readouterr().err


@pytest.mark.parametrize('argv', [
    ['robustness', 'resnet18', '--pretrained', '--imagenet-val', '{root}/val', '--out', '{out}'],
    ['analyze', 'tcnn_resnet50rs', '--pretrained', '--images', '{root}/images', '--out', '{out}'],
    ['convert', 'tcnn_resnet101rs', '--out', '{out}'],
    ['robustness', 'hf-hub:acme/tcnn', '--pretrained', '--corrupt', '{root}/data/train', '--out', '{out}'],
    ['analyze', 'hf-hub:acme/tcnn', '--pretrained', '--images', '{root}/images', '--out', '{out}'],
    ['robustness', 'resnet18', '--checkpoint', '{root}/resnetrs50.safetensors', '--compare', 'hf-hub:acme/cnn',
     '--compare-pretrained', '--corrupt', '{root}/data/train', '--out', '{out}'],
    ['analyze', 'tcnn_resnet50rs', '--random-weights', '--cnn', 'hf-hub:acme/cnn', '--images', '{root}/images',
     '--out', '{out}'],
], ids=['robustness', 'analyze', 'convert', 'robustness-hf-hub', 'analyze-hf-hub', 'robustness-compare-hf-hub',
        'analyze-cnn-hf-hub'])
@pytest.mark.parametrize('offline', [True, False], ids=['offline', 'unreachable'])
def test_missing_hub_weights_fail_fast(bad, tmp_path, capsys, monkeypatch, argv, offline):
    """Offline mode, or an endpoint where nothing listens: one line within seconds, no retries."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', offline)
    monkeypatch.setattr(hf_constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    for name in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / 'out'
    start = time.perf_counter()
    assert main([a.format(root=bad, out=out) for a in argv]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert 'error: Cannot get ' in err and 'hf download' in err and 'Traceback' not in err
    assert ('hf-hub:acme/' in err) == ('hf-hub:' in ' '.join(argv))
    assert not out.exists() and not list(tmp_path.iterdir())


def _hang_in_analyze_output(monkeypatch, signum=None):
    """Make analyze stop while its output folder is half written: send `signum` to this process, or hang."""
    import timm_tcnn.tools.analyze as analyze

    def csv_text(rows):
        if signum is None:
            print('ready', flush=True)
            time.sleep(120)
        # to this thread: Python runs the handler before raise_signal returns
        signal.raise_signal(signum)
        raise AssertionError(f'{signum!r} did not interrupt the command')

    monkeypatch.setattr(analyze, '_csv_text', csv_text)


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_interrupted_command_leaves_nothing(bad, tmp_path, capsys, monkeypatch, signum):
    _hang_in_analyze_output(monkeypatch, signum)
    out = tmp_path / 'out'
    # Python's own SIGINT handler, as in a terminal: a shell starts background jobs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(['analyze', 'tcnn_resnet50rs', *TINY, '--random-weights', '--images', str(bad / 'images'),
                     '--out', str(out), '--no-plots', '--img-size', '64'])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signum
    err = capsys.readouterr().err
    assert f'interrupted ({signal.Signals(signum).name})' in err and 'Traceback' not in err
    assert not list(tmp_path.iterdir())


def test_terminated_process_exit_code_and_cleanup(bad, tmp_path):
    """A real process: SIGTERM while the output is half written -> exit 143, no traceback, nothing left."""
    out = tmp_path / 'out'
    script = (
        'import sys, pytest, timm_tcnn.cli as cli\n'
        'sys.path.insert(0, sys.argv[1])\n'
        'from test_cli_errors import _hang_in_analyze_output\n'
        'with pytest.MonkeyPatch.context() as mp:\n'
        '    _hang_in_analyze_output(mp)\n'
        '    sys.exit(cli.main(sys.argv[2:]))\n')
    argv = ['analyze', 'tcnn_resnet50rs', *TINY, '--random-weights', '--images', str(bad / 'images'),
            '--out', str(out), '--no-plots', '--img-size', '64']
    proc = subprocess.Popen([sys.executable, '-c', script, str(Path(__file__).parent), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'ready'
    assert [p.name.split('-')[0] for p in tmp_path.iterdir()] == ['.out.partial']
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and 'interrupted (SIGTERM)' in err and 'Traceback' not in err
    assert not list(tmp_path.iterdir())


def test_killed_run_leftovers_are_removed_by_the_next_run(tmp_path, caplog):
    """A run killed outright (SIGKILL) leaves its partial folder; the next write to the same output removes
    it and says so, and leaves those of runs still in progress alone."""
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    out = tmp_path / 'out'
    killed = tmp_path / f'.out.partial-{dead.pid}-abcd'
    killed.mkdir()
    (killed / 'model.safetensors').write_bytes(bytes(1000))
    alive = tmp_path / f'.out.partial-{os.getpid()}-efgh'
    alive.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / 'config.json').write_text('{}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, 'out']
    assert f'removed {killed}, the partial output of an interrupted run' in caplog.text
    alive.rmdir()
    assert remove_stale_partials(out) == []


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / 'out') as tmp:
            save_file({'w': torch.zeros(2)}, str(tmp / 'model.safetensors'))  # safetensors writes 0600
            (tmp / 'sub').mkdir(mode=0o700)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / 'out', *(tmp_path / 'out').iterdir()]}
    assert modes == {'out': 0o750, 'model.safetensors': 0o640, 'sub': 0o750}


def test_checkpoint_prefixes_and_ema(tmp_path):
    weights = {'fc.weight': torch.ones(2, 2)}
    path = tmp_path / 'compiled_ddp.pth'
    torch.save({'state_dict': {f'_orig_mod.module.{k}': v for k, v in weights.items()},
                'state_dict_ema': {f'module.{k}': 2 * v for k, v in weights.items()}}, path)
    assert torch.equal(load_checkpoint_state_dict(path)['fc.weight'], weights['fc.weight'])
    assert torch.equal(load_checkpoint_state_dict(path, use_ema=True)['fc.weight'], 2 * weights['fc.weight'])
    torch.save({'state_dict': weights}, path)
    with pytest.raises(CheckpointError, match='no EMA weights'):
        load_checkpoint_state_dict(path, use_ema=True)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match='holds no state dict'):
        load_checkpoint_state_dict(path)


def test_non_finite_outputs_never_pass_an_identity_check():
    ref = torch.tensor([1., -2.])
    assert relative_error(torch.tensor([1., -1.5]), ref) == pytest.approx(0.25)
    for bad_value in (math.nan, math.inf, -math.inf):
        assert relative_error(torch.tensor([1., bad_value]), ref) == math.inf
        assert relative_error(ref, torch.tensor([bad_value, 1.])) == math.inf
    assert max(0., relative_error(torch.tensor([math.nan]), torch.tensor([1.]))) > 1e-4
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0


def test_a_checkpoint_tells_its_query_key_width():
    """`tcnn_qk_dim` is read from the joint projection `qk.weight` (heads * 2 * qk_dim rows), and a model of another
    width is told which model kwargs rebuild the checkpoint."""
    from timm_tcnn.models import checkpoint_options
    tiny = dict(layers=(1, 1, 1, 1), num_classes=3)
    saved = timm.create_model('tcnn_resnet50rs', tcnn_qk_dim=8, **tiny).state_dict()
    other = timm.create_model('tcnn_resnet50rs', **tiny)
    assert saved['layer4.0.conv2.qk.weight'].shape[0] == 9 * 2 * 8
    assert checkpoint_options(saved, other)['tcnn_qk_dim'] == 8
    assert checkpoint_options(other.state_dict(), other)['tcnn_qk_dim'] != 8
    with pytest.raises(RuntimeError, match='Rebuild it with --model-kwargs tcnn_qk_dim=8'):
        other.load_state_dict(saved)
