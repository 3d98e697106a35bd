""" Finding the images of robustness benchmarks on disk, and loading them without stopping on bad files.

Layouts (class folders are WordNet synsets such as `n01440764`, mapped to ImageNet-1k indices
with timm's own synset list):

    ImageNet-C   DIR/<corruption>/<severity>/<synset>/*.JPEG   (also DIR/<family>/<corruption>/...)
    ImageNet-A/R DIR/<synset>/*.jpg                             (200 synsets, see `subset_indices`)
    any folder   DIR/<class>/*.jpg                              (ImageNet-val, or `--corrupt`)

Scans never raise on a malformed tree: what is wrong (unknown names, missing severities, empty
folders, non-image files) is collected as readable `problems`, and only usable cells are returned.
"""
import functools
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageNetInfo
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key

from .protocol import CORRUPTIONS, FAMILIES, SEVERITIES

__all__ = [
    'EXTRA_CORRUPTIONS', 'Sample', 'FolderScan', 'ImageNetCScan', 'imagenet_class_to_idx', 'subset_indices',
    'scan_class_folders', 'scan_imagenet_c', 'SampleDataset', 'collate_readable',
]

# the 4 held-out ImageNet-C corruptions: evaluated and reported when present, never part of mCE
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

Sample = Tuple[str, int]  # (image path, class index)


def imagenet_class_to_idx() -> Dict[str, int]:
    """ImageNet-1k synset -> class index, from timm's `imagenet_synsets.txt`."""
    return {synset: index for index, synset in enumerate(_imagenet_synsets())}


@functools.lru_cache(maxsize=1)
def _imagenet_synsets() -> Tuple[str, ...]:
    return tuple(ImageNetInfo('imagenet-1k').label_names())


def subset_indices(name: str) -> List[int]:
    """ImageNet-1k indices of the 200 classes of 'imagenet-a' or 'imagenet-r', from timm's index files.

    The i-th index is the class of the i-th synset of timm's `imagenet_{a,r}_synsets.txt`; both
    lists are checked against each other and against the 1k synset list.
    """
    if name not in ('imagenet-a', 'imagenet-r'):
        raise ValueError(f"no class subset for {name!r}; use 'imagenet-a' or 'imagenet-r'")
    stem = name.replace('-', '_')
    indices = [int(x) for x in _timm_info_lines(f'{stem}_indices.txt')]
    synsets = _timm_info_lines(f'{stem}_synsets.txt')
    all_synsets = _imagenet_synsets()
    if len(indices) != len(synsets) or any(all_synsets[i] != s for i, s in zip(indices, synsets)):
        raise RuntimeError(f"timm's {stem}_indices.txt and {stem}_synsets.txt disagree; reinstall timm")
    return indices


def _timm_info_lines(filename: str) -> List[str]:
    data = pkgutil.get_data('timm.data', os.path.join('_info', filename))
    return [line.strip() for line in data.decode('utf-8').splitlines() if line.strip()]


@dataclass
class FolderScan:
    """The labelled images found under one root, and what was wrong with the tree."""
    root: str
    samples: List[Sample] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)


@dataclass
class ImageNetCScan:
    """ImageNet-C cells {(corruption, severity): samples} and what was wrong with the tree."""
    root: str
    cells: Dict[Tuple[str, int], List[Sample]] = field(default_factory=dict)
    cell_roots: Dict[Tuple[str, int], str] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)


def _subdirs(path: str) -> List[str]:
    return sorted((e.name for e in os.scandir(path) if e.is_dir()), key=natural_key)


def _files(path: str) -> List[str]:
    return sorted((e.name for e in os.scandir(path) if e.is_file()), key=natural_key)


def _examples(names: Sequence[str], limit: int = 5) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names)} in all)' if len(names) > limit else '')


def scan_class_folders(
        root: str,
        class_to_idx: Dict[str, int],
        allowed: Optional[Iterable[int]] = None,
) -> FolderScan:
    """Images of `root/<class>/**` whose class is in `class_to_idx` (and whose index is in `allowed`)."""
    scan = FolderScan(root=root)
    if not os.path.isdir(root):
        scan.problems.append(f'{root}: not a directory')
        return scan
    extensions = get_img_extensions(as_set=True)
    allowed = None if allowed is None else set(allowed)
    unknown, outside, empty, non_images = [], [], [], []
    stray = _files(root)
    for name in _subdirs(root):
        if name not in class_to_idx:
            unknown.append(name)
            continue
        target = class_to_idx[name]
        if allowed is not None and target not in allowed:
            outside.append(name)
            continue
        found = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort(key=natural_key)
            for filename in sorted(filenames, key=natural_key):
                path = os.path.join(dirpath, filename)
                if os.path.splitext(filename)[1].lower() in extensions:
                    scan.samples.append((path, target))
                    found += 1
                else:
                    non_images.append(os.path.relpath(path, root))
        if not found:
            empty.append(name)
    if unknown:
        scan.problems.append(f'{root}: {len(unknown)} folder(s) are not known class names, skipped: '
                             f'{_examples(unknown)}')
    if outside:
        scan.problems.append(
            f'{root}: {len(outside)} class folder(s) outside the evaluated class subset, skipped: {_examples(outside)}')
    if empty:
        scan.problems.append(f'{root}: {len(empty)} class folder(s) hold no images: {_examples(empty)}')
    if non_images:
        scan.problems.append(f'{root}: {len(non_images)} non-image file(s) ignored: {_examples(non_images)}')
    if stray:
        scan.problems.append(f'{root}: {len(stray)} file(s) outside class folders ignored: {_examples(stray)}')
    if not scan.samples:
        scan.problems.append(f'{root}: no labelled images found (expected {root}/<class>/<image>)')
    return scan


def scan_imagenet_c(
        root: str,
        class_to_idx: Dict[str, int],
        corruptions: Optional[Sequence[str]] = None,
        severities: Optional[Sequence[int]] = None,
) -> ImageNetCScan:
    """Find `root/<corruption>/<severity>/<synset>/*` cells, optionally restricted to some corruptions/severities.

    A family level (`root/noise/gaussian_noise/...`) is looked through. Unknown corruption names,
    severities outside 1..5, missing severities and empty cells are reported in `problems`.
    """
    scan = ImageNetCScan(root=root)
    if not os.path.isdir(root):
        scan.problems.append(f'{root}: not a directory')
        return scan
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    wanted_corruptions = set(corruptions) if corruptions else set(known)
    wanted_severities = set(severities) if severities else set(SEVERITIES)
    found: Dict[str, str] = {}
    unknown = []
    for name in _subdirs(root):
        path = os.path.join(root, name)
        if name in known:
            found[name] = path
        elif name in FAMILIES or name == 'extra':
            for sub in _subdirs(path):
                if sub in known:
                    found[sub] = os.path.join(path, sub)
                else:
                    unknown.append(f'{name}/{sub}')
        else:
            unknown.append(name)
    if unknown:
        scan.problems.append(
            f'{root}: unknown corruption folder(s) skipped: {_examples(unknown)} '
            f'(known: {", ".join(known)})')
    if corruptions:
        absent = [c for c in corruptions if c not in found]
        if absent:
            scan.problems.append(f'{root}: requested corruption(s) not found: {", ".join(absent)}')
    elif found:
        absent = [c for c in CORRUPTIONS if c not in found]
        if absent:
            scan.problems.append(
                f'{root}: {len(absent)} of the 15 benchmark corruptions absent: {", ".join(absent)} '
                '(mCE will be partial)')

    for corruption in [c for c in known if c in found and c in wanted_corruptions]:
        path = found[corruption]
        bad_severities = [s for s in _subdirs(path) if s not in {str(x) for x in SEVERITIES}]
        if bad_severities:
            scan.problems.append(
                f'{path}: folder(s) that are not severities 1..5 skipped: {_examples(bad_severities)}')
        present = []
        for severity in sorted(wanted_severities):
            cell_root = os.path.join(path, str(severity))
            if not os.path.isdir(cell_root):
                continue
            cell = scan_class_folders(cell_root, class_to_idx)
            scan.problems.extend(cell.problems)
            if cell.samples:
                scan.cells[(corruption, severity)] = cell.samples
                scan.cell_roots[(corruption, severity)] = cell_root
                present.append(severity)
        missing = [s for s in sorted(wanted_severities) if s not in present]
        if missing:
            scan.problems.append(
                f'{path}: severit{"y" if len(missing) == 1 else "ies"} {", ".join(map(str, missing))} '
                f'missing or empty (no CE for {corruption})')
    if not scan.cells:
        scan.problems.append(f'{root}: no ImageNet-C cells found (expected '
                             f'{root}/<corruption>/<severity>/<synset>/<image>)')
    return scan


class SampleDataset(torch.utils.data.Dataset):
    """Labelled image files -> (tensor, target, index); a file that cannot be read (or prepared) gives
    (None, target, index), counted and reported by the caller instead of stopping the run.

    Args:
        samples: (path, class index) pairs.
        transform: PIL image -> tensor.
        prepare: optional PIL image -> PIL image step before `transform` (e.g. resize + corrupt);
            called as prepare(image, index) so that random corruptions can be seeded per image.
    """

    def __init__(
            self,
            samples: Sequence[Sample],
            transform: Callable[[Image.Image], torch.Tensor],
            prepare: Optional[Callable[[Image.Image, int], Image.Image]] = None,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')
        except (OSError, ValueError, Image.DecompressionBombError):
            return None, target, index
        if self.prepare is not None:
            try:
                image = self.prepare(image, index)
            except Exception:  # a third-party corruption failing on one image must not end an hour-long run
                return None, target, index
        return self.transform(image), target, index


def collate_readable(
        batch: Sequence[Tuple[Optional[torch.Tensor], int, int]],
) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], List[int]]:
    """Group the readable samples by image size.

    Returns ([(images (B, C, H, W), targets (B,)) per size], indices of unreadable samples).
    """
    groups: Dict[Tuple[int, ...], List[Tuple[torch.Tensor, int]]] = {}
    unreadable = []
    for image, target, index in batch:
        if image is None:
            unreadable.append(index)
        else:
            groups.setdefault(tuple(image.shape), []).append((image, target))
    stacked = [
        (torch.stack([image for image, _ in group]), torch.tensor([t for _, t in group], dtype=torch.long))
        for group in groups.values()
    ]
    return stacked, unreadable
