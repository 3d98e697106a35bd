""" Which computation the attention layers run: one switch for the process, as timm's `use_fused_attn()`.

Paths (`ATTENTION_PATHS`):
- `explicit`: the attention materialised in blocks of queries, by the autograd functions of `functions.py`.
- `fused`: the content attention through `torch.nn.functional.scaled_dot_product_attention` (flash /
  memory-efficient / cuDNN kernels on CUDA: no attention-sized tensor in memory), the positional part as
  one GEMM shared by the batch.
- `reference`: the layer's definition written plainly (`reference.py`); slow, for checks.
- `auto` (default): `explicit`.

Independently of the path, the positional part of the attention is built by Triton kernels
(`positional_kernels.py`: one launch forward, two backward) where they can run, CUDA with Triton installed, and
by its closed form in standard operations elsewhere. Each layer shape checks the kernels against the closed form
on first use and falls back to it, with a warning, if they fail or differ. `set_positional_kernels(False)` or
`TIMM_TCNN_POSITIONAL_KERNELS=0` turns them off; under Triton's interpreter (`TRITON_INTERPRET=1`) they also run
on CPU tensors (slowly: for tests).

Whatever the path, scripted, traced, exported and compiled graphs compute the same maths in standard operations,
and with autograd off (nothing to differentiate) `explicit` and `fused` reuse what does not depend on the input
(`inference.py`). Set the path with `set_attention_path`, the `attention_path` context manager, or the
environment variable `TIMM_TCNN_ATTENTION_PATH`.
"""
import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch

__all__ = [
    'ATTENTION_PATHS', 'set_attention_path', 'get_attention_path', 'attention_path', 'resolve_attention_path',
    'set_positional_kernels', 'positional_kernels_enabled',
]

ATTENTION_PATHS = ('auto', 'explicit', 'fused', 'reference')


def _checked(path: str) -> str:
    if path not in ATTENTION_PATHS:
        raise ValueError(f'unknown attention path {path!r}: choose from {", ".join(ATTENTION_PATHS)}.')
    return path


_PATH = _checked(os.environ.get('TIMM_TCNN_ATTENTION_PATH', 'auto'))


def set_attention_path(path: str = 'auto') -> None:
    """Choose the computation of every `GatedPositionalAttention2d` in this process (`ATTENTION_PATHS`)."""
    global _PATH
    _PATH = _checked(path)


def get_attention_path() -> str:
    """The path as set (may be `auto`)."""
    return _PATH


@contextlib.contextmanager
def attention_path(path: str) -> Iterator[None]:
    """Run the enclosed code with attention path `path`, then restore the previous one."""
    previous = get_attention_path()
    set_attention_path(path)
    try:
        yield
    finally:
        set_attention_path(previous)


def resolve_attention_path() -> str:
    """The path eager layers take now: `explicit`, `fused` or `reference` (`auto` resolved)."""
    return 'explicit' if _PATH == 'auto' else _PATH


_POSITIONAL_KERNELS = os.environ.get('TIMM_TCNN_POSITIONAL_KERNELS', '1') != '0'


def set_positional_kernels(enabled: bool = True) -> None:
    """Let the layers build their positional attention with Triton kernels where they can run (the default)."""
    global _POSITIONAL_KERNELS
    _POSITIONAL_KERNELS = bool(enabled)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec('triton') is not None


def positional_kernels_enabled(device: torch.device) -> bool:
    """The positional kernels are on and can run on `device`: CUDA with Triton installed, or CPU tensors under
    Triton's interpreter."""
    if not _POSITIONAL_KERNELS or not _triton_installed():
        return False
    return device.type == 'cuda' or (device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1')
