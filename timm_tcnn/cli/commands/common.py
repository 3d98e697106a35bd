""" Arguments and checks shared by the commands: weights, model kwargs, device, output folders, and which
exceptions of the library mean bad input (`input_errors`). Every command spells an option the same way. """
import argparse
import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from timm.utils import ParseKwargs

from ...errors import InputError

__all__ = ['add_weight_args', 'add_model_kwargs_arg', 'require_weights', 'add_device_arg', 'resolve_device',
           'add_output_args', 'refuse_unused', 'INPUT_ERRORS', 'input_errors']

# exceptions the library raises for values that came from the user (bad model kwargs or options, a missing file, a
# missing optional package): within `input_errors` they are bad input (`InputError`, exit code 2), not bugs
INPUT_ERRORS = (TypeError, ValueError, FileNotFoundError, ImportError)

_CHECKPOINT_HELP = ('weights of MODEL: .safetensors, state dict or train.py checkpoint (read with '
                    'weights_only=True); a CNN checkpoint given for a tcnn_* model is converted exactly')


def add_weight_args(
        parser: argparse.ArgumentParser,
        sources: Sequence[str] = ('pretrained', 'checkpoint'),
        checkpoint_help: str = _CHECKPOINT_HELP,
        model_kwargs_help: str = 'arguments of timm.create_model, e.g. tcnn_stages="(3, 4)" num_classes=10',
) -> None:
    """`--pretrained`, `--checkpoint FILE`, `--random-weights` (those in `sources`, mutually exclusive),
    `--ema` and `--model-kwargs`."""
    group = parser.add_argument_group('weights')
    source = group.add_mutually_exclusive_group() if sources else group
    if 'pretrained' in sources:
        source.add_argument('--pretrained', action='store_true',
                            help="timm's pretrained weights of MODEL (Hugging Face Hub or its local cache)")
    if 'checkpoint' in sources:
        source.add_argument('--checkpoint', metavar='FILE', help=checkpoint_help)
    if 'random_weights' in sources:
        source.add_argument('--random-weights', action='store_true', help='random weights, nothing downloaded')
    group.add_argument('--ema', action='store_true', help="take a train.py checkpoint's EMA weights")
    add_model_kwargs_arg(group, help=model_kwargs_help)


def add_model_kwargs_arg(
        parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup],
        flag: str = '--model-kwargs',
        help: Optional[str] = None,
) -> None:
    """`--model-kwargs KEY=VALUE ...` (or another `flag`), parsed as timm's scripts parse it."""
    parser.add_argument(flag, nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE', help=help)


def require_weights(args: argparse.Namespace) -> None:
    """MODEL must have weights from one of the sources its command offers; never random by omission."""
    offered = [name for name in ('pretrained', 'checkpoint', 'random_weights') if hasattr(args, name)]
    if not any(getattr(args, name) for name in offered):
        options = ', '.join('--checkpoint FILE' if n == 'checkpoint' else '--' + n.replace('_', '-') for n in offered)
        raise InputError(f'{args.model} has no weights: pass one of {options}.')
    if args.ema and not getattr(args, 'checkpoint', None):
        raise InputError('--ema takes the EMA weights of a train.py checkpoint: pass --checkpoint FILE too.')


def add_device_arg(parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup], what: str = '') -> None:
    """`--device`, the same default for every command: cuda if available, else cpu."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help=f'torch device{what}, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)')


def resolve_device(name: str) -> torch.device:
    """The torch device `name`, checked to exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f'--device {name!r} is not a torch device ({e}); e.g. cpu, cuda, cuda:1.') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device {name}: no CUDA device is available on this machine; use --device cpu.')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).')
    return device


def add_output_args(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """`--out DIR` (written all or nothing; must not exist) and `--overwrite`."""
    parser.add_argument('--out', metavar='DIR', required=required,
                        help=f'{help}; written all or nothing, must not exist unless --overwrite')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')


@contextlib.contextmanager
def input_errors(what: Optional[str] = None, fix: Optional[str] = None) -> Iterator[None]:
    """Turn an exception of `INPUT_ERRORS` raised in the block into an `InputError`: '`what`: its message `fix`'."""
    try:
        yield
    except INPUT_ERRORS as e:
        message = f'{what}: {e}' if what else str(e)
        raise InputError(f'{message} {fix}' if fix else message) from None


def refuse_unused(given: Mapping[str, bool], needs: str, fix: Optional[str] = None) -> None:
    """Raise an `InputError` naming the options of `given` that were given (True) but do nothing without `needs`;
    the message offers `fix` (default: add `needs`) or leaving them out."""
    names = [name for name, is_given in given.items() if is_given]
    if names:
        one = len(names) == 1
        raise InputError(f'{", ".join(names)} only {"acts" if one else "act"} with {needs}: {fix or "add " + needs} '
                         f'or leave {"it" if one else "them"} out.')
