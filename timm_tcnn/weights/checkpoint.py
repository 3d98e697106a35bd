""" Reading checkpoint files safely: safetensors, plain state dicts and timm train.py checkpoints. """
import argparse
import pickle
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from timm.models import load_state_dict

from ..errors import InputError

__all__ = ['CheckpointError', 'checkpoint_epochs', 'load_checkpoint_state_dict']

_EMA_KEYS = ('state_dict_ema', 'model_ema')


class CheckpointError(InputError):
    """A checkpoint file is missing, empty, unreadable or holds something other than a state dict."""


def _peek(path: Path) -> object:
    """A torch checkpoint's contents, memory-mapped where possible so that its tensors are not read."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # files of the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location='cpu', weights_only=True)


def _has_ema(path: Path) -> bool:
    """Whether a torch checkpoint holds EMA weights."""
    checkpoint = _peek(path)
    return isinstance(checkpoint, dict) and any(isinstance(checkpoint.get(k), dict) for k in _EMA_KEYS)


def checkpoint_epochs(path: Union[str, Path]) -> Optional[int]:
    """Epochs trained to reach a train.py checkpoint (its `epoch` entry is the last finished epoch's index, so
    index 4 is 5 epochs), or None for a file that does not record it (safetensors, plain state dicts)."""
    path = Path(path)
    if path.suffix == '.safetensors':
        return None
    checkpoint = _peek(path)
    epoch = checkpoint.get('epoch') if isinstance(checkpoint, dict) else None
    return int(epoch) + 1 if isinstance(epoch, int) else None


def load_checkpoint_state_dict(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """State dict of a `.safetensors` file, a plain `torch.save`d state dict or a timm train.py checkpoint.

    Read with timm's `load_state_dict` (`weights_only=True`: arbitrary objects are never unpickled), which
    also strips the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes. With `use_ema` the EMA
    weights of a train.py checkpoint are taken (a `CheckpointError` if it has none). Every failure is a
    `CheckpointError` saying what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist or is not a file: check the path.')
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes): an interrupted save or copy? Use the '
                              'complete file.')
    safetensors = path.suffix == '.safetensors'
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args
            if use_ema and (safetensors or not _has_ema(path)):
                raise CheckpointError(f'checkpoint {path} has no EMA weights (state_dict_ema): leave out --ema.')
            state_dict = load_state_dict(str(path), use_ema=use_ema, weights_only=True)
    except (CheckpointError, MemoryError):
        raise
    except AttributeError:  # timm's reader found something other than a mapping
        raise CheckpointError(f'checkpoint {path} holds no state dict (a mapping of names to tensors): save '
                              f'model.state_dict() or a train.py checkpoint.') from None
    except Exception as e:  # torch, timm and safetensors fail on damaged files with many exception types
        cause = e.__cause__ if isinstance(e.__cause__, pickle.UnpicklingError) else e
        if 'Unsupported global' in str(cause):
            raise CheckpointError(
                f'checkpoint {path} holds objects other than tensors and plain containers, which are not loaded '
                f'for safety ({_global_name(cause)}). Save a plain state dict (model.state_dict()) or safetensors.'
            ) from None
        detail = _first_line(e)
        detail = f' ({type(e).__name__}: {detail})' if 'weights_only' not in detail else ''
        kind = 'safetensors' if safetensors else 'PyTorch'
        raise CheckpointError(
            f'checkpoint {path} is corrupt, truncated or not a {kind} file{detail}. Use the complete file, saved '
            f'with torch.save or safetensors.') from None
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'checkpoint {path} is not a state dict: entries {not_tensors[:5]} are not tensors.')
    return state_dict


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else 'no details'


def _global_name(e: BaseException) -> str:
    for line in str(e).splitlines():
        if 'Unsupported global' in line:
            return line.split('Unsupported global:', 1)[1].split(' was ')[0].strip()
    return 'pickled objects'
