""" Comparing outputs: the relative error of the identity checks, infinite for NaN or Inf. """
import math

import torch

__all__ = ['error_ratio', 'relative_error']


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
