""" Where an experiment's steps run, chosen once per command: `LocalLauncher` (here, one after another) or
`slurm.SlurmLauncher` (every job on SLURM). Both take the same steps and leave the same files. """
import shlex
from typing import Callable, List, Optional

from .identity import identity_check, start_step
from .predictions import predictions_step
from .runner import ExperimentState, run_steps
from .scratch import scratch_recipe_step
from .spec import ExperimentSpec, Step

__all__ = ['IN_PROCESS', 'LAUNCHERS', 'LocalLauncher']

LAUNCHERS = ('local', 'slurm')
# steps run in the Python process of the runner (here, or in a SLURM job), not as a command
IN_PROCESS = {'identity': identity_check, 'start': start_step, 'predictions': predictions_step,
              'scratch-recipe': scratch_recipe_step}


class LocalLauncher:
    """Every step in this process or a subprocess of it, in order (`run_steps`)."""
    interrupted = False

    def check(self, spec: ExperimentSpec) -> None:
        """Nothing to refuse: any spec runs here."""

    def plan(self, spec: ExperimentSpec, steps: List[Step]) -> List[str]:
        """`--dry-run`: every step and its command line."""
        lines = []
        for step in steps:
            lines += [f'# {step.key}', shlex.join(step.argv) if step.argv else f'(in process: {step.kind} check)']
        return lines

    def run(self, spec: ExperimentSpec, steps: List[Step], record_weights: bool = False,
            echo: Callable[[str], None] = print) -> Optional[ExperimentState]:
        return run_steps(spec, steps, IN_PROCESS, echo=echo, record_weights=record_weights)
