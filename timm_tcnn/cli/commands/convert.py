""" `timm-tcnn convert`: turn a pretrained ResNet-RS into its T-CNN, prove the identity, save it. """
import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import timm
import torch
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from ...errors import InputError, WorkError
from ...models.convert import attention_layers
from ...models.options import PREFIX
from ...models.variants import conversion_options, tcnn_and_cnn_names
from ...utils.io import atomic_directory, check_output_dir, image_files
from ...weights.identity import TOLERANCE, identity_error, load_converted
from ...weights.loading import create_model, load_cnn
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


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load_images(files: List[Path], model: torch.nn.Module, folder: str) -> Tuple[torch.Tensor, int]:
    """(N, 3, H, W) preprocessed with the model's eval transform, and the number of unreadable files."""
    from PIL import Image, UnidentifiedImageError
    transform = create_transform(**resolve_data_config(model=model))
    images, unreadable = [], 0
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert('RGB')))
        except (UnidentifiedImageError, OSError):
            unreadable += 1
    if not images:
        raise InputError(f'--images {folder}: none of the {len(files)} image files could be read.')
    return torch.stack(images), unreadable


@torch.no_grad()
def _random_cnn(cnn_name: str, **kwargs: Any) -> torch.nn.Module:
    """A random CNN in which every block contributes: no zero-initialised last BatchNorm, and running
    statistics measured on random images so that the activations stay well scaled."""
    cnn = create_model(cnn_name, **kwargs)
    norms = [m for m in cnn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        if m.affine and not m.weight.any():
            torch.nn.init.ones_(m.weight)  # zero-initialised last norm of a residual block
        m.momentum = None  # cumulative average over the calibration batch
    cnn.train()(torch.randn(4, *cnn.pretrained_cfg['input_size']))
    for m in norms:
        m.momentum = 0.1
    return cnn


def _checks(args: argparse.Namespace, model: torch.nn.Module, files: List[Path]) -> List[Tuple[str, torch.Tensor]]:
    """Named input batches: random at the train size, the test size and a non-square size; images."""
    generator = torch.Generator().manual_seed(args.seed)
    cfg = model.pretrained_cfg
    train_h = cfg['input_size'][-1]
    test_h = cfg.get('test_input_size', cfg['input_size'])[-1]
    shapes = {f'random {train_h}x{train_h}': (train_h, train_h), f'random {test_h}x{test_h}': (test_h, test_h),
              f'random {train_h}x{test_h}': (train_h, test_h)}
    checks = [(name, torch.randn(args.batch_size, 3, h, w, generator=generator)) for name, (h, w) in shapes.items()]
    if files:
        images, unreadable = _load_images(files, model, args.images)
        skipped = f', {unreadable} unreadable skipped' if unreadable else ''
        checks.append((f'{len(images)} images{skipped}', images))
    return checks


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


def _check_tag(cnn_name: str) -> None:
    """A pretrained tag in MODEL must be one of the CNN's."""
    arch, _, tag = cnn_name.partition('.')
    tags = [name.split('.', 1)[1] for name in timm.list_pretrained(f'{arch}.*')]
    if tag and tag not in tags:
        raise InputError(f'{arch} has no pretrained tag {tag!r}; its tags: {", ".join(tags)} (or leave the tag out '
                         f'for the default).')


def _load_cnn(args: argparse.Namespace, tcnn_name: str, cnn_name: str,
              kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, str, str]:
    """The CNN built with `kwargs` and its weights, where they came from (printed, and as the T-CNN's note says it).
    Random weights get --model-kwargs num_classes; loaded weights keep their classifier."""
    arch = cnn_name.split('.')[0]
    if args.checkpoint:
        refusal = (f'convert takes CNN weights. Load it as it is, e.g. timm.create_model("{tcnn_name.split(".")[0]}", '
                   f'checkpoint_path=...) or --checkpoint of analyze, robustness and publish.')
        cnn = load_cnn(arch, args.checkpoint, args.ema, refusal=refusal, **kwargs)
        return cnn, args.checkpoint, f'CNN checkpoint {Path(args.checkpoint).name}'
    if args.random_weights:
        torch.manual_seed(args.seed)
        classes = {'num_classes': args.model_kwargs['num_classes']} if 'num_classes' in args.model_kwargs else {}
        return _random_cnn(cnn_name, **kwargs, **classes), 'random weights', 'random CNN weights (not pretrained)'
    hf_hub_id = timm.models.get_pretrained_cfg(cnn_name).hf_hub_id
    return load_cnn(cnn_name, **kwargs), f'hf-hub:{hf_hub_id}', f'hf-hub:{hf_hub_id}'


def _replace_classifier(cnn: torch.nn.Module, num_classes: int, seed: int) -> str:
    """A new random classifier of `num_classes` outputs (timm's `reset_classifier`), drawn with `seed`; returns
    what was done, for the T-CNN's note."""
    done = f'its {cnn.num_classes}-class classifier replaced by a random {num_classes}-class one (seed {seed})'
    print(f'classifier replaced: the weights have {cnn.num_classes} classes, --model-kwargs num_classes='
          f'{num_classes}; the new classifier is random (seed {seed}) and the same in the CNN and the T-CNN')
    torch.manual_seed(seed)
    cnn.reset_classifier(num_classes)
    return done


def _local_cfg(source: str) -> Dict[str, Any]:
    """Pretrained cfg overlay of weights that are not the Hub's: no Hub id, a tag and a note saying what they are."""
    return dict(hf_hub_id=None, tag='converted', notes=(f'T-CNN converted from {source} by timm-tcnn convert.',))


def run(args: argparse.Namespace) -> int:
    tcnn_name, cnn_name = tcnn_and_cnn_names(args.model)
    _check_tag(cnn_name)
    options, kwargs = _options(tcnn_name, args.model_kwargs)
    files = _check_args(args)

    start = time.perf_counter()
    cnn, source, label = _load_cnn(args, tcnn_name, cnn_name, kwargs)
    num_classes = args.model_kwargs.get('num_classes', cnn.num_classes)
    if num_classes != cnn.num_classes:
        label = f'{label}, {_replace_classifier(cnn, num_classes, args.seed)}'
    # timm's own pretrained cfg only for its weights as they are
    cfg_overlay = {} if label == source and source.startswith('hf-hub:') else _local_cfg(label)
    load_time = time.perf_counter() - start

    start = time.perf_counter()
    tcnn = create_model(tcnn_name, num_classes=num_classes, pretrained_cfg_overlay=cfg_overlay, **kwargs, **options)
    load_converted(tcnn, cnn)
    convert_time = time.perf_counter() - start
    cnn.eval()
    tcnn.eval()

    print(f'{cnn_name} ({source}) -> {tcnn_name}')
    print(f'options: {options}' + (f'; model kwargs: {kwargs}' if kwargs else ''))
    print(f'converted layers: {len(list(attention_layers(tcnn)))}; parameters: CNN {_count(cnn) / 1e6:.2f}M, '
          f'T-CNN {_count(tcnn) / 1e6:.2f}M (+{(_count(tcnn) - _count(cnn)) / 1e6:.2f}M attention)')

    start = time.perf_counter()
    worst = 0.
    print(f'{"input":<28} {"max rel. error":>15} {"top-1 agree":>12}')
    for name, x in tqdm(_checks(args, tcnn, files), desc='identity check', unit='batch', leave=False, disable=None):
        error, agree = identity_error(cnn, tcnn, x)
        worst = max(worst, error)
        tqdm.write(f'{name:<28} {error:>15.2e} {agree:>11.0%}')
    verify_time = time.perf_counter() - start
    print(f'time: load {load_time:.1f}s, convert {convert_time:.1f}s, verify {verify_time:.1f}s')

    if not worst <= args.tolerance:
        raise WorkError(f'the identity does not hold: max relative error {worst:.2e} > tolerance '
                        f'{args.tolerance:.0e}; nothing was written. Report it with the command line used.')
    print(f'identity holds: max relative error {worst:.2e} <= {args.tolerance:.0e}')
    if args.out:
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            timm.models.save_for_hf(tcnn, str(tmp), model_args={**kwargs, **options}, safe_serialization=True)
        print(f'wrote {Path(args.out) / "model.safetensors"} and config.json; load with '
              f'`import timm_tcnn; timm.create_model("local-dir:{args.out}")`')
    return 0
