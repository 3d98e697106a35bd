""" The `fused` path: content attention through `torch.nn.functional.scaled_dot_product_attention`.

    mixed = P . x  +  g * SDPA(q, k, v = x for every head)

The positional part P (Nq, heads, N) is the same for every sample, so it mixes the batch with one GEMM; the
content part never holds an attention-sized tensor on CUDA, where SDPA runs flash, memory-efficient or cuDNN
kernels (the keys and queries are `qk_dim` wide, the values full width; SDPA picks a backend that accepts the
widths, or its math fallback). The gradient floor is kept by two small autograd functions around the call:
`FlooredHeadScale` gives SDPA the output gradient of a gate at least `grad_floor` (so queries and keys learn as
the explicit path's do), and `SharedValues` takes the floor back out of the values' gradient.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .functions import MixGeometry, query_maps, split_qk
from .numerics import mixing_dtype, tokens_of

__all__ = ['FlooredHeadScale', 'SharedValues', 'fused_mix']


class FlooredHeadScale(torch.autograd.Function):
    """o * g per head: o (B, heads, Nq, C), g (heads,) float32. Backward: o gets max(g, floor) * grad, g its true
    gradient <grad, o>."""

    @staticmethod
    def forward(ctx, content: torch.Tensor, gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
        ctx.save_for_backward(content, gate)
        ctx.grad_floor = grad_floor
        return content * gate[:, None, None].to(content.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        content, gate = ctx.saved_tensors
        grad_content = grad * gate.clamp(min=ctx.grad_floor)[:, None, None].to(grad.dtype)
        grad_gate = (grad * content).float().sum((0, 2, 3))
        return grad_content, grad_gate, None


class SharedValues(torch.autograd.Function):
    """tokens (B, N, C) -> values (B, heads, N, C), a stride-0 view over heads. Backward: the heads' gradients summed,
    each weighted by `ratio` (heads,) = g / max(g, floor), undoing `FlooredHeadScale`'s floor on the value path."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ratio)
        return tokens[:, None].expand(-1, ratio.shape[0], -1, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ratio, = ctx.saved_tensors
        return torch.einsum('bhnc,h->bnc', grad, ratio.to(grad.dtype)), None


def _queries_keys(maps: torch.Tensor, qk_weight: torch.Tensor, geometry: MixGeometry) -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, heads, Nq, d) and keys (B, heads, N, d), d contiguous (as SDPA's kernels read them)."""
    d = geometry.qk_dim
    q_weight, k_weight = split_qk(qk_weight, d, maps.dtype)
    queries = query_maps(maps, geometry).flatten(2).transpose(1, 2)
    q = F.linear(queries, q_weight).unflatten(-1, (-1, d)).transpose(1, 2)
    k = F.linear(tokens_of(maps, maps.dtype), k_weight).unflatten(-1, (-1, d)).transpose(1, 2)
    return q, k


def fused_mix(x: torch.Tensor, qk_weight: torch.Tensor, positional: torch.Tensor, gate: torch.Tensor,
              geometry: MixGeometry, grad_floor: float) -> torch.Tensor:
    """What `content_mix` computes, (B, Nq, heads, C) in the mixing dtype, with the content attention fused: maps x
    (B, C, H, W), the joint query and key projection (heads * 2 * d, C), positional (Nq, heads, N) float32, gate (heads,) float32."""
    maps = x.to(mixing_dtype(x))
    tokens = tokens_of(maps, maps.dtype)
    B, N, C = tokens.shape
    num_queries, heads = positional.shape[:2]
    mixed = torch.matmul(positional.to(maps.dtype).view(num_queries * heads, N), tokens)  # B, Nq * heads, C
    q, k = _queries_keys(maps, qk_weight, geometry)
    ratio = gate.detach() / gate.detach().clamp(min=max(grad_floor, 1e-30))
    values = SharedValues.apply(tokens, ratio)
    content = F.scaled_dot_product_attention(q, k, values, scale=geometry.scale)  # B, heads, Nq, C
    content = FlooredHeadScale.apply(content, gate, grad_floor)
    return mixed.view(B, num_queries, heads, C) + content.transpose(1, 2)
