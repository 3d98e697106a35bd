""" How the attention layers compute, decided once per layer (as timm's `use_fused_attn()` decides once per module):
when the layer is built, moved or cast, and when a process-wide switch changes.

A layer's `choices` (`LayerChoices`, from `choose`) are the only device-dependent decisions its forward pass reads:

- `positional_kernels`: the positional attention of the eager training step is built by Triton kernels
  (`positional_kernels.py`: one launch forward, two backward) on CUDA with Triton installed, in float32, unless
  turned off by `set_positional_kernels(False)` or `TIMM_TCNN_POSITIONAL_KERNELS=0`; by its closed form in standard
  operations elsewhere. Under Triton's interpreter (`TRITON_INTERPRET=1`) they also run on CPU tensors (slowly:
  for tests). Each layer shape checks the kernels against the closed form on first use and falls back to it, with
  a warning, if they fail or differ.
- `queries_everywhere`: stride-2 layers project queries at every position together with the keys, one GEMM (CUDA:
  fewer launches), or at the query positions only (CPU: fewer multiply-adds).
- `channels_first_projection`: dense layers project NCHW maps channels first at inference (CUDA: no transposing
  copy), or through one GEMM over the batch (CPU).
- `block_bytes`: the default bound on the attention materialised at once (`default_block_bytes`).

docs/performance.md records the measurement behind each. Scripted, traced, exported and compiled graphs compute
the same maths in standard operations and read none of these.
"""
import functools
import importlib.util
import os
import weakref
from typing import NamedTuple

import torch

from .numerics import default_block_bytes

__all__ = ['LayerChoices', 'choose', 'set_positional_kernels', 'positional_kernels_enabled', 'register']

_POSITIONAL_KERNELS = os.environ.get('TIMM_TCNN_POSITIONAL_KERNELS', '1') != '0'
_LAYERS: 'weakref.WeakSet' = weakref.WeakSet()  # every layer, to re-choose when a switch changes


class LayerChoices(NamedTuple):
    """The computation a layer's eager forward pass takes on its device (see the module docstring)."""
    positional_kernels: bool
    queries_everywhere: bool
    channels_first_projection: bool
    block_bytes: int


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec('triton') is not None


def positional_kernels_enabled(device: torch.device) -> bool:
    """The positional kernels are on and can run on `device`: CUDA with Triton installed, or CPU tensors under
    Triton's interpreter."""
    if not _POSITIONAL_KERNELS or not _triton_installed():
        return False
    return device.type == 'cuda' or (device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1')


def choose(device: torch.device, dtype: torch.dtype, stride: int, groups: int) -> LayerChoices:
    """The choices of a layer with parameters of `dtype` on `device`."""
    cuda = device.type == 'cuda'
    return LayerChoices(
        positional_kernels=positional_kernels_enabled(device) and dtype != torch.float64,
        queries_everywhere=stride == 1 or cuda,
        channels_first_projection=groups == 1 and cuda,
        block_bytes=default_block_bytes(device),
    )


def register(layer) -> None:
    """Keep `layer` (a `GatedPositionalAttention2d`) to re-choose its computation when a switch changes."""
    _LAYERS.add(layer)


def set_positional_kernels(enabled: bool = True) -> None:
    """Let the layers build their positional attention with Triton kernels where they can run (the default)."""
    global _POSITIONAL_KERNELS
    _POSITIONAL_KERNELS = bool(enabled)
    for layer in list(_LAYERS):
        layer.choose_computation()
