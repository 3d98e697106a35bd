""" Reading small files, checking output paths before work, and writing outputs all or nothing.

Temporary outputs live beside their target as `.NAME.partial-PID-XXXX`: they are removed when a run
fails or is interrupted (SIGINT, SIGTERM), and a later write to the same target removes those of
runs that were killed outright. Files and folders are created with the user's umask.
"""
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

import yaml
from timm.data.readers import get_img_extensions

from ..errors import InputError

__all__ = [
    'read_mapping', 'image_files', 'check_writable', 'check_output_dir',
    'check_output_file', 'remove_stale_partials', 'atomic_directory', 'atomic_path', 'atomic_write',
]

_logger = logging.getLogger(__name__)

_PARTIAL = '.partial-'


def read_mapping(path: Union[str, Path], what: str) -> Dict[str, Any]:
    """The mapping held by a YAML or JSON file (JSON is read as YAML); `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'{what} {path} does not exist.')
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f'{what} {path} is not valid YAML or JSON: {e}') from None
    if not isinstance(data, dict):
        raise InputError(f'{what} {path} must hold a mapping (a YAML mapping or a JSON object), '
                         f'not {type(data).__name__}.')
    return data


def image_files(folder: Union[str, Path], option: str = '--images') -> List[Path]:
    """Image files under `folder` (recursively, timm's image extensions), sorted; an `InputError` if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f'{option} {folder} is not a folder: pass a folder of images.')
    extensions = get_img_extensions(as_set=True)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise InputError(f'{option} {folder} holds no image file ({", ".join(sorted(extensions))}).')
    return files


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _apply_umask(root: Path) -> None:
    """Give `root` and everything in it the modes a plain `open`/`mkdir` would: `mkdtemp`, `mkstemp` and
    safetensors create 0700 folders and 0600 files whatever the umask."""
    umask = _umask()
    paths = [root, *root.rglob('*')] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def check_writable(folder: Union[str, Path], option: str) -> None:
    """Before any work: this user can create files in `folder` (or, if missing, in its nearest existing
    ancestor): a temporary folder is created there and removed."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f'{option}: {existing} is a file, so {folder} cannot be created; choose another path.')
    try:
        os.rmdir(tempfile.mkdtemp(prefix='.timm-tcnn-probe-', dir=existing))
    except OSError as e:
        raise InputError(f'{option}: cannot write into {existing} ({e.strerror}); choose a writable folder.') from None


def check_output_dir(out: Union[str, Path], overwrite: bool = False, option: str = '--out') -> None:
    """Before any work: `out` must be creatable (or, with `overwrite`, replaceable) by this user."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f'{option} {out} is a file, not a folder: choose another path.')
    if out.exists() and not overwrite:
        raise InputError(f'{option} {out} already exists: choose another folder or pass --overwrite to replace it.')
    check_writable(out.absolute().parent, option)


def check_output_file(path: Union[str, Path], option: str = '--out') -> None:
    """Before any work: `path` must be a file this user can create or replace."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f'{option} {path} is a folder: give a file name.')
    check_writable(path.absolute().parent, option)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Union[str, Path]) -> List[Path]:
    """Remove the temporary outputs for `target` left by runs that were killed; returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(f'.{target.name}{_PARTIAL}*'):
        pid = path.name[len(target.name) + 1 + len(_PARTIAL):].split('-', 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue  # not ours, or a run still in progress
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path)
        _logger.warning('removed %s, the partial output of an interrupted run', path)
    return removed


def _partial_prefix(target: Path) -> str:
    return f'.{target.name}{_PARTIAL}{os.getpid()}-'


@contextlib.contextmanager
def atomic_directory(out: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out` that becomes `out` only if the block succeeds.

    An existing `out` is an error unless `overwrite`; it is then replaced only after the new folder is
    complete. On failure or interruption nothing is left behind.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=out.parent))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write `data` (text as UTF-8) to `path` so that readers see the old or the new file, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode('utf-8') if isinstance(data, str) else data)
