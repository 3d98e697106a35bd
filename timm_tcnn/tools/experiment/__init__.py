""" The T-CNN vs CNN experiment: specification, resumable runner, identity check and report. """
__all__ = [
    'ARMS', 'ExperimentSpec', 'ExperimentState', 'Step', 'build_steps', 'identity_check', 'load_cnn', 'parts_step',
    'run_steps', 'start_step', 'write_report',
]
from .identity import identity_check, load_cnn, start_step
from .parts import parts_step
from .report import write_report
from .runner import ExperimentState, run_steps
from .spec import ARMS, ExperimentSpec, Step, build_steps
