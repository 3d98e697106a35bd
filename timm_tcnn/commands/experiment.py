""" `timm-tcnn experiment`: the paper's experiment in one command, a T-CNN against its CNN control. """
import argparse
import hashlib
import os
import shlex
from pathlib import Path
from typing import Dict

import timm
from timm.data import ImageDataset
from timm.utils import ParseKwargs

from ..errors import InputError, WorkError
from ..experiment import ExperimentSpec, build_steps, identity_check, parts_step, run_steps, write_report
from ..experiment.parts import load_label_parts
from ..io import check_writable, load_checkpoint_state_dict, read_mapping
from ..loading import unknown_model_hint
from ..numerics import check_finite
from ..variants import variant
from .common import resolve_device

_DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / 'examples' / 'tcnn_resnet50rs_in1k_ft50.yaml'
_SCRIPTS_HINT = ("timm's train.py and validate.py are not in the timm package: clone "
                 'https://github.com/huggingface/pytorch-image-models and pass its folder with --scripts-dir '
                 'or TIMM_SCRIPTS_DIR.')

DESCRIPTION = """\
Fine-tune a T-CNN and its CNN (the control) with the same train.py recipe, seed, data order and epochs, for
every seed; validate both arms' best and last checkpoints at the train and test sizes with validate.py;
measure their robustness (ImageNet-C/A/R when given, else the validation split corrupted on the fly);
analyse the T-CNN's attention at conversion and at the end and record its gates every epoch; then write
OUT/report.md, OUT/results.json and figures. A rerun continues where the last one stopped.
"""

_EXAMPLES = """\
examples:
  timm-tcnn experiment --model tcnn_resnet50rs --data-dir /data/imagenet --out runs/rs50 --nproc 8
  timm-tcnn experiment --model tcnn_resnet18 --data-dir DATA --cnn-checkpoint cnn.pth.tar \\
      --config examples/relational_shapes_ft.yaml --seeds 0 1 2 --out runs/demo -- --batch-size 32
  timm-tcnn experiment ... --dry-run        # print every command, run nothing

Arguments after `--` go to train.py unchanged (both arms).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'experiment', help='T-CNN vs its CNN control: fine-tune both, validate, robustness, report',
        description=DESCRIPTION, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, metavar='TCNN', help='the T-CNN, e.g. tcnn_resnet50rs')
    parser.add_argument('--data-dir', required=True, metavar='DIR', help='ImageFolder with train and validation splits')
    parser.add_argument('--out', required=True, metavar='DIR', help='experiment folder (resumed if it exists)')
    parser.add_argument('--config', metavar='YAML', help=f'train.py --config recipe (default: {_DEFAULT_RECIPE.name})')
    parser.add_argument('--epochs', type=int, help="override the recipe's epochs")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='one run per arm and seed')
    parser.add_argument('--nproc', type=int, default=1, help='processes per training run (torchrun when > 1)')
    parser.add_argument('--cnn-checkpoint', metavar='FILE',
                        help="start from this CNN checkpoint instead of timm's pretrained weights")
    parser.add_argument('--scripts-dir', default=os.environ.get('TIMM_SCRIPTS_DIR'), metavar='DIR',
                        help="folder with timm's train.py and validate.py (default: $TIMM_SCRIPTS_DIR)")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='create_model arguments of both arms')
    parser.add_argument('--tcnn-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='T-CNN options of the tcnn arm, e.g. tcnn_stages="(3,)"')
    parser.add_argument('--num-classes', type=int, help='classes of the data (default: the checkpoint\'s or the model\'s)')
    parser.add_argument('--train-size', type=int, help="training image size (default: the model's)")
    parser.add_argument('--test-size', type=int, help="evaluation image size (default: the model's test size)")
    parser.add_argument('--train-split', default='train')
    parser.add_argument('--val-split', default='validation')
    parser.add_argument('--device', default='cpu', help='device of every step, e.g. cuda')
    parser.add_argument('--workers', type=int, default=2, help='data loading processes of the evaluations')
    parser.add_argument('--eval-batch-size', type=int, default=64)
    robust = parser.add_argument_group('robustness (default: the validation split corrupted on the fly)')
    robust.add_argument('--imagenet-c', metavar='DIR')
    robust.add_argument('--imagenet-a', metavar='DIR')
    robust.add_argument('--imagenet-r', metavar='DIR')
    robust.add_argument('--corruptions', nargs='+', default=[], metavar='NAME', help='default: the 15 of ImageNet-C')
    robust.add_argument('--severities', nargs='+', type=int, default=[], metavar='S', help='default: 1..5')
    parser.add_argument('--analyze-images', type=int, default=32, help='validation images for the attention analysis')
    parser.add_argument('--dry-run', action='store_true', help='print every command and run nothing')
    parser.add_argument('train_args', nargs='*', metavar='-- TRAIN_ARGS', help='passed to train.py unchanged')
    parser.set_defaults(func=run)


def _model_names(model: str) -> Dict[str, str]:
    """{'tcnn': ..., 'cnn': ...} for a registered T-CNN name (closest names on a typo)."""
    if not timm.is_model(model):
        raise InputError(f'unknown model {model!r}. {unknown_model_hint(RuntimeError(f"Unknown model ({model})"))}')
    row = variant(model)
    return dict(tcnn=row.name, cnn=row.cnn)


def _check_split(data_dir: Path, split: str) -> None:
    folder = data_dir / split
    if not folder.is_dir():
        raise InputError(f'{folder} does not exist: --data-dir needs the splits {split!r} (see --train-split, '
                         f'--val-split), each holding one folder of images per class.')
    classes = [p for p in folder.iterdir() if p.is_dir()]
    if len(classes) < 2:
        raise InputError(f'{folder} is not labelled: it needs one folder per class (at least 2), found {len(classes)}.')
    if len(ImageDataset(str(folder))) == 0:
        raise InputError(f'{folder} holds no images in its class folders.')


def _spec(args: argparse.Namespace) -> ExperimentSpec:
    names = _model_names(args.model)
    scripts = Path(args.scripts_dir) if args.scripts_dir else None
    if scripts is None or not all((scripts / s).is_file() for s in ('train.py', 'validate.py')):
        where = f'{scripts} has no train.py and validate.py' if scripts else 'no --scripts-dir and no TIMM_SCRIPTS_DIR'
        raise InputError(f'{where}. {_SCRIPTS_HINT}')
    recipe = Path(args.config) if args.config else _DEFAULT_RECIPE
    try:
        read_mapping(recipe, 'recipe')
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f'{e} Pass a train.py YAML recipe with --config.') from None
    data_dir = Path(args.data_dir)
    for split in (args.train_split, args.val_split):
        _check_split(data_dir, split)
    if args.cnn_checkpoint:  # damaged or diverged weights fail now, not after the first training run
        check_finite(load_checkpoint_state_dict(args.cnn_checkpoint), f'--cnn-checkpoint {args.cnn_checkpoint}')
    resolve_device(args.device)
    check_writable(args.out, '--out')
    if len(set(args.seeds)) != len(args.seeds) or (args.epochs is not None and args.epochs < 1) or args.nproc < 1:
        raise InputError('--seeds must be distinct, --epochs and --nproc >= 1.')
    cfg = timm.models.get_pretrained_cfg(names['cnn']) or {}
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    train_size = args.train_size or cfg.get('input_size', (3, 224, 224))[-1]
    test_size = args.test_size or (cfg.get('test_input_size') or cfg.get('input_size', (3, 224, 224)))[-1]
    return ExperimentSpec(
        model=names['tcnn'], cnn_model=names['cnn'], data_dir=str(data_dir.resolve()), out=str(Path(args.out).resolve()),
        recipe=str(recipe.resolve()), recipe_sha256=hashlib.sha256(recipe.read_bytes()).hexdigest(),
        scripts_dir=str(scripts.resolve()), seeds=tuple(args.seeds), epochs=args.epochs, nproc=args.nproc,
        cnn_checkpoint=str(Path(args.cnn_checkpoint).resolve()) if args.cnn_checkpoint else None,
        model_kwargs=dict(args.model_kwargs), tcnn_kwargs=dict(args.tcnn_kwargs), num_classes=args.num_classes,
        train_size=train_size, test_size=test_size, train_split=args.train_split, val_split=args.val_split,
        train_args=tuple(args.train_args), device=args.device, workers=args.workers,
        eval_batch_size=args.eval_batch_size, corruptions=tuple(args.corruptions), severities=tuple(args.severities),
        imagenet_c=args.imagenet_c, imagenet_a=args.imagenet_a, imagenet_r=args.imagenet_r,
        analyze_images=args.analyze_images,
    )


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    steps = build_steps(spec, label_parts=load_label_parts(spec.data_dir) is not None)
    if args.dry_run:
        for step in steps:
            command = shlex.join(step.argv) if step.argv else f'(in process: {step.kind} check)'
            print(f'# {step.key}\n{command}')
        return 0
    state = run_steps(spec, steps, {'identity': identity_check, 'parts': parts_step})
    write_report(spec, state)
    print(f'report: {spec.root / "report.md"}')
    failed = [k for k, v in state.steps.items() if v['status'] != 'done']
    if 'identity' in failed:
        raise WorkError(f'the identity check failed ({state.steps["identity"].get("reason")}); nothing was trained.')
    if failed:
        raise WorkError(f'{len(failed)} step(s) did not finish: {", ".join(failed)}; see the report and their logs. '
                        f'Rerun the same command to retry them.')
    return 0
