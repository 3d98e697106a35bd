""" The `timm-tcnn` command line (also `python -m timm_tcnn`).

Each subcommand lives in its own module under `timm_tcnn.commands` and provides
`add_parser(subparsers)` (which sets `func`, called with the parsed namespace, returning an exit code).
"""
import argparse
import importlib
import sys
from typing import List, Optional

from .errors import TcnnError
from .version import __version__

# subcommand name -> module in timm_tcnn.commands, in the order shown by --help
COMMANDS = ('convert', 'run', 'experiment', 'relational-shapes', 'analyze', 'robustness', 'publish', 'bench')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-tcnn',
        description='Transformed CNNs for timm: convert pretrained CNNs into exact gated positional '
                    'self-attention models, then train, evaluate and inspect them.',
    )
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name in COMMANDS:
        importlib.import_module(f'.commands.{name.replace("-", "_")}', __package__).add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TcnnError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
