""" What a checkpoint holds, read from its entries: architecture, class count and T-CNN options. """
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn as nn

from ..layers import RATE_SCALED_PARAMS
from .convert import attention_layers, conv_stages
from .variants import VARIANTS

__all__ = ['ATTENTION_PARAMS', 'attention_layer_names', 'checkpoint_options', 'fitting_variants', 'describe_mismatch']

# the entries a converted layer holds beyond its convolution's `weight` and `bias`
ATTENTION_PARAMS = (*RATE_SCALED_PARAMS, 'gate_lr_scale', 'qk.weight')


def attention_layer_names(state_dict: Mapping[str, Any]) -> List[str]:
    """Names of the converted layers whose entries a T-CNN state dict holds, in its order."""
    return [k[:-len('.content_gate')] for k in state_dict if k.endswith('.content_gate')]


def _classifier(model: nn.Module) -> Optional[str]:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')


def _num_classes(state_dict: Mapping[str, Any], classifier: Optional[str]) -> Optional[int]:
    weight = state_dict.get(f'{classifier}.weight') if classifier else None
    return None if weight is None else int(weight.shape[0])


def _stride(module: nn.Module) -> int:
    stride = module.stride
    return stride if isinstance(stride, int) else stride[0]


def checkpoint_options(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, Any]:
    """The model kwargs a checkpoint of `model`'s architecture was saved with, as far as its entries tell.

    `num_classes` from the classifier; `tcnn_stages` from which of `model`'s spatial convolutions hold
    attention entries in the checkpoint, `tcnn_convert_strided` from whether the strided ones do, `tcnn_qk_dim`
    from the shape of the joint query-key projection `qk.weight` (heads * 2 * qk_dim, C), `tcnn_gate_lr_scale` from
    the stored scale. A CNN checkpoint yields no `tcnn_*` key.
    """
    options: Dict[str, Any] = {}
    num_classes = _num_classes(state_dict, _classifier(model))
    if num_classes is not None:
        options['num_classes'] = num_classes
    converted = set(attention_layer_names(state_dict))
    stage_of = {name: stage for name, stage in conv_stages(model).items() if f'{name}.weight' in state_dict}
    layers = [name for name in stage_of if name in converted]
    if not layers:
        return options
    stages = sorted({stage_of[name] for name in layers})
    options['tcnn_stages'] = tuple(stages)
    modules = dict(model.named_modules())
    strided = [name for name, stage in stage_of.items() if stage in stages and _stride(modules[name]) > 1]
    if strided:
        options['tcnn_convert_strided'] = any(name in converted for name in strided)
    heads = state_dict[f'{layers[0]}.weight'].shape[-1] ** 2
    options['tcnn_qk_dim'] = int(state_dict[f'{layers[0]}.qk.weight'].shape[0]) // 2 // heads
    scale = state_dict.get(f'{layers[0]}.gate_lr_scale')
    if scale is not None:
        options['tcnn_gate_lr_scale'] = float(scale)
    return options


def _cnn_signature(state_dict: Mapping[str, Any], classifier: Optional[str]) -> Dict[str, Tuple[int, ...]]:
    """Entry name -> shape, without the classifier and the attention-only entries."""
    converted = attention_layer_names(state_dict)
    extra = {f'{layer}.{entry}' for layer in converted for entry in ATTENTION_PARAMS}
    skip = (f'{classifier}.weight', f'{classifier}.bias') if classifier else ()
    return {k: tuple(v.shape) for k, v in state_dict.items() if k not in extra and k not in skip}


@lru_cache(maxsize=None)
def _architecture_signature(cnn: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    model = timm.create_model(cnn, device='meta')  # no memory, but timm's init still takes up to seconds
    return tuple(_cnn_signature(model.state_dict(), _classifier(model)).items())


def fitting_variants(state_dict: Mapping[str, Any]) -> List[str]:
    """Registered T-CNNs whose architecture (classifier aside) has exactly the checkpoint's entries and shapes.

    Only CNNs whose stem and classifier (from their pretrained cfg) the checkpoint holds are built, on the meta
    device."""
    fits = []
    for row in VARIANTS.values():
        cfg = timm.models.get_pretrained_cfg(row.cnn)
        if f'{cfg.first_conv}.weight' not in state_dict or f'{cfg.classifier}.weight' not in state_dict:
            continue
        if _cnn_signature(state_dict, cfg.classifier) == dict(_architecture_signature(row.cnn)):
            fits.append(row.name)
    return fits


def _layer_summary(names: List[str]) -> str:
    """Converted layers counted per top-level module, e.g. 'layer3: 1, layer4: 3'."""
    counts: Dict[str, int] = {}
    for name in names:
        counts[name.split('.')[0]] = counts.get(name.split('.')[0], 0) + 1
    return ', '.join(f'{stage}: {n}' for stage, n in counts.items()) or 'none'


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ' '.join(f"'{k}={v}'" if ' ' in str(v) else f'{k}={v}' for k, v in kwargs.items())


@torch.no_grad()
def describe_mismatch(state_dict: Mapping[str, Any], model: nn.Module) -> str:
    """Why a checkpoint does not fit `model`, and the model kwargs (`--model-kwargs`) that rebuild it."""
    kind = 'a T-CNN' if attention_layer_names(state_dict) else 'a CNN'
    classifier = _classifier(model)
    ckpt, own = _cnn_signature(state_dict, classifier), _cnn_signature(model.state_dict(), classifier)
    if ckpt != own:
        fits = fitting_variants(state_dict)
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        only_ckpt = [k for k in ckpt if k not in own]
        only_model = [k for k in own if k not in ckpt]
        shapes = [k for k in ckpt if k in own and ckpt[k] != own[k]]
        where = (f'It fits {" or ".join(fits)}.' if fits else
                 'No registered T-CNN has this architecture: pass the architecture kwargs it was trained with.')
        return (f'The checkpoint is {kind} of another architecture than {name} ({len(only_ckpt)} entries only in '
                f'the checkpoint, e.g. {only_ckpt[:2]}; {len(only_model)} only in the model, e.g. {only_model[:2]}; '
                f'{len(shapes)} of other shapes, e.g. {shapes[:2]}). {where}')
    found = checkpoint_options(state_dict, model)
    own = checkpoint_options(model.state_dict(), model)
    differ = {k: v for k, v in found.items() if own.get(k) != v}
    lines = [f'The checkpoint is {kind} of this architecture.']
    if 'num_classes' in differ:
        lines.append(f'It has {found["num_classes"]} classes, this model {own.get("num_classes")}: '
                     f'pass num_classes={found["num_classes"]}.')
    if kind == 'a CNN':
        return ' '.join(lines)
    if differ:
        lines.append(
            f'It was saved with {_kwargs_text(found)}; this model has {_kwargs_text(own)}. Rebuild it with '
            f'--model-kwargs {_kwargs_text(differ)} (in Python: {", ".join(f"{k}={v}" for k, v in differ.items())}).')
    ckpt_layers = sorted(attention_layer_names(state_dict))
    model_layers = sorted(name for name, _ in attention_layers(model))
    if ckpt_layers != model_layers:
        only_ckpt = [n for n in ckpt_layers if n not in model_layers][:4]
        only_model = [n for n in model_layers if n not in ckpt_layers][:4]
        lines.append(f'Converted layers differ: checkpoint {_layer_summary(ckpt_layers)}, model '
                     f'{_layer_summary(model_layers)} (only in checkpoint {only_ckpt}, only in model {only_model}).')
    return ' '.join(lines)
