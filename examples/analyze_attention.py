""" Look inside a T-CNN before and after a tiny fine-tune, with the Python API of timm_tcnn.tools.analysis.

    python examples/analyze_attention.py --out /tmp/tcnn-analysis [--images DIR] [--pretrained]

Builds tcnn_resnet50rs (random weights, or ResNet-RS-50's converted with --pretrained), analyses it on
the images (or on generated ones), fine-tunes its converted layers for a few Adam steps on random
labels, analyses it again, prints per-layer numbers side by side and writes the figures of both
states into --out/fresh and --out/tuned. The same report comes from the command line:

    timm-tcnn analyze tcnn_resnet50rs --images DIR --out DIR [--checkpoint FILE] [--cnn resnetrs50]
"""
import argparse
import copy
from pathlib import Path
from typing import List

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config

import timm_tcnn
from timm_tcnn.tools import plots
from timm_tcnn.tools.analysis import AttentionAnalyzer, LayerStats


def generated_images(folder: Path, count: int = 6) -> List[Path]:
    """Stripes, gradients and blobs at assorted sizes, so that content attention has structure to find."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = rng.integers(96, 256, size=2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        stripes = np.sin(2 * np.pi * (xx * rng.uniform(2, 8) + yy * rng.uniform(-4, 4)))
        blob = np.exp(-((yy - rng.uniform(0.2, 0.8)) ** 2 + (xx - rng.uniform(0.2, 0.8)) ** 2) / 0.02)
        rgb = np.stack([stripes, blob * 2 - 1, yy * 2 - 1], -1) * 0.5 + 0.5
        path = folder / f'generated_{i}.png'
        Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """BatchNorm running statistics of a random-weight model measured on the images, so that the
    eval-mode activations stay well scaled."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()(images)
    for m in norms:
        m.momentum = 0.1


def analyse(model, images: torch.Tensor, cnn_state_dict, out: Path, data_config) -> List[LayerStats]:
    analyzer = AttentionAnalyzer(model, cnn_state_dict)
    for batch in images.split(4):
        analyzer.update(batch)
    stats = analyzer.stats()
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_content_share(stats, out / 'content_share.png')
    plots.plot_attention_distance(stats, out / 'attention_distance.png')
    pixel = (images.shape[-2] // 2, images.shape[-1] // 2)
    mean, std = torch.tensor(data_config['mean'])[:, None, None], torch.tensor(data_config['std'])[:, None, None]
    picture = (images[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    plots.plot_query_attention(picture, analyzer.query_attention(images[0], pixel), pixel, out / 'query_attention.png')
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='folder for the figures')
    parser.add_argument('--images', help='folder of images (default: generated ones in OUT/images)')
    parser.add_argument('--pretrained', action='store_true', help="convert ResNet-RS-50's ImageNet weights (Hub)")
    parser.add_argument('--img-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=5, help='Adam steps of the tiny fine-tune')
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    # random weights: every block contributes (no zero-initialised last BatchNorm)
    kwargs = {} if args.pretrained else dict(zero_init_last=False)
    model = timm.create_model('tcnn_resnet50rs', pretrained=args.pretrained, **kwargs)
    data_config = resolve_data_config({'img_size': args.img_size}, model=model)
    transform = create_transform(**data_config)
    paths = sorted(Path(args.images).glob('*')) if args.images else generated_images(out / 'images')
    images = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
    if not args.pretrained:
        calibrate_batchnorm(model, images)
    model.eval()
    cnn_state_dict = copy.deepcopy(model.state_dict())  # the converted weights, to measure the drift from
    print(f'{len(images)} images at {tuple(images.shape[-2:])}, '
          f'{len(list(timm_tcnn.attention_layers(model)))} converted layers')

    fresh = analyse(model, images, cnn_state_dict, out / 'fresh', data_config)

    # tiny fine-tune of the converted layers only, on random labels: a large learning rate for the
    # attention parameters (gates, locality, Q/K), a small one for the kernels
    model.train().requires_grad_(False)
    attention_params, kernels = [], []
    for _, layer in timm_tcnn.attention_layers(model):
        layer.requires_grad_(True)
        for name, param in layer.named_parameters():
            (kernels if name in ('weight', 'bias') else attention_params).append(param)
    optimizer = torch.optim.Adam([dict(params=attention_params, lr=0.02), dict(params=kernels, lr=1e-4)])
    labels = torch.randint(0, model.num_classes, (len(images),))
    for step in range(args.steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f'step {step}: loss {loss.item():.3f}')
    model.eval()

    tuned = analyse(model, images, cnn_state_dict, out / 'tuned', data_config)

    print(f'\n{"layer":<16} {"state":<6} {"content share":>13} {"dist pos":>9} {"dist content":>12} '
          f'{"dist mixed":>10} {"entropy mixed":>13} {"drift":>8} {"identity err":>12}')
    for before, after in zip(fresh, tuned):
        for state, layer in (('fresh', before), ('tuned', after)):
            mean = {k: np.mean([getattr(h, k) for h in layer.heads]) for k in (
                'content_share', 'distance_positional', 'distance_content', 'distance_mixed', 'entropy_mixed')}
            identity = '-' if layer.identity_error is None else f'{layer.identity_error:.1e}'
            print(f'{layer.name:<16} {state:<6} {mean["content_share"]:>13.3f} {mean["distance_positional"]:>9.3f} '
                  f'{mean["distance_content"]:>12.3f} {mean["distance_mixed"]:>10.3f} {mean["entropy_mixed"]:>13.3f} '
                  f'{layer.weight_drift:>8.1e} {identity:>12}')
    print(f'\nfigures: {out / "fresh"}/*.png and {out / "tuned"}/*.png')


if __name__ == '__main__':
    main()
