""" The experiment's first step: the T-CNN built from the CNN weights gives the CNN's logits on real images. """
import json
from pathlib import Path
from typing import Any, Dict

import timm
import torch
from safetensors.torch import save_file
from timm.data import ImageDataset, create_transform, resolve_data_config

from ..convert import attention_layers, convert_cnn_state_dict
from ..hub import require_hub_weights
from ..io import atomic_path, atomic_write, load_checkpoint_state_dict
from ..numerics import relative_error
from .spec import ExperimentSpec, Step, analyze_argv

__all__ = ['load_cnn', 'identity_check', 'start_step', 'TOLERANCE']

TOLERANCE = 1e-4  # max |T-CNN - CNN| / max |CNN| over the logits


def load_cnn(spec: ExperimentSpec) -> torch.nn.Module:
    """The CNN the experiment starts from: `cnn_checkpoint` (class count read from its classifier) or
    timm's pretrained weights of `cnn_model`."""
    if spec.cnn_checkpoint:
        state_dict = load_checkpoint_state_dict(spec.cnn_checkpoint)
        probe = timm.create_model(spec.cnn_model, pretrained=False, device='meta', **spec.model_kwargs)
        classifier = probe.pretrained_cfg.get('classifier', 'fc')
        num_classes = state_dict[f'{classifier}.weight'].shape[0] if f'{classifier}.weight' in state_dict else 0
        cnn = timm.create_model(spec.cnn_model, num_classes=num_classes, **spec.model_kwargs)
        cnn.load_state_dict(state_dict)
        return cnn
    require_hub_weights(timm.models.get_pretrained_cfg(spec.cnn_model).hf_hub_id)
    return timm.create_model(spec.cnn_model, pretrained=True, **spec.model_kwargs)


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


def identity_check(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """Compare the T-CNN's logits with the CNN's on validation images, save both weights (the CNN's as
    `identity/cnn.safetensors`, reference of weight drift) and analyse the T-CNN at conversion."""
    from ..cli import main as cli_main

    out = spec.root / 'identity'
    out.mkdir(parents=True, exist_ok=True)
    cnn = load_cnn(spec).eval()
    tcnn = timm.create_model(spec.model, num_classes=cnn.num_classes, **spec.arm_kwargs('tcnn'))
    tcnn.load_state_dict(convert_cnn_state_dict(cnn.state_dict(), tcnn))
    tcnn.eval()
    images = _validation_batch(spec, cnn)
    ref = cnn(images).detach()
    with torch.enable_grad():  # the attention computation itself, not the inference shortcut to conv2d
        logits = tcnn(images).detach()
    error = relative_error(logits, ref)  # inf for NaN or Inf
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    passed = error <= TOLERANCE
    result = dict(
        passed=passed, max_relative_error=error, top1_agreement=agree, tolerance=TOLERANCE,
        images=len(images), input_size=list(images.shape[1:]), converted_layers=len(list(attention_layers(tcnn))),
        cnn_parameters=sum(p.numel() for p in cnn.parameters()), tcnn_parameters=sum(p.numel() for p in tcnn.parameters()),
    )
    if not passed:
        result['reason'] = f'T-CNN logits differ from the CNN\'s: max relative error {error:.2e} > {TOLERANCE:.0e}'
    else:
        _save(cnn, out / 'cnn.safetensors')
        _save(tcnn, out / 'tcnn_converted.safetensors')
        code = cli_main(analyze_argv(spec, str(out / 'tcnn_converted.safetensors'), spec.root / 'analyze' / 'conversion',
                                     {**spec.arm_kwargs('tcnn'), 'num_classes': cnn.num_classes}))
        if code:
            result.update(passed=False, reason='timm-tcnn analyze failed on the converted T-CNN')
    atomic_write(out / 'identity.json', json.dumps(result, indent=2) + '\n')
    print(f'identity: max relative error {error:.2e} (tolerance {TOLERANCE:.0e}), top-1 agreement {agree:.0%} '
          f'on {len(images)} validation images')
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
    print(f'start: {classes}-class classifier of the starting weights replaced by a '
          f'random {spec.num_classes}-class one (seed {step.seed})')
    return dict(passed=True)
