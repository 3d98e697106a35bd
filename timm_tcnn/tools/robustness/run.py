""" Planning the cells of a robustness run from the dataset folders, and evaluating a model on them. """
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.data.readers.class_map import load_class_map
from timm.utils.misc import natural_key

from ...errors import InputError
from .corruptions import CorruptImage, check_corruptions
from .datasets import (
    Sample,
    SampleDataset,
    imagenet_class_to_idx,
    scan_class_folders,
    scan_imagenet_c,
    subset_indices,
)
from .evaluate import (
    ModelSpec,
    build_model,
    count_top1,
    eval_transform,
    model_data_config,
    model_fingerprint,
    native_transform,
)
from .protocol import CORRUPTIONS, SEVERITIES
from .results import ResultsStore, cell_key

__all__ = ['CellTask', 'Plan', 'plan_cells', 'evaluate_model']

INPUT_MODES = ('native', 'model')


@dataclass
class CellTask:
    """One cell to evaluate: its images, how they are prepared, and which logits may win."""
    benchmark: str
    samples: List[Sample]
    folder: str
    input: str = 'model'  # 'model': timm's eval transform; 'native': to tensor + normalise only
    corruption: Optional[str] = None
    severity: Optional[int] = None
    prepare: Optional[CorruptImage] = None
    label_indices: Optional[List[int]] = None
    needs_imagenet: bool = True  # targets are ImageNet-1k indices
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return cell_key(self.benchmark, self.corruption, self.severity)

    @property
    def source(self) -> Dict[str, Any]:
        """What the cell's result depends on besides the model; equal sources => a rerun skips the cell."""
        return dict(folder=self.folder, images=len(self.samples), input=self.input, **self.settings)


@dataclass
class Plan:
    tasks: List[CellTask] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _corruption_package() -> str:
    for name in ('imagecorruptions-imaug', 'imagecorruptions'):
        try:
            return f'{name}=={importlib.metadata.version(name)}'
        except importlib.metadata.PackageNotFoundError:
            continue
    return 'unknown'


def _folder_classes(root: str, class_map: Optional[str], notes: List[str]) -> Tuple[Dict[str, int], bool]:
    """Class name -> index for an arbitrary labelled folder, and whether the indices are ImageNet-1k's."""
    if class_map:
        if not os.path.isfile(class_map) or os.path.splitext(class_map)[1] not in ('.txt', '.pkl'):
            raise InputError(f'class map {class_map!r} is not a .txt (one class name per line) or .pkl file')
        notes.append(f'{root}: class indices from the class map {class_map}')
        return dict(load_class_map(class_map)), False
    imagenet = imagenet_class_to_idx()
    names = sorted((e.name for e in os.scandir(root) if e.is_dir())) if os.path.isdir(root) else []
    if names and all(n in imagenet for n in names):
        notes.append(f'{root}: class folders are ImageNet synsets; targets are ImageNet-1k indices')
        return imagenet, True
    notes.append(f'{root}: class folders are not all ImageNet synsets; class index = position in sorted folder '
                 f'names (as timm\'s ImageFolder); pass --class-map to choose')
    return {n: i for i, n in enumerate(sorted(names, key=natural_key))}, False


def plan_cells(
        imagenet_c: Optional[str] = None,
        imagenet_a: Optional[str] = None,
        imagenet_r: Optional[str] = None,
        imagenet_val: Optional[str] = None,
        corrupt: Optional[str] = None,
        corruptions: Optional[Sequence[str]] = None,
        severities: Optional[Sequence[int]] = None,
        c_input: str = 'native',
        corrupt_size: int = 224,
        seed: int = 0,
        class_map: Optional[str] = None,
) -> Plan:
    """Scan the given folders and list the cells to evaluate; malformed parts become `problems`."""
    if c_input not in INPUT_MODES:
        raise ValueError(f'input mode must be one of {INPUT_MODES}, got {c_input!r}')
    plan = Plan()
    imagenet = imagenet_class_to_idx()
    if imagenet_val:
        scan = scan_class_folders(imagenet_val, imagenet)
        plan.problems += scan.problems
        if scan.samples:
            plan.tasks.append(CellTask('imagenet-val', scan.samples, imagenet_val))
    if imagenet_c:
        scan = scan_imagenet_c(imagenet_c, imagenet, corruptions, severities)
        plan.problems += scan.problems
        for (corruption, severity), samples in scan.cells.items():
            plan.tasks.append(CellTask('imagenet-c', samples, scan.cell_roots[(corruption, severity)], c_input,
                                       corruption, severity))
    for benchmark, root in (('imagenet-a', imagenet_a), ('imagenet-r', imagenet_r)):
        if root:
            indices = subset_indices(benchmark)
            scan = scan_class_folders(root, imagenet, allowed=indices)
            plan.problems += scan.problems
            if scan.samples:
                plan.tasks.append(CellTask(benchmark, scan.samples, root, label_indices=indices))
    if corrupt:
        names = list(corruptions or CORRUPTIONS)
        levels = list(severities or SEVERITIES)
        check_corruptions(names, levels)
        class_to_idx, is_imagenet = _folder_classes(corrupt, class_map, plan.notes)
        scan = scan_class_folders(corrupt, class_to_idx)
        plan.problems += scan.problems
        if scan.samples:
            settings = dict(size=corrupt_size, seed=seed, package=_corruption_package())
            for name, severity in [('clean', 0)] + [(n, s) for n in names for s in levels]:
                plan.tasks.append(CellTask(
                    'corrupt', scan.samples, corrupt, c_input, name, severity,
                    prepare=CorruptImage(name, severity, corrupt_size, seed),
                    needs_imagenet=is_imagenet, settings=settings))
    return plan


def _label(spec: ModelSpec) -> str:
    weights = os.path.basename(spec.checkpoint) if spec.checkpoint else ('pretrained' if spec.pretrained else 'random')
    return f'{spec.name} ({weights})'


def evaluate_model(
        spec: ModelSpec,
        plan: Plan,
        store: ResultsStore,
        device: torch.device,
        batch_size: int = 64,
        workers: int = 0,
        data_overrides: Optional[Dict[str, Any]] = None,
        clean_accuracy: Optional[float] = None,
) -> Dict[str, Any]:
    """Evaluate every planned cell not already in `store` for this model; returns the model's entry.

    Each finished cell is written to the store at once, so an interrupted run resumes where it stopped.
    `clean_accuracy` (fraction) stands in for ImageNet-val top-1 in the relative mCE.
    """
    model = build_model(spec, device)
    data_config = model_data_config(model, data_overrides)
    num_classes = getattr(model, 'num_classes', None)
    for task in plan.tasks:
        if task.needs_imagenet and num_classes != 1000:
            raise InputError(f'{spec.name} has {num_classes} classes; {task.benchmark} needs an ImageNet-1k '
                             'classifier (1000 classes)')
        if not task.needs_imagenet and num_classes is not None and task.samples \
                and max(t for _, t in task.samples) >= num_classes:
            raise InputError(f'{task.folder}: class indices reach {max(t for _, t in task.samples)} but '
                             f'{spec.name} has {num_classes} classes; pass --class-map')
    fingerprint = model_fingerprint(spec, data_config)
    entry = store.model(fingerprint, _label(spec), clean_accuracy)
    entry['problems'] = list(plan.problems)
    transforms = {'model': eval_transform(data_config), 'native': native_transform(data_config)}
    skipped = 0
    for task in plan.tasks:
        if store.finished(entry, task.key, task.source) is not None:
            skipped += 1
            continue
        dataset = SampleDataset(task.samples, transforms[task.input], task.prepare)
        count = count_top1(model, dataset, device, batch_size, workers, task.label_indices,
                           desc=f'{spec.name} {task.key}')
        store.put(entry, task.key, dict(
            benchmark=task.benchmark, corruption=task.corruption, severity=task.severity,
            correct=count.correct, total=count.total, unreadable=count.unreadable, top1=count.top1,
            source=task.source,
        ))
    for task in plan.tasks:
        unreadable = entry['cells'][task.key]['unreadable']
        if unreadable:
            entry['problems'].append(f'{task.folder}: {unreadable} image(s) could not be read or corrupted '
                                     f'and were left out of {task.key}')
    entry['skipped_cells'] = skipped
    store.save(final=True)
    return entry
