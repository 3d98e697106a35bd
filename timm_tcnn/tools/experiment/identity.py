""" The experiment's first step: the T-CNN built from the CNN weights gives the CNN's logits on real images. """
import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import save_file
from timm.data import ImageDataset, create_transform, resolve_data_config

from ...errors import TcnnError
from ...models.convert import attention_layers
from ...utils.io import atomic_path, atomic_write, image_files
from ...weights.identity import TOLERANCE, identity_error, load_converted
from ...weights.loading import create_model
from ...weights.loading import load_cnn as load_weights
from ..analyze import analyze_images
from .spec import ExperimentSpec, Step

__all__ = ['load_cnn', 'identity_check', 'start_step', 'TOLERANCE']


def load_cnn(spec: ExperimentSpec) -> torch.nn.Module:
    """The CNN the experiment starts from: `cnn_checkpoint` (class count read from its entries) or timm's pretrained
    weights of `cnn_model`."""
    return load_weights(spec.cnn_model, spec.cnn_checkpoint, source=f'--cnn-checkpoint {spec.cnn_checkpoint}',
                        **spec.model_kwargs)


def _save(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


@torch.no_grad()
def _validation_batch(spec: ExperimentSpec, model: torch.nn.Module, count: int = 16) -> torch.Tensor:
    """The first `count` validation images with the model's eval transform at the test size."""
    config = resolve_data_config(dict(img_size=spec.test_size), model=model)
    dataset = ImageDataset(str(Path(spec.data_dir) / spec.val_split), transform=create_transform(**config))
    step = max(1, len(dataset) // count)  # spread over the classes (ImageFolder order is by class)
    return torch.stack([dataset[i][0] for i in range(0, len(dataset), step)][:count])


def _analyze_conversion(spec: ExperimentSpec, tcnn: torch.nn.Module, cnn: torch.nn.Module, out: Path) -> None:
    """The attention analysis of the T-CNN at conversion (`analyze/conversion`), against the CNN's weights."""
    meta = dict(model=spec.model, model_kwargs={k: repr(v) for k, v in spec.arm_kwargs('tcnn').items()},
                pretrained=False, checkpoint=str(out / 'tcnn_converted.safetensors'), cnn=str(out / 'cnn.safetensors'))
    files = image_files(Path(spec.data_dir) / spec.val_split)
    analyze_images(tcnn, files, spec.root / 'analyze' / 'conversion', cnn.state_dict(), max_images=spec.analyze_images,
                   img_size=spec.test_size, plots=False, overwrite=True, meta=meta, title=spec.model)


def identity_check(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """Compare the T-CNN's logits with the CNN's on validation images, save both weights (the CNN's as
    `identity/cnn.safetensors`, reference of weight drift) and analyse the T-CNN at conversion."""
    out = spec.root / 'identity'
    out.mkdir(parents=True, exist_ok=True)
    cnn = load_cnn(spec).eval()
    # its random query and key weights (content attention, gated off at conversion) drawn with seed 0, whatever this
    # process drew before: the converted T-CNN and its analysis are the same in a local run and in a SLURM job
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tcnn = create_model(spec.model, num_classes=cnn.num_classes, **spec.arm_kwargs('tcnn'))
    tcnn = load_converted(tcnn, cnn).eval()
    images = _validation_batch(spec, cnn)
    error, agree = identity_error(cnn, tcnn, images)
    passed = error <= TOLERANCE
    result = dict(
        passed=passed,
        max_relative_error=error,
        top1_agreement=agree,
        tolerance=TOLERANCE,
        images=len(images),
        input_size=list(images.shape[1:]),
        converted_layers=len(list(attention_layers(tcnn))),
        cnn_parameters=sum(p.numel() for p in cnn.parameters()),
        tcnn_parameters=sum(p.numel() for p in tcnn.parameters()),
    )
    if not passed:
        result['reason'] = f'T-CNN logits differ from the CNN\'s: max relative error {error:.2e} > {TOLERANCE:.0e}'
    else:
        _save(cnn, out / 'cnn.safetensors')
        _save(tcnn, out / 'tcnn_converted.safetensors')
        try:
            _analyze_conversion(spec, tcnn, cnn, out)
        except TcnnError as e:
            result.update(passed=False, reason=f'the attention analysis of the converted T-CNN failed: {e}')
    atomic_write(out / 'identity.json', json.dumps(result, indent=2) + '\n')
    print(
        f'identity: max relative error {error:.2e} (tolerance {TOLERANCE:.0e}), top-1 agreement {agree:.0%} '
        f'on {len(images)} validation images'
    )
    return result


def start_step(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """Transfer: the CNN both arms of `step.seed` start from, its classifier replaced by a new random one of
    `spec.num_classes` outputs (timm's `reset_classifier`) drawn with the seed. The T-CNN arm converts it on load,
    so both arms start with the same classifier."""
    cnn = load_cnn(spec)
    classes = cnn.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step.seed)
        cnn.reset_classifier(spec.num_classes)
    _save(cnn, Path(step.result))
    print(
        f'start: {classes}-class classifier of the starting weights replaced by a '
        f'random {spec.num_classes}-class one (seed {step.seed})'
    )
    return dict(passed=True)
