""" `timm-tcnn convert`: turn a pretrained ResNet-RS into its T-CNN, prove the identity, save it. """
import argparse
import time
from pathlib import Path
from typing import List, Tuple

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs

from ..convert import attention_layers, convert_cnn_state_dict
from ..hub import require_hub_weights
from ..io import atomic_directory, load_checkpoint_state_dict
from ..checkpoints import checkpoint_options
from ..variants import conversion_options, tcnn_and_cnn_names

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert',
        help='convert a pretrained CNN into its exactly equivalent T-CNN and save it',
        description='Load CNN weights (Hugging Face Hub or cache, a local checkpoint, or random), convert '
                    'them into the T-CNN, check on random inputs (and optional images) that both give the same '
                    'logits, and write model.safetensors + config.json, loadable with '
                    'timm.create_model("local-dir:OUT") after `import timm_tcnn`.',
    )
    parser.add_argument('model', metavar='MODEL', help='a registered T-CNN (tcnn_resnet50rs, tcnn_convnext_tiny, ...)[.tag] or its CNN name (resnetrs50[.tag])')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--checkpoint', metavar='FILE', help='CNN weights: .safetensors, state dict or train.py checkpoint')
    source.add_argument('--random-weights', action='store_true',
                        help='random CNN weights, BatchNorm statistics measured on random images (no download)')
    parser.add_argument('--ema', action='store_true', help="take a train.py checkpoint's EMA weights")
    parser.add_argument('--out', metavar='DIR', help='output folder (must not exist unless --overwrite)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='T-CNN options, e.g. tcnn_stages="(3, 4)" tcnn_convert_strided=False')
    parser.add_argument('--images', metavar='DIR', help='also check the identity on the images in DIR (recursive)')
    parser.add_argument('--max-images', type=int, default=32, help='at most this many images from --images')
    parser.add_argument('--batch-size', type=int, default=2, help='random inputs per check')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest accepted max|T-CNN - CNN| / max|CNN| over the logits')
    parser.add_argument('--seed', type=int, default=0)
    parser.set_defaults(func=run)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _load_images(folder: Path, model: torch.nn.Module, limit: int) -> Tuple[torch.Tensor, int]:
    """(N, 3, H, W) preprocessed with the model's eval transform, and the number of unreadable files."""
    from PIL import Image, UnidentifiedImageError
    if not folder.is_dir():
        raise NotADirectoryError(f'--images {folder} is not a folder.')
    transform = create_transform(**resolve_data_config(model=model))
    files = sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images, unreadable = [], 0
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert('RGB')))
        except (UnidentifiedImageError, OSError):
            unreadable += 1
    if not images:
        raise FileNotFoundError(f'--images {folder}: no readable image among {len(files)} files '
                                f'(looked for {", ".join(IMAGE_SUFFIXES)}).')
    return torch.stack(images), unreadable


@torch.no_grad()
def _random_cnn(cnn_name: str) -> torch.nn.Module:
    """A random CNN in which every block contributes: no zero-initialised last BatchNorm, and running
    statistics measured on random images so that the activations stay well scaled."""
    cnn = timm.create_model(cnn_name)
    norms = [m for m in cnn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        if m.affine and not m.weight.any():
            torch.nn.init.ones_(m.weight)  # zero-initialised last norm of a residual block
        m.momentum = None  # cumulative average over the calibration batch
    cnn.train()(torch.randn(4, *cnn.pretrained_cfg['input_size']))
    for m in norms:
        m.momentum = 0.1
    return cnn


def _checks(args: argparse.Namespace, model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Named input batches: random at the train size, the test size and a non-square size; images."""
    generator = torch.Generator().manual_seed(args.seed)
    cfg = model.pretrained_cfg
    train_h = cfg['input_size'][-1]
    test_h = cfg.get('test_input_size', cfg['input_size'])[-1]
    shapes = {f'random {train_h}x{train_h}': (train_h, train_h), f'random {test_h}x{test_h}': (test_h, test_h),
              f'random {train_h}x{test_h}': (train_h, test_h)}
    checks = [(name, torch.randn(args.batch_size, 3, h, w, generator=generator)) for name, (h, w) in shapes.items()]
    if args.images:
        images, unreadable = _load_images(Path(args.images), model, args.max_images)
        skipped = f', {unreadable} unreadable skipped' if unreadable else ''
        checks.append((f'{len(images)} images{skipped}', images))
    return checks


def run(args: argparse.Namespace) -> int:
    tcnn_name, cnn_name = tcnn_and_cnn_names(args.model)
    options = conversion_options(tcnn_name, **args.model_kwargs)

    start = time.perf_counter()
    if args.checkpoint:
        state_dict = load_checkpoint_state_dict(args.checkpoint, use_ema=args.ema)
        cnn = timm.create_model(cnn_name.split('.')[0], device='meta')
        cnn = timm.create_model(cnn_name.split('.')[0], **checkpoint_options(state_dict, cnn))
        cnn.load_state_dict(state_dict)
        source = args.checkpoint
    elif args.random_weights:
        torch.manual_seed(args.seed)
        cnn = _random_cnn(cnn_name)
        source = 'random weights'
    else:
        hf_hub_id = timm.models.get_pretrained_cfg(cnn_name).hf_hub_id
        require_hub_weights(hf_hub_id)
        cnn = timm.create_model(cnn_name, pretrained=True)
        source = f'hf-hub:{hf_hub_id}'
    load_time = time.perf_counter() - start

    start = time.perf_counter()
    tcnn = timm.create_model(tcnn_name, num_classes=cnn.num_classes, **options)
    tcnn.load_state_dict(convert_cnn_state_dict(cnn.state_dict(), tcnn))
    convert_time = time.perf_counter() - start
    cnn.eval()
    tcnn.eval()

    print(f'{cnn_name} ({source}) -> {tcnn_name}')
    print(f'options: {options}')
    print(f'converted layers: {len(list(attention_layers(tcnn)))}; parameters: CNN {_count(cnn) / 1e6:.2f}M, '
          f'T-CNN {_count(tcnn) / 1e6:.2f}M (+{(_count(tcnn) - _count(cnn)) / 1e6:.2f}M attention)')

    start = time.perf_counter()
    worst = 0.
    print(f'{"input":<28} {"max rel. error":>15} {"top-1 agree":>12}')
    for name, x in _checks(args, tcnn):
        with torch.no_grad():
            ref = cnn(x)
        with torch.enable_grad():  # the attention computation itself, not the inference shortcut to conv2d
            out = tcnn(x).detach()
        error = _relative_error(out, ref)
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        worst = max(worst, error)
        print(f'{name:<28} {error:>15.2e} {agree:>11.0%}')
    verify_time = time.perf_counter() - start
    print(f'time: load {load_time:.1f}s, convert {convert_time:.1f}s, verify {verify_time:.1f}s')

    if worst > args.tolerance:
        print(f'FAILED: max relative error {worst:.2e} > tolerance {args.tolerance:.0e}; nothing written.')
        return 1
    print(f'identity holds: max relative error {worst:.2e} <= {args.tolerance:.0e}')
    if args.out:
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            timm.models.save_for_hf(tcnn, str(tmp), model_args=options, safe_serialization=True)
        print(f'wrote {Path(args.out) / "model.safetensors"} and config.json; load with '
              f'`import timm_tcnn; timm.create_model("local-dir:{args.out}")`')
    return 0
