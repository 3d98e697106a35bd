""" `timm-tcnn convert`: turn a pretrained CNN into its T-CNN, prove the identity, save it (the work is
`timm_tcnn.weights.convert.convert_weights`; this module parses, checks, calls and prints). """
import argparse
from pathlib import Path
from typing import Any, Dict, List, Tuple

from tqdm import tqdm

from ...errors import InputError
from ...models.options import PREFIX
from ...models.variants import conversion_options, tcnn_and_cnn_names
from ...utils.io import check_output_dir, image_files
from ...weights.convert import IdentityCheck, check_pretrained_tag, convert_weights
from ...weights.identity import TOLERANCE
from .common import add_output_args, add_weight_args, input_errors, refuse_unused


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert',
        help='convert a pretrained CNN into its exactly equivalent T-CNN and save it',
        description='Load CNN weights (Hugging Face Hub or cache, a local checkpoint, or random), convert '
                    'them into the T-CNN, check on random inputs (and optional images) that both give the same '
                    'logits, and write model.safetensors + config.json, loadable with '
                    'timm.create_model("local-dir:OUT") after `import timm_tcnn`. Inputs and the output folder '
                    'are checked before any work; weights holding NaN or Inf are refused.',
    )
    parser.add_argument('model', metavar='MODEL', help='a registered T-CNN (tcnn_resnet50rs, tcnn_convnext_tiny, ...)'
                                                       '[.tag] or its CNN name (resnetrs50[.tag])')
    add_weight_args(
        parser, sources=('checkpoint', 'random_weights'),
        checkpoint_help='CNN weights: .safetensors, state dict or train.py checkpoint (default: the Hub weights)',
        model_kwargs_help='T-CNN options and arguments of timm.create_model, e.g. tcnn_stages="(3, 4)" '
                          'drop_rate=0.2 num_classes=10 (a class count other than the weights\' replaces the '
                          'classifier by a new random one, the same in the CNN and the T-CNN)')
    add_output_args(parser, 'output folder')
    parser.add_argument('--images', metavar='DIR', help='also check the identity on the images in DIR (recursive)')
    parser.add_argument('--max-images', type=int, help='at most this many images from --images (default: 32)')
    parser.add_argument('--batch-size', type=int, default=2, help='random inputs per check')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help='largest accepted max|T-CNN - CNN| / max|CNN| over the logits')
    parser.add_argument('--seed', type=int, default=0)
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> List[Path]:
    """Everything checkable before loading: numbers, the output folder, the image folder (its files)."""
    refuse_unused({'--max-images': args.max_images is not None and not args.images}, '--images DIR')
    refuse_unused({'--overwrite': args.overwrite and not args.out}, '--out DIR')
    args.max_images = 32 if args.max_images is None else args.max_images
    if args.batch_size < 1 or args.max_images < 1:
        raise InputError('--batch-size and --max-images must be at least 1.')
    if not args.tolerance > 0:
        raise InputError(f'--tolerance must be positive, got {args.tolerance}.')
    if args.ema and not args.checkpoint:
        raise InputError('--ema takes the EMA weights of a train.py checkpoint: pass --checkpoint FILE too.')
    if args.out:
        check_output_dir(args.out, args.overwrite)
    return image_files(args.images)[:args.max_images] if args.images else []


def _options(tcnn_name: str, model_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(every T-CNN option, the other `create_model` arguments but `num_classes`) from --model-kwargs."""
    other = {k: v for k, v in model_kwargs.items() if not k.startswith(PREFIX) and k != 'num_classes'}
    num_classes = model_kwargs.get('num_classes', 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise InputError(f'--model-kwargs num_classes={num_classes!r}: expected an integer >= 0.')
    with input_errors('--model-kwargs'):
        return conversion_options(tcnn_name, **model_kwargs), other


def run(args: argparse.Namespace) -> int:
    tcnn_name, cnn_name = tcnn_and_cnn_names(args.model)
    check_pretrained_tag(cnn_name)
    options, kwargs = _options(tcnn_name, args.model_kwargs)
    files = _check_args(args)
    checks: List[IdentityCheck] = []
    with tqdm(desc='identity check', unit='batch', leave=False, disable=None) as progress:
        def on_check(check: IdentityCheck) -> None:
            checks.append(check)
            progress.update()

        done = convert_weights(
            tcnn_name, cnn_name, options, kwargs, num_classes=args.model_kwargs.get('num_classes'),
            checkpoint=args.checkpoint, use_ema=args.ema, random_weights=args.random_weights, images=files,
            batch_size=args.batch_size, tolerance=args.tolerance, seed=args.seed, out=args.out,
            overwrite=args.overwrite, on_check=on_check)
    print(f'{cnn_name} ({done.source}) -> {tcnn_name}')
    if done.classifier:
        print(f'classifier replaced: the weights have {done.weights_classes} classes, --model-kwargs num_classes='
              f'{done.num_classes}; the new classifier is random (seed {args.seed}) and the same in the CNN and the '
              f'T-CNN')
    print(f'options: {options}' + (f'; model kwargs: {kwargs}' if kwargs else ''))
    added = done.tcnn_parameters - done.cnn_parameters
    print(f'converted layers: {done.converted_layers}; parameters: CNN {done.cnn_parameters / 1e6:.2f}M, '
          f'T-CNN {done.tcnn_parameters / 1e6:.2f}M (+{added / 1e6:.2f}M attention)')
    print(f'{"input":<28} {"max rel. error":>15} {"top-1 agree":>12}')
    for check in checks:
        print(f'{check.name:<28} {check.max_relative_error:>15.2e} {check.top1_agreement:>11.0%}')
    seconds = done.seconds
    print(f'time: load {seconds["load"]:.1f}s, convert {seconds["convert"]:.1f}s, verify {seconds["verify"]:.1f}s')
    print(f'identity holds: max relative error {done.max_relative_error:.2e} <= {args.tolerance:.0e}')
    if done.out:
        print(f'wrote {done.out / "model.safetensors"} and config.json; load with '
              f'`import timm_tcnn; timm.create_model("local-dir:{done.out}")`')
    return 0
