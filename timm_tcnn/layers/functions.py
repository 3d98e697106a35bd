""" Autograd functions of the attention layer's eager training path, each with a hand-written backward pass
that issues a few large operations where autograd would issue many small ones.

- `ScaledValues`: the four gate and positional parameters -> one (5 * heads,) vector of values in the attention's dtype
  (rate-scaled, gates clamped to [0, 1] with a straight-through gradient).
- `AttentionMix`: maps and values -> the positional attention (its builder's), queries and keys of every
  head (one GEMM per sample), content softmax blended with the positional attention, mixing the full-width tokens
  of every head; queries processed in blocks (`content_mix`, also the inference path's).

`floored_blend` and `content_mix_reference` are the same maths in standard operations, for scripted, traced and
compiled graphs and as the references the functions are tested against.
"""
from typing import Any, List, NamedTuple, Tuple

import torch

from .numerics import (
    attention_dtype,
    autocast_off,
    cast_without_subnormals,
    mixing_dtype,
    softmax_without_subnormals_,
    tokens_of,
)

__all__ = [
    'ScaledValues', 'AttentionMix', 'content_mix', 'MixGeometry', 'query_maps', 'split_qk', 'projection_weight',
    'project_qk', 'floored_blend', 'content_mix_reference',
]


class ScaledValues(torch.autograd.Function):
    """(content_gate, locality_gate, pos_log_alpha (heads,), pos_center (heads, 2)) stored / scale -> their values
    (5 * heads,) in `attention_dtype` (float32; float64 for float64 parameters): stored * scale, gates clamped to
    [0, 1]. Backward: each stored parameter gets the gradient of its value (rate scaling: an optimizer step of lr moves
    the value by scale x lr; straight-through: a gate at 0 still gets its one-sided gradient), as contiguous slices of
    one vector."""

    @staticmethod
    def forward(ctx, content_gate, locality_gate, log_alpha, center, scale):
        values = torch.cat([content_gate, locality_gate, log_alpha, center.flatten()])
        values = values.to(attention_dtype(values.dtype)).mul_(scale)
        heads = content_gate.shape[0]
        values[: 2 * heads].clamp_(0.0, 1.0)
        ctx.dtypes = content_gate.dtype, center.shape
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dtype, center_shape = ctx.dtypes
        heads = center_shape[0]
        grad = grad.to(dtype)
        return (
            grad[:heads],
            grad[heads : 2 * heads],
            grad[2 * heads : 3 * heads],
            grad[3 * heads :].view(center_shape),
            None,
        )


class MixGeometry(NamedTuple):
    """What `content_mix` needs to know of the maps: input (height, width), stride, first query (row, col), the
    query/key width per head, the logit scale, the number of queries per block, and whether queries are projected
    at every position (one GEMM for queries and keys) or, with stride 2, only at the query positions (two GEMMs,
    a quarter of the queries' multiply-adds: `project_qk`)."""

    height: int
    width: int
    stride: int
    query_start: Tuple[int, int]
    qk_dim: int
    scale: float
    block: int
    queries_everywhere: bool = True


def _query_grid(geometry: MixGeometry) -> Tuple[int, int]:
    s = geometry.stride
    return (geometry.height - 1) // s + 1, (geometry.width - 1) // s + 1


def query_maps(x: torch.Tensor, geometry: MixGeometry) -> torch.Tensor:
    """The maps at the query positions: x itself for stride 1, a strided view for stride 2."""
    if geometry.stride == 1:
        return x
    (row0, col0), s = geometry.query_start, geometry.stride
    return x[:, :, row0::s, col0::s]


def split_qk(qk_weight: torch.Tensor, qk_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(2, heads * d, C) query and key weights in `dtype`, one copy, of the joint projection (heads * 2 * d, C)
    (per head, its d query rows then its d key rows)."""
    heads = qk_weight.shape[0] // (2 * qk_dim)
    weights = qk_weight.new_empty(2, heads, qk_dim, qk_weight.shape[1], dtype=dtype)
    return weights.copy_(qk_weight.view(heads, 2, qk_dim, -1).transpose(0, 1)).view(2, heads * qk_dim, -1)


def projection_weight(qk_weight: torch.Tensor, geometry: MixGeometry, dtype: torch.dtype) -> torch.Tensor:
    """What `project_qk` multiplies by, in `dtype`: the joint weight (heads * 2 * d, C), or (2, heads * d, C) split
    (`split_qk`) where queries are projected at their positions only. One copy at most, kept for the backward pass."""
    if geometry.queries_everywhere:
        return qk_weight.to(dtype)
    return split_qk(qk_weight, geometry.qk_dim, dtype)


def project_qk(
    maps: torch.Tensor, weight: torch.Tensor, geometry: MixGeometry, precision: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries (B * heads, d, Nq) and keys (B * heads, d, N) in `precision` (the attention's dtype), of (B, C, H, W)
    maps and `projection_weight` in their dtype, reading NCHW or channels-last maps in place.

    With `geometry.queries_everywhere`, one GEMM per sample whose (B * heads, 2, d, N) output the keys are a view
    of, and the queries too for stride 1; for stride 2 they are copied from the query positions (4x the queries'
    multiply-adds for one launch and one copy fewer: a GPU's choice). Otherwise two GEMMs, the queries' at the
    query positions only (a CPU's choice for stride 2)."""
    B, d = maps.shape[0], geometry.qk_dim
    if geometry.queries_everywhere:
        heads = weight.shape[0] // (2 * d)
        qk = torch.bmm(weight.expand(B, -1, -1), maps.flatten(2)).to(precision).view(B * heads, 2, d, -1)
        if geometry.stride == 1:
            return qk[:, 0], qk[:, 1]
        queries = query_maps(qk[:, 0].unflatten(-1, maps.shape[-2:]), geometry)
        return queries.reshape(B * heads, d, -1), qk[:, 1]
    heads = weight.shape[1] // d
    q = torch.bmm(weight[0].expand(B, -1, -1), query_maps(maps, geometry).flatten(2)).to(precision)
    k = torch.bmm(weight[1].expand(B, -1, -1), maps.flatten(2)).to(precision)
    return q.view(B * heads, d, -1), k.view(B * heads, d, -1)


def query_blocks(num_queries: int, block: int) -> List[Tuple[int, int]]:
    return [(start, min(start + block, num_queries)) for start in range(0, num_queries, block)]


def content_mix(
    x: torch.Tensor,
    qk_weight: torch.Tensor,
    positional: torch.Tensor,
    gate: torch.Tensor,
    geometry: MixGeometry,
    for_backward: bool = True,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """x A_h^T for every head h, A = positional + gate * softmax(scale * q k), without autograd: maps x (B, C, H, W),
    the joint query and key projection (heads * 2 * d, C), positional (Nq, heads, N) in the attention's dtype, gate
    (heads,) -> mixed (B, Nq, heads, C) in the mixing dtype (`mixing_dtype`: autocast's, else x's), and what the
    backward pass reads: the maps and projection weight in that dtype, queries, keys and the softmax of each block of
    queries. Queries, keys and softmax are in the positional attention's dtype (`softmax_without_subnormals_`);
    queries go in blocks of `geometry.block`. Without `for_backward` (inference) nothing is kept: each block's softmax
    is freed before the next one's."""
    dtype = mixing_dtype(x)
    num_queries, heads = positional.shape[:2]
    with autocast_off(x.device):
        maps = x.to(dtype)
        tokens = tokens_of(maps, dtype)
        B, N, C = tokens.shape
        weight = projection_weight(qk_weight, geometry, dtype)
        queries, keys = project_qk(maps, weight, geometry, positional.dtype)
        mixed = tokens.new_empty(B, num_queries, heads, C)
        probs_blocks = []
        for start, stop in query_blocks(num_queries, geometry.block):
            block_queries = queries[:, :, start:stop].transpose(1, 2)
            logits = torch.baddbmm(keys.new_empty(()), block_queries, keys, beta=0.0, alpha=geometry.scale)
            probs = softmax_without_subnormals_(logits).view(B, heads, stop - start, N)
            attn = _blended(positional[start:stop], probs, gate[:, None], dtype)
            torch.bmm(attn, tokens, out=mixed[:, start:stop].view(B, -1, C))
            if for_backward:
                probs_blocks.append(probs)
    return mixed, [maps, weight, queries, keys] + probs_blocks if for_backward else []


def _blended(positional: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, block * heads, N) attention positional + gate * probs in `dtype`, rows in the order the mixing GEMM
    reads."""
    B, heads, block, N = probs.shape
    # float32 and bfloat16 share float32's range: written in `dtype` directly; float16 through float32, its values
    # below float16's smallest normal set to 0 (`cast_without_subnormals`)
    out = probs.new_empty(B, block, heads, N, dtype=torch.float32 if dtype == torch.float16 else dtype)
    attn = torch.addcmul(positional, probs.transpose(1, 2), gate, out=out)
    return cast_without_subnormals(attn, dtype).view(B, block * heads, N)


class AttentionMix(torch.autograd.Function):
    """The attention of every head built and applied in one function: maps x (B, C, H, W), the joint query and key
    projection (heads * 2 * d, C), the packed values (5 * heads,) (`ScaledValues`) and the builder of the positional
    attention (`ClosedFormPositional` or `KernelPositional`) -> mixed (B, Nq, heads, C), `content_mix` of the
    positional attention and the content gates.

    Stores each block's softmax, not A: the backward pass recomputes A (one pass) where autograd would keep both.
    Backward, per block: three passes over the attention and no temporary (the softmax's row sums r = <grad, p>
    also give the gate's gradient); then the builder's backward pass on the positional attention's gradient (the sum
    of the attention's over the batch), which gives the values' gradient, gates included. Queries and keys learn as if
    their gate were at least `grad_floor`; the maps' gradient sums the mixing's and the projection's in place.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        qk_weight: torch.Tensor,
        values: torch.Tensor,
        builder: Any,
        geometry: MixGeometry,
        grad_floor: float,
    ) -> torch.Tensor:
        positional, positional_saved = builder.forward(values, grad_floor)
        heads = positional.shape[1]
        mixed, saved = content_mix(x, qk_weight, positional, values[:heads], geometry)
        ctx.save_for_backward(positional, values, *positional_saved, *saved)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, qk_weight.dtype
        ctx.builder, ctx.num_positional_saved = builder, len(positional_saved)
        ctx.geometry, ctx.grad_floor, ctx.dtype = geometry, grad_floor, mixed.dtype
        return mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        positional, values, *saved = ctx.saved_tensors
        positional_saved = tuple(saved[: ctx.num_positional_saved])
        maps, weight, queries, keys, *probs_blocks = saved[ctx.num_positional_saved :]
        geometry, dtype = ctx.geometry, ctx.dtype
        num_queries, heads = positional.shape[:2]
        gate = values[:heads, None]
        tokens = tokens_of(maps, dtype)
        B, N, C = tokens.shape
        grad = grad.to(dtype)
        with autocast_off(maps.device):
            grad_tokens = tokens.new_empty(B, N, C)
            if geometry.queries_everywhere:
                # one buffer, in the joint projection's layout; for stride 2 the queries' part is 0 off their positions
                grad_qk = keys.new_empty(B * heads, 2, geometry.qk_dim, N)
                grad_keys = grad_qk[:, 1]
                if geometry.stride == 1:
                    grad_queries = grad_qk[:, 0]
                else:
                    grad_qk[:, 0].zero_()
                    grad_queries = torch.empty_like(queries)
            else:
                grad_queries, grad_keys = torch.empty_like(queries), torch.empty_like(keys)
            grad_positional = torch.empty_like(positional)
            grad_gate = values.new_empty(heads, 1)
            blocks = query_blocks(num_queries, geometry.block)
            for index, ((start, stop), probs) in enumerate(zip(blocks, probs_blocks)):
                first = index == 0
                grad_block = grad[:, start:stop].reshape(B, -1, C)
                attn = _blended(positional[start:stop], probs, gate, dtype)
                _bmm_into(attn.transpose(1, 2), grad_block, grad_tokens, accumulate=not first)
                grad_attn = torch.bmm(grad_block, tokens.transpose(1, 2)).to(positional.dtype)
                grad_attn = grad_attn.view(B, stop - start, heads, N)
                torch.sum(grad_attn, 0, out=grad_positional[start:stop])
                # p * (g - r), r = <g, p> per row: written once, in the logits' layout
                grad_logits = torch.mul(grad_attn.transpose(1, 2), probs, out=torch.empty_like(probs))
                row_sums = grad_logits.sum(-1, keepdim=True)
                grad_logits.addcmul_(probs, row_sums, value=-1.0)
                grad_logits = grad_logits.view(B * heads, stop - start, N)
                # the logits' scale applied by the GEMMs
                _bmm_into(
                    grad_logits,
                    keys.transpose(1, 2),
                    grad_queries[:, :, start:stop].transpose(1, 2),
                    alpha=geometry.scale,
                )
                _bmm_into(queries[:, :, start:stop], grad_logits, grad_keys, accumulate=not first, alpha=geometry.scale)
                if first:
                    torch.sum(row_sums, (0, 2), out=grad_gate)
                else:
                    grad_gate += row_sums.sum((0, 2))
            # the gate (at least grad_floor) through which queries and keys act
            factor = gate.clamp(min=ctx.grad_floor)
            if not geometry.queries_everywhere:
                grad_x, grad_qk_weight = _split_qk_backward(maps, weight, grad_queries, grad_keys, factor, geometry)
            else:
                if geometry.stride > 1:
                    query_maps(grad_qk[:, 0].unflatten(-1, maps.shape[-2:]), geometry).copy_(
                        grad_queries.view(B * heads, geometry.qk_dim, *_query_grid(geometry))
                    )
                grad_x, grad_qk_weight = _joint_qk_backward(maps, weight, grad_qk, factor, geometry.qk_dim)
            grad_x.view(B, C, N).transpose(1, 2).add_(grad_tokens)
            grad_values = ctx.builder.backward(
                grad_positional, values, positional_saved, ctx.grad_floor, grad_gate.view(heads)
            )
        return grad_x.to(ctx.x_dtype), grad_qk_weight.to(ctx.weight_dtype), grad_values, None, None, None


def _scaled_per_head(grad: torch.Tensor, factor: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A (batch * heads, ...) gradient times `factor` (heads, 1) per head, written in `dtype`: (batch, heads, -1)."""
    grad = grad.view(batch, factor.shape[0], -1)
    return torch.mul(grad, factor, out=grad.new_empty(grad.shape, dtype=dtype))


def _joint_qk_backward(
    maps: torch.Tensor,
    weight: torch.Tensor,
    grad_qk: torch.Tensor,
    factor: torch.Tensor,
    qk_dim: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `project_qk`'s maps (in their dtype) and joint weight (the attention's dtype) from that of its GEMM
    output (B * heads, 2, d, N), scaled per head by `factor` (heads, 1)."""
    B = maps.shape[0]
    heads = weight.shape[0] // (2 * qk_dim)
    scaled = _scaled_per_head(grad_qk, factor, B, maps.dtype).view(B, 2 * heads * qk_dim, -1)
    grad_maps = torch.bmm(weight.t().expand(B, -1, -1), scaled).view(maps.shape)
    return grad_maps, torch.bmm(scaled, maps.flatten(2).transpose(1, 2)).sum(0, dtype=grad_qk.dtype)


def _split_qk_backward(
    maps: torch.Tensor,
    weight: torch.Tensor,
    grad_queries: torch.Tensor,
    grad_keys: torch.Tensor,
    factor: torch.Tensor,
    geometry: MixGeometry,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `project_qk`'s maps (in their dtype) and joint weight (the attention's dtype, in its layout) from
    those of its queries and keys where queries are projected at their positions only (`weight` split: (2, heads * d,
    C)), scaled per head by `factor` (heads, 1)."""
    B, C = maps.shape[:2]
    d = geometry.qk_dim
    heads = weight.shape[1] // d
    grad_q, grad_k = (
        _scaled_per_head(grad, factor, B, maps.dtype).view(B, heads * d, -1) for grad in (grad_queries, grad_keys)
    )
    grad_maps = torch.bmm(weight[1].t().expand(B, -1, -1), grad_k).view(maps.shape)
    query_maps(grad_maps, geometry).add_(
        torch.bmm(weight[0].t().expand(B, -1, -1), grad_q).view(B, C, *_query_grid(geometry))
    )
    grad_weight = grad_queries.new_empty(heads, 2, d, C)
    for part, (grad, inputs) in enumerate(((grad_q, query_maps(maps, geometry)), (grad_k, maps))):
        per_sample = torch.bmm(grad, inputs.flatten(2).transpose(1, 2)).view(B, heads, d, C)
        torch.sum(per_sample, 0, dtype=grad_weight.dtype, out=grad_weight[:, part])
    return grad_maps, grad_weight.flatten(0, 2)


def _bmm_into(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False, alpha: float = 1.0
) -> None:
    """out = alpha * a @ b, or out += alpha * a @ b (batched)."""
    if accumulate or alpha != 1.0:
        out.baddbmm_(a, b, beta=float(accumulate), alpha=alpha)  # beta 0: out's old contents are ignored
    else:
        torch.bmm(a, b, out=out)


def floored_blend(
    positional: torch.Tensor, content: torch.Tensor, gate: torch.Tensor, grad_floor: float
) -> torch.Tensor:
    """positional + gate * content (gate broadcast); in the backward pass content gets the gradient of
    max(gate, grad_floor) * content, gate and positional their true gradients. Standard operations."""
    out = torch.addcmul(positional, content, gate)
    if grad_floor > 0:  # exactly 0 in the forward pass
        out = out + (content - content.detach()) * (gate.detach().clamp(min=grad_floor) - gate.detach())
    return out


def content_mix_reference(
    x: torch.Tensor,
    qk_weight: torch.Tensor,
    positional: torch.Tensor,
    values: torch.Tensor,
    geometry: MixGeometry,
    grad_floor: float,
) -> torch.Tensor:
    """`content_mix` (with autograd) in standard operations, all queries at once."""
    num_queries, heads = positional.shape[:2]
    maps = x.to(mixing_dtype(x))
    tokens = tokens_of(maps, maps.dtype)
    B, N, C = tokens.shape
    queries, keys = project_qk(maps, projection_weight(qk_weight, geometry, maps.dtype), geometry, positional.dtype)
    logits = torch.bmm(queries.transpose(1, 2), keys) * geometry.scale
    probs = softmax_without_subnormals_(logits).view(B, heads, num_queries, N).transpose(1, 2)
    attn = floored_blend(positional, probs, values[:heads, None], grad_floor)
    attn = cast_without_subnormals(attn, tokens.dtype)
    return torch.bmm(attn.reshape(B, num_queries * heads, N), tokens).view(B, num_queries, heads, C)
