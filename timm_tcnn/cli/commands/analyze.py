""" `timm-tcnn analyze`: per-head attention diagnostics of a T-CNN on a folder of images, with figures. """
import argparse
from typing import Dict, List, Tuple

import torch

from ...errors import InputError
from ...tools import plots
from ...tools.analysis import LayerStats
from ...tools.analyze import OUTPUTS, analyze_images
from ...utils.io import check_output_dir, image_files
from ...weights.loading import cnn_state_dict, create_model_with_weights
from .common import add_output_args, add_weight_args, input_errors, refuse_unused, require_weights


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


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """MODEL with its --pretrained weights or --checkpoint, in eval mode."""
    return create_model_with_weights(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, use_ema=args.ema, **args.model_kwargs,
    ).eval()


def analyze(args: argparse.Namespace) -> Tuple[List[LayerStats], Dict[str, object]]:
    """Run the analysis; returns the per-layer statistics and the run's metadata (also written)."""
    if args.max_images < 1 or args.batch_size < 1:
        raise InputError('--max-images and --batch-size must be at least 1.')
    require_weights(args)
    if args.no_plots:
        refuse_unused({'--query-pixel': args.query_pixel is not None, '--plot-heads': args.plot_heads is not None},
                      'the figures', 'drop --no-plots')
    check_output_dir(args.out, args.overwrite)
    if not args.no_plots:
        with input_errors():
            plots.require_matplotlib()
    files = image_files(args.images)
    model = load_model(args)
    source_cnn = cnn_state_dict(args.cnn, args.ema) if args.cnn else None
    meta = {
        'model': args.model,
        'model_kwargs': {k: repr(v) for k, v in args.model_kwargs.items()},
        'pretrained': args.pretrained,
        'checkpoint': args.checkpoint,
        'cnn': args.cnn,
    }
    return analyze_images(
        model, files, args.out, source_cnn, max_images=args.max_images, batch_size=args.batch_size,
        img_size=args.img_size, query_pixel=args.query_pixel, plot_heads=args.plot_heads, plots=not args.no_plots,
        overwrite=args.overwrite, meta=meta, title=args.model)


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
