""" The identity check of a conversion: a T-CNN built from a CNN's weights gives the CNN's logits. """
from typing import Tuple

import torch
import torch.nn as nn

from ..models.convert import convert_cnn_state_dict
from ..utils.numerics import relative_error

__all__ = ['TOLERANCE', 'load_converted', 'identity_error']

TOLERANCE = 1e-4  # default largest accepted max |T-CNN - CNN| / max |CNN| over the logits


def load_converted(tcnn: nn.Module, cnn: nn.Module) -> nn.Module:
    """Load `cnn`'s weights into `tcnn`, a T-CNN of its architecture, converted exactly; returns `tcnn`."""
    tcnn.load_state_dict(convert_cnn_state_dict(cnn.state_dict(), tcnn))
    return tcnn


def identity_error(cnn: nn.Module, tcnn: nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    """(max relative error of the T-CNN's logits against the CNN's, share of equal top-1 predictions) on `x`.

    The T-CNN runs its attention computation (autograd on), not the inference shortcut that runs a still-unchanged
    layer as its convolution; the error is infinite when any logit is NaN or Inf.
    """
    with torch.no_grad():
        ref = cnn(x)
    with torch.enable_grad():
        out = tcnn(x).detach()
    return relative_error(out, ref), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
