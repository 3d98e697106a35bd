""" `timm-tcnn experiment`: the paper's experiment in one command, a T-CNN against its CNN control. """
import argparse
import hashlib
import os
from pathlib import Path
from typing import Dict, List, Tuple

import timm
from timm.data import ImageDataset

from ...errors import InputError, WorkError
from ...models.options import PREFIX
from ...models.variants import conversion_options, variant
from ...tools.experiment import ARMS, DEFAULT_ARMS, ExperimentSpec, build_steps, scratch_arm, write_report
from ...tools.experiment.launchers import LAUNCHERS, LocalLauncher
from ...tools.experiment.parts import load_label_parts
from ...tools.experiment.recipes import DEFAULT_RECIPE, recipe_path
from ...tools.robustness import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES
from ...utils.hub import require_hub_weights
from ...utils.io import check_writable, read_mapping
from ...weights.loading import load_cnn, unknown_model_hint
from .common import add_device_arg, add_model_kwargs_arg, input_errors, refuse_unused, resolve_device

# create_model arguments train.py sets itself (from its own options): --model-kwargs must not repeat them
_TRAIN_PY_KWARGS = ('pretrained', 'in_chans', 'num_classes', 'drop_rate', 'drop_path_rate', 'drop_block_rate',
                    'global_pool', 'bn_momentum', 'bn_eps', 'scriptable', 'checkpoint_path', 'pretrained_cfg_overlay')
_SCRIPTS_HINT = ("timm's train.py and validate.py are not in the timm package: clone "
                 'https://github.com/huggingface/pytorch-image-models and pass its folder with --scripts-dir '
                 'or TIMM_SCRIPTS_DIR.')

DESCRIPTION = """\
Fine-tune a T-CNN and its CNN (the control) with the same train.py recipe, seed, data order and epochs, for
every seed; validate every arm's best and last checkpoints at the train and test sizes with validate.py and
record every validation image's prediction; measure the robustness of the T-CNN and the CNN (ImageNet-C/A/R when
given, else the validation split corrupted on the fly); analyse the T-CNN's attention at conversion and at the
end and record its gates every epoch; then write OUT/report.md (verdicts with intervals counting seeds and
images, training times, learning curves), OUT/results.json and figures. A rerun continues where the last one
stopped.

Partially trained CNN: with --arms tcnn cnn scratch, a third arm trains the T-CNN from its own initialisation
with the starting CNN's recipe (args.yaml beside --cnn-checkpoint, or --scratch-config) for the CNN's epochs (read
from the checkpoint, or --cnn-epochs) plus the fine-tune's: both routes to a T-CNN then train for as many epochs, and
the report compares them, with their training times (the CNN's counted for the tcnn route).

Transfer: with --num-classes other than the starting weights' class count (e.g. an ImageNet CNN fine-tuned
on a 10-class data set), both arms of a seed start from the same CNN whose classifier is replaced by a new
random one drawn with that seed (OUT/start/seedS.safetensors); the identity check runs on the CNN as loaded.
"""

_EXAMPLES = """\
examples:
  timm-tcnn experiment --model tcnn_resnet50rs --data-dir /data/imagenet --out runs/rs50 --nproc 8
  timm-tcnn experiment --model tcnn_resnet18 --data-dir DATA --cnn-checkpoint cnn.pth.tar \\
      --config examples/relational_shapes_ft.yaml --seeds 0 1 2 --out runs/demo -- --batch-size 32
  timm-tcnn experiment --model tcnn_resnet18 --data-dir DATA --cnn-checkpoint run/checkpoint-3.pth.tar \\
      --config examples/relational_shapes_ft.yaml --arms tcnn cnn scratch --out runs/partial
  timm-tcnn experiment ... --dry-run        # print every command, run nothing
  timm-tcnn experiment ... --launcher slurm --nproc 16 --slurm partition=gpu nodes=2 gpus_per_node=8 \
      cpus_per_task=10 timeout_min=1440 'setup=source ~/venv/bin/activate'    # every run a SLURM job (docs/cluster.md)

Arguments after `--` go to train.py unchanged (both arms).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'experiment', help='T-CNN vs its CNN control: fine-tune both, validate, robustness, report',
        description=DESCRIPTION, epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, metavar='TCNN', help='the T-CNN, e.g. tcnn_resnet50rs')
    parser.add_argument('--data-dir', required=True, metavar='DIR', help='ImageFolder with train and validation splits')
    parser.add_argument('--out', required=True, metavar='DIR', help='experiment folder (resumed if it exists)')
    parser.add_argument(
        '--config', metavar='YAML', help=f'train.py --config recipe (default: the shipped {DEFAULT_RECIPE})'
    )
    parser.add_argument('--epochs', type=int, help="override the recipe's epochs")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='one run per arm and seed')
    parser.add_argument(
        '--arms',
        nargs='+',
        choices=ARMS,
        default=list(DEFAULT_ARMS),
        help='training arms (default: tcnn cnn); scratch: the T-CNN trained from scratch (see above)',
    )
    parser.add_argument(
        '--cnn-epochs',
        type=int,
        metavar='N',
        help="epochs the starting CNN was trained for (default: read from --cnn-checkpoint)",
    )
    parser.add_argument(
        '--scratch-config',
        metavar='YAML',
        help="the scratch arm's train.py recipe (default: the args.yaml beside --cnn-checkpoint)",
    )
    parser.add_argument('--nproc', type=int, default=1, help='processes per training run (torchrun when > 1)')
    parser.add_argument(
        '--cnn-checkpoint', metavar='FILE', help="start from this CNN checkpoint instead of timm's pretrained weights"
    )
    parser.add_argument(
        '--scripts-dir',
        default=os.environ.get('TIMM_SCRIPTS_DIR'),
        metavar='DIR',
        help="folder with timm's train.py and validate.py (default: $TIMM_SCRIPTS_DIR)",
    )
    add_model_kwargs_arg(parser, help='create_model arguments of both arms')
    add_model_kwargs_arg(parser, '--tcnn-kwargs', help='T-CNN options of the tcnn arm, e.g. tcnn_stages="(3,)"')
    parser.add_argument(
        '--num-classes',
        type=int,
        help="classes of the model (default: the starting weights'); another count replaces the "
        'classifier (transfer, see above)',
    )
    parser.add_argument('--train-size', type=int, help="training image size (default: the model's)")
    parser.add_argument('--test-size', type=int, help="evaluation image size (default: the model's test size)")
    parser.add_argument('--train-split', default='train')
    parser.add_argument('--val-split', default='validation')
    add_device_arg(parser, ' of every step')
    parser.add_argument('--workers', type=int, default=2, help='data loading processes of the evaluations')
    parser.add_argument('--eval-batch-size', type=int, default=64)
    robust = parser.add_argument_group('robustness (default: the validation split corrupted on the fly)')
    robust.add_argument('--imagenet-c', metavar='DIR')
    robust.add_argument('--imagenet-a', metavar='DIR')
    robust.add_argument('--imagenet-r', metavar='DIR')
    robust.add_argument('--corruptions', nargs='+', default=[], metavar='NAME', help='default: the 15 of ImageNet-C')
    robust.add_argument('--severities', nargs='+', type=int, default=[], metavar='S', help='default: 1..5')
    parser.add_argument('--analyze-images', type=int, default=32, help='validation images for the attention analysis')
    parser.add_argument('--dry-run', action='store_true', help='print every command (and SLURM job) and run nothing')
    cluster = parser.add_argument_group('cluster (docs/cluster.md)')
    cluster.add_argument(
        '--launcher',
        choices=LAUNCHERS,
        default='local',
        help='local: every step here, one after another; slurm: every run a SLURM job through '
        'submitit, independent runs at once (default: local)',
    )
    cluster.add_argument(
        '--slurm',
        nargs='+',
        action='extend',
        default=[],
        metavar='KEY=VALUE',
        help="submitit's SlurmExecutor parameters of every job, e.g. partition=gpu nodes=2 "
        'gpus_per_node=8 cpus_per_task=10 mem_gb=400 timeout_min=1440 account=... qos=... '
        "constraint=... 'setup=module load cuda' (repeatable)",
    )
    cluster.add_argument(
        '--no-wait',
        action='store_true',
        help='submit the jobs and return (a rerun attaches to them and writes the report)',
    )
    parser.add_argument('train_args', nargs='*', metavar='-- TRAIN_ARGS', help='passed to train.py unchanged')
    parser.set_defaults(func=run)


def _model_names(model: str) -> Dict[str, str]:
    """{'tcnn': ..., 'cnn': ...} for a registered T-CNN name (closest names on a typo)."""
    if not timm.is_model(model):
        raise InputError(f'unknown model {model!r}. {unknown_model_hint(RuntimeError(f"Unknown model ({model})"))}')
    row = variant(model)
    return dict(tcnn=row.name, cnn=row.cnn)


def _check_split(data_dir: Path, split: str) -> List[str]:
    """The classes of a split (its class folders holding images, in timm's ImageFolder order)."""
    folder = data_dir / split
    if not folder.is_dir():
        raise InputError(
            f'{folder} does not exist: --data-dir needs the splits {split!r} (see --train-split, '
            f'--val-split), each holding one folder of images per class.'
        )
    classes = [p for p in folder.iterdir() if p.is_dir()]
    if len(classes) < 2:
        raise InputError(f'{folder} is not labelled: it needs one folder per class (at least 2), found {len(classes)}.')
    dataset = ImageDataset(str(folder))
    if len(dataset) == 0:
        raise InputError(f'{folder} holds no images in its class folders.')
    return list(dataset.reader.class_to_idx)


def _check_classes(data_dir: Path, train_split: str, val_split: str) -> int:
    """Both splits must have the same classes (else timm numbers them differently); returns their number."""
    train, val = _check_split(data_dir, train_split), _check_split(data_dir, val_split)
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise InputError(
            f'the splits {train_split!r} and {val_split!r} of {data_dir} have different classes (with images only '
            f'in {train_split}: {only_train[:5]}; only in {val_split}: {only_val[:5]}), so their labels would be '
            f'numbered differently: give every class images in both splits.'
        )
    return len(train)


def _start_classes(args: argparse.Namespace, cnn: str) -> int:
    """The class count of the weights both arms start from; a --cnn-checkpoint is read, checked to be a finite CNN
    checkpoint of `cnn` (with --model-kwargs) now, not after the first training run."""
    if not args.cnn_checkpoint:
        cfg = timm.models.get_pretrained_cfg(cnn)
        if not args.dry_run:
            require_hub_weights(cfg.hf_hub_id)
        return cfg.num_classes
    cnn = load_cnn(
        cnn,
        args.cnn_checkpoint,
        source=f'--cnn-checkpoint {args.cnn_checkpoint}',
        device='meta',
        refusal='both arms start from CNN weights; pass the CNN checkpoint it was converted from.',
        **args.model_kwargs,
    )
    return cnn.num_classes


def _check_options(args: argparse.Namespace) -> None:
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise InputError(f'--seeds must be distinct integers >= 0, got {" ".join(map(str, args.seeds))}.')
    if (
        (args.epochs is not None and args.epochs < 1)
        or args.nproc < 1
        or (args.cnn_epochs is not None and args.cnn_epochs < 1)
    ):
        raise InputError('--epochs, --cnn-epochs and --nproc must be >= 1.')
    if 'tcnn' not in args.arms or len(set(args.arms)) != len(args.arms):
        raise InputError(f'--arms must name the tcnn arm and each arm once, got {" ".join(args.arms)}.')
    if 'scratch' not in args.arms:
        refuse_unused(
            {'--cnn-epochs': args.cnn_epochs is not None, '--scratch-config': bool(args.scratch_config)},
            'the scratch arm',
            'add --arms tcnn cnn scratch',
        )
    if args.num_classes is not None and args.num_classes < 1:
        raise InputError(f'--num-classes must be >= 1, got {args.num_classes}.')
    if (args.imagenet_a or args.imagenet_r) and not args.imagenet_c:  # no corrupted images in the robustness step
        refuse_unused(
            {'--corruptions': bool(args.corruptions), '--severities': bool(args.severities)},
            'corrupted images',
            'add --imagenet-c DIR (or drop --imagenet-a/-r: the validation split is then corrupted on the fly)',
        )
    unknown = [c for c in args.corruptions if c not in CORRUPTIONS + EXTRA_CORRUPTIONS]
    bad = [s for s in args.severities if s not in SEVERITIES]
    if unknown or bad:
        raise InputError(
            f'unknown corruption(s) {unknown} or severities {bad}: corruptions are '
            f'{", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS)}; severities 1..5.'
        )
    not_tcnn = sorted(k for k in args.tcnn_kwargs if not k.startswith(PREFIX))
    tcnn_in_both = sorted(k for k in args.model_kwargs if k.startswith(PREFIX))
    if not_tcnn or tcnn_in_both:
        raise InputError(
            f'--tcnn-kwargs takes the T-CNN options (tcnn_*), of the tcnn arm only, and --model-kwargs the '
            f'arguments of both arms: move {not_tcnn + tcnn_in_both} to the other one.'
        )
    with input_errors('--tcnn-kwargs'):
        conversion_options(args.model, **args.tcnn_kwargs)
    repeated = sorted(set(args.model_kwargs) & set(_TRAIN_PY_KWARGS))
    if repeated:
        raise InputError(
            f'--model-kwargs {", ".join(repeated)}: train.py sets these from its own options (e.g. '
            f'--num-classes, or --drop, --drop-path after --): pass them that way.'
        )


def _spec(args: argparse.Namespace) -> Tuple[ExperimentSpec, bool]:
    """The experiment's spec, all its inputs checked, and whether it is a transfer (another class count)."""
    names = _model_names(args.model)
    scripts = Path(args.scripts_dir) if args.scripts_dir else None
    if scripts is None or not all((scripts / s).is_file() for s in ('train.py', 'validate.py')):
        where = f'{scripts} has no train.py and validate.py' if scripts else 'no --scripts-dir and no TIMM_SCRIPTS_DIR'
        raise InputError(f'{where}. {_SCRIPTS_HINT}')
    recipe = Path(args.config) if args.config else recipe_path()
    with input_errors(fix='Pass a train.py YAML recipe with --config.'):
        recipe_epochs = read_mapping(recipe, 'recipe').get('epochs')
    _check_options(args)
    data_dir = Path(args.data_dir)
    data_classes = _check_classes(data_dir, args.train_split, args.val_split)
    resolve_device(args.device)
    check_writable(args.out, '--out')
    start_classes = _start_classes(args, names['cnn'])
    classes = args.num_classes or start_classes
    if classes < data_classes:
        raise InputError(
            f'the model would have {classes} classes but {data_dir} has {data_classes}: pass '
            f'--num-classes {data_classes}.'
        )
    cfg = timm.models.get_pretrained_cfg(names['cnn']) or {}
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    scratch = None
    if 'scratch' in args.arms:
        finetune_epochs = args.epochs or recipe_epochs
        if not isinstance(finetune_epochs, int):
            raise InputError(f'--arms scratch needs the fine-tune\'s epochs: {recipe} sets none, pass --epochs N.')
        scratch = scratch_arm(args.cnn_checkpoint, finetune_epochs, classes, args.cnn_epochs, args.scratch_config)
    train_size = args.train_size or cfg.get('input_size', (3, 224, 224))[-1]
    test_size = args.test_size or (cfg.get('test_input_size') or cfg.get('input_size', (3, 224, 224)))[-1]
    spec = ExperimentSpec(
        model=names['tcnn'],
        cnn_model=names['cnn'],
        data_dir=str(data_dir.resolve()),
        out=str(Path(args.out).resolve()),
        recipe=str(recipe.resolve()),
        recipe_sha256=hashlib.sha256(recipe.read_bytes()).hexdigest(),
        scripts_dir=str(scripts.resolve()),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        nproc=args.nproc,
        cnn_checkpoint=str(Path(args.cnn_checkpoint).resolve()) if args.cnn_checkpoint else None,
        model_kwargs=dict(args.model_kwargs),
        tcnn_kwargs=dict(args.tcnn_kwargs),
        num_classes=args.num_classes,
        train_size=train_size,
        test_size=test_size,
        train_split=args.train_split,
        val_split=args.val_split,
        train_args=tuple(args.train_args),
        device=args.device,
        workers=args.workers,
        eval_batch_size=args.eval_batch_size,
        corruptions=tuple(args.corruptions),
        severities=tuple(args.severities),
        imagenet_c=args.imagenet_c,
        imagenet_a=args.imagenet_a,
        imagenet_r=args.imagenet_r,
        analyze_images=args.analyze_images,
        arms=tuple(args.arms),
        scratch=scratch,
    )
    return spec, classes != start_classes


def _launcher(args: argparse.Namespace):
    """The launcher the command runs the steps with, its options checked."""
    if args.launcher == 'local':
        refuse_unused({'--slurm': bool(args.slurm), '--no-wait': args.no_wait}, '--launcher slurm')
        return LocalLauncher()
    from ...tools.experiment.slurm import SlurmLauncher, parse_parameters  # needs the cluster extra

    return SlurmLauncher(parse_parameters(args.slurm), wait=not args.no_wait)


def run(args: argparse.Namespace) -> int:
    launcher = _launcher(args)
    spec, transfer = _spec(args)
    launcher.check(spec)
    steps = build_steps(spec, transfer=transfer)
    if args.dry_run:
        print('\n'.join(launcher.plan(spec, steps)))
        return 0
    state = launcher.run(spec, steps, record_weights=load_label_parts(spec.data_dir) is not None)
    if state is None:  # the jobs keep running on the cluster
        return 130 if launcher.interrupted else 0
    write_report(spec, state)
    print(f'report: {spec.root / "report.md"}')
    failed = [k for k, v in state.steps.items() if v['status'] != 'done']
    if 'identity' in failed:
        raise WorkError(f'the identity check failed ({state.steps["identity"].get("reason")}); nothing was trained.')
    if failed:
        raise WorkError(
            f'{len(failed)} step(s) did not finish: {", ".join(failed)}; see the report and their logs. '
            f'Rerun the same command to retry them.'
        )
    return 0
