""" `timm-tcnn experiment --launcher slurm` with the stand-in scripts: its options and plan, and on a real SLURM
(`.ci/slurm-up`) jobs in parallel after the jobs they need, a rerun that submits nothing, a requeued training job
resuming from its checkpoint, a failing job reported once and an interrupted submitting process re-attaching. """
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from timm_tcnn.cli import main
from timm_tcnn.tools.relational_shapes import write_dataset
from helpers import randomize_batchnorm

pytest.importorskip('submitit', reason='the SLURM launcher needs submitit (the cluster extra)')

STANDIN = Path(__file__).parent / 'standin_scripts'
needs_slurm = pytest.mark.skipif(shutil.which('sbatch') is None,
                                 reason='no SLURM here (sbatch is not on PATH): start one with .ci/slurm-up')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny relational-shapes dataset, a CNN checkpoint of a 4-block resnetrs50 and a 2-epoch recipe."""
    root = tmp_path_factory.mktemp('slurm')
    write_dataset(root / 'data', seed=31, train_images=20, val_images=20, size=64)
    cnn = timm.create_model('resnetrs50', num_classes=10, zero_init_last=False, layers=(1, 1, 1, 1))
    cnn = randomize_batchnorm(cnn, torch.Generator().manual_seed(0))
    torch.save({'state_dict': cnn.state_dict(), 'epoch': 3}, root / 'cnn.pth.tar')
    (root / 'recipe.yaml').write_text('epochs: 2\nbatch_size: 4\nopt: adamw\n')
    return root


def slurm_args(setup: Path, out: Path, *extra: str, seeds=('0', '1'), arms=('tcnn', 'cnn')) -> list:
    return [
        'experiment', '--model', 'tcnn_resnet50rs', '--data-dir', str(setup / 'data'), '--out', str(out),
        '--config', str(setup / 'recipe.yaml'), '--scripts-dir', str(STANDIN), '--seeds', *seeds, '--arms', *arms,
        '--cnn-checkpoint', str(setup / 'cnn.pth.tar'), '--model-kwargs', 'layers=(1,1,1,1)', '--num-classes', '10',
        '--train-size', '64', '--test-size', '64', '--corruptions', 'contrast', '--severities', '3',
        '--analyze-images', '4', '--workers', '0', '--launcher', 'slurm', *extra,
    ]


def command(args: list) -> list:
    return [sys.executable, '-m', 'timm_tcnn', *args]


def run_cli(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command(args), capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def jobs_of(out: Path) -> dict:
    return json.loads((out / 'experiment.json').read_text())['jobs']


@pytest.mark.parametrize('extra, expect', [
    (['--slurm', 'partiton=gpu'], "--slurm partiton: not a parameter of submitit's SlurmExecutor; valid keys: account"),
    (['--slurm', 'nodes=two'], '--slurm nodes=two: expected an integer'),
    (['--slurm', 'timeout_min=0'], '--slurm timeout_min=0: expected a number >= 1'),
    (['--slurm', 'partition'], '--slurm partition: expected KEY=VALUE'),
    (['--slurm', 'dependency=afterok:1'], '--slurm dependency: set by the experiment'),
    (['--slurm', 'timeout_min=60', 'time=60'], '--slurm time: given twice (or with time)'),
    (['--slurm', 'exclusive=yes', 'additional_parameters=reservation'], 'expected a Python dict of sbatch options'),
    (['--slurm', 'nodes=2'], '--nproc 1 processes cannot be spread over --slurm nodes=2'),
    (['--slurm', 'gpus_per_node=8'], '--slurm gpus_per_node=8 with --device cpu'),
])
def test_bad_slurm_options(setup, tmp_path, capsys, extra, expect):
    assert main(slurm_args(setup, tmp_path / 'out', '--dry-run', *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-tcnn experiment: error: ') and expect in err
    assert not (tmp_path / 'out').exists()


def test_slurm_options_need_the_slurm_launcher(setup, tmp_path, capsys):
    args = slurm_args(setup, tmp_path / 'out', '--dry-run', '--slurm', 'partition=gpu', '--no-wait')
    args[args.index('--launcher') + 1] = 'local'
    assert main(args) == 2
    assert '--slurm, --no-wait only act with --launcher slurm' in capsys.readouterr().err


def test_dry_run_lists_every_job(setup, tmp_path, capsys):
    """Two nodes of two processes: training jobs of 2 x 2 tasks each running train.py itself (ranks from SLURM), every
    other job one task on one node, each after the jobs its steps need."""
    out = tmp_path / 'out'
    assert main(slurm_args(setup, out, '--dry-run', '--nproc', '4', '--slurm', 'nodes=2', 'partition=gpu',
                           'timeout_min=1440', 'mem_gb=8', 'setup=source env.sh', 'setup=export X=1')) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    headers = [line for line in printed.splitlines() if line.startswith('# job ')]
    assert [h.split(':')[0].split(' (')[0][len('# job '):] for h in headers] == [
        'prepare', 'train/tcnn/seed0', 'train/cnn/seed0', 'evaluate/tcnn/seed0', 'evaluate/cnn/seed0',
        'robustness/seed0', 'train/tcnn/seed1', 'train/cnn/seed1', 'evaluate/tcnn/seed1', 'evaluate/cnn/seed1',
        'robustness/seed1']
    flags = '--mem=8192MB --nodes={} --ntasks-per-node={} --partition=gpu --time=1440'
    train = f'# job train/tcnn/seed1 (after prepare): sbatch {flags.format(2, 2)}'
    assert train in printed.splitlines()
    assert (f'# job robustness/seed1 (after train/cnn/seed1, train/tcnn/seed1): sbatch {flags.format(1, 1)}'
            in printed.splitlines())
    assert printed.count('#   setup: source env.sh\n#   setup: export X=1\n') == 11
    commands = [line for line in printed.splitlines() if 'train.py' in line]
    assert len(commands) == 4 and not any('torchrun' in line for line in commands)
    assert printed.count('#   train/tcnn/seed0, on each of 4 tasks\n') == 1
    assert '#   identity: in process (identity)' in printed


def test_waiting_looks_at_the_queue_when_a_job_records(tmp_path):
    """Between looks at squeue (up to 30 s apart), the records are read every second: a job recording a step or a
    new attempt ends the wait at once; a heartbeat (its seconds so far) does not."""
    import threading

    from timm_tcnn.tools.experiment import ExperimentSpec
    from timm_tcnn.tools.experiment.runner import ExperimentState
    from timm_tcnn.tools.experiment.slurm import RECORD_POLL_SECONDS, _sleep_unless_recorded
    from timm_tcnn.tools.experiment.slurm_job import record_path
    from timm_tcnn.utils.io import atomic_write

    spec = ExperimentSpec(model='tcnn_resnet50rs', cnn_model='resnetrs50', data_dir='', out=str(tmp_path), recipe='',
                          recipe_sha256='', scripts_dir='', seeds=(0,))
    state = ExperimentState(spec)
    state.jobs['train/tcnn/seed0'] = dict(job_id='7', steps=['train/tcnn/seed0'])
    path = record_path(spec, 'train/tcnn/seed0')
    path.parent.mkdir(parents=True)
    record = dict(job_id='7', job='train/tcnn/seed0', attempts=[dict(host='h', started=0., seconds=0.)], steps={})

    def write(seconds: float, **steps) -> None:
        record['attempts'][0]['seconds'] = seconds
        record['steps'].update(steps)
        atomic_write(path, json.dumps(record))  # as a job writes it

    write(0.)
    heartbeat = threading.Timer(0.2, write, (10.,))
    heartbeat.start()
    start = time.time()
    _sleep_unless_recorded(spec, state, 3 * RECORD_POLL_SECONDS)
    assert time.time() - start >= 3 * RECORD_POLL_SECONDS - 0.05  # slept it all
    step = threading.Timer(0.2, write, (11.,), {'train/tcnn/seed0': dict(status='done')})
    step.start()
    start = time.time()
    _sleep_unless_recorded(spec, state, 30.)
    assert time.time() - start < 2 * RECORD_POLL_SECONDS + 0.5


def test_conversion_does_not_depend_on_the_process(setup, tmp_path):
    """The identity step's converted T-CNN (random query and key weights) and its analysis at conversion are the
    same whatever the process drew before: the SLURM job `prepare` (a fresh process) gives what the local runner
    gives after the command's own work."""
    from safetensors.torch import load_file

    from timm_tcnn.tools.experiment import ExperimentSpec, Step
    from timm_tcnn.tools.experiment.identity import identity_check

    outputs = []
    for seed in (1, 2):
        out = tmp_path / f'seed{seed}'
        spec = ExperimentSpec(model='tcnn_resnet50rs', cnn_model='resnetrs50', data_dir=str(setup / 'data'),
                              out=str(out), recipe='', recipe_sha256='', scripts_dir='', seeds=(0,),
                              cnn_checkpoint=str(setup / 'cnn.pth.tar'), model_kwargs=dict(layers=(1, 1, 1, 1)),
                              num_classes=10, test_size=64, analyze_images=4)
        torch.manual_seed(seed)
        assert identity_check(spec, Step('identity', 'identity', ()))['passed']
        stats = json.loads((out / 'analyze' / 'conversion' / 'attention_stats.json').read_text())
        outputs.append((load_file(str(out / 'identity' / 'tcnn_converted.safetensors')),
                        {k: v for k, v in stats.items() if k not in ('checkpoint', 'cnn')}))  # not the paths
    (first, first_stats), (second, second_stats) = outputs
    assert sorted(first) == sorted(second) and any('qk' in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first_stats == second_stats


@pytest.fixture(scope='module')
def cluster_run(setup):
    """Both arms of two seeds on the cluster, waiting for every job."""
    out, log, times = setup / 'run', setup / 'standin.log', setup / 'times.log'
    env = dict(STANDIN_LOG=str(log), STANDIN_TIMES=str(times), STANDIN_EPOCH_SECONDS='2')
    result = run_cli(slurm_args(setup, out), env)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, env, result


@needs_slurm
def test_jobs_run_at_once_after_the_jobs_they_need(cluster_run):
    out, env, result = cluster_run
    times = lines(Path(env['STANDIN_TIMES']))
    train = [t for t in times if t['script'] == 'train']
    assert len(train) == 4 and len({t['job'] for t in train}) == 4  # one SLURM job per run
    overlapping = max(sum(u['started'] < t['ended'] and t['started'] < u['ended'] for u in train) for t in train)
    assert overlapping >= 2
    ended = {t['run']: t['ended'] for t in train}
    for check in (t for t in times if t['script'] == 'validate'):  # every evaluation after its run's training
        assert check['started'] > ended[Path(check['checkpoint']).parent.name]
    jobs = jobs_of(out)
    assert sorted(jobs) == sorted(['prepare', *(f'{k}/{arm}/seed{s}' for k in ('train', 'evaluate')
                                                for arm in ('tcnn', 'cnn') for s in (0, 1)),
                                   'robustness/seed0', 'robustness/seed1'])
    assert jobs['robustness/seed1']['after'] == sorted([jobs['train/tcnn/seed1']['job_id'],
                                                        jobs['train/cnn/seed1']['job_id']], key=int)
    assert all(Path(job['log']).exists() for job in jobs.values())
    assert '[submit]  train/cnn/seed1: job' in result.stdout


@needs_slurm
def test_cluster_report_matches_the_local_one(cluster_run):
    """The stand-in's validation top-1 (CNN 50 + seed + epoch, T-CNN 52 + 2 seed + epoch), per-image predictions,
    gates every epoch and the analysis, as a local run gives them."""
    out, _, _ = cluster_run
    results = json.loads((out / 'results.json').read_text())
    table = results['comparisons']['tcnn - cnn']
    assert table['top1_last_64px']['cnn']['mean'] == pytest.approx(51.5)
    assert table['top1_last_64px']['tcnn']['mean'] == pytest.approx(54.0)
    assert table['top1_best_64px']['paired'] == [2.0, 3.0]
    assert table['top1_best_64px']['image_error'] == 'paired per image'
    assert 'corrupted_accuracy' in table and 'part/relation' in table
    assert sorted(json.loads((out / 'gates' / 'tcnn-seed1.json').read_text())) == ['0', '1']
    curves = results['results']['runs']['cnn-seed0']['curves']
    assert sorted(curves) == ['1', '2'] and 'part/relation' in curves['2']  # weights recorded every epoch in the job
    steps = json.loads((out / 'experiment.json').read_text())['steps']
    assert all(entry['status'] == 'done' for entry in steps.values()) and len(steps) == 22
    assert steps['train/tcnn/seed0']['attempts'] and steps['train/tcnn/seed0']['seconds'] > 0
    report = (out / 'report.md').read_text()
    assert '22 of 22 steps done.' in report and 'No attention analysis yet.' not in report


@needs_slurm
def test_rerun_submits_nothing(cluster_run, setup):
    out, env, _ = cluster_run
    before = jobs_of(out)
    calls = len(lines(Path(env['STANDIN_LOG'])))
    report = (out / 'report.md').stat().st_mtime_ns
    result = run_cli(slurm_args(setup, out), env)
    assert result.returncode == 0, result.stderr
    assert '[submit]' not in result.stdout and result.stdout.count('[done]') == len(before)
    assert jobs_of(out) == before and len(lines(Path(env['STANDIN_LOG']))) == calls
    assert (out / 'report.md').stat().st_mtime_ns > report


def _wait_for(condition, seconds: float = 180.):
    end = time.time() + seconds
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError('timed out')


def _squeue_state(job_id: str) -> str:
    return subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True).stdout.strip()


@needs_slurm
def test_requeued_run_resumes_and_failing_run_is_reported_once(setup, tmp_path):
    """One seed: the CNN's train.py fails; the T-CNN's job is requeued (`scontrol requeue`) after its first epoch
    and continues from its last.pth.tar. The failure is reported once, with its log, and not resubmitted."""
    out, log, times = tmp_path / 'run', tmp_path / 'standin.log', tmp_path / 'times.log'
    env = {**os.environ, 'STANDIN_LOG': str(log), 'STANDIN_TIMES': str(times), 'STANDIN_EPOCH_SECONDS': '3',
           'STANDIN_FAIL': 'resnetrs50'}
    process = subprocess.Popen(command(slurm_args(setup, out, '--epochs', '4', seeds=('0',))), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        last = out / 'train' / 'tcnn-seed0' / 'last.pth.tar'
        _wait_for(last.exists)
        job = jobs_of(out)['train/tcnn/seed0']['job_id']
        assert _squeue_state(job) == 'RUNNING'
        subprocess.run(['scontrol', 'requeue', job], check=True)
        _wait_for(lambda: _squeue_state(job) == 'PENDING')
        subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], check=True)  # no 2-minute hold
        stdout, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stdout + stderr
    assert 'error:' in stderr and 'train/cnn/seed0' in stderr and 'Traceback' not in stderr
    assert (stdout + stderr).count('[failed]  train/cnn/seed0') == 1
    calls = [c for c in lines(log) if c['script'] == 'train']
    assert sum('resnetrs50' in c['argv'] for c in calls) == 1  # the failure was not resubmitted
    tcnn = [c['argv'] for c in calls if 'tcnn_resnet50rs' in c['argv']]
    assert len(tcnn) == 2 and '--resume' not in tcnn[0] and tcnn[1][-2:] == ['--resume', str(last)]
    resumed = [t for t in lines(times) if t['script'] == 'train']
    assert len(resumed) == 1 and resumed[0]['start_epoch'] >= 1  # the killed attempt wrote no end
    steps = json.loads((out / 'experiment.json').read_text())['steps']
    assert steps['train/tcnn/seed0']['status'] == 'done' and len(steps['train/tcnn/seed0']['attempts']) == 2
    assert steps['train/cnn/seed0']['status'] == 'failed'
    assert 'failing as asked' in Path(steps['train/cnn/seed0']['log']).read_text()
    assert steps['robustness/seed0']['status'] == 'blocked'
    assert steps['validate/tcnn/seed0/last/64px']['status'] == 'done'
    assert sorted(json.loads((out / 'gates' / 'tcnn-seed0.json').read_text()), key=int) == ['0', '1', '2', '3']
    report = (out / 'report.md').read_text()
    assert 'train/cnn/seed0: failed' in report and 'train/tcnn/seed0: 2 attempts' in report


@needs_slurm
def test_interrupted_submission_reattaches(setup, tmp_path):
    """Ctrl-C while the jobs are being submitted or waited for leaves them running; the same command attaches to
    them and submits only the jobs not submitted yet, each once."""
    out, log = tmp_path / 'run', tmp_path / 'standin.log'
    env = {'STANDIN_LOG': str(log), 'STANDIN_EPOCH_SECONDS': '1'}
    args = slurm_args(setup, out, seeds=('0', '1'), arms=('tcnn',))
    process = subprocess.Popen(command(args), env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / 'experiment.json').exists() and jobs_of(out))
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and 'keep running on SLURM; rerun the same command' in stderr, stdout + stderr
    first = jobs_of(out)
    result = run_cli(args, env)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = jobs_of(out)
    assert sorted(jobs) == ['evaluate/tcnn/seed0', 'evaluate/tcnn/seed1', 'prepare', 'train/tcnn/seed0',
                            'train/tcnn/seed1']
    assert all(jobs[key]['job_id'] == job['job_id'] for key, job in first.items())  # attached, not resubmitted
    assert result.stdout.count('[submit]') == len(jobs) - len(first)
    assert len([p for p in (out / 'slurm').iterdir() if p.name.isdigit()]) == len(jobs)  # one submitit folder a job
    assert sorted(c['argv'][c['argv'].index('--seed') + 1] for c in lines(log) if c['script'] == 'train') == ['0', '1']


def _without_training_time(report: str) -> str:
    """The report less its training-time section (wall clocks, which differ between runs side by side and in turn)."""
    head, _, rest = report.partition('\n## Training time\n')
    return head + '\n## ' + rest.partition('\n## ')[2]


@pytest.mark.slow
@needs_slurm
@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS_DIR'),
                    reason="TIMM_SCRIPTS_DIR is not set: point it at a checkout of pytorch-image-models (timm's "
                           "train.py and validate.py) to run the experiment with the real scripts on SLURM")
def test_real_scripts_on_slurm_give_the_local_report(setup, tmp_path):
    """timm's own train.py and validate.py (one seed, about 3 minutes on 2 cores): both arms train at once as SLURM
    jobs, the report is the local run's but for the training times, and the same command again submits nothing."""
    scripts = os.environ['TIMM_SCRIPTS_DIR']

    def args(out: Path, launcher: str) -> list:
        argv = slurm_args(setup, out, seeds=('0',))
        argv[argv.index('--scripts-dir') + 1] = scripts
        argv[argv.index('--launcher') + 1] = launcher
        return argv

    local = run_cli(args(tmp_path / 'local', 'local'), {})
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-4000:]
    out = tmp_path / 'slurm'
    cluster = run_cli(args(out, 'slurm'), {})
    assert cluster.returncode == 0, cluster.stdout[-2000:] + cluster.stderr[-4000:]
    records = {key: json.loads((out / 'slurm' / 'records' / f'train_{key}_seed0.json').read_text())['attempts'][0]
               for key in ('tcnn', 'cnn')}
    spans = [(a['started'], a['started'] + a['seconds']) for a in records.values()]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two runs trained at once
    report, expected = (out / 'report.md').read_text(), (tmp_path / 'local' / 'report.md').read_text()
    assert '12 of 12 steps done.' in report and '## Training time' in report and len(jobs_of(out)) == 6
    assert _without_training_time(report) == _without_training_time(expected)
    before = jobs_of(out)
    again = run_cli(args(out, 'slurm'), {})
    assert again.returncode == 0 and '[submit]' not in again.stdout, again.stdout + again.stderr
    assert jobs_of(out) == before
