""" `timm-tcnn relational-shapes`: generate the relational-shapes ImageFolder (see timm_tcnn.relational_shapes). """
import argparse
from pathlib import Path

from ...errors import InputError
from ...tools.relational_shapes import DATASET_FILE, check_counts, write_dataset
from ...utils.io import atomic_directory, check_output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'relational-shapes', help='generate a small image task whose labels relate distant regions',
        description='Write an ImageFolder (train/, validation/, 10 classes) of generated images: a large shape '
                    '(5 kinds) and two small dots that have the same colour or not, half of them nearly touching '
                    'and half far apart. Class = shape_relation; dataset.json lists the label parts and each '
                    "image's pair distance (near or far). The same arguments always give the same images. Each "
                    'image\'s class is drawn at random: counts that leave a class without an image in a split are '
                    'refused, with the smallest count that has every class for the seed (about 30 to 60).')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='output folder, written all or nothing (must be missing or empty)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-images', type=int, default=6000)
    parser.add_argument('--val-images', type=int, default=500)
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / DATASET_FILE).exists() or (out / 'train').exists():
        raise InputError(f'{out} already holds a dataset: choose another --out or remove it.')
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f'{out} is not empty: choose a new or empty --out.')
    if args.size < 64:
        raise InputError(f'--size must be >= 64, got {args.size}.')
    check_counts(args.seed, args.train_images, args.val_images)
    check_output_dir(out, overwrite=True)  # an empty folder is replaced
    with atomic_directory(out, overwrite=True) as tmp:
        info = write_dataset(tmp, args.seed, args.train_images, args.val_images, args.size)
    print(f'wrote {args.train_images} training and {args.val_images} validation images of {len(info["classes"])} '
          f'classes to {out}')
    return 0
