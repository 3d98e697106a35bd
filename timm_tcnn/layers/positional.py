""" The positional attention of a layer: one-hot kernel taps blended with a learnable Gaussian, per head.

    P_h = (1 - g_h) * ((1 - l_h) * onehot(D_h) + l_h * gauss(alpha_h, c_h))

as a dense (Nq, heads, N) matrix in the attention's dtype (float32; float64 for float64 layers), queries leading (the
layout the mixing GEMM reads). The Gaussian is separable: gauss[(i, j), (y, x)] = rows[i, y] * cols[j, x], each factor
a softmax over every offset in [-(size - 1), size - 1] (offsets outside the image are zero tokens, so rows of border
queries sum to less than 1). In log space the dense Gaussian is the broadcast sum of the two factors' logarithms, so
one attention-sized addition builds it; everything else works on (heads, size, size) tensors.

What depends on the map size only (the one-hot matrix, the offset tables) is built once per shape and device
(`positional_tables`). `ClosedFormPositional` builds P from the layer's values, inside the attention's autograd
function, with a closed-form backward pass (a handful of operations where autograd takes about a hundred); the
Gaussian learns as if its share (1 - g) * l were at least `grad_floor`. `positional_mixing` is the same maths in
standard operations, for scripted, traced and compiled graphs and as the reference the function is tested against.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .cache import BoundedCache
from .numerics import exp_without_subnormals

__all__ = [
    'PositionalTables', 'TABLES', 'positional_tables', 'cached_positional_tables', 'gaussian_factors',
    'positional_mixing', 'ClosedFormPositional', 'PositionalSaved', 'positional_forward', 'positional_backward',
    'split_values', 'same_pad_before', 'query_start',
]


class PositionalTables(NamedTuple):
    """What the positional attention of (height, width) maps needs besides the layer's values.

    onehot: (Nq, heads, N), 1 where the key sits at the head's tap offset from the query.
    offsets: (2, Ho * H + 2 * H - 1) for square maps; per dimension (rows, cols), the key's offset from each
        query, (out_size, size) flattened, then every offset of the normalisation, -(size - 1) ... size - 1,
        padded to a common length with offsets no Gaussian reaches.
    basis: (Nq, N, 5) per query and key, (-2 dy, dy^2, -2 dx, dx^2, 1) of the key's offset (dy, dx): what the
        backward pass reduces the Gaussian's gradient against, in one GEMM.
    norm_basis: (2, M, 2) per dimension, (-2 o, o^2) of the normalisation's offsets (the last M of `offsets`).
    rows: (Ho, H), cols: (Wo, W): the shapes of the two factors.
    """

    onehot: torch.Tensor
    offsets: torch.Tensor
    basis: torch.Tensor
    norm_basis: torch.Tensor
    rows: Tuple[int, int]
    cols: Tuple[int, int]


def same_pad_before(size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Zeros TF 'SAME' padding puts before a dimension of `size` (timm's `pad_same`: the smaller half)."""
    out = (size - 1) // stride + 1
    return max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0) // 2


def query_start(size: int, kernel_size: int, stride: int, same_padding: bool, dilation: int = 1) -> int:
    """Input position of the first query along a dimension: the query of output i sits at start + stride * i.

    0 with padding dilation * (K // 2); with TF 'SAME' padding, dilation * (K // 2) minus the zeros before the
    dimension."""
    if not same_padding:
        return 0
    return dilation * (kernel_size // 2) - same_pad_before(size, kernel_size, stride, dilation)


def _dimension_tables(
    size: int, kernel_size: int, stride: int, dilation: int, same_padding: bool, device: torch.device,
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one dimension of `size` with (size - 1) // stride + 1 queries: one-hot taps (K, out_size, size) at
    dilation * (t - K // 2), offsets of the keys from the queries (out_size * size,) and every offset of the
    normalisation (2 * size - 1,)."""
    start = query_start(size, kernel_size, stride, same_padding, dilation)
    keys = torch.arange(size, device=device, dtype=dtype)
    queries = torch.arange((size - 1) // stride + 1, device=device, dtype=dtype) * stride + start
    rel = keys[None, :] - queries[:, None]  # out_size, size: offset of key k from the query at start + stride * i
    taps = (torch.arange(kernel_size, device=device, dtype=dtype) - kernel_size // 2) * dilation
    onehot = (rel[None] == taps[:, None, None]).to(dtype)
    return onehot, rel.flatten(), torch.arange(1 - size, size, device=device, dtype=dtype)


def positional_tables(
    kernel_size: int,
    stride: int,
    height: int,
    width: int,
    same_padding: bool = False,
    device: torch.device = torch.device('cpu'),
    dtype: torch.dtype = torch.float32,
    far: float = 1e15,
    dilation: int = 1,
) -> PositionalTables:
    """The shape-dependent constants of the positional attention (see `PositionalTables`), in `dtype`
    (the layer's `attention_dtype`). Padding offsets are `far`: their Gaussian weight is
    exactly 0 for every alpha > 1e-20."""
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    (row_onehot, row_rel, row_norm), (col_onehot, col_rel, col_norm) = (
        _dimension_tables(size, kernel_size, stride, dilation, same_padding, device, dtype) for size in (height, width)
    )
    length = max(row_rel.numel(), col_rel.numel()) + max(row_norm.numel(), col_norm.numel())
    offsets = torch.full((2, length), far, device=device, dtype=dtype)
    offsets[0, : row_rel.numel()] = row_rel
    offsets[1, : col_rel.numel()] = col_rel
    offsets[0, length - row_norm.numel() :] = row_norm
    offsets[1, length - col_norm.numel() :] = col_norm
    # head = tap row * K + tap col
    onehot = torch.einsum('aiy,bjx->ijabyx', row_onehot, col_onehot).reshape(
        out_h * out_w, kernel_size * kernel_size, height * width
    )
    dy = row_rel.view(out_h, 1, height, 1).expand(out_h, out_w, height, width)
    dx = col_rel.view(1, out_w, 1, width).expand(out_h, out_w, height, width)
    basis = torch.stack([-2 * dy, dy.square(), -2 * dx, dx.square(), torch.ones_like(dy)], -1)
    norm = offsets[:, length - max(row_norm.numel(), col_norm.numel()) :]
    norm_basis = torch.stack([-2 * norm, norm.square()], -1)
    return PositionalTables(
        onehot.contiguous(),
        offsets,
        basis.view(out_h * out_w, height * width, 5),
        norm_basis,
        (out_h, height),
        (out_w, width),
    )


# shared by every layer of the process; the one-hot matrix of a 56x56 -> 28x28 layer is 88 MiB
TABLES = BoundedCache(256 * 2**20)


@torch.compiler.assume_constant_result
def cached_positional_tables(
    kernel_size: int,
    stride: int,
    height: int,
    width: int,
    same_padding: bool,
    device: torch.device,
    dilation: int = 1,
    dtype: torch.dtype = torch.float32,
) -> PositionalTables:
    """`positional_tables`, built once per shape, device and dtype in eager code (constants, never written to) and
    kept in `TABLES`, least recently used evicted beyond its byte budget."""
    key = (kernel_size, stride, height, width, same_padding, device, dilation, dtype)
    tables = TABLES.get(key)
    if tables is None:
        tables = positional_tables(kernel_size, stride, height, width, same_padding, device, dtype, dilation=dilation)
        TABLES.put(key, tables, sum(t.numel() * t.element_size() for t in tables[:4]))
    return tables


def split_values(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's packed values (5 * heads,) -> content gate, locality gate, log alpha (heads,), centre (heads, 2)."""
    heads = values.shape[0] // 5
    return values[:heads], values[heads : 2 * heads], values[2 * heads : 3 * heads], values[3 * heads :].view(heads, 2)


def _log_gaussian(log_alpha: torch.Tensor, center: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(heads, 2, L): -alpha * (offset - centre)^2 per head and dimension."""
    diff = offsets - center[:, :, None]
    return diff.square() * -log_alpha.exp()[:, None, None]


def _normalised_logits(logits: torch.Tensor, tables: PositionalTables) -> torch.Tensor:
    """(heads, 2, L) `_log_gaussian` logits minus each dimension's log normaliser (the logsumexp over its
    normalisation offsets): logs of the normalised factors, then of the normaliser's softmax."""
    norm_len = 2 * max(tables.rows[1], tables.cols[1]) - 1
    return logits - logits[:, :, logits.shape[-1] - norm_len :].logsumexp(-1, keepdim=True)


def _factors(logits: torch.Tensor, rows: Tuple[int, int], cols: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views (heads, Ho, H) and (heads, Wo, W) of the factors' entries of (heads, 2, L) per-dimension logits
    (`PositionalTables.rows`, `.cols`)."""
    (out_h, height), (out_w, width) = rows, cols
    heads = logits.shape[0]
    return (
        logits[:, 0, : out_h * height].view(heads, out_h, height),
        logits[:, 1, : out_w * width].view(heads, out_w, width),
    )


def _dense_log_gaussian(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(Ho * Wo, heads, H * W) log of the dense Gaussian, rows[h, i, y] + cols[h, j, x]: one attention-sized
    broadcast sum."""
    out_h, out_w = rows.shape[1], cols.shape[1]
    dense = rows.permute(1, 0, 2)[:, None, :, :, None] + cols.permute(1, 0, 2)[None, :, :, None, :]
    return dense.view(out_h * out_w, rows.shape[0], rows.shape[2] * cols.shape[2])


def gaussian_factors(
    log_alpha: torch.Tensor, center: torch.Tensor, tables: PositionalTables
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Separable factors (heads, Ho, H) and (heads, Wo, W) of the Gaussian attention, in the tables' dtype, each row a
    softmax over every offset of its dimension; values below exp(-35) are 0 (`exp_without_subnormals`)."""
    dtype = tables.offsets.dtype
    logits = _normalised_logits(_log_gaussian(log_alpha.to(dtype), center.to(dtype), tables.offsets), tables)
    rows, cols = _factors(logits, tables.rows, tables.cols)
    return exp_without_subnormals(rows), exp_without_subnormals(cols)


def positional_mixing(values: torch.Tensor, tables: PositionalTables, grad_floor: float = 0.0) -> torch.Tensor:
    """P (Nq, heads, N) in the tables' dtype from a layer's packed values (`split_values`; gates already in [0, 1]), in
    standard operations; the Gaussian learns as if its share (1 - g) * l were at least `grad_floor`."""
    gate, locality, log_alpha, center = split_values(values)
    logits = _normalised_logits(_log_gaussian(log_alpha, center, tables.offsets), tables)
    gauss = exp_without_subnormals(_dense_log_gaussian(*_factors(logits, tables.rows, tables.cols)))
    gauss_share = (1 - gate) * locality
    onehot_share = (1 - gate) - gauss_share
    dense = tables.onehot * onehot_share[:, None] + gauss * gauss_share[:, None]
    if grad_floor > 0:  # exactly 0 in the forward pass; the Gaussian's missing gradient below the floor
        lift = (gauss_share.detach().clamp(min=grad_floor) - gauss_share.detach())[:, None]
        dense = dense + (gauss - gauss.detach()) * lift
    return dense


class PositionalSaved(NamedTuple):
    """What `positional_backward` reads of a forward pass: the locality gate, 1 - content gate, the Gaussian's
    learning share max((1 - g) * l, grad_floor), -alpha (heads,), the centre (heads, 2), the normalised
    per-dimension logits (heads, 2, L) and the dense Gaussian (Nq, heads, N)."""

    locality: torch.Tensor
    keep: torch.Tensor
    learn_share: torch.Tensor
    neg_alpha: torch.Tensor
    center: torch.Tensor
    logits: torch.Tensor
    gauss: torch.Tensor


def positional_forward(
    values: torch.Tensor, tables: PositionalTables, grad_floor: float
) -> Tuple[torch.Tensor, PositionalSaved]:
    """`positional_mixing` without autograd, and what its closed-form backward pass needs: P (Nq, heads, N)."""
    gate, locality, log_alpha, center = split_values(values)
    neg_alpha = log_alpha.exp().neg_()
    logits = (tables.offsets - center[:, :, None]).square_().mul_(neg_alpha[:, None, None])  # heads, 2, L
    logits = _normalised_logits(logits, tables)
    gauss = exp_without_subnormals(_dense_log_gaussian(*_factors(logits, tables.rows, tables.cols)))
    keep = 1 - gate
    gauss_share = keep * locality
    dense = torch.mul(tables.onehot, (keep - gauss_share)[:, None])
    dense.addcmul_(gauss, gauss_share[:, None])
    saved = PositionalSaved(locality, keep, gauss_share.clamp(min=grad_floor), neg_alpha, center, logits, gauss)
    return dense, saved


def positional_backward(
    grad: torch.Tensor,
    saved: PositionalSaved,
    tables: PositionalTables,
    grad_values: torch.Tensor,
    content_gate_grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Writes the gradient of the packed values (5 * heads,) from that of P (Nq, heads, N) into `grad_values`,
    adding `content_gate_grad` (heads,), the content's share of the gates' gradient, when given.

    With Z = grad * gauss and S its sums against `tables.basis` (one GEMM), the Gaussian's parameters get, scaled
    by their learning share: centre 2 alpha U_1, log alpha -alpha (U_2 - 2 c U_1) summed over the dimensions,
    where U_k = S_k - sum(Z) E[o^k] takes out the normaliser (E over its softmax)."""
    heads = saved.keep.shape[0]
    sums = torch.bmm(grad * saved.gauss, tables.basis).sum(0)  # heads, 5
    onehot_sum = (grad * tables.onehot).sum((0, 2))
    gauss_sum = sums[:, 4]
    norm_len = tables.norm_basis.shape[1]
    softmax = exp_without_subnormals(saved.logits[:, :, saved.logits.shape[-1] - norm_len :])  # heads, 2, M
    moments = torch.bmm(softmax.transpose(0, 1), tables.norm_basis).transpose(0, 1)  # heads, 2, (E[-2o], E[o^2])
    centred = torch.addcmul(sums[:, :4].view(heads, 2, 2), gauss_sum[:, None, None], moments, value=-1.0)
    rate = saved.learn_share * saved.neg_alpha  # -alpha, at the learning share
    grad_gate, grad_locality, grad_log_alpha, grad_center = split_values(grad_values)
    torch.mul(centred[..., 0], rate[:, None], out=grad_center)
    torch.mul(torch.addcmul(centred[..., 1], saved.center, centred[..., 0]).sum(-1), rate, out=grad_log_alpha)
    share_diff = gauss_sum - onehot_sum
    torch.mul(share_diff, saved.keep, out=grad_locality)
    torch.addcmul(onehot_sum, saved.locality, share_diff, out=grad_gate)
    if content_gate_grad is None:
        grad_gate.neg_()
    else:
        torch.sub(content_gate_grad, grad_gate, out=grad_gate)
    return grad_values


class ClosedFormPositional(NamedTuple):
    """Builds the positional attention of one map size in its closed form (`positional_forward`) and reduces its
    gradient (`positional_backward`): about fifteen operations each way. `positional_kernels.KernelPositional` has
    the same interface."""

    tables: PositionalTables

    def forward(self, values: torch.Tensor, grad_floor: float) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """P (Nq, heads, N) from the packed values, and the tensors `backward` needs."""
        dense, saved = positional_forward(values, self.tables, grad_floor)
        return dense, tuple(saved)

    def backward(
        self,
        grad: torch.Tensor,
        values: torch.Tensor,
        saved: Tuple[torch.Tensor, ...],
        grad_floor: float,
        content_gate_grad: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The values' gradient (5 * heads,) from P's, plus `content_gate_grad` (heads,) on the gates if given."""
        grad_values = values.new_empty(values.shape)
        return positional_backward(grad, PositionalSaved(*saved), self.tables, grad_values, content_gate_grad)
