""" Comparing outputs and checking weights: the identity error, and finite values everywhere. """
import math
from typing import List, Mapping

import torch

from .errors import InputError

__all__ = ['error_ratio', 'relative_error', 'nonfinite_tensors', 'check_finite']


def error_ratio(max_diff: float, max_ref: float) -> float:
    """`max_diff / max_ref`; inf if either is NaN or Inf, 0 for 0 / 0."""
    if not (math.isfinite(max_diff) and math.isfinite(max_ref)):
        return math.inf
    if max_ref == 0:
        return 0. if max_diff == 0 else math.inf
    return max_diff / max_ref


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, or inf if either holds NaN or Inf: a non-finite output never passes
    a tolerance check (`error <= tol`) nor hides in a running maximum."""
    out, ref = out.detach(), ref.detach()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.inf
    return error_ratio((out - ref).abs().max().item(), ref.abs().max().item())


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
