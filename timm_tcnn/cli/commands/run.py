""" `timm-tcnn run SCRIPT [args...]`: run one of timm's scripts with the T-CNN models registered. """
import argparse

from ...errors import report_error
from ...tools.runner import ScriptNotFoundError, resolve_script, run_script

_EXAMPLES = """\
examples:
  timm-tcnn run pytorch-image-models/train.py --data-dir DATA --model tcnn_resnet50rs --pretrained ...
  timm-tcnn run pytorch-image-models/validate.py --data-dir DATA/val --model tcnn_resnet50rs --checkpoint CKPT
  timm-tcnn run pytorch-image-models/benchmark.py --model tcnn_resnet50rs --device cpu
  torchrun --nproc_per_node=8 -m timm_tcnn run pytorch-image-models/train.py --config RECIPE.yaml ...

Everything after SCRIPT goes to the script untouched (`timm-tcnn run train.py --help` shows train.py's help).
The script runs as `python SCRIPT args...` would, in a process that imported timm_tcnn first, and exits
with the script's exit code.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'run',
        help="run timm's train.py, validate.py, benchmark.py (or any script) with the T-CNN models registered",
        description="Run a Python script, e.g. timm's train.py, validate.py or benchmark.py from a clone of "
                    'https://github.com/huggingface/pytorch-image-models, as __main__ with its own arguments, '
                    'after registering the tcnn_* models with timm.',
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('script', metavar='SCRIPT', help='path of the script to run')
    parser.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS',
                        help="the script's own arguments, passed through untouched")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        script = resolve_script(args.script)
    except ScriptNotFoundError as e:
        if args.debug:
            raise
        return report_error('run', e)
    run_script(script, args.script_args)  # the script's own exit code and exceptions pass through
    return 0
