""" Accuracy per part of a composite label (datasets whose `dataset.json` lists `label_parts`). """
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from tqdm import tqdm

from ...utils.io import atomic_write
from ...weights.loading import create_model_with_weights
from .spec import ExperimentSpec, Step

__all__ = ['load_label_parts', 'load_image_groups', 'part_accuracy', 'evaluate_parts', 'parts_step']


def _dataset_info(data_dir: str) -> Dict[str, Any]:
    path = Path(data_dir) / 'dataset.json'
    return json.loads(path.read_text(encoding='utf-8')) if path.exists() else {}


def load_label_parts(data_dir: str) -> Optional[Dict[str, Dict[str, str]]]:
    """{class name: {part: value}} from `data_dir/dataset.json`, or None if the dataset has none."""
    return _dataset_info(data_dir).get('label_parts')


def load_image_groups(data_dir: str, split: str) -> Optional[Dict[str, str]]:
    """{'<class>/<file>': group} of `split` from `data_dir/dataset.json`, or None if the dataset has none."""
    return _dataset_info(data_dir).get('image_groups', {}).get(split)


@torch.no_grad()
def part_accuracy(model: torch.nn.Module, folder: str, label_parts: Dict[str, Dict[str, str]], img_size: int,
                  image_groups: Optional[Dict[str, str]] = None, batch_size: int = 64) -> Dict[str, Any]:
    """Top-1 accuracy (%) of each label part over the ImageFolder `folder`: a prediction scores on a part
    when its class has the true class's value of that part. Also the chance level of each part.

    With `image_groups` ({path relative to `folder`: group}), also each part's accuracy within each group,
    keyed `'<part> (<group>)'`.
    """
    config = resolve_data_config(dict(img_size=img_size), model=model)
    dataset = ImageDataset(folder, transform=create_transform(**config))
    folders = {index: name for name, index in dataset.reader.class_to_idx.items()}  # this split's targets
    groups = [image_groups[Path(dataset.filename(i)).as_posix()] for i in range(len(dataset))] if image_groups else []
    classes = sorted(label_parts)  # the model's outputs: every class, in ImageFolder order
    parts = sorted(next(iter(label_parts.values())))
    scopes = {p: [p, *(f'{p} ({g})' for g in sorted(set(groups)))] for p in parts}  # part -> its result keys
    keys = [key for p in parts for key in scopes[p]]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    hits = dict.fromkeys(keys, 0)
    counts = dict.fromkeys(keys, 0)
    index = 0
    model.eval()
    for images, targets in tqdm(loader, desc='accuracy per label part', unit='batch', leave=False):
        predictions = model(images).argmax(-1)
        for target, prediction in zip(targets.tolist(), predictions.tolist()):
            truth, guess = label_parts[folders[target]], label_parts[classes[prediction]]
            for p in parts:
                for key in (p, f'{p} ({groups[index]})') if groups else (p,):
                    hits[key] += truth[p] == guess[p]
                    counts[key] += 1
            index += 1
    chance = {key: 100 / len({v[p] for v in label_parts.values()}) for p in parts for key in scopes[p]}
    return dict(accuracy={k: 100 * hits[k] / counts[k] for k in keys}, chance=chance, images=index,
                images_per_group={k: counts[k] for k in keys if k not in scopes})


def evaluate_parts(model_name: str, checkpoint: str, folder: str, label_parts: Dict[str, Dict[str, str]],
                   img_size: int, image_groups: Optional[Dict[str, str]] = None,
                   **model_kwargs: Any) -> Dict[str, Any]:
    """`part_accuracy` of a model built by name with a checkpoint."""
    model = create_model_with_weights(model_name, checkpoint=checkpoint, **model_kwargs)
    return part_accuracy(model, folder, label_parts, img_size, image_groups)


def parts_step(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """In-process experiment step: accuracy per label part of the starting CNN or of an arm's best checkpoint."""
    label_parts = load_label_parts(spec.data_dir)
    image_groups = load_image_groups(spec.data_dir, spec.val_split)
    folder = str(Path(spec.data_dir) / spec.val_split)
    if step.arm is None:
        from .identity import load_cnn
        result = part_accuracy(load_cnn(spec), folder, label_parts, spec.test_size, image_groups)
    else:
        result = evaluate_parts(spec.model_name(step.arm), str(spec.checkpoint(step.arm, step.seed, 'best')), folder,
                                label_parts, spec.test_size, image_groups, **spec.eval_kwargs(step.arm))
    Path(step.result).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(step.result, json.dumps(result, indent=2) + '\n')
    return result
