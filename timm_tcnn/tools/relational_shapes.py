""" Relational shapes: a generated image-classification task whose labels relate distant regions.

Every image shows one large *main shape* (disk, square, triangle, cross or ring) and two small *dots*, each
red, green or blue, on a shaded grey background with pixel noise. The label has two parts:

- `shape`: which main shape is drawn (5 values): a local pattern, what convolutions are made for;
- `relation`: whether the two dots have the same colour (2 values). Only a comparison of the two dots
  tells: pooled counts of dot colours cannot separate `same` from `different` linearly (the average of two
  `same` pairs is a `different` pair), so a CNN must see both dots within one unit's receptive field.

Half the pairs are `near` (the dots almost touch: any small receptive field sees both) and half are `far`
(at least 0.45 x the image side apart), so a CNN can solve part of the relation, and what attention
across the image adds shows on the far pairs. Class = f'{shape}_{relation}' (10 classes).

`write_dataset` writes an ImageFolder (`train/`, `validation/`, one folder per class, PNG files) and
`dataset.json` with the generator's arguments, the label parts and each image's pair distance
(`image_groups`). Every image is a pure function of (seed, split, index, size), its class drawn at random, so
a split needs enough images for every class to have one: `check_counts` refuses counts that leave a class
empty (timm's ImageFolder would number the classes of the two splits differently).
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import InputError

__all__ = ['SHAPES', 'DOT_COLORS', 'RELATIONS', 'PAIRS', 'Sample', 'class_names', 'render', 'write_dataset',
           'label_parts', 'complete_count', 'check_counts']

SHAPES = ('disk', 'square', 'triangle', 'cross', 'ring')
DOT_COLORS = ((220, 30, 30), (30, 200, 30), (40, 40, 230))  # red, green, blue; each dot is jittered by +-25
RELATIONS = ('same', 'different')
PAIRS = ('near', 'far')
SPLITS = {'train': 0, 'validation': 1}
DATASET_FILE = 'dataset.json'
FAR_DISTANCE = 0.45  # far dots are at least this fraction of the image side apart (centre to centre)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated image and what it shows; `dot_distance` is centre to centre, in pixels."""
    image: Image.Image
    shape: str
    relation: str
    pair: str
    dot_distance: float

    @property
    def class_name(self) -> str:
        return f'{self.shape}_{self.relation}'


def class_names() -> List[str]:
    """The 10 class names `shape_relation`, in the order of the class indices (sorted, as ImageFolder)."""
    return sorted(f'{shape}_{relation}' for shape in SHAPES for relation in RELATIONS)


def label_parts(class_name: str) -> Dict[str, str]:
    """{'shape': ..., 'relation': ...} of a class name."""
    shape, relation = class_name.split('_')
    return {'shape': shape, 'relation': relation}


def _polygon(center: Tuple[float, float], radius: float, sides: int, angle: float) -> List[Tuple[float, float]]:
    return [(center[0] + radius * math.cos(angle + 2 * math.pi * i / sides),
             center[1] + radius * math.sin(angle + 2 * math.pi * i / sides)) for i in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: Tuple[float, float], radius: float,
                angle: float, color: Tuple[int, ...]) -> None:
    x, y = center
    if kind == 'disk':
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    elif kind == 'square':
        draw.polygon(_polygon(center, radius * 1.2, 4, angle), fill=color)
    elif kind == 'triangle':
        draw.polygon(_polygon(center, radius * 1.25, 3, angle), fill=color)
    elif kind == 'cross':
        w = radius * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon([(x - dx * radius + px, y - dy * radius + py), (x + dx * radius + px, y + dy * radius + py),
                          (x + dx * radius - px, y + dy * radius - py), (x - dx * radius - px, y - dy * radius - py)],
                         fill=color)
    elif kind == 'ring':
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=max(2, round(radius * 0.3)))
    else:
        raise ValueError(f'unknown shape {kind!r}')


def _color(rng: np.random.Generator, background: np.ndarray, min_contrast: float = 90.) -> Tuple[int, int, int]:
    """A random colour at least `min_contrast` (RGB distance) from the background's mean colour."""
    while True:
        color = rng.integers(0, 256, 3)
        if np.linalg.norm(color - background) >= min_contrast:
            return tuple(int(c) for c in color)


def _free(x: float, y: float, taken: List[Tuple[float, float, float]], radius: float) -> bool:
    return all(math.hypot(x - tx, y - ty) > radius + tr + 1 for tx, ty, tr in taken)


def _place_shape(rng: np.random.Generator, size: int, radius: float) -> Tuple[float, float]:
    x, y = rng.uniform(radius + 1, size - radius - 1, 2)
    return float(x), float(y)


def _place_dots(rng: np.random.Generator, size: int, radius: float, pair: str,
                taken: List[Tuple[float, float, float]]) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Two dot centres inside the image, clear of `taken` (x, y, radius) disks: `near` 2.3-3 radii apart
    (gaps of 0.3-1 radius between the dots), `far` at least FAR_DISTANCE x size apart."""
    low = radius + 1
    for _ in range(10000):
        x0, y0 = rng.uniform(low, size - low, 2)
        if pair == 'near':
            distance, angle = rng.uniform(2.3, 3.) * radius, rng.uniform(0, 2 * math.pi)
            x1, y1 = x0 + distance * math.cos(angle), y0 + distance * math.sin(angle)
        else:
            x1, y1 = rng.uniform(low, size - low, 2)
            if math.hypot(x1 - x0, y1 - y0) < FAR_DISTANCE * size:
                continue
        inside = low <= x1 <= size - low and low <= y1 <= size - low
        if inside and _free(x0, y0, taken, radius) and _free(x1, y1, taken, radius):
            return (float(x0), float(y0)), (float(x1), float(y1))
    raise RuntimeError('no free position found: image too small for its shapes')


def _labels(rng: np.random.Generator) -> Tuple[str, str, str]:
    """(shape, relation, pair): the first draws of an image's generator."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return shape, relation, PAIRS[rng.integers(len(PAIRS))]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def complete_count(seed: int, split: str) -> int:
    """The smallest number of images of `split` in which every class has at least one (images are numbered
    from 0, so any larger count has every class too)."""
    missing, index = set(class_names()), 0
    while missing:
        shape, relation, _ = _labels(_rng(seed, split, index))
        missing.discard(f'{shape}_{relation}')
        index += 1
    return index


def check_counts(seed: int, train_images: int, val_images: int) -> None:
    """Raise an `InputError` if a split's image count leaves a class without an image."""
    for split, count, option in (('train', train_images, '--train-images'), ('validation', val_images, '--val-images')):
        needed = complete_count(seed, split)
        if count < needed:
            seen = {'_'.join(_labels(_rng(seed, split, i))[:2]) for i in range(count)}
            missing = sorted(set(class_names()) - seen)
            raise InputError(
                f'{option} {count} leaves {len(missing)} classes without a {split} image with seed {seed} '
                f'({", ".join(missing)}), so the splits would number their classes differently: use {option} '
                f'{needed} or more (the smallest count with every class for this seed).')


def render(seed: int, split: str, index: int, size: int = 64) -> Sample:
    """Image `index` of `split` ('train' or 'validation') and its labels; deterministic."""
    rng = _rng(seed, split, index)
    shape, relation, pair = _labels(rng)
    first = int(rng.integers(len(DOT_COLORS)))
    second = first if relation == 'same' else (first + int(rng.integers(1, len(DOT_COLORS)))) % len(DOT_COLORS)

    # background: a linear shade between two grey levels
    g0, g1 = rng.integers(60, 200, 2)
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(direction) * xx + np.sin(direction) * yy + 1) / 2
    background = (g0 * (1 - t) + g1 * t)[..., None].repeat(3, -1)
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    scale = size / 64
    radius = rng.uniform(7.5, 11) * scale
    center = _place_shape(rng, size, radius * 1.25)
    _draw_shape(draw, shape, center, radius, rng.uniform(0, 2 * math.pi),
                _color(rng, background.reshape(-1, 3).mean(0)))
    dot_radius = rng.uniform(1.8, 2.4) * scale
    dots = _place_dots(rng, size, dot_radius, pair, [(center[0], center[1], radius * 1.25)])
    for (x, y), color in zip(dots, (DOT_COLORS[first], DOT_COLORS[second])):
        color = tuple(int(c) for c in np.clip(np.array(color) + rng.integers(-25, 26, 3), 0, 255))
        draw.ellipse([x - dot_radius, y - dot_radius, x + dot_radius, y + dot_radius], fill=color)

    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return Sample(image, shape, relation, pair, math.dist(*dots))


def write_dataset(
        out: Union[str, Path],
        seed: int = 0,
        train_images: int = 6000,
        val_images: int = 500,
        size: int = 64,
) -> Dict:
    """Write the ImageFolder `out/{train,validation}/<class>/<index>.png` and `out/dataset.json`.

    `dataset.json` holds the arguments, `label_parts` ({class: {part: value}}) and `image_groups`
    ({split: {'<class>/<index>.png': 'near' or 'far'}}). `out` must not hold a dataset yet. Counts that leave a
    class without an image are refused (`check_counts`). Returns the contents of `dataset.json`.
    """
    check_counts(seed, train_images, val_images)
    out = Path(out)
    groups = {}
    for split, count in (('train', train_images), ('validation', val_images)):
        for name in class_names():
            (out / split / name).mkdir(parents=True, exist_ok=True)
        groups[split] = {}
        for index in tqdm(range(count), desc=f'relational shapes {split}', unit='img'):
            sample = render(seed, split, index, size)
            file = f'{sample.class_name}/{index:06d}.png'
            sample.image.save(out / split / file, compress_level=1)
            groups[split][file] = sample.pair
    info = {
        'generator': 'timm_tcnn.relational_shapes',
        'seed': seed, 'size': size, 'train_images': train_images, 'val_images': val_images,
        'classes': class_names(),
        'label_parts': {name: label_parts(name) for name in class_names()},
        'image_groups': groups,
    }
    (out / DATASET_FILE).write_text(json.dumps(info, indent=2) + '\n', encoding='utf-8')
    return info
