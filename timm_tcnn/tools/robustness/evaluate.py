""" Building the evaluated model, its preprocessing, and counting top-1 hits over a set of images. """
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor
from torchvision import transforms
from tqdm import tqdm

from ...weights.loading import create_model_with_weights
from .datasets import SampleDataset, collate_readable

__all__ = [
    'ModelSpec', 'build_model', 'model_data_config', 'model_fingerprint', 'file_sha256',
    'eval_transform', 'native_transform', 'CellCount', 'count_top1', 'masked_predictions',
]

_DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


@dataclass
class ModelSpec:
    """What identifies an evaluated model: timm name, weights and constructor arguments."""
    name: str
    pretrained: bool = False
    checkpoint: Optional[str] = None
    model_kwargs: Optional[Dict[str, Any]] = None
    use_ema: bool = False  # take a train.py checkpoint's EMA weights


def build_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    """A timm model (tcnn_* included) in eval mode, with `spec.checkpoint` loaded strictly.

    The checkpoint is read safely (safetensors, or torch.load with weights_only=True; a train.py
    checkpoint's `state_dict` or, with `use_ema`, its EMA weights). A CNN checkpoint given for
    a T-CNN is converted exactly on load; a T-CNN checkpoint is loaded as it is.
    """
    model = create_model_with_weights(
        spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint, use_ema=spec.use_ema,
        **(spec.model_kwargs or {}))
    return model.to(device).eval()


def model_data_config(model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's evaluation data config for `model` at its test size (as validate.py), with overrides."""
    config = resolve_data_config(dict(overrides or {}), model=model, use_test_size=True)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in _DATA_CONFIG_KEYS}


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(spec: ModelSpec, data_config: Dict[str, Any]) -> Dict[str, Any]:
    """The identity under which results are stored: model, weights (content hash) and preprocessing.

    Returns a dict with 'id' (16 hex digits) and the fields it was computed from.
    """
    fields = dict(
        model=spec.name,
        pretrained=spec.pretrained,
        checkpoint_sha256=file_sha256(spec.checkpoint) if spec.checkpoint else None,
        use_ema=spec.use_ema if spec.checkpoint else None,
        model_kwargs=spec.model_kwargs or {},
        data_config=data_config,
    )
    text = json.dumps(fields, sort_keys=True, default=str)
    return dict(id=hashlib.sha256(text.encode()).hexdigest()[:16], checkpoint=spec.checkpoint, **fields)


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """timm's evaluation transform: resize, centre crop (crop_pct), to tensor, normalise."""
    return create_transform(**data_config, is_training=False)


def native_transform(data_config: Dict[str, Any]) -> Callable:
    """To tensor and normalise only: images are used at the size they are stored at (ImageNet-C: 224)."""
    return transforms.Compose([
        MaybeToTensor(),
        transforms.Normalize(mean=torch.tensor(data_config['mean']), std=torch.tensor(data_config['std'])),
    ])


def masked_predictions(logits: torch.Tensor, label_indices: Optional[Sequence[int]]) -> torch.Tensor:
    """Top-1 class indices (B,) from logits (B, num_classes), restricted to `label_indices` if given."""
    if label_indices is None:
        return logits.argmax(dim=1)
    index = torch.as_tensor(label_indices, device=logits.device)
    return index[logits.index_select(1, index).argmax(dim=1)]


@dataclass
class CellCount:
    correct: int = 0
    total: int = 0
    unreadable: int = 0

    @property
    def top1(self) -> Optional[float]:
        return self.correct / self.total if self.total else None


@torch.inference_mode()
def count_top1(
        model: nn.Module,
        dataset: SampleDataset,
        device: torch.device,
        batch_size: int = 64,
        workers: int = 0,
        label_indices: Optional[Sequence[int]] = None,
        desc: str = '',
) -> CellCount:
    """Top-1 hits over `dataset`; unreadable images are counted apart, not scored."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_readable,
        pin_memory=device.type == 'cuda',
    )
    count = CellCount()
    failed: List[int] = []
    for groups, unreadable in tqdm(loader, desc=desc, leave=False, unit='batch', dynamic_ncols=True):
        failed.extend(unreadable)
        for images, targets in groups:
            logits = model(images.to(device, non_blocking=True))
            predictions = masked_predictions(logits, label_indices).cpu()
            count.correct += int((predictions == targets).sum())
            count.total += targets.numel()
    count.unreadable = len(failed)
    return count
