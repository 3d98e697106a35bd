""" Checks that weights can be used: every value finite, and exactly the keys and shapes of the model. """
from typing import List, Mapping

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.state_dicts import describe_mismatch

__all__ = ['nonfinite_tensors', 'check_finite', 'check_fits']


def nonfinite_tensors(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the floating point tensors holding NaN or Inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise an `InputError` naming the tensors if any weight of `source` is NaN or Inf."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
        raise InputError(
            f'{source} holds NaN or Inf values in {", ".join(bad[:3])}{more}: training diverged or the file is '
            f'damaged. Use an earlier checkpoint.')


def check_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise an `InputError` unless `state_dict` has exactly `model`'s keys and shapes, saying which
    registered T-CNN, class count or model kwargs it fits."""
    own = model.state_dict()
    if set(own) == set(state_dict) and all(state_dict[k].shape == v.shape for k, v in own.items()):
        return
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    raise InputError(f'{source} does not fit {name}: {describe_mismatch(state_dict, model)}')
