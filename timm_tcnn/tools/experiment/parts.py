""" Accuracy per part of a composite label (datasets whose `dataset.json` lists `label_parts`). """
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ...weights.loading import create_model_with_weights
from .predictions import predict_folder

__all__ = ['load_label_parts', 'load_image_groups', 'part_hits', 'chance_levels', 'part_accuracy', 'evaluate_parts']


def _dataset_info(data_dir: str) -> Dict[str, Any]:
    path = Path(data_dir) / 'dataset.json'
    return json.loads(path.read_text(encoding='utf-8')) if path.exists() else {}


def load_label_parts(data_dir: str) -> Optional[Dict[str, Dict[str, str]]]:
    """{class name: {part: value}} from `data_dir/dataset.json`, or None if the dataset has none."""
    return _dataset_info(data_dir).get('label_parts')


def load_image_groups(data_dir: str, split: str) -> Optional[Dict[str, str]]:
    """{'<class>/<file>': group} of `split` from `data_dir/dataset.json`, or None if the dataset has none."""
    return _dataset_info(data_dir).get('image_groups', {}).get(split)


def part_hits(record: Dict[str, Any], predicted: List[int], label_parts: Dict[str, Dict[str, str]],
              image_groups: Optional[Dict[str, str]] = None) -> Dict[str, List[int]]:
    """Per image, whether a prediction scores on each part of the label (its class has the true class's value of
    that part): {part: [0/1 per image]}, and with `image_groups` ({image path: group}) also {'<part> (<group>)':
    [0/1 per image of the group]}. `record` holds the images, classes and targets of `predict_folder`."""
    classes = sorted(label_parts)  # the model's outputs: every class, in ImageFolder order
    parts = sorted(next(iter(label_parts.values())))
    groups = [image_groups[path] for path in record['images']] if image_groups else None
    hits: Dict[str, List[int]] = {}
    for p in parts:
        scored = [int(label_parts[record['classes'][t]][p] == label_parts[classes[g]][p])
                  for t, g in zip(record['targets'], predicted)]
        hits[p] = scored
        for group in sorted(set(groups or ())):
            hits[f'{p} ({group})'] = [h for h, g in zip(scored, groups) if g == group]
    return hits


def chance_levels(label_parts: Dict[str, Dict[str, str]], keys: List[str]) -> Dict[str, float]:
    """Chance accuracy (%) of each result key: 100 / the number of values of its part."""
    return {key: 100 / len({v[key.split(' (')[0]] for v in label_parts.values()}) for key in keys}


def part_accuracy(model: torch.nn.Module, folder: str, label_parts: Dict[str, Dict[str, str]], img_size: int,
                  image_groups: Optional[Dict[str, str]] = None, batch_size: int = 64) -> Dict[str, Any]:
    """Top-1 accuracy (%) of each label part over the ImageFolder `folder` (see `part_hits`; with `image_groups`,
    also within each group, keyed `'<part> (<group>)'`), the chance levels and image counts."""
    record = predict_folder(model, folder, img_size, batch_size, desc='accuracy per label part')
    hits = part_hits(record, record['predicted'], label_parts, image_groups)
    return dict(
        accuracy={k: 100 * sum(v) / len(v) for k, v in hits.items()},
        chance=chance_levels(label_parts, list(hits)),
        images=len(record['images']),
        images_per_group={k: len(v) for k, v in hits.items() if ' (' in k},
    )


def evaluate_parts(
    model_name: str,
    checkpoint: str,
    folder: str,
    label_parts: Dict[str, Dict[str, str]],
    img_size: int,
    image_groups: Optional[Dict[str, str]] = None,
    **model_kwargs: Any,
) -> Dict[str, Any]:
    """`part_accuracy` of a model built by name with a checkpoint."""
    model = create_model_with_weights(model_name, checkpoint=checkpoint, **model_kwargs)
    return part_accuracy(model, folder, label_parts, img_size, image_groups)
