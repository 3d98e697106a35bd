""" End-to-end T-CNN fine-tune on a CPU in minutes, with timm's own train.py and validate.py.

1. writes a tiny 2-class ImageFolder (generated images: reddish vs bluish noise),
2. fine-tunes tcnn_resnet50rs for one epoch with train.py through `timm-tcnn run`, starting from
   ResNet50-RS weights converted into the T-CNN on load (Hub weights, or random CNN weights offline),
3. validates the best checkpoint with validate.py,
4. prints where everything is and how much content attention each converted layer now uses.

    python examples/cpu_finetune_demo.py --timm-scripts pytorch-image-models
    python examples/cpu_finetune_demo.py --timm-scripts pytorch-image-models --weights random  # offline
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import torch
from PIL import Image

CLASSES = {'red': (200, 40, 40), 'blue': (40, 40, 200)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--timm-scripts', default=os.environ.get('TIMM_SCRIPTS_DIR'), metavar='DIR',
                        help='checkout of https://github.com/huggingface/pytorch-image-models '
                             '(default: $TIMM_SCRIPTS_DIR)')
    parser.add_argument('--out', default='tcnn_cpu_demo', metavar='DIR', help='everything is written here')
    parser.add_argument('--weights', choices=('hub', 'random'), default='hub',
                        help='hub: timm/resnetrs50.tf_in1k (downloaded once); random: random CNN weights, no network')
    parser.add_argument('--images-per-class', type=int, default=8, help='training images per class')
    parser.add_argument('--img-size', type=int, default=96)
    parser.add_argument('--batch-size', type=int, default=8, help='at most 2 x --images-per-class')
    args = parser.parse_args()
    if not args.timm_scripts or not (Path(args.timm_scripts) / 'train.py').is_file():
        parser.error('--timm-scripts (or $TIMM_SCRIPTS_DIR) must be a pytorch-image-models checkout with train.py; '
                     'git clone https://github.com/huggingface/pytorch-image-models')
    if args.batch_size > 2 * args.images_per_class:
        parser.error('--batch-size exceeds the number of training images: the epoch would do no step')
    return args


def make_image_folder(root: Path, images_per_class: int, size: int) -> None:
    """root/{train,validation}/{red,blue}/*.png: noisy images of the class colour."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (('train', images_per_class), ('validation', max(2, images_per_class // 2))):
        for label, colour in CLASSES.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = torch.tensor(colour) + 40 * torch.randn(size, size, 3, generator=generator)
                Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f'{i}.png')


def random_cnn_weights(path: Path) -> None:
    """A stand-in for the Hub weights when offline: a random resnetrs50 state dict (safetensors)."""
    import timm
    from safetensors.torch import save_file
    state_dict = timm.create_model('resnetrs50').state_dict()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def run_script(scripts: Path, name: str, args: List[str]) -> None:
    command = [sys.executable, '-m', 'timm_tcnn', 'run', str(scripts / name), *args]
    print('\n$ ' + ' '.join(command), flush=True)
    subprocess.run(command, check=True)


def content_shares(checkpoint: Path) -> List[str]:
    """'layer4.0.conv2: mean content share 1.2e-02' for each converted layer of a train.py checkpoint."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state_dict = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    return [f'{key[:-len(".content_gate")]}: mean content share {value.clamp(0, 1).mean():.1e}'
            for key, value in state_dict.items() if key.endswith('.content_gate')]


def main() -> None:
    args = parse_args()
    out, scripts = Path(args.out).resolve(), Path(args.timm_scripts).resolve()
    data = out / 'data'
    make_image_folder(data, args.images_per_class, args.img_size + args.img_size // 8)
    weights = ['--pretrained']
    if args.weights == 'random':
        random_cnn_weights(out / 'random_resnetrs50.safetensors')
        weights += ['--pretrained-path', str(out / 'random_resnetrs50.safetensors')]
    common = ['--num-classes', '2', '--img-size', str(args.img_size), '--device', 'cpu', '--workers', '0']

    run_script(scripts, 'train.py', [
        '--data-dir', str(data), '--model', 'tcnn_resnet50rs', *weights, *common,
        '--batch-size', str(args.batch_size), '--epochs', '1', '--opt', 'adamw', '--lr', '1e-3',
        '--warmup-epochs', '0', '--output', str(out / 'train'), '--experiment', 'tcnn_demo'])
    run_dir = out / 'train' / 'tcnn_demo'
    best = run_dir / 'model_best.pth.tar'
    run_script(scripts, 'validate.py', [
        '--data-dir', str(data / 'validation'), '--model', 'tcnn_resnet50rs', '--checkpoint', str(best), *common,
        '--batch-size', str(args.batch_size), '--results-file', str(out / 'validate.csv')])

    print(f'\nDataset:            {data}')
    print(f'Training run:       {run_dir}  (args.yaml, summary.csv, last.pth.tar, model_best.pth.tar)')
    print(f'Validation results: {out / "validate.csv"}')
    print('Converted layers after one epoch:\n  ' + '\n  '.join(content_shares(best)))


if __name__ == '__main__':
    main()
