""" The T-CNN vs CNN experiment: specification, resumable runner, identity check, predictions and report. """
__all__ = [
    'ARMS', 'DEFAULT_ARMS', 'ExperimentSpec', 'ExperimentState', 'ScratchArm', 'Step', 'build_steps', 'identity_check',
    'load_cnn', 'predictions_step', 'run_steps', 'scratch_arm', 'scratch_recipe_step', 'start_step', 'write_report',
]
from .identity import identity_check, load_cnn, start_step
from .predictions import predictions_step
from .report import write_report
from .runner import ExperimentState, run_steps
from .scratch import scratch_arm, scratch_recipe_step
from .spec import ARMS, DEFAULT_ARMS, ExperimentSpec, ScratchArm, Step, build_steps
