""" Every validation image's prediction by the experiment's models: the per-image record behind its verdicts
(paired over images) and its per-epoch curves. """
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from tqdm import tqdm

from ...utils.io import atomic_write
from ...weights.loading import create_model_with_weights
from .identity import load_cnn
from .spec import CHECKPOINTS, ExperimentSpec, Step

__all__ = ['predict_folder', 'predictions_step', 'correct']


@torch.no_grad()
def predict_folder(model: torch.nn.Module, folder: str, img_size: int, batch_size: int = 64,
                   desc: str = 'predictions') -> Dict[str, Any]:
    """The model's top-1 class of every image of the ImageFolder `folder`, with the eval transform validate.py gives
it at `img_size` (the pretrained config's test crop), so that the experiment's per-image results are validate.py's.

    Returns `images` (paths relative to `folder`), `classes` (the folder's class names, index order), `targets`
    and `predicted` (indices of the model's outputs; the same as the targets' when the model was trained on a split
    with the same classes, as the experiment checks).
    """
    config = resolve_data_config(dict(img_size=img_size), model=model, use_test_size=True)
    dataset = ImageDataset(folder, transform=create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    model.eval()
    targets, predicted = [], []
    for images, labels in tqdm(loader, desc=desc, unit='batch', leave=False):
        predicted += model(images).argmax(-1).tolist()
        targets += labels.tolist()
    return dict(images=[Path(dataset.filename(i)).as_posix() for i in range(len(dataset))],
                classes=list(dataset.reader.class_to_idx), targets=targets, predicted=predicted)


def correct(targets: List[int], predicted: List[int]) -> List[int]:
    """1 where the prediction is the target, else 0."""
    return [int(t == p) for t, p in zip(targets, predicted)]


def _models(spec: ExperimentSpec, step: Step) -> Iterable[Tuple[str, Callable[[], torch.nn.Module]]]:
    """(name, builder) of every model the step predicts with: the starting CNN (arm None), or an arm's best and last
    checkpoints and its weights after every epoch (`epoch<N>`, where they were recorded)."""
    if step.arm is None:
        yield 'start', lambda: load_cnn(spec)
        return
    model, kwargs = spec.model_name(step.arm), spec.eval_kwargs(step.arm)
    paths = {which: spec.checkpoint(step.arm, step.seed, which) for which in CHECKPOINTS}
    recorded = spec.epoch_weights(step.arm, step.seed).glob('epoch*.safetensors')
    paths.update({path.stem: path for path in sorted(recorded, key=lambda p: int(p.stem[len('epoch'):]))})
    for name, path in paths.items():
        yield name, lambda path=path: create_model_with_weights(model, checkpoint=str(path), **kwargs)


def predictions_step(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """In-process experiment step: the predictions on the validation split at the test size of the starting CNN
    (arm None) or of an arm's checkpoints and recorded epochs, as {images, classes, targets, predicted: {name: ...}}."""
    folder = str(Path(spec.data_dir) / spec.val_split)
    record: Dict[str, Any] = dict(img_size=spec.test_size, predicted={})
    for name, build in _models(spec, step):
        result = predict_folder(build(), folder, spec.test_size, spec.eval_batch_size, desc=f'{step.key} {name}')
        record.update(images=result['images'], classes=result['classes'], targets=result['targets'])
        record['predicted'][name] = result['predicted']
    atomic_write(step.result, json.dumps(record) + '\n')
    return dict(passed=True)
