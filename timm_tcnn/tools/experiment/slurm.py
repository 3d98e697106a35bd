""" The SLURM launcher: every job of the experiment (`slurm_job.group_jobs`) submitted through submitit, independent
jobs at once, each after the jobs it needs (`afterany`; a job checks its steps' needs itself and records the steps
it cannot run as blocked, as the local runner does).

The experiment folder is the state. `experiment.json` records every job as it is submitted (`jobs`: its SLURM id,
its steps, its SLURM log), and the jobs record their steps in `OUT/slurm/records/` (see `slurm_job`). A rerun reads
both: steps done are skipped, jobs still queued or running are attached to, and only the jobs of steps neither done
nor under way are submitted, so no step is ever submitted twice at once. Waiting shows a progress bar; Ctrl-C (or
`wait=False`) leaves the jobs running.
"""
import ast
import collections.abc
import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from tqdm import tqdm

from ...errors import InputError, WorkError
from ...utils.io import read_mapping
from .report import read_summary
from .runner import ExperimentState
from .spec import ExperimentSpec, Step, task_argv

__all__ = ['SlurmLauncher', 'job_parameters', 'parse_parameters']

# submitit's generic names (AutoExecutor) of SlurmExecutor parameters
_GENERIC = {'timeout_min': 'time', 'mem_gb': 'mem', 'tasks_per_node': 'ntasks_per_node', 'name': 'job_name'}
# set by the launcher for every job
_RESERVED = {
    'job_name': 'each job is named tcnn:<job>',
    'dependency': 'each job waits for the jobs it needs',
    'ntasks_per_node': 'a training job runs one task per process: --nproc / nodes',
    'stderr_to_stdout': 'a job writes one log',
    'use_srun': 'every task is started by srun',
    'array_parallelism': 'jobs are submitted one by one',
    'num_gpus': 'use gpus_per_node',
}
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
_ACTIVE = ('PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESIZING',
           'SUSPENDED', 'STOPPED', 'SIGNALING', 'STAGE_OUT')
RECORD_POLL_SECONDS = 1.  # between looks at the jobs' record files while waiting (squeue: 2 s to 30 s apart)


def _submitit():
    try:
        import submitit
    except ImportError:
        raise InputError("--launcher slurm needs submitit: pip install 'timm-tcnn[cluster]'.") from None
    return submitit


def _parameter_types() -> Dict[str, Any]:
    """SlurmExecutor's parameters and their types (those of the sbatch file it writes)."""
    submitit = _submitit()
    hints = typing.get_type_hints(submitit.slurm.slurm._make_sbatch_string)  # the sbatch file it writes
    return {name: hints[name] for name in submitit.SlurmExecutor._valid_parameters()}


def _is_list(kind: Any) -> bool:
    return any(typing.get_origin(a) in (list, collections.abc.Iterable) for a in typing.get_args(kind))


def _convert(key: str, value: str, kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        if bool in args and str in args:  # exclusive: a flag or a value
            return True if value.lower() in _TRUE else value
        kind = args[0]
    if kind is bool:
        if value.lower() not in _TRUE + _FALSE:
            raise InputError(f'--slurm {key}={value}: expected true or false.')
        return value.lower() in _TRUE
    if kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            expected = 'an integer' if kind is int else 'a number'
            raise InputError(f'--slurm {key}={value}: expected {expected}.') from None
        least = 1 if key in ('nodes', 'time', 'timeout_min', 'cpus_per_task') else 0
        if number < least:
            raise InputError(f'--slurm {key}={value}: expected a number >= {least}.')
        return number
    if typing.get_origin(kind) is dict:
        try:
            mapping = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            mapping = None
        if not isinstance(mapping, dict):
            raise InputError(f"--slurm {key}={value}: expected a Python dict of sbatch options, e.g. "
                             f"{key}=\"{{'reservation': 'mine'}}\".")
        return mapping
    return value


def parse_parameters(pairs: Sequence[str]) -> Dict[str, Any]:
    """`--slurm KEY=VALUE ...` as SlurmExecutor parameters: keys are submitit's (its SlurmExecutor parameters, or
    the generic timeout_min, mem_gb), values converted to their types; list parameters (setup, teardown, srun_args)
    take every value given. An `InputError` on an unknown, reserved or repeated key or a bad value."""
    types = _parameter_types()
    types.update(timeout_min=int, mem_gb=float)
    params: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise InputError(f'--slurm {pair}: expected KEY=VALUE, e.g. partition=gpu timeout_min=1440.')
        name = _GENERIC.get(key, key)
        if name in _RESERVED:
            raise InputError(f'--slurm {key}: set by the experiment ({_RESERVED[name]}).')
        if key not in types:
            valid = sorted(set(types) - set(_RESERVED))
            raise InputError(f'--slurm {key}: not a parameter of submitit\'s SlurmExecutor; valid keys: '
                             f'{", ".join(valid)}.')
        if _is_list(types[key]):
            params.setdefault(name, []).append(value)
            continue
        converted = _convert(key, value, types[key])
        if name in params:
            raise InputError(f'--slurm {key}: given twice (or with {name}).')
        params[name] = f'{round(converted * 1024)}MB' if key == 'mem_gb' else converted
    return params


def job_parameters(params: Dict[str, Any], nproc: int, cuda: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The SLURM parameters of a training job and of every other job. A training run is `nproc` processes, one
    SLURM task each (one per GPU on CUDA): `nodes` x tasks per node, so `nproc` must be a multiple of `nodes` and,
    with `gpus_per_node`, equal `nodes` x `gpus_per_node`. The other jobs run one process on one node (one GPU)."""
    params = dict(params)
    nodes = params.pop('nodes', 1)
    gpus = params.pop('gpus_per_node', None)
    if nproc % nodes:
        raise InputError(f'--nproc {nproc} processes cannot be spread over --slurm nodes={nodes}: give --nproc a '
                         f'multiple of nodes (nodes x GPUs per node).')
    per_node = nproc // nodes
    if gpus is not None and not cuda and gpus:
        raise InputError(f'--slurm gpus_per_node={gpus} with --device {"cpu"}: pass --device cuda, or leave '
                         f'gpus_per_node out.')
    if cuda:
        if gpus is not None and gpus != per_node:
            raise InputError(f'--slurm nodes={nodes} gpus_per_node={gpus} gives {nodes * gpus} GPUs but --nproc '
                             f'{nproc}: a training run is one process per GPU, pass --nproc {nodes * gpus}.')
        gpus = per_node
    train = dict(params, nodes=nodes, ntasks_per_node=per_node, **({'gpus_per_node': gpus} if gpus else {}))
    other = dict(params, nodes=1, ntasks_per_node=1, **({'gpus_per_node': 1} if gpus else {}))
    return train, other


def _sbatch_flags(params: Dict[str, Any]) -> str:
    flags = [f'--{k.replace("_", "-")}={v}' for k, v in sorted(params.items())
             if k not in ('setup', 'teardown', 'srun_args', 'additional_parameters', 'signal_delay_s')]
    flags += [f'--{k}={v}' for k, v in sorted(params.get('additional_parameters', {}).items())]
    return ' '.join(flags)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C waits until the block is over: a job submitted is always recorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _planned_epochs(step: Step) -> Optional[int]:
    argv = list(step.argv)
    if '--epochs' in argv:
        return int(argv[argv.index('--epochs') + 1])
    epochs = read_mapping(argv[argv.index('--config') + 1], 'recipe').get('epochs')
    return epochs if isinstance(epochs, int) else None


def _recorded(spec: ExperimentSpec, state: ExperimentState) -> List[Any]:
    """What the recorded jobs' record files say (their attempts and steps, not the seconds of a heartbeat)."""
    from .slurm_job import read_record
    marks = []
    for key in state.jobs:
        try:
            record = read_record(spec, key)
        except (OSError, ValueError):  # being replaced
            record = None
        marks.append(None if record is None else (record['job_id'], len(record['attempts']), record['steps']))
    return marks


def _sleep_unless_recorded(spec: ExperimentSpec, state: ExperimentState, seconds: float) -> None:
    """Sleep `seconds`, or less: until a job records a step or a new attempt (a job's last act is writing its
    record, so the queue is worth a look then). The records are read every `RECORD_POLL_SECONDS`, squeue is not."""
    end = time.time() + seconds
    before = _recorded(spec, state)
    while time.time() < end:
        time.sleep(max(0., min(RECORD_POLL_SECONDS, end - time.time())))
        if _recorded(spec, state) != before:
            return


class SlurmLauncher:
    """Runs an experiment's steps as SLURM jobs (see the module docstring). `params`: from `parse_parameters`;
    `wait`: wait for the jobs and show their progress (else submit and return)."""

    def __init__(self, params: Dict[str, Any], wait: bool = True):
        self.params = params
        self.wait = wait
        self.interrupted = False

    def _parameters(self, spec: ExperimentSpec) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        return job_parameters(self.params, spec.nproc, spec.device.startswith('cuda'))

    def check(self, spec: ExperimentSpec) -> None:
        """Refuse parameters that do not fit the spec, before any work."""
        self._parameters(spec)

    def plan(self, spec: ExperimentSpec, steps: List[Step]) -> List[str]:
        """`--dry-run`: every job with its SLURM parameters, the jobs it waits for and its steps' command lines."""
        from .slurm_job import group_jobs
        train, other = self._parameters(spec)
        jobs = group_jobs(steps)
        owner = {s.key: job.key for job in jobs for s in job.steps}
        lines = []
        for job in jobs:
            params = train if job.train else other
            after = sorted({owner[n] for s in job.steps for n in s.needs if owner.get(n) not in (None, job.key)})
            lines.append(f'# job {job.key}' + (f' (after {", ".join(after)})' if after else '') +
                         f': sbatch {_sbatch_flags(params)}')
            for name in ('setup', 'teardown'):
                lines += [f'#   {name}: {line}' for line in params.get(name, [])]
            tasks = params['nodes'] * params['ntasks_per_node']
            for step in job.steps:
                if not step.argv:
                    lines.append(f'#   {step.key}: in process ({step.kind})')
                    continue
                argv = task_argv(step) if job.train and tasks > 1 else step.argv
                each = f', on each of {tasks} tasks' if job.train and tasks > 1 else ''
                lines += [f'#   {step.key}{each}', shlex.join(argv)]
        return lines

    # the cluster

    def _queue(self, state: ExperimentState) -> Dict[str, str]:
        """{job key: SLURM state} of the recorded jobs still queued or running."""
        ids = {record['job_id']: key for key, record in state.jobs.items()}
        if not ids:
            return {}
        try:
            result = subprocess.run(['squeue', '-h', '--me', '-o', '%i %T'], capture_output=True, text=True,
                                    timeout=120)
        except FileNotFoundError:
            raise WorkError('squeue is not on PATH: run the SLURM launcher on a machine of the cluster.') from None
        if result.returncode:
            raise WorkError(f'squeue failed: {result.stderr.strip()}')
        queue = dict(line.split()[:2] for line in result.stdout.splitlines() if line.strip())
        return {ids[i]: s for i, s in queue.items() if i in ids and s in _ACTIVE}

    def _merge(self, spec: ExperimentSpec, state: ExperimentState) -> bool:
        """Copy the steps the recorded jobs ran into `state.steps`; whether anything changed."""
        from .slurm_job import read_record
        changed = False
        for key, job in state.jobs.items():
            record = read_record(spec, key)
            if record is None or record['job_id'] != job['job_id']:
                continue
            attempts = len(record['attempts'])
            changed |= job.get('attempts') != attempts
            job['attempts'] = attempts
            for name, entry in record['steps'].items():
                changed |= state.steps.get(name) != entry
                state.steps[name] = entry
        return changed

    def _submit(self, spec: ExperimentSpec, job: Any, params: Dict[str, Any], after: List[str],
                record_weights: bool) -> str:
        submitit = _submitit()
        from .slurm_job import StepsJob
        executor = submitit.SlurmExecutor(folder=spec.root / 'slurm' / '%j')
        executor.update_parameters(job_name=f'tcnn:{job.key}', stderr_to_stdout=True,
                                   dependency=f'afterany:{":".join(after)}' if after else None, **params)
        try:
            submitted = executor.submit(StepsJob(spec, job, record_weights))
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as e:
            raise WorkError(f'sbatch refused the job {job.key}: {e}') from None
        return str(submitted.job_id)

    def _submit_missing(self, spec: ExperimentSpec, state: ExperimentState, steps: List[Step], record_weights: bool,
                        echo: Callable[[str], None]) -> List[str]:
        from .slurm_job import group_jobs, record_path
        train, other = self._parameters(spec)
        jobs = group_jobs(steps)
        owner = {s.key: job.key for job in jobs for s in job.steps}
        active = set(self._queue(state))
        coming: Set[str] = set()  # jobs queued, running or submitted now
        submitted = []
        for job in jobs:
            todo = [s for s in job.steps if not state.done(s)]
            if not todo:
                echo(f'[done]    {job.key}')
                continue
            if job.key in active:
                echo(f'[attach]  {job.key}: job {state.jobs[job.key]["job_id"]}')
                coming.add(job.key)
                continue
            runnable: Set[str] = set()
            for step in todo:  # in order: a step needing an earlier one of the same job runs if that one can
                if all(state.steps.get(n, {}).get('status') == 'done' or owner.get(n) in coming or n in runnable
                       for n in step.needs):
                    runnable.add(step.key)
            for step in todo:
                if step.key not in runnable:
                    missing = [n for n in step.needs if state.steps.get(n, {}).get('status') != 'done']
                    state.record(step, 'blocked', reason=f'needs {", ".join(missing)}')
                    echo(f'[blocked] {step.key}: needs {", ".join(missing)}')
            if not runnable:
                continue
            job = type(job)(job.key, tuple(s for s in todo if s.key in runnable), job.train)
            after = sorted({state.jobs[owner[n]]['job_id'] for s in job.steps for n in s.needs
                            if owner.get(n) in coming and owner[n] != job.key}, key=int)
            with _deferred_interrupt():
                record_path(spec, job.key).unlink(missing_ok=True)  # an earlier job's
                job_id = self._submit(spec, job, train if job.train else other, after, record_weights)
                state.jobs[job.key] = dict(job_id=job_id, steps=[s.key for s in job.steps], after=after,
                                           log=str(spec.root / 'slurm' / job_id / f'{job_id}_0_log.out'),
                                           submitted=time.strftime('%Y-%m-%dT%H:%M:%S'))
                for step in job.steps:
                    state.steps[step.key] = dict(argv=list(step.argv), status='queued', job_id=job_id)
                state.save()
            coming.add(job.key)
            submitted.append(job.key)
            echo(f'[submit]  {job.key}: job {job_id}' + (f' after {", ".join(after)}' if after else ''))
        return submitted

    def _lost(self, spec: ExperimentSpec, state: ExperimentState, queue: Dict[str, str]) -> bool:
        """Steps of jobs that ended without recording them (cancelled, out of memory, node failure) fail, with the
        job's SLURM log; whether there were any."""
        lost = False
        for key, job in state.jobs.items():
            if key in queue:
                continue
            for name in job['steps']:
                entry = state.steps.get(name, {})
                if entry.get('status') == 'queued' and entry.get('job_id') == job['job_id']:
                    state.steps[name] = dict(entry, status='failed', log=job['log'],
                                             reason=f'SLURM job {job["job_id"]} ended without running it (cancelled, '
                                                    f'out of time or memory?): see its log {job["log"]}')
                    lost = True
        return lost

    def _wait(self, spec: ExperimentSpec, state: ExperimentState, steps: List[Step]) -> None:
        train = [s for s in steps if s.kind == 'train']
        planned = {s.key: _planned_epochs(s) for s in train}
        reported = {k for k, v in state.steps.items() if v.get('status') in ('failed', 'blocked')}
        delay = 2.
        with tqdm(total=len(steps), desc='experiment steps', unit='step', file=sys.stderr, disable=None) as bar:
            while True:
                queue = self._queue(state)  # before the records: a job gone from the queue has written its last
                changed = self._merge(spec, state)
                changed |= self._lost(spec, state, queue)
                if changed:
                    state.save()
                for key, entry in state.steps.items():
                    if entry.get('status') in ('failed', 'blocked') and key not in reported:
                        reported.add(key)
                        what = entry.get('reason') or f'exit code {entry.get("returncode")}, log {entry.get("log")}'
                        bar.write(f'[{entry["status"]}]  {key}: {what}')
                finished = sum(state.steps.get(s.key, {}).get('status') in ('done', 'failed', 'blocked') for s in steps)
                epochs = sum(len(read_summary(spec.run_dir(s.arm, s.seed) / 'summary.csv')) for s in train)
                running = sum(s == 'RUNNING' for s in queue.values())
                bar.n = finished
                bar.set_postfix_str(f'{running} job(s) running, {len(queue) - running} queued; epochs {epochs}/'
                                    f'{sum(planned.values()) if all(planned.values()) else "?"}')
                if not queue:
                    return
                delay = 2. if changed else min(30., delay * 1.5)
                _sleep_unless_recorded(spec, state, delay)

    def run(self, spec: ExperimentSpec, steps: List[Step], record_weights: bool = False,
            echo: Callable[[str], None] = print) -> Optional[ExperimentState]:
        """Submit what is missing, then wait for every job; None if the jobs were left running (`wait` False, or
        Ctrl-C: `interrupted`)."""
        if shutil.which('sbatch') is None:
            raise InputError('--launcher slurm: sbatch is not on PATH; run the command on a machine that submits to '
                             'the cluster (a login node), or use --launcher local.')
        state = ExperimentState(spec)
        self._merge(spec, state)
        try:
            submitted = self._submit_missing(spec, state, steps, record_weights, echo)
            if not self.wait:
                echo(f'{len(submitted)} job(s) submitted; rerun the same command to attach to them and write the '
                     f'report (state: {state.path}).')
                return None
            self._wait(spec, state, steps)
        except KeyboardInterrupt:
            self.interrupted = True
            print(f'interrupted: the submitted jobs keep running on SLURM; rerun the same command to attach to them '
                  f'(state: {state.path}).', file=sys.stderr)
            return None
        return state
