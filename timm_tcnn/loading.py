""" Building any timm model (T-CNNs included) with its weights from the Hub or a checkpoint file. """
import difflib
import re
from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn

from .checkpoints import describe_mismatch
from .convert import convert_cnn_state_dict
from .errors import InputError
from .hub import require_hub_weights
from .io import load_checkpoint_state_dict
from .numerics import check_finite

__all__ = ['unknown_model_hint', 'create_model', 'check_fits', 'create_model_with_weights']

_UNKNOWN_MODEL = re.compile(r'Unknown model \((.+)\)')


def unknown_model_hint(exc: BaseException) -> Optional[str]:
    """For timm's `RuntimeError('Unknown model (name)')`, the closest registered names; else None."""
    match = _UNKNOWN_MODEL.fullmatch(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None:
        return None
    name = match.group(1)
    close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
    suggestion = f'Did you mean {close[0]!r}? ' if close else ''
    return f'{suggestion}{name!r} is not a registered model; T-CNN models: {", ".join(timm.list_models("tcnn_*"))}.'


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, with an unknown name (closest names suggested) or bad model kwargs as `InputError`;
    with `pretrained=True`, Hub weights that are neither cached nor downloadable fail within seconds."""
    cfg = timm.models.get_pretrained_cfg(name) if kwargs.get('pretrained') and timm.is_model(name) else None
    if cfg is not None and cfg.hf_hub_id:
        require_hub_weights(cfg.hf_hub_id)
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        hint = unknown_model_hint(e)
        if hint is None:
            raise
        raise InputError(f'{e}. {hint}') from None
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        options = {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg')}
        raise InputError(f'cannot build {name} with {options}: {e}') from None


def check_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise an `InputError` unless `state_dict` has exactly `model`'s keys and shapes, saying which
    registered T-CNN, class count or model kwargs it fits."""
    own = model.state_dict()
    if set(own) == set(state_dict) and all(state_dict[k].shape == v.shape for k, v in own.items()):
        return
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    raise InputError(f'{source} does not fit {name}: {describe_mismatch(state_dict, model)}')


def create_model_with_weights(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, pretrained, **kwargs)`, then `checkpoint` loaded strictly.

    The checkpoint is read safely (`load_checkpoint_state_dict`); a CNN checkpoint given for a T-CNN is
    converted exactly. Raises `InputError` for an unknown name (with the closest names), weights holding
    NaN or Inf (named), or a checkpoint that does not fit (saying which variant and class count it fits).
    """
    state_dict = load_checkpoint_state_dict(checkpoint, use_ema=use_ema) if checkpoint else None
    if state_dict is not None:
        check_finite(state_dict, f'checkpoint {checkpoint}')
    model = create_model(name, pretrained=pretrained, **kwargs)
    if state_dict is None:
        if pretrained:
            check_finite(model.state_dict(), f'the pretrained weights of {name}')
        return model
    state_dict = convert_cnn_state_dict(state_dict, model)
    check_fits(state_dict, model, f'checkpoint {checkpoint}')
    model.load_state_dict(state_dict)
    return model
