""" Run timm's own scripts (train.py, validate.py, benchmark.py, ...) with the T-CNN models registered.

timm has no plugin discovery, so its scripts only know the `tcnn_*` models if `timm_tcnn` was imported
first. `run_script(path, args)` does that and then behaves like `python path *args`: the script runs as
`__main__` with `sys.argv == [absolute path, *args]`, its own directory first on `sys.path` and `__file__` set to
its absolute path; its exceptions (with their tracebacks) and `SystemExit` codes propagate untouched.
Works in every process `torchrun -m timm_tcnn run ...` starts.
"""
import contextlib
import functools
import importlib.machinery
import logging
import os
import runpy
import sys
from typing import Iterator, List, Sequence

import timm
import torch

from .. import models  # noqa: F401  registers the tcnn_* models
from ..errors import InputError
from ..weights.loading import unknown_model_hint

__all__ = ['ScriptNotFoundError', 'resolve_script', 'run_script']

_logger = logging.getLogger(__name__)

_TIMM_SCRIPTS_HINT = (
    "timm's train.py, validate.py and benchmark.py are not installed with the timm package: they are in "
    'its GitHub repository (git clone https://github.com/huggingface/pytorch-image-models), '
    'e.g. `timm-tcnn run pytorch-image-models/train.py ...`.')


class ScriptNotFoundError(InputError, FileNotFoundError):
    """The script to run does not exist or is not a file."""


def resolve_script(path: str) -> str:
    """Absolute path of the Python file `path`; `ScriptNotFoundError` saying what to pass instead."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise ScriptNotFoundError(f'{path} is a folder, not a script. {_TIMM_SCRIPTS_HINT}')
    if not os.path.isfile(full):
        raise ScriptNotFoundError(f'script not found: {path}. {_TIMM_SCRIPTS_HINT}')
    return full


def _warn_if_shadowed(script_dir: str) -> None:
    """`python script.py` in a timm checkout would import the checkout's timm; say that this one is used."""
    spec = importlib.machinery.PathFinder.find_spec('timm', [script_dir])
    if spec is None or spec.origin is None:
        return
    if os.path.realpath(spec.origin) != os.path.realpath(timm.__file__):
        _logger.warning(
            '%s holds its own timm package (%s), which `python script.py` would import; the script runs with '
            'the timm %s that timm_tcnn uses (%s). To use the checkout, pip install -e it.',
            script_dir, os.path.dirname(spec.origin), timm.__version__, os.path.dirname(timm.__file__))


def _note(exc: BaseException, text: str) -> None:
    """Attach `text` below the exception message (Python >= 3.11), else print it to stderr."""
    if hasattr(exc, 'add_note'):
        exc.add_note(text)
    else:
        print(text, file=sys.stderr)


@contextlib.contextmanager
def _ddp_without_cpu_device_ids() -> Iterator[None]:
    """Let `DistributedDataParallel` take `device_ids=[cpu]`, as timm's train.py passes on CPU.

    torch requires `device_ids=None` for a module on the CPU and raises otherwise, so train.py under
    torchrun on CPU (gloo) fails; the two mean the same, so CPU device ids are dropped.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    original = ddp.__init__

    @functools.wraps(original)
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None
        original(self, module, device_ids, *args, **kwargs)

    ddp.__init__ = __init__
    try:
        yield
    finally:
        ddp.__init__ = original


def run_script(path: str, args: Sequence[str] = ()) -> None:
    """Run the Python file `path` as `__main__` with command line `args`, the T-CNN models registered.

    Returns when the script ends normally; its `SystemExit` and exceptions propagate. An unknown model
    name in timm's `create_model` gets a note with the closest registered names. On the CPU,
    `DistributedDataParallel` accepts `device_ids=[cpu]` (train.py under torchrun). `sys.argv` and
    `sys.path` are restored afterwards.
    """
    script = resolve_script(path)
    script_dir = os.path.dirname(script)
    _warn_if_shadowed(script_dir)
    saved_argv: List[str] = sys.argv
    saved_path: List[str] = list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, script_dir)
    try:
        with _ddp_without_cpu_device_ids():
            runpy.run_path(script, run_name='__main__')
    except RuntimeError as e:
        hint = unknown_model_hint(e)
        if hint:
            _note(e, hint)
        raise
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
