""" `timm-tcnn run`: stand-in scripts run as `python script.py` would, with the T-CNN models registered. """
import json
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import timm

from timm_tcnn.cli import main as cli_main
from timm_tcnn.tools.runner import ScriptNotFoundError, run_script
from timm_tcnn.weights.loading import unknown_model_hint

# writes what the script sees to report.json next to itself (timm only if already imported: fast under plain python)
REPORT_SCRIPT = '''
import json, os, sys
import helper  # a module next to the script: needs the script's folder on sys.path
timm = sys.modules.get('timm')
report = dict(
    argv=sys.argv, name=__name__, file=__file__, path0=sys.path[0], helper=helper.VALUE,
    registered=timm is not None and timm.is_model('tcnn_resnet50rs'),
)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'report.json'), 'w') as f:
    json.dump(report, f)
'''


def write_script(folder: Path, body: str, name: str = 'script.py') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'helper.py').write_text('VALUE = 42\n')
    script = folder / name
    script.write_text(textwrap.dedent(body))
    return script


def read_report(script: Path) -> dict:
    return json.loads((script.parent / 'report.json').read_text())


def test_script_sees_what_python_script_py_gives_plus_registered_models(tmp_path):
    script = write_script(tmp_path / 'scripts', REPORT_SCRIPT)
    args = ['--model', 'tcnn_resnet50rs', '--flag=1', '-h', '--', 'x y']
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=tmp_path, timeout=300)
    reference = read_report(script)  # plain python: same argv/__name__/__file__/sys.path[0], models unknown
    run_script(str(script), args)
    report = read_report(script)
    assert report['argv'] == reference['argv'] == [str(script), *args]
    assert report['name'] == reference['name'] == '__main__'
    assert report['file'] == reference['file'] == str(script)
    assert report['path0'] == reference['path0'] == str(script.parent)
    assert report['helper'] == reference['helper'] == 42
    assert reference['registered'] is False and report['registered'] is True


def test_relative_script_path_and_restored_interpreter_state(tmp_path, monkeypatch):
    script = write_script(tmp_path / 'scripts', REPORT_SCRIPT)
    monkeypatch.chdir(tmp_path)
    argv, path = list(sys.argv), list(sys.path)
    run_script(os.path.join('scripts', 'script.py'), ['a'])
    report = read_report(script)
    assert report['file'] == str(script) and report['argv'] == [str(script), 'a']
    assert sys.argv == argv and sys.path == path


def test_cli_passes_script_arguments_through_untouched(tmp_path):
    script = write_script(tmp_path, REPORT_SCRIPT)
    args = ['--help', '--version', '-h', '--model=tcnn_resnet50rs', '--', '--model-kwargs', 'tcnn_stages=(3,4)']
    assert cli_main(['run', str(script), *args]) == 0
    assert read_report(script)['argv'] == [str(script), *args]


@pytest.mark.parametrize('code', [0, 3, 'bad arguments'])
def test_system_exit_code_propagates(tmp_path, code):
    script = write_script(tmp_path, f'import sys\nsys.exit({code!r})\n')
    with pytest.raises(SystemExit) as info:
        cli_main(['run', str(script)])
    assert info.value.code == code


def test_exception_propagates_with_script_traceback(tmp_path):
    script = write_script(tmp_path, 'def main():\n    raise ValueError("boom")\n\nmain()\n')
    with pytest.raises(ValueError, match='boom') as info:
        run_script(str(script))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (frames[-1].filename, frames[-1].lineno, frames[-1].name) == (str(script), 2, 'main')
    assert (frames[-2].filename, frames[-2].lineno) == (str(script), 4)


def test_process_exit_code_and_traceback(tmp_path):
    """The real entry point: `python -m timm_tcnn run` prints the script's traceback and exits with 1."""
    fails = write_script(tmp_path, 'def main():\n    raise KeyError("missing")\n\nmain()\n', 'fails.py')
    out = subprocess.run([sys.executable, '-m', 'timm_tcnn', 'run', str(fails)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert f'File "{fails}", line 2, in main' in out.stderr and out.stderr.rstrip().endswith("KeyError: 'missing'")


def test_model_name_typo_gets_a_suggestion(tmp_path):
    script = write_script(tmp_path, 'import timm\ntimm.create_model("tcnn_resnet50_rs")\n')
    with pytest.raises(RuntimeError, match=r'Unknown model \(tcnn_resnet50_rs\)') as info:
        run_script(str(script))
    assert "Did you mean 'tcnn_resnet50rs'?" in info.value.__notes__[0]


def test_unknown_model_hint():
    hint = unknown_model_hint(RuntimeError('Unknown model (resnetrs_50)'))
    assert hint.startswith("Did you mean 'resnetrs50'?")
    hint = unknown_model_hint(RuntimeError('Unknown model (qqqqqqqqqqqqqqqq)'))
    assert 'Did you mean' not in hint and set(timm.list_models('tcnn_*')) <= set(hint.rstrip('.').split(': ')[-1]
                                                                                  .split(', '))
    assert unknown_model_hint(RuntimeError('out of memory')) is None
    assert unknown_model_hint(ValueError('Unknown model (x)')) is None


def test_missing_script_or_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ScriptNotFoundError, match='script not found: .*pytorch-image-models'):
        run_script(str(tmp_path / 'train.py'))
    with pytest.raises(ScriptNotFoundError, match='is a folder, not a script'):
        run_script(str(tmp_path))
    assert cli_main(['run', str(tmp_path / 'train.py')]) == 2
    assert f'timm-tcnn run: error: script not found: {tmp_path / "train.py"}' in capsys.readouterr().err


def test_warns_when_script_folder_holds_another_timm(tmp_path, capsys, caplog):
    """`python script.py` in a timm checkout would import the checkout's timm; the runner says it does not."""
    script = write_script(tmp_path, 'import timm\nprint(timm.__file__)\n')
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / '__init__.py').write_text('raise ImportError("the checkout timm was imported")\n')
    run_script(str(script))
    assert f'{tmp_path} holds its own timm package' in caplog.text
    assert capsys.readouterr().out.strip() == timm.__file__


DDP_SCRIPT = '''
import json, os, sys
import timm, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(rank)  # different initial weights and data on each rank: DDP must reconcile them
model = timm.create_model(sys.argv[1], layers=(1, 1, 1, 1), num_classes=2, zero_init_last=False)
model = DistributedDataParallel(model, device_ids=[torch.device('cpu')])  # as timm's train.py does on CPU
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
loss.backward()
optimizer.step()
params = {k: v.detach() for k, v in model.module.named_parameters()}
grad = [p.grad.abs().sum().item() for n, p in model.module.named_parameters() if n.endswith('content_gate')]
report = dict(argv=sys.argv[1:], name=__name__, world=dist.get_world_size(), gate_grad=grad,
              gate=params['layer4.0.conv2.content_gate'].tolist(),
              checksum=sum(v.double().sum().item() for v in params.values()))
with open(os.path.join(os.path.dirname(__file__), f'rank{rank}.json'), 'w') as f:
    json.dump(report, f)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_a_tcnn(tmp_path):
    """`torchrun --nproc_per_node=2 -m timm_tcnn run SCRIPT`: every rank has the models; DDP (gloo), given
    `device_ids=[cpu]` as train.py gives it, syncs a step."""
    script = write_script(tmp_path, DDP_SCRIPT)
    cmd = ['torchrun', '--standalone', '--nproc_per_node=2', '-m', 'timm_tcnn', 'run', str(script),
           'tcnn_resnet50rs']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for report in ranks:
        assert report['argv'] == ['tcnn_resnet50rs'] and report['name'] == '__main__' and report['world'] == 2
        # layer4.0.conv2's gates learn from 0
        assert len(report['gate_grad']) == 1 and all(g > 0 for g in report['gate_grad'])
    assert ranks[0]['checksum'] == ranks[1]['checksum']  # same weights after the synchronised step
    assert ranks[0]['gate'] == ranks[1]['gate']
