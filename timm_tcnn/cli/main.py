""" The `timm-tcnn` command line (also `python -m timm_tcnn`).

Each subcommand lives in its own module under `timm_tcnn.cli.commands` and provides
`add_parser(subparsers)` (which sets `func`, called with the parsed namespace, returning an exit code).

One error path: a `TcnnError` raised anywhere is printed as `timm-tcnn COMMAND: error: ...` and exits
with its `exit_code` (2: bad input, 1: the work failed); argparse's usage errors exit 2 as well. SIGINT
and SIGTERM end a command through its cleanup code (no partial output is left) with exit code
128 + signal number. `--debug` shows the traceback instead; any other exception is a bug and shows it too.
`run` leaves signals, exit codes and exceptions to the script it runs; only its own errors (script not
found) take this path.
"""
import argparse
import contextlib
import signal
import sys
import threading
from typing import Iterator, List, Optional

from ..errors import TcnnError, report_error
from ..version import __version__
from .commands import analyze, bench, convert, experiment, publish, relational_shapes, robustness, run

# subcommand name -> its module, in the order shown by --help
_MODULES = {
    'convert': convert, 'run': run, 'experiment': experiment, 'relational-shapes': relational_shapes,
    'analyze': analyze, 'robustness': robustness, 'publish': publish, 'bench': bench,
}
COMMANDS = tuple(_MODULES)
# commands whose process belongs to a user script: its signals and errors are left to the script
SCRIPT_COMMANDS = ('run',)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that cleanup code runs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-tcnn',
        description='Transformed CNNs for timm: convert pretrained CNNs into exact gated positional '
                    'self-attention models, then train, evaluate and inspect them.',
    )
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--debug', action='store_true', help='show the full traceback of errors')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, module in _MODULES.items():
        module.add_parser(subparsers)
        if name not in SCRIPT_COMMANDS:  # `run` passes everything after SCRIPT to the script
            subparsers.choices[name].add_argument(
                '--debug', action='store_true', default=argparse.SUPPRESS, help='show the full traceback of errors')
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command in SCRIPT_COMMANDS:
        return int(args.func(args) or 0)
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except TcnnError as e:
        if args.debug:
            raise
        return report_error(args.command, e)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f'timm-tcnn {args.command}: interrupted ({signum.name}); no partial output was left.', file=sys.stderr)
        return 128 + signum
