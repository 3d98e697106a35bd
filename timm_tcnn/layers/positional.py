""" The positional attention of a layer: one-hot kernel taps blended with a learnable Gaussian, per head.

    P_h = (1 - g_h) * ((1 - l_h) * onehot(D_h) + l_h * gauss(alpha_h, c_h))

as a dense float32 (Nq, heads, N) matrix, queries leading (the layout the mixing GEMM reads). The Gaussian is
separable: gauss[(i, j), (y, x)] = rows[i, y] * cols[j, x], each factor a softmax over every offset in
[-(size - 1), size - 1] (offsets outside the image are zero tokens, so rows of border queries sum to less
than 1). In log space the dense Gaussian is the broadcast sum of the two factors' logarithms, so one
attention-sized addition builds it; everything else works on (heads, size, size) tensors.

What depends on the map size only (the one-hot matrix, the offset tables) is built once per shape and device
(`positional_tables`). `PositionalMixing` builds P from the layer's values in one autograd function with a
closed-form backward pass (a handful of operations where autograd takes about a hundred); the Gaussian learns
as if its share (1 - g) * l were at least `grad_floor`. `positional_mixing` is the same maths in standard
operations, for scripted, traced and compiled graphs and as the reference the function is tested against.
"""
from typing import NamedTuple, Tuple

import torch

from .cache import BoundedCache
from .numerics import exp_without_subnormals

__all__ = [
    'PositionalTables', 'TABLES', 'positional_tables', 'cached_positional_tables', 'gaussian_factors', 'positional_mixing',
    'PositionalMixing', 'split_values', 'same_pad_before', 'query_start',
]

class PositionalTables(NamedTuple):
    """What the positional attention of (height, width) maps needs besides the layer's values.

    onehot: (Nq, heads, N) float32, 1 where the key sits at the head's tap offset from the query.
    offsets: (2, Ho * H + 2 * H - 1) for square maps; per dimension (rows, cols), the key's offset from each
        query, (out_size, size) flattened, then every offset of the normalisation, -(size - 1) ... size - 1,
        padded to a common length with offsets no Gaussian reaches.
    powers: (1., 2.): the offsets' powers the backward pass reduces against.
    rows: (Ho, H), cols: (Wo, W): the shapes of the two factors.
    """
    onehot: torch.Tensor
    offsets: torch.Tensor
    powers: torch.Tensor
    rows: Tuple[int, int]
    cols: Tuple[int, int]


def same_pad_before(size: int, kernel_size: int, stride: int) -> int:
    """Zeros TF 'SAME' padding puts before a dimension of `size` (timm's `pad_same`: the smaller half)."""
    out = (size - 1) // stride + 1
    return max((out - 1) * stride + kernel_size - size, 0) // 2


def query_start(size: int, kernel_size: int, stride: int, same_padding: bool) -> int:
    """Input position of the first query along a dimension: the query of output i sits at start + stride * i.

    0 with padding K // 2; with TF 'SAME' padding, K // 2 minus the zeros before the dimension."""
    if not same_padding:
        return 0
    return kernel_size // 2 - same_pad_before(size, kernel_size, stride)


def _relative(
        in_size: int, out_size: int, stride: int, start: int, device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """(out_size, in_size): offset of key k from the query at `start + stride * i`."""
    keys = torch.arange(in_size, device=device, dtype=dtype)
    queries = torch.arange(out_size, device=device, dtype=dtype) * stride + start
    return keys[None, :] - queries[:, None]


def _dimension_tables(
        size: int, out_size: int, kernel_size: int, stride: int, start: int, device: torch.device,
        dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one dimension: one-hot taps (K, out_size, size), offsets of the keys from the queries (out_size *
    size,) and every offset of the normalisation (2 * size - 1,)."""
    rel = _relative(size, out_size, stride, start, device, dtype)
    taps = torch.arange(kernel_size, device=device, dtype=dtype) - kernel_size // 2
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
) -> PositionalTables:
    """The shape-dependent constants of the positional attention (see `PositionalTables`), in `dtype`
    (float32 in the layer; float64 for gradient checks). Padding offsets are `far`: their Gaussian weight is
    exactly 0 for every alpha > 1e-20."""
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    row_onehot, row_rel, row_norm = _dimension_tables(
        height, out_h, kernel_size, stride, query_start(height, kernel_size, stride, same_padding), device, dtype)
    col_onehot, col_rel, col_norm = _dimension_tables(
        width, out_w, kernel_size, stride, query_start(width, kernel_size, stride, same_padding), device, dtype)
    length = max(row_rel.numel(), col_rel.numel()) + max(row_norm.numel(), col_norm.numel())
    offsets = torch.full((2, length), far, device=device, dtype=dtype)
    offsets[0, :row_rel.numel()] = row_rel
    offsets[1, :col_rel.numel()] = col_rel
    offsets[0, length - row_norm.numel():] = row_norm
    offsets[1, length - col_norm.numel():] = col_norm
    # head = tap row * K + tap col
    onehot = torch.einsum('aiy,bjx->ijabyx', row_onehot, col_onehot).reshape(
        out_h * out_w, kernel_size * kernel_size, height * width)
    powers = torch.tensor([1., 2.], device=device, dtype=dtype)
    return PositionalTables(onehot.contiguous(), offsets, powers, (out_h, height), (out_w, width))


# shared by every layer of the process; the one-hot matrix of a 56x56 -> 28x28 layer is 88 MiB
TABLES = BoundedCache(256 * 2 ** 20)


@torch.compiler.assume_constant_result
def cached_positional_tables(
        kernel_size: int, stride: int, height: int, width: int, same_padding: bool, device: torch.device,
) -> PositionalTables:
    """`positional_tables`, built once per shape and device in eager code (constants, never written to) and kept
    in `TABLES`, least recently used evicted beyond its byte budget."""
    key = (kernel_size, stride, height, width, same_padding, device)
    tables = TABLES.get(key)
    if tables is None:
        tables = positional_tables(kernel_size, stride, height, width, same_padding, device)
        TABLES.put(key, tables, sum(t.numel() * t.element_size() for t in tables[:3]))
    return tables


def split_values(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's packed values (5 * heads,) -> content gate, locality gate, log alpha (heads,), centre (heads, 2)."""
    heads = values.shape[0] // 5
    return values[:heads], values[heads:2 * heads], values[2 * heads:3 * heads], values[3 * heads:].view(heads, 2)


def _log_gaussian(log_alpha: torch.Tensor, center: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(heads, 2, L): -alpha * (offset - centre)^2 per head and dimension."""
    diff = offsets - center[:, :, None]
    return diff.square() * -log_alpha.exp()[:, None, None]


def _normalised_logits(logits: torch.Tensor, tables: PositionalTables) -> torch.Tensor:
    """(heads, 2, L) `_log_gaussian` logits minus each dimension's log normaliser (the logsumexp over its
    normalisation offsets): logs of the normalised factors, then of the normaliser's softmax."""
    norm_len = 2 * max(tables.rows[1], tables.cols[1]) - 1
    return logits - logits[:, :, logits.shape[-1] - norm_len:].logsumexp(-1, keepdim=True)


def _factors(
        logits: torch.Tensor, rows: Tuple[int, int], cols: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Views (heads, Ho, H) and (heads, Wo, W) of the factors' entries of (heads, 2, L) per-dimension logits
    (`PositionalTables.rows`, `.cols`)."""
    (out_h, height), (out_w, width) = rows, cols
    heads = logits.shape[0]
    return (logits[:, 0, :out_h * height].view(heads, out_h, height),
            logits[:, 1, :out_w * width].view(heads, out_w, width))


def _dense_log_gaussian(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(Ho * Wo, heads, H * W) log of the dense Gaussian, rows[h, i, y] + cols[h, j, x]: one attention-sized
    broadcast sum."""
    out_h, out_w = rows.shape[1], cols.shape[1]
    dense = rows.permute(1, 0, 2)[:, None, :, :, None] + cols.permute(1, 0, 2)[None, :, :, None, :]
    return dense.view(out_h * out_w, rows.shape[0], rows.shape[2] * cols.shape[2])


def gaussian_factors(
        log_alpha: torch.Tensor, center: torch.Tensor, tables: PositionalTables) -> Tuple[torch.Tensor, torch.Tensor]:
    """Separable factors (heads, Ho, H) and (heads, Wo, W) of the Gaussian attention, float32, each row a
    softmax over every offset of its dimension; values below exp(-35) are 0 (`exp_without_subnormals`)."""
    logits = _normalised_logits(_log_gaussian(log_alpha.float(), center.float(), tables.offsets), tables)
    rows, cols = _factors(logits, tables.rows, tables.cols)
    return exp_without_subnormals(rows), exp_without_subnormals(cols)


def positional_mixing(values: torch.Tensor, tables: PositionalTables, grad_floor: float = 0.) -> torch.Tensor:
    """P (Nq, heads, N) float32 from a layer's packed values (`split_values`; gates already in [0, 1]), in
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


class PositionalMixing(torch.autograd.Function):
    """`positional_mixing` with a closed-form backward pass: (5 * heads,) values -> P (Nq, heads, N).

    Keeps the dense Gaussian (one attention-sized tensor) and (heads, 2, L) offsets for the backward pass, which
    reads the incoming gradient three times (its products with the one-hot matrix and the Gaussian, and the
    Gaussian product's two partial sums) and otherwise works on (heads, L) tensors.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, tables: PositionalTables, grad_floor: float) -> torch.Tensor:
        gate, locality, log_alpha, center = split_values(values)
        neg_alpha = log_alpha.exp().neg_()
        powers = (tables.offsets - center[:, :, None])[..., None].pow(tables.powers)  # heads, 2, L, (diff, diff^2)
        logits = _normalised_logits(powers[..., 1] * neg_alpha[:, None, None], tables)
        gauss = exp_without_subnormals(_dense_log_gaussian(*_factors(logits, tables.rows, tables.cols)))
        keep = 1 - gate
        gauss_share = keep * locality
        dense = torch.mul(tables.onehot, (keep - gauss_share)[:, None])
        dense.addcmul_(gauss, gauss_share[:, None])
        ctx.save_for_backward(
            locality, keep, gauss_share.clamp(min=grad_floor), neg_alpha, powers, logits, gauss, tables.onehot)
        ctx.shapes = tables.rows, tables.cols
        return dense

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        locality, keep, learn_share, neg_alpha, powers, logits, gauss, onehot = ctx.saved_tensors
        (out_h, height), (out_w, width) = ctx.shapes
        heads, length = logits.shape[0], logits.shape[-1]
        grad_onehot_share = (grad * onehot).sum((0, 2))
        grad_gauss = grad * gauss  # d loss / d log gauss, per unit share
        grad_gauss_share = grad_gauss.sum((0, 2))
        grad_gauss = grad_gauss.view(out_h, out_w, heads, height, width)
        # gradient of the normalised logits (heads, 2, L), each row's Gaussian learning at `learn_share`
        square = (out_h, height) == (out_w, width)  # no padding between the factors and the normalisers
        grad_logits = torch.empty_like(logits) if square else torch.zeros_like(logits)
        rows_out, cols_out = _factors(grad_logits, *ctx.shapes)
        torch.mul(grad_gauss.sum((1, 4)).transpose(0, 1), learn_share[:, None, None], out=rows_out)
        torch.mul(grad_gauss.sum((0, 3)).transpose(0, 1), learn_share[:, None, None], out=cols_out)
        # each normaliser's gradient, -(sum of its factor's gradient), spread by its softmax over the offsets
        norm_len = 2 * max(height, width) - 1
        softmax = exp_without_subnormals(logits[:, :, length - norm_len:])
        total = grad_gauss_share.mul(learn_share).neg_()
        torch.mul(softmax, total[:, None, None], out=grad_logits[:, :, length - norm_len:])
        # logits = -alpha * diff^2: one GEMM gives sum(g * diff) and sum(g * diff^2) per head and dimension
        sums = torch.bmm(grad_logits.view(heads * 2, 1, length), powers.view(heads * 2, length, 2)).view(heads, 2, 2)
        grad_values = logits.new_empty(5 * heads)
        grad_gate, grad_locality, grad_log_alpha, grad_center = split_values(grad_values)
        torch.mul(sums[..., 0], neg_alpha[:, None], out=grad_center).mul_(-2.)  # d diff / d centre = -1
        torch.mul(sums[..., 1].sum(-1), neg_alpha, out=grad_log_alpha)
        diff_share = grad_gauss_share - grad_onehot_share
        torch.addcmul(grad_onehot_share, locality, diff_share, out=grad_gate).neg_()
        torch.mul(diff_share, keep, out=grad_locality)
        return grad_values, None, None

