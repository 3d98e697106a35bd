""" The `timm-tcnn` command line: `main` (the console script) and one module per command in `commands`.

Nothing else in the package imports this one. """
from .main import COMMANDS, build_parser, main

__all__ = [
    'COMMANDS', 'build_parser', 'main',
]
