""" `timm-tcnn robustness`: ImageNet-C mCE, ImageNet-A/R and on-the-fly corruptions, optionally for two models. """
import argparse
import os
import sys

from ...errors import InputError
from ...tools.robustness import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    ModelSpec,
    ResultsStore,
    evaluate_model,
    plan_cells,
)
from ...tools.robustness.report import format_comparison, format_summary
from ...utils.io import check_writable
from ...weights.loading import check_model_source
from .common import (
    add_device_arg,
    add_model_kwargs_arg,
    add_weight_args,
    refuse_unused,
    require_weights,
    resolve_device,
)

DESCRIPTION = """\
Measure the robustness of a timm model (tcnn_* included): ImageNet-C top-1 per corruption and
severity, CE normalised by AlexNet, mCE, relative mCE and mean corruption accuracy; ImageNet-A and
ImageNet-R top-1 with timm's 200-class logit masks; ImageNet-C corruptions applied on the fly to any
labelled folder. Results go to OUT/robustness.{json,csv,png}, rewritten after every cell; a rerun
skips the cells already there for the same model, weights and preprocessing.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        'robustness', help='ImageNet-C mCE, ImageNet-A/R and on-the-fly corruption robustness',
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', metavar='MODEL', help='timm model name, e.g. tcnn_resnet50rs or resnetrs50')
    add_weight_args(parser)

    data = parser.add_argument_group('datasets (at least one)')
    data.add_argument('--imagenet-c', metavar='DIR', help='ImageNet-C: DIR/<corruption>/<severity>/<synset>/*')
    data.add_argument('--imagenet-a', metavar='DIR', help='ImageNet-A: DIR/<synset>/* (200-class mask)')
    data.add_argument('--imagenet-r', metavar='DIR', help='ImageNet-R: DIR/<synset>/* (200-class mask)')
    data.add_argument('--imagenet-val', metavar='DIR', help='ImageNet validation set DIR/<synset>/*: clean top-1 '
                      'for the relative mCE')
    data.add_argument('--corrupt', metavar='DIR', help='any labelled folder DIR/<class>/*, corrupted on the fly '
                      'with the imagecorruptions package (plus a clean pass)')

    protocol = parser.add_argument_group('protocol')
    protocol.add_argument('--corruptions', nargs='+', metavar='NAME',
                          help=f'corruptions to evaluate (default: the 15 of ImageNet-C; also '
                               f'{", ".join(EXTRA_CORRUPTIONS)})')
    protocol.add_argument('--severities', nargs='+', type=int, metavar='S', help='severities 1..5 (default: all)')
    protocol.add_argument('--c-input', choices=('native', 'model'), default='native',
                          help="corrupted images: 'native' uses them at their stored size (224, the ImageNet-C "
                               "protocol), 'model' resizes and crops them with the model's eval transform")
    protocol.add_argument('--corrupt-size', type=int, default=224, metavar='N',
                          help='--corrupt renders images as ImageNet-C was made: shorter side to N*256/224, '
                               'centre crop N (default 224), then corrupts them')
    protocol.add_argument('--seed', type=int, default=0, help='seed of the on-the-fly corruptions')
    protocol.add_argument('--class-map', metavar='FILE', help='--corrupt class map (timm format: one class '
                          'folder name per line, line number = class index)')
    protocol.add_argument('--clean-accuracy', type=float, metavar='PCT',
                          help='clean ImageNet top-1 (%%) of MODEL for the relative mCE, instead of --imagenet-val')

    compare = parser.add_argument_group('comparison')
    compare.add_argument('--compare', metavar='OTHER_MODEL', help='evaluate a second model on the same cells and '
                         'print MODEL - OTHER_MODEL differences')
    compare.add_argument('--compare-checkpoint', metavar='FILE', help='weights of OTHER_MODEL')
    compare.add_argument('--compare-pretrained', action='store_true', help="OTHER_MODEL with timm's weights")
    add_model_kwargs_arg(compare, '--compare-model-kwargs', help='arguments of timm.create_model for OTHER_MODEL')
    compare.add_argument('--compare-clean-accuracy', type=float, metavar='PCT')

    pre = parser.add_argument_group("preprocessing (defaults: timm's data config of the model, test size)")
    pre.add_argument('--img-size', type=int, metavar='N')
    pre.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'))
    pre.add_argument('--crop-pct', type=float)
    pre.add_argument('--interpolation', metavar='NAME')
    pre.add_argument('--mean', type=float, nargs='+')
    pre.add_argument('--std', type=float, nargs='+')

    run = parser.add_argument_group('run')
    run.add_argument('--out', default='robustness-results', metavar='DIR',
                     help='results folder, resumed if it exists (default: ./robustness-results)')
    run.add_argument('--batch-size', type=int, default=64)
    run.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help='data loading processes')
    add_device_arg(run)
    parser.set_defaults(func=main)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not any((args.imagenet_c, args.imagenet_a, args.imagenet_r, args.imagenet_val, args.corrupt)):
        raise InputError('nothing to evaluate: give at least one of --imagenet-c, --imagenet-a, --imagenet-r, '
                         '--imagenet-val, --corrupt')
    require_weights(args)
    if not args.compare:
        refuse_unused({'--compare-checkpoint': bool(args.compare_checkpoint), '--compare-pretrained':
                       args.compare_pretrained, '--compare-model-kwargs': bool(args.compare_model_kwargs),
                       '--compare-clean-accuracy': args.compare_clean_accuracy is not None}, '--compare OTHER_MODEL')
    refuse_unused({'--class-map': bool(args.class_map and not args.corrupt)}, '--corrupt DIR')
    if not (args.imagenet_c or args.corrupt):
        refuse_unused({'--corruptions': bool(args.corruptions), '--severities': bool(args.severities)},
                      '--imagenet-c DIR or --corrupt DIR')
    if not args.imagenet_c:
        refuse_unused({'--clean-accuracy': args.clean_accuracy is not None, '--compare-clean-accuracy':
                       args.compare_clean_accuracy is not None}, '--imagenet-c DIR (the relative mCE)',
                      'add --imagenet-c DIR')
    if args.compare and not (args.compare_pretrained or args.compare_checkpoint):
        raise InputError(f'{args.compare} has no weights: pass --compare-pretrained or --compare-checkpoint FILE.')
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    unknown = [c for c in args.corruptions or () if c not in known]
    if unknown:
        raise InputError(f'unknown corruption(s) {", ".join(unknown)}; known: {", ".join(known)}')
    bad = [s for s in args.severities or () if s not in SEVERITIES]
    if bad:
        raise InputError(f'severities must be in 1..5, got {", ".join(map(str, bad))}')
    for value in (args.clean_accuracy, args.compare_clean_accuracy):
        if value is not None and not 0 <= value <= 100:
            raise InputError(f'clean accuracy is a percentage in [0, 100], got {value}')
    if args.batch_size < 1 or args.workers < 0 or args.corrupt_size < 32:
        raise InputError('--batch-size must be >= 1, --workers >= 0 and --corrupt-size >= 32')


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    device = resolve_device(args.device)
    check_writable(args.out, '--out')
    check_model_source(args.model, args.pretrained)  # before scanning the data
    if args.compare:
        check_model_source(args.compare, args.compare_pretrained)
    plan = plan_cells(
        imagenet_c=args.imagenet_c, imagenet_a=args.imagenet_a, imagenet_r=args.imagenet_r,
        imagenet_val=args.imagenet_val, corrupt=args.corrupt, corruptions=args.corruptions,
        severities=args.severities, c_input=args.c_input, corrupt_size=args.corrupt_size, seed=args.seed,
        class_map=args.class_map,
    )
    for note in plan.notes:
        print(f'note: {note}')
    for problem in plan.problems:
        print(f'warning: {problem}', file=sys.stderr)
    if not plan.tasks:
        raise InputError('no usable images found in the given folders (see the warnings above)')
    store = ResultsStore(args.out)
    overrides = {k: getattr(args, k) for k in ('img_size', 'input_size', 'crop_pct', 'interpolation', 'mean',
                                               'std') if getattr(args, k) is not None}
    specs = [(ModelSpec(args.model, args.pretrained, args.checkpoint, args.model_kwargs, args.ema),
              args.clean_accuracy)]
    if args.compare:
        specs.append((ModelSpec(args.compare, args.compare_pretrained, args.compare_checkpoint,
                                args.compare_model_kwargs, args.ema), args.compare_clean_accuracy))
    entries = []
    for spec, clean in specs:
        entry = evaluate_model(
            spec, plan, store, device, args.batch_size, args.workers, overrides, None if clean is None else clean / 100)
        if entry['skipped_cells']:
            print(f'{spec.name}: {entry["skipped_cells"]} cell(s) already in {store.json_path}, not re-evaluated')
        entries.append(entry)
    for entry in entries:
        print('\n'.join(format_summary(entry)))
    if len(entries) == 2:
        print('\n'.join(format_comparison(*entries)))
    problems = entries[0]['problems']
    if problems:
        print(f'{len(problems)} problem(s) with the data; results above are partial where noted:', file=sys.stderr)
        for problem in problems:
            print(f'  - {problem}', file=sys.stderr)
    print(f'results: {store.json_path}, {store.csv_path}' + (f', {store.png_path}' if os.path.exists(store.png_path)
                                                             else ''))
    return 0
