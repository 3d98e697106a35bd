""" Building any timm model (T-CNNs included) with its weights from the Hub or a checkpoint file. """
import difflib
import re
from typing import Any, Optional

import timm
import torch.nn as nn

from .convert import convert_cnn_state_dict
from .io import load_checkpoint_state_dict

__all__ = ['unknown_model_hint', 'create_model_with_weights']

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


def create_model_with_weights(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, pretrained, **kwargs)`, then `checkpoint` loaded strictly.

    The checkpoint is read safely (`load_checkpoint_state_dict`); a CNN checkpoint given for a T-CNN is
    converted exactly. Raises ValueError for an unknown name (with the closest names) or a checkpoint that
    does not fit (with what it holds, for T-CNNs).
    """
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        hint = unknown_model_hint(e)
        if hint is None:
            raise
        raise ValueError(f'{e}. {hint}') from None
    if checkpoint:
        state_dict = convert_cnn_state_dict(load_checkpoint_state_dict(checkpoint, use_ema=use_ema), model)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(
                f'Checkpoint {checkpoint} does not match {name} (model kwargs {kwargs}): was it saved from another '
                f'variant or with other model kwargs (e.g. tcnn_stages, num_classes)?\n{e}') from None
    return model
