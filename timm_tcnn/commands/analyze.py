""" `timm-tcnn analyze`: per-head attention diagnostics of a T-CNN on a folder of images, with figures. """
import argparse
import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import timm
import torch
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from ..analysis import AttentionAnalyzer, LayerStats, head_rows
from ..errors import InputError
from ..io import atomic_directory, check_output_dir, image_files, load_checkpoint_state_dict
from ..loading import create_model_with_weights
from ..numerics import check_finite
from .common import add_output_args, add_weight_args, refuse_unused, require_weights

OUTPUTS = {
    'json': 'attention_stats.json',
    'csv': 'attention_stats.csv',
    'content_share': 'content_share.png',
    'distance': 'attention_distance.png',
    'query': 'query_attention.png',
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'analyze',
        help='per-head attention diagnostics of a T-CNN on images: JSON, CSV and figures',
        description='Run a T-CNN on the images of a folder (preprocessed with the model\'s timm data config) and '
                    'report, for every converted layer and head: content share, Gaussian locality and centre, '
                    'mean attention distance and entropy of the positional, content and mixed attention, share of '
                    'attention on in-image keys; per layer the weight drift from the source CNN (--cnn) and the '
                    'identity error while the layer is still a convolution. Writes ' + ', '.join(OUTPUTS.values())
                    + ' into --out.',
    )
    parser.add_argument('model', metavar='MODEL', help='timm model name, e.g. tcnn_resnet50rs')
    add_weight_args(parser, sources=('pretrained', 'checkpoint', 'random_weights'))
    parser.add_argument('--cnn', metavar='NAME_OR_FILE',
                        help='source CNN, for weight drift and identity error: a timm model name (loaded with '
                             'pretrained=True; also hf-hub:ORG/NAME or local-dir:FOLDER) or a checkpoint file')
    parser.add_argument('--images', metavar='DIR', required=True, help='folder of images (searched recursively)')
    add_output_args(parser, 'output folder', required=True)
    parser.add_argument('--max-images', type=int, default=32, metavar='N', help='analyse at most N readable images')
    parser.add_argument('--batch-size', type=int, default=8, metavar='N')
    parser.add_argument('--img-size', type=int, metavar='PIXELS',
                        help="input size (default: the model's test size from its data config)")
    parser.add_argument('--query-pixel', type=int, nargs=2, metavar=('Y', 'X'),
                        help='query pixel of the attention map figure, in the model input (default: centre)')
    parser.add_argument('--plot-heads', type=int, metavar='N',
                        help='heads per layer in the attention map figure (largest content share first; default: 9)')
    parser.add_argument('--no-plots', action='store_true', help='write only the JSON and CSV files')
    parser.set_defaults(func=run)


def read_images(files: List[Path], transform, limit: int, skipped: List[Path]) -> Iterator[torch.Tensor]:
    """Preprocessed (C, H, W) images, at most `limit`, with a progress bar over the files tried;
    unreadable files are appended to `skipped`."""
    from PIL import Image, UnidentifiedImageError
    read = 0
    with tqdm(files, desc='images', unit='img', disable=None) as progress:
        for path in progress:
            if read >= limit:
                return
            try:
                with Image.open(path) as image:
                    tensor = transform(image.convert('RGB'))
            except (UnidentifiedImageError, OSError, ValueError):
                skipped.append(path)
                progress.set_postfix(skipped=len(skipped))
                continue
            read += 1
            yield tensor


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """MODEL with its --pretrained weights or --checkpoint, in eval mode."""
    return create_model_with_weights(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, use_ema=args.ema, **args.model_kwargs,
    ).eval()


def load_cnn_state_dict(source: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """State dict of the source CNN: a checkpoint file, or a timm model name loaded with pretrained=True."""
    if os.path.isfile(source):
        state_dict = load_checkpoint_state_dict(source, use_ema=ema)
        check_finite(state_dict, f'--cnn {source}')
        return state_dict
    if not timm.is_model(source) and not timm.models.parse_model_name(source)[0]:
        raise InputError(f'--cnn {source} is neither a file nor a timm model name (e.g. resnetrs50, hf-hub:ORG/NAME, '
                         f'local-dir:FOLDER).')
    return create_model_with_weights(source, pretrained=True).state_dict()


def _csv_text(rows: List[Dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _to_image(tensor: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]):
    """(C, H, W) normalised input -> (H, W, 3) numpy image in [0, 1]."""
    image = tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def analyze(args: argparse.Namespace) -> Tuple[List[LayerStats], Dict[str, object]]:
    """Run the analysis; returns the per-layer statistics and the run's metadata (also written)."""
    if args.max_images < 1 or args.batch_size < 1:
        raise InputError('--max-images and --batch-size must be at least 1.')
    require_weights(args)
    if args.no_plots:
        refuse_unused({'--query-pixel': args.query_pixel is not None, '--plot-heads': args.plot_heads is not None},
                      'the figures', 'drop --no-plots')
    check_output_dir(args.out, args.overwrite)
    plots = None
    if not args.no_plots:
        from .. import plots
        try:
            plots.require_matplotlib()
        except ImportError as e:
            raise InputError(str(e)) from None
    files = image_files(args.images)
    model = load_model(args)
    cnn_state_dict = load_cnn_state_dict(args.cnn, args.ema) if args.cnn else None
    analyzer = AttentionAnalyzer(model, cnn_state_dict)

    data_config = resolve_data_config({'img_size': args.img_size}, model=model, use_test_size=True)
    transform = create_transform(**data_config)
    img_h, img_w = data_config['input_size'][1:]
    pixel = tuple(args.query_pixel) if args.query_pixel else (img_h // 2, img_w // 2)
    if not (0 <= pixel[0] < img_h and 0 <= pixel[1] < img_w):
        raise InputError(f'--query-pixel {pixel[0]} {pixel[1]} lies outside the {img_h}x{img_w} model input.')

    skipped: List[Path] = []
    first: Optional[torch.Tensor] = None
    batch: List[torch.Tensor] = []
    seen = 0
    for tensor in read_images(files, transform, args.max_images, skipped):
        first = tensor if first is None else first
        batch.append(tensor)
        if len(batch) == args.batch_size:
            analyzer.update(torch.stack(batch))
            seen += len(batch)
            batch = []
    if batch:
        analyzer.update(torch.stack(batch))
        seen += len(batch)
    if first is None:
        raise InputError(f'--images {args.images}: none of the {len(files)} image files could be read.')
    stats = analyzer.stats()

    meta = {
        'model': args.model,
        'model_kwargs': {k: repr(v) for k, v in args.model_kwargs.items()},
        'pretrained': args.pretrained,
        'checkpoint': args.checkpoint,
        'cnn': args.cnn,
        'images': seen,
        'skipped_images': [str(p) for p in skipped],
        'input_size': list(data_config['input_size']),
        'query_pixel': list(pixel),
    }
    report = dict(meta, layers=[asdict(layer) for layer in stats])
    with atomic_directory(args.out, overwrite=args.overwrite) as out:
        (out / OUTPUTS['json']).write_text(json.dumps(report, indent=2) + '\n', encoding='utf-8')
        (out / OUTPUTS['csv']).write_text(_csv_text(head_rows(stats)), encoding='utf-8')
        if plots is not None:
            plots.plot_content_share(stats, out / OUTPUTS['content_share'])
            plots.plot_attention_distance(stats, out / OUTPUTS['distance'])
            plots.plot_query_attention(
                _to_image(first, data_config['mean'], data_config['std']),
                analyzer.query_attention(first, pixel),
                pixel,
                out / OUTPUTS['query'],
                max_heads=9 if args.plot_heads is None else args.plot_heads,
                title=f'{args.model}: mixed attention of the query at pixel {pixel}',
            )
    return stats, meta


def run(args: argparse.Namespace) -> int:
    stats, meta = analyze(args)
    if meta['skipped_images']:
        print(f'skipped {len(meta["skipped_images"])} unreadable image files, e.g. {meta["skipped_images"][0]}')
    print(f'{meta["images"]} images, {len(stats)} converted layers; wrote into {args.out}: '
          + ', '.join(name for key, name in OUTPUTS.items() if not args.no_plots or key in ('json', 'csv')))
    print(f'{"layer":<22} {"content share":>14} {"dist pos":>9} {"dist content":>13} {"dist mixed":>11} '
          f'{"drift":>8} {"identity err":>13}')
    for layer in stats:
        mean = {key: sum(getattr(h, key) for h in layer.heads) / len(layer.heads)
                for key in ('content_share', 'distance_positional', 'distance_content', 'distance_mixed')}
        drift = '-' if layer.weight_drift is None else f'{layer.weight_drift:.2e}'
        identity = '-' if layer.identity_error is None else f'{layer.identity_error:.2e}'
        print(f'{layer.name:<22} {mean["content_share"]:>14.3f} {mean["distance_positional"]:>9.3f} '
              f'{mean["distance_content"]:>13.3f} {mean["distance_mixed"]:>11.3f} {drift:>8} {identity:>13}')
    return 0
