""" The positional attention and its gradient as Triton kernels: one launch builds P, two reduce its gradient.

The closed form of `positional.py` builds P = (1 - g) ((1 - l) onehot + l gauss) from a layer's (5 * heads,) values
in about fifteen operations and reduces its gradient in about fifteen more; on a GPU each is a launch. Here:

- `positional_attention`: one program per head and block of (query, key) pairs writes those entries of P (Nq,
  heads, N), computing the Gaussian's two log normalisers, the one-hot tap and the blend in registers (nothing else
  is stored: the backward pass recomputes the Gaussian).
- `positional_sums`: per head and chunk of (query, key) pairs, the six sums the gradient needs: <grad, onehot>, and
  with Z = grad * gauss, sum Z, sum Z dy, sum Z dy^2, sum Z dx, sum Z dx^2 (partial sums, no atomics: deterministic).
- `positional_values_grad`: per head, the partial sums added up and turned into the values' gradient (the same
  algebra as `positional_backward`), the content's share of the gates' gradient added.

Each is a `torch.library` custom operation, so that dispatch (and the operation counter) sees one operation per
launch. What each launch runs with (grid, arguments, constexprs, warps and stages) comes from one place,
`kernel_launches`, which `tools.kernel_report` also reads to compile the kernels ahead of time for GPU targets. They
run on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""
import warnings
from typing import Any, Dict, Hashable, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .positional import ClosedFormPositional, cached_positional_tables, query_start

__all__ = [
    'KernelPositional', 'Launch', 'kernel_launches', 'checked_kernels', 'positional_attention', 'positional_sums',
    'positional_values_grad', 'NUM_SUMS',
]

NUM_SUMS = 6  # <grad, onehot>, sum Z, sum Z dy, sum Z dy^2, sum Z dx, sum Z dx^2
_BLOCK = 1024  # (query, key) pairs per block
_NUM_WARPS = 4
_NUM_STAGES = 3


@triton.jit
def _log_normaliser(alpha, center, size, BLOCK_M: tl.constexpr):
    """log sum over o in [-(size - 1), size - 1] of exp(-alpha (o - center)^2)."""
    offsets = tl.arange(0, BLOCK_M) - (size - 1)
    logits = -alpha * (offsets - center) * (offsets - center)
    logits = tl.where(offsets <= size - 1, logits, float('-inf'))
    top = tl.max(logits, 0)
    return top + tl.log(tl.sum(tl.exp(logits - top), 0))

@triton.jit
def _moments(alpha, center, log_norm, size, BLOCK_M: tl.constexpr):
    """E[o] and E[o^2] over the normalisation's softmax."""
    offsets = tl.arange(0, BLOCK_M) - (size - 1)
    softmax = tl.exp(-alpha * (offsets - center) * (offsets - center) - log_norm)
    softmax = tl.where(offsets <= size - 1, softmax, 0.)
    offsets = offsets.to(tl.float32)
    return tl.sum(softmax * offsets, 0), tl.sum(softmax * offsets * offsets, 0)

@triton.jit
def _head_values(values_ptr, head, heads, height, width, BLOCK_M: tl.constexpr):
    gate = tl.load(values_ptr + head)
    locality = tl.load(values_ptr + heads + head)
    alpha = tl.exp(tl.load(values_ptr + 2 * heads + head))
    center_row = tl.load(values_ptr + 3 * heads + 2 * head)
    center_col = tl.load(values_ptr + 3 * heads + 2 * head + 1)
    norm_row = _log_normaliser(alpha, center_row, height, BLOCK_M)
    norm_col = _log_normaliser(alpha, center_col, width, BLOCK_M)
    return gate, locality, alpha, center_row, center_col, norm_row, norm_col

@triton.jit
def _offsets_of(query, key, width, out_w, stride, row0, col0):
    dy = key // width - (row0 + stride * (query // out_w))
    dx = key % width - (col0 + stride * (query % out_w))
    return dy, dx

@triton.jit
def _tap(head, dilation, KERNEL: tl.constexpr):
    """The head's one-hot offset (row, col): dilation * (head // K - K // 2, head % K - K // 2)."""
    return dilation * (head // KERNEL - KERNEL // 2), dilation * (head % KERNEL - KERNEL // 2)

@triton.jit
def _gaussian(dy, dx, alpha, center_row, center_col, norm_row, norm_col):
    ry = dy.to(tl.float32) - center_row
    rx = dx.to(tl.float32) - center_col
    logits = (-alpha * (ry * ry) - norm_row) + (-alpha * (rx * rx) - norm_col)
    return tl.where(logits > -35., tl.exp(logits), 0.)  # as `exp_without_subnormals`

@triton.jit
def _forward_kernel(values_ptr, out_ptr, heads, height, width, out_w, stride, row0, col0, dilation, num_pairs,
                    KERNEL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    head = tl.program_id(1)
    gate, locality, alpha, center_row, center_col, norm_row, norm_col = _head_values(
        values_ptr, head, heads, height, width, BLOCK_M)
    keep = 1. - gate
    gauss_share = keep * locality
    onehot_share = keep - gauss_share
    tap_row, tap_col = _tap(head, dilation, KERNEL)
    num_keys = height * width
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    query = pairs // num_keys
    keys = pairs % num_keys
    dy, dx = _offsets_of(query, keys, width, out_w, stride, row0, col0)
    gauss = _gaussian(dy, dx, alpha, center_row, center_col, norm_row, norm_col)
    onehot = tl.where((dy == tap_row) & (dx == tap_col), onehot_share, 0.)
    address = (query * heads + head).to(tl.int64) * num_keys + keys
    tl.store(out_ptr + address, onehot + gauss * gauss_share, mask=pairs < num_pairs)


@triton.jit
def _sums_kernel(grad_ptr, values_ptr, sums_ptr, heads, height, width, out_w, stride, row0, col0, dilation, chunk,
                num_pairs, KERNEL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    head = tl.program_id(0)
    part = tl.program_id(1)
    _, _, alpha, center_row, center_col, norm_row, norm_col = _head_values(
        values_ptr, head, heads, height, width, BLOCK_M)
    tap_row, tap_col = _tap(head, dilation, KERNEL)
    num_keys = height * width
    onehot_sum = tl.zeros((BLOCK,), tl.float32)
    z_sum = tl.zeros((BLOCK,), tl.float32)
    z_dy = tl.zeros((BLOCK,), tl.float32)
    z_dy2 = tl.zeros((BLOCK,), tl.float32)
    z_dx = tl.zeros((BLOCK,), tl.float32)
    z_dx2 = tl.zeros((BLOCK,), tl.float32)
    first = part * chunk
    for start in range(first, first + chunk, BLOCK):
        pairs = start + tl.arange(0, BLOCK)
        mask = (pairs < num_pairs) & (pairs < first + chunk)
        query = pairs // num_keys
        keys = pairs % num_keys
        grad = tl.load(grad_ptr + (query * heads + head).to(tl.int64) * num_keys + keys, mask=mask, other=0.)
        dy, dx = _offsets_of(query, keys, width, out_w, stride, row0, col0)
        onehot_sum += tl.where((dy == tap_row) & (dx == tap_col), grad, 0.)
        z = grad * _gaussian(dy, dx, alpha, center_row, center_col, norm_row, norm_col)
        fy = dy.to(tl.float32)
        fx = dx.to(tl.float32)
        z_sum += z
        z_dy += z * fy
        z_dy2 += z * fy * fy
        z_dx += z * fx
        z_dx2 += z * fx * fx
    out = sums_ptr + (head * tl.num_programs(1) + part) * 6
    tl.store(out, tl.sum(onehot_sum, 0))
    tl.store(out + 1, tl.sum(z_sum, 0))
    tl.store(out + 2, tl.sum(z_dy, 0))
    tl.store(out + 3, tl.sum(z_dy2, 0))
    tl.store(out + 4, tl.sum(z_dx, 0))
    tl.store(out + 5, tl.sum(z_dx2, 0))

@triton.jit
def _values_grad_kernel(sums_ptr, values_ptr, content_ptr, grad_ptr, heads, height, width, parts, grad_floor,
                       HAS_CONTENT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    head = tl.program_id(0)
    gate, locality, alpha, center_row, center_col, norm_row, norm_col = _head_values(
        values_ptr, head, heads, height, width, BLOCK_M)
    index = tl.arange(0, BLOCK_P)
    row = sums_ptr + (head * parts + index) * 6
    mask = index < parts
    onehot_sum = tl.sum(tl.load(row, mask=mask, other=0.), 0)
    z_sum = tl.sum(tl.load(row + 1, mask=mask, other=0.), 0)
    z_dy = tl.sum(tl.load(row + 2, mask=mask, other=0.), 0)
    z_dy2 = tl.sum(tl.load(row + 3, mask=mask, other=0.), 0)
    z_dx = tl.sum(tl.load(row + 4, mask=mask, other=0.), 0)
    z_dx2 = tl.sum(tl.load(row + 5, mask=mask, other=0.), 0)
    mean_row, square_row = _moments(alpha, center_row, norm_row, height, BLOCK_M)
    mean_col, square_col = _moments(alpha, center_col, norm_col, width, BLOCK_M)
    # the normaliser taken out: U_k = S_k - sum(Z) E[o^k]
    u1_row = z_dy - z_sum * mean_row
    u2_row = z_dy2 - z_sum * square_row
    u1_col = z_dx - z_sum * mean_col
    u2_col = z_dx2 - z_sum * square_col
    keep = 1. - gate
    rate = tl.maximum(keep * locality, grad_floor) * alpha
    share_diff = z_sum - onehot_sum
    grad_gate = -(onehot_sum + locality * share_diff)
    if HAS_CONTENT:
        grad_gate += tl.load(content_ptr + head)
    tl.store(grad_ptr + head, grad_gate)
    tl.store(grad_ptr + heads + head, keep * share_diff)
    tl.store(grad_ptr + 2 * heads + head,
             -rate * (u2_row + u2_col - 2. * (center_row * u1_row + center_col * u1_col)))
    tl.store(grad_ptr + 3 * heads + 2 * head, 2. * rate * u1_row)
    tl.store(grad_ptr + 3 * heads + 2 * head + 1, 2. * rate * u1_col)


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


class KernelPositional(NamedTuple):
    """Builds the positional attention of one map size with the kernels (one launch) and reduces its gradient (two);
    the interface of `positional.ClosedFormPositional`. Nothing is saved for the backward pass but the values.
    The query of output (i, j) sits at `query_start` + stride * (i, j); head h's tap at dilation * its offset."""
    kernel_size: int
    stride: int
    height: int
    width: int
    query_start: Tuple[int, int]
    dilation: int = 1

    @property
    def num_queries(self) -> int:
        return _out_size(self.height, self.stride) * _out_size(self.width, self.stride)

    def forward(self, values: torch.Tensor, grad_floor: float) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        return positional_attention(values, *self._args()), ()

    def backward(self, grad: torch.Tensor, values: torch.Tensor, saved: Tuple[torch.Tensor, ...], grad_floor: float,
                 content_gate_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        sums = positional_sums(grad, values, *self._args())
        return positional_values_grad(sums, values, content_gate_grad, *self._args(), grad_floor)

    def _args(self) -> Tuple[int, ...]:
        """The geometry as the custom operations take it: kernel size, stride, height, width, row0, col0, dilation."""
        return self.kernel_size, self.stride, self.height, self.width, *self.query_start, self.dilation


class Launch(NamedTuple):
    """One kernel launch: `kernel[grid](*tensors, **scalars, **constexprs, num_warps=, num_stages=)`; the tensors
    (float32, contiguous) are the kernel's leading `*_ptr` arguments, in order."""
    kernel: Any  # a triton.JITFunction
    grid: Tuple[int, ...]
    scalars: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int = _NUM_WARPS
    num_stages: int = _NUM_STAGES

    def __call__(self, *tensors: torch.Tensor) -> None:
        self.kernel[self.grid](*tensors, **self.scalars, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def _norm_block(height: int, width: int) -> int:
    return 1 << (2 * max(height, width) - 2).bit_length()  # a power of two >= 2 * size - 1


def _parts(num_pairs: int) -> int:
    """Programs per head of the gradient's sums: about four blocks of pairs each, at most 64."""
    return max(1, min(64, -(-num_pairs // (4 * _BLOCK))))


def kernel_launches(geometry: KernelPositional, has_content: bool = True, grad_floor: float = 0.) -> Dict[str, Launch]:
    """How each kernel is launched for one layer geometry, by custom operation: `positional_attention` (forward),
    `positional_sums` and `positional_values_grad` (backward; `has_content`: the content's gate gradient is added).
    The only place that chooses grids, block sizes, warps and stages."""
    kernel_size, stride, height, width, row0, col0, dilation = geometry._args()
    heads = kernel_size * kernel_size
    num_keys = height * width
    num_pairs = geometry.num_queries * num_keys
    parts = _parts(num_pairs)
    block_m = _norm_block(height, width)
    place = dict(heads=heads, height=height, width=width, out_w=_out_size(width, stride), stride=stride, row0=row0,
                 col0=col0, dilation=dilation)
    return {
        'positional_attention': Launch(
            _forward_kernel, (triton.cdiv(num_pairs, _BLOCK), heads), dict(place, num_pairs=num_pairs),
            dict(KERNEL=kernel_size, BLOCK=_BLOCK, BLOCK_M=block_m)),
        'positional_sums': Launch(
            _sums_kernel, (heads, parts), dict(place, chunk=-(-num_pairs // parts), num_pairs=num_pairs),
            dict(KERNEL=kernel_size, BLOCK=_BLOCK, BLOCK_M=block_m)),
        'positional_values_grad': Launch(
            _values_grad_kernel, (heads,),
            dict(heads=heads, height=height, width=width, parts=parts, grad_floor=float(grad_floor)),
            dict(HAS_CONTENT=has_content, BLOCK_P=triton.next_power_of_2(parts), BLOCK_M=block_m)),
    }


def _geometry(kernel_size: int, stride: int, height: int, width: int, row0: int, col0: int,
              dilation: int) -> KernelPositional:
    return KernelPositional(kernel_size, stride, height, width, (row0, col0), dilation)


@torch.library.custom_op('timm_tcnn::positional_attention', mutates_args=())
def positional_attention(values: torch.Tensor, kernel_size: int, stride: int, height: int, width: int, row0: int,
                         col0: int, dilation: int) -> torch.Tensor:
    """P (Nq, heads, N) float32 from (5 * heads,) float32 values (`split_values`, gates in [0, 1]); the query of
    output (i, j) sits at (row0, col0) + stride * (i, j), head h's tap at dilation * its offset."""
    geometry = _geometry(kernel_size, stride, height, width, row0, col0, dilation)
    out = values.new_empty(geometry.num_queries, kernel_size * kernel_size, height * width)
    kernel_launches(geometry)['positional_attention'](values, out)
    return out


@positional_attention.register_fake
def _(values, kernel_size, stride, height, width, row0, col0, dilation):
    heads = kernel_size * kernel_size
    return values.new_empty(_out_size(height, stride) * _out_size(width, stride), heads, height * width)


@torch.library.custom_op('timm_tcnn::positional_sums', mutates_args=())
def positional_sums(grad: torch.Tensor, values: torch.Tensor, kernel_size: int, stride: int, height: int,
                    width: int, row0: int, col0: int, dilation: int) -> torch.Tensor:
    """(heads, parts, NUM_SUMS) partial sums of P's gradient (Nq, heads, N) (see the module's docstring)."""
    launch = kernel_launches(_geometry(kernel_size, stride, height, width, row0, col0, dilation))['positional_sums']
    sums = values.new_empty(*launch.grid, NUM_SUMS)
    launch(grad.contiguous(), values, sums)
    return sums


@positional_sums.register_fake
def _(grad, values, kernel_size, stride, height, width, row0, col0, dilation):
    return values.new_empty(kernel_size * kernel_size, _parts(grad.shape[0] * grad.shape[2]), NUM_SUMS)


@torch.library.custom_op('timm_tcnn::positional_values_grad', mutates_args=())
def positional_values_grad(sums: torch.Tensor, values: torch.Tensor, content_gate_grad: Optional[torch.Tensor],
                           kernel_size: int, stride: int, height: int, width: int, row0: int, col0: int,
                           dilation: int, grad_floor: float) -> torch.Tensor:
    """The values' gradient (5 * heads,) from `positional_sums`, plus `content_gate_grad` (heads,) if given; the
    Gaussian's parameters learn at a share of at least `grad_floor`."""
    geometry = _geometry(kernel_size, stride, height, width, row0, col0, dilation)
    launch = kernel_launches(geometry, content_gate_grad is not None, grad_floor)['positional_values_grad']
    grad = values.new_empty(values.shape)
    content = content_gate_grad.contiguous() if content_gate_grad is not None else values
    launch(sums, values, content, grad)
    return grad


@positional_values_grad.register_fake
def _(sums, values, content_gate_grad, kernel_size, stride, height, width, row0, col0, dilation, grad_floor):
    return values.new_empty(values.shape)


_CHECKED: Dict[Hashable, bool] = {}


def checked_kernels(
        kernel_size: int, stride: int, height: int, width: int, same_padding: bool, device: torch.device,
        tolerance: float = 1e-4, dilation: int = 1,
) -> Optional[KernelPositional]:
    """The kernels for one layer shape on `device`, checked on first use against the closed form (P and the values'
    gradient, for spread values and a random gradient, to `tolerance` of their largest entries); None, with a
    warning, where they fail or differ (the caller takes the closed form)."""
    key = (kernel_size, stride, height, width, same_padding, device, dilation)
    starts = (query_start(height, kernel_size, stride, same_padding, dilation),
              query_start(width, kernel_size, stride, same_padding, dilation))
    kernels = KernelPositional(kernel_size, stride, height, width, starts, dilation)
    if key not in _CHECKED:
        closed = ClosedFormPositional(cached_positional_tables(
            kernel_size, stride, height, width, same_padding, device, dilation=dilation))
        try:
            _CHECKED[key] = _agree(kernels, closed, kernel_size * kernel_size, device, tolerance)
        except Exception as e:  # a kernel that cannot compile or run here
            warnings.warn(f'timm-tcnn: the positional kernels failed for {key} ({e!r}); using the closed form.')
            _CHECKED[key] = False
        else:
            if not _CHECKED[key]:
                warnings.warn(f'timm-tcnn: the positional kernels differ from the closed form for {key}; using it.')
    return kernels if _CHECKED[key] else None


@torch.no_grad()
def _agree(kernels: KernelPositional, closed: ClosedFormPositional, heads: int, device: torch.device,
           tolerance: float) -> bool:
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.rand(heads, generator=generator) * (torch.arange(heads) % 2), torch.rand(heads, generator=generator),
        torch.randn(heads, generator=generator), torch.randn(2 * heads, generator=generator),
    ]).to(device)
    ours, _ = kernels.forward(values, 0.1)
    grad = torch.randn(ours.shape, generator=generator).to(device)
    content = torch.randn(heads, generator=generator).to(device)
    ours_grad = kernels.backward(grad, values, (), 0.1, content)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')  # the closed form's GEMMs in full float32, not TF32
    try:
        theirs, saved = closed.forward(values, 0.1)
        theirs_grad = closed.backward(grad, values, saved, 0.1, content)
    finally:
        torch.set_float32_matmul_precision(precision)
    return all(
        bool((a - b).abs().max() <= tolerance * b.abs().max()) for a, b in ((ours, theirs), (ours_grad, theirs_grad)))
