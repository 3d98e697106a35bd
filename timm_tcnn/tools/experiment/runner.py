""" Running an experiment's steps: resumable, refusing to mix recipes, recording the gates while training.

State lives in `OUT/experiment.json` (rewritten atomically after every step): the spec's fingerprint and,
per step, its command line, status (`done`, `failed`, `blocked`), exit code, log file and duration. A rerun
skips steps that are done with the same command line, resumes an interrupted train.py run from its
`last.pth.tar`, and refuses a folder that holds an experiment of another spec.
"""
import argparse
import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors.torch import save_file

from ...errors import InputError
from ...layers import RATE_SCALED_PARAMS
from ...models.state_dicts import attention_layer_names
from ...utils.io import atomic_path, atomic_write
from .spec import TCNN_ARMS, ExperimentSpec, Step

__all__ = [
    'ExperimentState',
    'EpochRecorder',
    'epoch_recorder',
    'gate_summary',
    'log_path',
    'run_command',
    'run_step',
    'run_steps',
    'spec_json',
]

STATE_FILE = 'experiment.json'
# between looks at a running command: train.py replaces last.pth.tar every epoch, and an epoch is recorded if it
# stays longer than this (a stat each time; the checkpoint is read when it changed)
POLL_SECONDS = 0.25


class ExperimentState:
    """`OUT/experiment.json`: the spec it belongs to, the status of every step and, with the SLURM launcher, every
    job submitted (`jobs`: {job key: its id, steps and logs})."""

    def __init__(self, spec: ExperimentSpec):
        self.spec = spec
        self.path = spec.root / STATE_FILE
        self.steps: Dict[str, Dict[str, Any]] = {}
        self.jobs: Dict[str, Dict[str, Any]] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text(encoding='utf-8'))
            if saved.get('fingerprint') != spec.fingerprint():
                changed = sorted(
                    k
                    for k, v in saved.get('spec', {}).items()
                    if k not in ('seeds', 'out') and v != spec_json(spec).get(k)
                )
                raise InputError(
                    f'{spec.root} holds an experiment with another recipe or setup (differs in: '
                    f'{", ".join(changed) or "the spec"}); results of different recipes are never mixed. '
                    f'Use another --out folder, or repeat the original options to resume it.'
                )
            self.steps = saved.get('steps', {})
            self.jobs = saved.get('jobs', {})

    def done(self, step: Step) -> bool:
        entry = self.steps.get(step.key)
        return bool(entry) and entry['status'] == 'done' and entry['argv'] == list(step.argv)

    def record(self, step: Step, status: str, **details: Any) -> None:
        self.steps[step.key] = dict(argv=list(step.argv), status=status, **details)
        self.save()

    def save(self) -> None:
        self.spec.root.mkdir(parents=True, exist_ok=True)
        data = dict(
            fingerprint=self.spec.fingerprint(),
            spec=spec_json(self.spec),
            steps=self.steps,
            **({'jobs': self.jobs} if self.jobs else {}),
        )
        atomic_write(self.path, json.dumps(data, indent=2) + '\n')


def spec_json(spec: ExperimentSpec) -> Dict[str, Any]:
    """The spec as JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


def gate_summary(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, List[float]]]:
    """Per converted layer: content and locality share and alpha of every head, from a T-CNN state dict."""
    layers = {}
    for name in attention_layer_names(state_dict):
        scale = state_dict.get(f'{name}.gate_lr_scale', torch.tensor(1.0)).float()
        value = {p: state_dict[f'{name}.{p}'].float() * scale for p in RATE_SCALED_PARAMS}
        layers[name] = dict(
            content_share=value['content_gate'].clamp(0, 1).tolist(),
            locality_share=value['locality_gate'].clamp(0, 1).tolist(),
            alpha=value['pos_log_alpha'].exp().tolist(),
        )
    return layers


def _read_train_checkpoint(path: Path) -> Optional[Dict[str, Any]]:
    """A train.py checkpoint (weights_only), or None if it is being replaced right now."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args
            return torch.load(path, map_location='cpu', weights_only=True)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


class EpochRecorder:
    """Records a train.py run after every epoch, from its `last.pth.tar` (train.py replaces it atomically).

    - `gates`: a T-CNN's gates, as {epoch: gate_summary} in that JSON file (at conversion every gate is 0);
    - `weights`: the epoch's weights as `epoch<N>.safetensors` in that folder, from which the report's per-epoch
    accuracies
      (label parts, image groups) are computed after training.
    """

    def __init__(self, run_dir: Path, gates: Optional[Path] = None, weights: Optional[Path] = None):
        self.checkpoint = run_dir / 'last.pth.tar'
        self.gates = gates
        self.weights = weights
        self.records: Dict[str, Any] = json.loads(gates.read_text()) if gates and gates.exists() else {}
        self._seen = None

    def poll(self) -> None:
        try:
            stamp = self.checkpoint.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._seen:
            return
        checkpoint = _read_train_checkpoint(self.checkpoint)
        if checkpoint is None:
            return
        self._seen = stamp
        epoch = int(checkpoint['epoch'])
        if self.gates is not None:
            self.records[str(epoch)] = gate_summary(checkpoint['state_dict'])
            atomic_write(self.gates, json.dumps(self.records, indent=1) + '\n')
        if self.weights is not None:
            with atomic_path(self.weights / f'epoch{epoch}.safetensors') as tmp:
                save_file({k: v.contiguous() for k, v in checkpoint['state_dict'].items()}, str(tmp))


def log_path(spec: ExperimentSpec, step: Step) -> Path:
    """The log of a step's command."""
    return spec.root / 'logs' / (step.key.replace('/', '_') + '.log')


def run_command(
    spec: ExperimentSpec,
    step: Step,
    poll: Optional[Callable[[], None]],
    argv: Optional[List[str]] = None,
    env: Optional[Dict[str, str]] = None,
) -> int:
    """Run `argv` (default: the step's) with its output appended to the step's log; a training run continues from
    its `last.pth.tar` where one exists. `poll` is called every `POLL_SECONDS` while it runs, and once after."""
    argv = list(step.argv if argv is None else argv)
    if step.kind == 'train':
        last = spec.run_dir(step.arm, step.seed) / 'last.pth.tar'
        if last.exists():  # an interrupted run: continue from its last epoch
            argv += ['--resume', str(last)]
    log = log_path(spec, step)
    log.parent.mkdir(parents=True, exist_ok=True)
    if step.result:
        Path(step.result).parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'a', encoding='utf-8') as f:
        f.write(f'$ {" ".join(argv)}\n')
        f.flush()
        process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while process.poll() is None:
                if poll is not None:
                    poll()
                try:  # back as soon as it ends: a step's seconds are its command's
                    process.wait(timeout=POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            process.terminate()
            process.wait()
            raise
    if poll is not None:
        poll()
    return process.returncode


def epoch_recorder(spec: ExperimentSpec, step: Step, record_weights: bool) -> EpochRecorder:
    """The recorder of a training step: gates of T-CNN arms, weights with `record_weights`."""
    run_dir = spec.run_dir(step.arm, step.seed)
    return EpochRecorder(
        run_dir,
        gates=spec.root / 'gates' / f'{run_dir.name}.json' if step.arm in TCNN_ARMS else None,
        weights=spec.epoch_weights(step.arm, step.seed) if record_weights else None,
    )


def run_step(
    spec: ExperimentSpec,
    step: Step,
    in_process: Dict[str, Callable[[ExperimentSpec, Step], Dict[str, Any]]],
    record_weights: bool = False,
    poll: Optional[Callable[[], None]] = None,
    argv: Optional[List[str]] = None,
    env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Run one step here and return its record: `status` (done or failed), `seconds`, and for a command its
    `returncode` and `log`, for an in-process step that failed its `reason`. A training step's epochs are recorded
    while it runs (`EpochRecorder`); `poll` is called beside it. `argv` and `env` replace the step's command line and
    this process's environment."""
    start = time.time()
    if step.kind in in_process:
        result = in_process[step.kind](spec, step)
        ok = bool(result.get('passed', True))
        return dict(
            status='done' if ok else 'failed',
            seconds=round(time.time() - start, 1),
            **({} if ok else {'reason': result.get('reason', 'check failed')}),
        )
    polls = [poll] if poll is not None else []
    if step.kind == 'train':
        polls.insert(0, epoch_recorder(spec, step, record_weights).poll)

    def poll_all() -> None:
        for each in polls:
            each()

    code = run_command(spec, step, poll_all if polls else None, argv, env)
    return dict(
        status='done' if code == 0 else 'failed',
        returncode=code,
        log=str(log_path(spec, step)),
        seconds=round(time.time() - start, 1),
    )


def run_steps(
    spec: ExperimentSpec,
    steps: List[Step],
    in_process: Dict[str, Callable[[ExperimentSpec, Step], Dict[str, Any]]],
    echo: Callable[[str], None] = print,
    record_weights: bool = False,
) -> ExperimentState:
    """Run every step not done yet; a failed step blocks the steps that need it, not the others.

    `in_process` maps step kinds run in this process (e.g. 'identity') to functions of (spec, step) returning
    their result, a dict with `passed` False (and a `reason`) if the step failed. While an arm trains, its gates (T-CNN
    arms) and, with `record_weights`, its weights are recorded after every epoch (`EpochRecorder`).
    """
    state = ExperimentState(spec)
    for step in steps:
        if state.done(step):
            echo(f'[done]    {step.key}')
            continue
        failed = [n for n in step.needs if state.steps.get(n, {}).get('status') != 'done']
        if failed:
            state.record(step, 'blocked', reason=f'needs {", ".join(failed)}')
            echo(f'[blocked] {step.key}: needs {", ".join(failed)}')
            continue
        echo(f'[run]     {step.key}')
        entry = run_step(spec, step, in_process, record_weights)
        state.record(step, **entry)
        if entry['status'] == 'failed' and 'returncode' in entry:
            echo(f'[failed]  {step.key}: exit code {entry["returncode"]}, log {entry["log"]}')
    return state
