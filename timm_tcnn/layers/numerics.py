""" Numerics of the attention layer: rate-scaled and straight-through parameters, float32 logits under
autocast (float64 for float64 layers), and attention tensors that never hold a subnormal number.

Subnormal floats (below float32's smallest normal, ~1.2e-38) can make CPU arithmetic, GEMMs above all, many times
slower (GPUs compute with them at full speed). On CPU the attention never produces one, by construction: the Gaussian
positional attention is 0 or >= exp(-35) (so a product with a gate >= 1e-22 stays normal); content logits more than 40
below their row's maximum are raised to that level (probabilities >= exp(-40) / N, a change of < 1e-17 each); weights
cast to float16 are 0 or >= its smallest normal. Defaults are arguments so that TorchScript reads them as constants.
"""
import contextlib
import math
from typing import ContextManager

import torch
import torch.nn.functional as F

__all__ = [
    'straight_through_clamp', 'rate_scaled', 'default_block_bytes', 'exp_without_subnormals',
    'raise_to_range_', 'softmax_without_subnormals_', 'cast_without_subnormals', 'attention_dtype',
    'mixing_dtype', 'tokens_of', 'autocast_off',
]


def straight_through_clamp(x: torch.Tensor, min_value: float = 0., max_value: float = 1.) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass."""
    return x + (x.clamp(min_value, max_value) - x).detach()


def rate_scaled(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`stored * scale` in the forward pass; the backward pass gives `stored` the gradient of the product
    itself (not scale times it), so an optimizer step of size lr on `stored` moves the value by scale x lr."""
    return stored.detach() * scale + (stored - stored.detach())


def default_block_bytes(device: torch.device, cpu: int = 8 * 2 ** 20, cuda: int = 512 * 2 ** 20) -> int:
    """Default bound on the float32 attention materialised at once (`attention_block_bytes`) on `device`:
    about a CPU's last-level cache; on a GPU (tens of MB of L2, launch-bound at small kernels), 512 MiB, which
    keeps a batch of 128 at ResNet-50 stage-3 shapes in one or two blocks."""
    return cuda if device.type == 'cuda' else cpu


def exp_without_subnormals(logits: torch.Tensor, log_floor: float = -35.) -> torch.Tensor:
    """exp(logits), 0 where logits <= `log_floor`: every value is 0 or >= exp(log_floor), none subnormal."""
    return F.threshold(logits, log_floor, -math.inf).exp()


def raise_to_range_(logits: torch.Tensor, logit_range: float = 40.) -> torch.Tensor:
    """Fresh logits raised in place to at least `logit_range` below their row's (last dimension's) maximum, so
    that a softmax or logsumexp over them computes no subnormal exponential: each weight is >= exp(-logit_range)
    / N and moves by less than that. The raise is invisible to autograd (a straight-through estimate of a
    gradient that is < exp(-logit_range) anyway), so backward passes are those of the plain softmax."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        # graphs are functional: the same raise, out of place (fused by compilers)
        floor = logits.detach().amax(dim=-1, keepdim=True) - logit_range
        return logits + (torch.maximum(logits, floor) - logits).detach()
    with torch.no_grad():
        logits.clamp_(min=logits.amax(dim=-1, keepdim=True) - logit_range)
    return logits


def softmax_without_subnormals_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of fresh float32 logits, on CPU never subnormal (`raise_to_range_`). GPUs
    compute with subnormal numbers at full speed, so there the raise (three passes) is skipped."""
    if logits.device.type == 'cpu':
        logits = raise_to_range_(logits)
    return logits.softmax(dim=-1)


def cast_without_subnormals(
        attn: torch.Tensor, dtype: torch.dtype, float16_tiny: float = 6.103515625e-05) -> torch.Tensor:
    """Attention weights (float32, >= 0) cast to the compute dtype. For float16, whose smallest normal is
    6.1e-5, smaller weights are set to 0 first (float32 and bfloat16 share float32's range)."""
    if dtype == torch.float16:
        attn = F.threshold(attn, float16_tiny, 0.)
    return attn.to(dtype)


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the attention (logits, softmax, positional attention, gate values) for parameters or maps of
    `dtype`: float64 for float64, float32 for every other (float16 and bfloat16 included, whatever autocast says)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device) -> ContextManager:
    """A context with autocast disabled for `device`'s type (nothing to disable where it has none, as meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def mixing_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the mixing GEMM computes in: autocast's for x's device where it is enabled, else x's own."""
    if torch.jit.is_scripting():
        return x.dtype  # scripted code does not autocast
    return _autocast_dtype(x)


@torch.jit.unused
def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype  # autocast off, or no autocast for this device type (meta)


def tokens_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C) in `dtype`: a view of x in its own layout (NCHW or channels-last), copied only
    to change the dtype (once per call, not per block of queries)."""
    return x.flatten(2).transpose(1, 2).to(dtype)
