""" An experiment's steps as SLURM jobs: how steps are grouped into jobs, and what a job does on its node.

Jobs (`group_jobs`): `prepare` (identity check, the starting CNN's predictions, the scratch recipe, transfer starts),
`train/<arm>/seed<S>` (one train.py run, on every node and GPU it asks for), `evaluate/<arm>/seed<S>` (validate.py at
both sizes, predictions and, for the T-CNN, its analysis) and `robustness/seed<S>`.

A job records what it did in `OUT/slurm/records/<job>.json`, written atomically after every step and every 10 s
while one runs: its SLURM id, its attempts (a requeued job starts a new one; each with its host and seconds) and
every step's record as the local runner writes it into `experiment.json`. The submitting process reads these files;
the job itself needs nothing from it, so jobs go on when it is gone.
"""
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import submitit

from ...errors import WorkError
from ...utils.io import atomic_write
from .launchers import IN_PROCESS
from .runner import STATE_FILE, run_command, run_step
from .spec import ExperimentSpec, Step, task_argv

__all__ = ['Job', 'StepsJob', 'group_jobs', 'read_record', 'record_path']

HEARTBEAT_SECONDS = 10.


@dataclass(frozen=True)
class Job:
    """Steps run one after another in one SLURM job; `train`: a training job (the nodes and GPUs of a run)."""
    key: str
    steps: Tuple[Step, ...]
    train: bool = False


def _job_key(step: Step) -> str:
    if step.kind in ('train', 'robustness'):
        return step.key
    if step.arm is None:  # identity, the starting CNN's predictions, the scratch recipe, transfer starts
        return 'prepare'
    return f'evaluate/{step.arm}/seed{step.seed}'


def group_jobs(steps: List[Step]) -> List[Job]:
    """The jobs of an experiment's steps, in the order of their first step (every job after the jobs it needs)."""
    groups: Dict[str, List[Step]] = {}
    for step in steps:
        groups.setdefault(_job_key(step), []).append(step)
    return [Job(key, tuple(members), members[0].kind == 'train') for key, members in groups.items()]


def record_path(spec: ExperimentSpec, job_key: str) -> Path:
    return spec.root / 'slurm' / 'records' / (job_key.replace('/', '_') + '.json')


def read_record(spec: ExperimentSpec, job_key: str) -> Optional[Dict[str, Any]]:
    path = record_path(spec, job_key)
    return json.loads(path.read_text(encoding='utf-8')) if path.exists() else None


def _known_steps(spec: ExperimentSpec) -> Dict[str, Dict[str, Any]]:
    """Every step's latest record: from `experiment.json`, then from the jobs' record files."""
    state = spec.root / STATE_FILE
    steps = dict(json.loads(state.read_text(encoding='utf-8')).get('steps', {})) if state.exists() else {}
    for path in sorted((spec.root / 'slurm' / 'records').glob('*.json')):
        steps.update(json.loads(path.read_text(encoding='utf-8'))['steps'])
    return steps


def _distributed_env(env: submitit.JobEnvironment) -> Optional[Dict[str, str]]:
    """With several tasks, where their process group meets: the first node, at a port drawn from the job id (train.py
    reads rank and world size from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the rest through `env://`)."""
    if env.num_tasks == 1:
        return None
    return {**os.environ, 'MASTER_ADDR': env.hostnames[0], 'MASTER_PORT': str(20000 + int(env.job_id) % 20000)}


class StepsJob(submitit.helpers.Checkpointable):
    """The callable a SLURM job runs (every task of it). Task 0 runs the job's steps not done yet, each after checking
    that the steps it needs are done, and records them; in a training job of several tasks every task runs train.py.
    On a time limit or pre-emption submitit requeues it (`Checkpointable`); its training step then continues from
    `last.pth.tar` (`--resume`), as after `scontrol requeue`."""

    def __init__(self, spec: ExperimentSpec, job: Job, record_weights: bool):
        self.spec, self.job, self.record_weights = spec, job, record_weights

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        distributed = _distributed_env(env) if self.job.train else None
        if env.global_rank != 0:  # another process of a distributed train.py run
            step = self.job.steps[0]
            code = run_command(self.spec, step, None, list(task_argv(step)), distributed)  # into the same log
            return f'task {env.global_rank}: exit code {code}'
        return self._run(str(env.job_id), distributed)

    def _run(self, job_id: str, distributed: Optional[Dict[str, str]]) -> str:
        record = read_record(self.spec, self.job.key)
        if record is None or record['job_id'] != job_id:
            record = dict(job_id=job_id, job=self.job.key, attempts=[], steps={})
        attempt = dict(host=socket.gethostname(), started=time.time(), seconds=0.)
        record['attempts'].append(attempt)
        path = record_path(self.spec, self.job.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = [0.]

        def save(force: bool = True) -> None:
            attempt['seconds'] = round(time.time() - attempt['started'], 1)
            if force or time.time() - written[0] >= HEARTBEAT_SECONDS:
                atomic_write(path, json.dumps(record, indent=1) + '\n')
                written[0] = time.time()

        save()
        known = _known_steps(self.spec)
        for step in self.job.steps:
            done = record['steps'].get(step.key, {})
            if done.get('status') == 'done' and done.get('argv') == list(step.argv):  # in an earlier attempt
                continue
            missing = [n for n in step.needs if known.get(n, {}).get('status') != 'done']
            if missing:
                entry = dict(status='blocked', reason=f'needs {", ".join(missing)}')
            else:
                argv = list(task_argv(step)) if distributed else None
                entry = run_step(self.spec, step, IN_PROCESS, self.record_weights, poll=lambda: save(False),
                                 argv=argv, env=distributed)
            save(False)
            if step.kind == 'train':  # every attempt's time: a requeued run trains again from its last epoch
                entry.update(seconds=round(sum(a['seconds'] for a in record['attempts']), 1),
                             attempts=[a['seconds'] for a in record['attempts']])
            record['steps'][step.key] = known[step.key] = dict(argv=list(step.argv), **entry, job_id=job_id)
            save()
        failed = [k for k, v in record['steps'].items() if v['status'] != 'done']
        if failed:  # the job's SLURM state says so too
            raise WorkError(f'step(s) not done: {", ".join(failed)}; see their logs in {self.spec.root / "logs"}')
        return f'{len(record["steps"])} step(s) done'
