""" Relational shapes: a generated image-classification task whose labels relate distant regions.

Every image shows one large *main shape* (disk, square, triangle, cross or ring) and two small *marks*
(bar, dot or corner) at a random distance from each other, on a noisy, shaded background. The label has
two parts:

- `shape`: which main shape is drawn (5 values): a local pattern, what convolutions are made for;
- `relation`: whether the two marks are of the same kind (2 values). Colours, sizes and positions are
  random, so only a comparison of the two marks tells. Pooled counts of mark kinds cannot separate
  `same` from `different` linearly (the average of two `same` pairs is a `different` pair), so a CNN
  must relate the marks within its receptive field: it solves close pairs more easily than distant ones.

Class = f'{shape}_{relation}' (10 classes). `write_dataset` writes an ImageFolder (`train/`,
`validation/`, one folder per class, PNG files) and `dataset.json` with the generator's arguments and
the label parts. Every image is a pure function of (seed, split, index): the same arguments always
give the same files.
"""
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ['SHAPES', 'MARKS', 'RELATIONS', 'class_names', 'render', 'write_dataset', 'label_parts']

SHAPES = ('disk', 'square', 'triangle', 'cross', 'ring')
MARKS = ('bar', 'dot', 'corner')
RELATIONS = ('same', 'different')
SPLITS = {'train': 0, 'validation': 1}
DATASET_FILE = 'dataset.json'


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


def _draw_mark(draw: ImageDraw.ImageDraw, kind: str, center: Tuple[float, float], size: float, angle: float,
               color: Tuple[int, ...]) -> None:
    x, y = center
    if kind == 'bar':
        dx, dy = math.cos(angle) * size, math.sin(angle) * size
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=color, width=max(2, round(size * 0.45)))
    elif kind == 'dot':
        r = size * 0.7
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif kind == 'corner':
        a, b = angle, angle + math.pi / 2
        width = max(2, round(size * 0.45))
        draw.line([(x + math.cos(a) * size, y + math.sin(a) * size), (x, y),
                   (x + math.cos(b) * size, y + math.sin(b) * size)], fill=color, width=width, joint='curve')
    else:
        raise ValueError(f'unknown mark {kind!r}')


def _color(rng: np.random.Generator, background: np.ndarray, min_contrast: float = 90.) -> Tuple[int, int, int]:
    """A random colour at least `min_contrast` (RGB distance) from the background's mean colour."""
    while True:
        color = rng.integers(0, 256, 3)
        if np.linalg.norm(color - background) >= min_contrast:
            return tuple(int(c) for c in color)


def _apart(rng: np.random.Generator, size: int, margin: float, taken: Sequence[Tuple[float, float, float]],
           radius: float) -> Tuple[float, float]:
    """A random centre at least `margin` inside the image whose disk of `radius` overlaps none in `taken`."""
    for _ in range(1000):
        x, y = rng.uniform(margin, size - margin, 2)
        if all(math.hypot(x - tx, y - ty) > radius + tr + 2 for tx, ty, tr in taken):
            return float(x), float(y)
    raise RuntimeError('no free position found: image too small for its shapes')


def render(seed: int, split: str, index: int, size: int = 128) -> Tuple[Image.Image, str]:
    """Image `index` of `split` ('train' or 'validation') and its class name; deterministic."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    first = int(rng.integers(len(MARKS)))
    second = first if relation == 'same' else (first + int(rng.integers(1, len(MARKS)))) % len(MARKS)

    # background: a linear shade between two colours plus pixel noise
    c0, c1 = rng.integers(40, 216, (2, 3))
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(direction) * xx + np.sin(direction) * yy + 1) / 2
    background = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    mean_bg = background.reshape(-1, 3).mean(0)
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    scale = size / 128
    radius = rng.uniform(15, 22) * scale
    center = _apart(rng, size, radius + 2, [], radius)
    _draw_shape(draw, shape, center, radius, rng.uniform(0, 2 * math.pi), _color(rng, mean_bg))
    taken = [(center[0], center[1], radius)]
    mark_size = rng.uniform(5, 7) * scale
    for kind in (MARKS[first], MARKS[second]):
        position = _apart(rng, size, mark_size + 2, taken, mark_size * 1.2)
        _draw_mark(draw, kind, position, mark_size, rng.uniform(0, 2 * math.pi), _color(rng, mean_bg))
        taken.append((position[0], position[1], mark_size * 1.2))

    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), f'{shape}_{relation}'


def write_dataset(
        out: Union[str, Path],
        seed: int = 0,
        train_images: int = 4000,
        val_images: int = 500,
        size: int = 128,
) -> Dict:
    """Write the ImageFolder `out/{train,validation}/<class>/<index>.png` and `out/dataset.json`.

    `out` must not hold a dataset yet. Returns the contents of `dataset.json`.
    """
    out = Path(out)
    for split, count in (('train', train_images), ('validation', val_images)):
        for name in class_names():
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index in tqdm(range(count), desc=f'relational shapes {split}', unit='img'):
            image, name = render(seed, split, index, size)
            image.save(out / split / name / f'{index:06d}.png', compress_level=1)
    info = {
        'generator': 'timm_tcnn.relational_shapes',
        'seed': seed, 'size': size, 'train_images': train_images, 'val_images': val_images,
        'classes': class_names(),
        'label_parts': {name: label_parts(name) for name in class_names()},
    }
    (out / DATASET_FILE).write_text(json.dumps(info, indent=2) + '\n', encoding='utf-8')
    return info
