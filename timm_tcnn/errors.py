""" Errors a user can act on: the command line prints them as `error: ...` without a traceback. """
import sys

__all__ = ['TcnnError', 'InputError', 'WorkError', 'report_error']


class TcnnError(Exception):
    """A failure the user can fix; `exit_code` is what the command line exits with."""
    exit_code = 1


class InputError(TcnnError, ValueError):
    """Bad input: an argument, option, file or folder the user gave (exit code 2)."""
    exit_code = 2


class WorkError(TcnnError, RuntimeError):
    """The work itself failed on valid input, e.g. an identity check or a training run (exit code 1)."""
    exit_code = 1


def report_error(command: str, error: TcnnError) -> int:
    """Print `error` as `timm-tcnn COMMAND: error: ...` on stderr and return its exit code."""
    print(f'timm-tcnn {command}: error: {error}', file=sys.stderr)
    return error.exit_code
