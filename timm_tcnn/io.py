""" Reading checkpoints safely and writing output folders atomically. """
import argparse
import contextlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Union

import torch
import yaml

__all__ = [
    'CheckpointError', 'load_checkpoint_state_dict', 'read_mapping', 'atomic_directory', 'atomic_path', 'atomic_write',
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or holds something other than a state dict."""


def load_checkpoint_state_dict(path: Union[str, Path], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """State dict of a `.safetensors` file, a plain `torch.save`d state dict or a timm train.py checkpoint.

    Never unpickles arbitrary objects (`torch.load(weights_only=True)`). With `use_ema`, a train.py
    checkpoint's EMA weights are taken (an error if it has none). A `module.` prefix (DDP) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'Checkpoint {path} does not exist or is not a file.')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            checkpoint = load_file(str(path), device='cpu')
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'Checkpoint {path} is not a readable safetensors file: {e}') from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f'Checkpoint {path} holds objects other than tensors and plain containers, which are not loaded '
                f'for safety ({str(e).splitlines()[0]}). Save a plain state dict (model.state_dict()) or safetensors.'
            ) from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f'Checkpoint {path} is corrupt or not a PyTorch file: {e}') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'Checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict.')
    keys = ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model')
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    else:
        if use_ema:
            raise CheckpointError(f'Checkpoint {path} has no EMA weights (state_dict_ema); leave out the EMA option.')
    tensors = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in checkpoint.items()}
    not_tensors = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'Checkpoint {path} is not a state dict: entries {not_tensors[:5]} are not tensors.')
    return tensors


def read_mapping(path: Union[str, Path], what: str) -> Dict[str, Any]:
    """The mapping held by a YAML or JSON file (JSON is read as YAML); `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{what} {path} does not exist.')
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as e:
        raise ValueError(f'{what} {path} is not valid YAML or JSON: {e}') from None
    if not isinstance(data, dict):
        raise ValueError(f'{what} {path} must hold a mapping (a YAML mapping or a JSON object), '
                         f'not {type(data).__name__}.')
    return data


@contextlib.contextmanager
def atomic_directory(out: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the block succeeds.

    An existing `out` is an error unless `overwrite`; it is then replaced only after the new folder
    is complete. On failure nothing is left behind.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f'{out} already exists: choose another output folder or allow overwriting.')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old.', dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; it replaces `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write `data` (text as UTF-8) to `path` so that readers see the old or the new file, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode('utf-8') if isinstance(data, str) else data)
