""" Gated positional self-attention on NCHW maps, initialisable as an exact convolution.

A KxK convolution with padding K // 2 is multi-head self-attention with one head per kernel tap
(Cordonnier et al., ICLR 2020): head h attends, one-hot, to the pixel at its tap offset D_h from
the query (a zero token when that pixel lies outside the image) and projects what it reads with
the tap's C_out x C_in slice of the kernel. `GatedPositionalAttention2d` keeps that structure and
adds, per head, what attention can learn and a convolution cannot:

    A_h = (1 - g_h) * P_h + g_h * S_h(x)                        (content gate g_h)
    P_h = (1 - l_h) * onehot(D_h) + l_h * gauss(alpha_h, c_h)   (locality gate l_h)
    S_h = softmax(q_h(x) k_h(x)^T / sqrt(d))                    (content attention)
    y   = bias + sum_h W[:, :, D_h] . (x A_h^T)

Both gates start at exactly 0, so a freshly converted layer *is* the convolution. They are
clamped to [0, 1] with a straight-through gradient: the forward pass sees the clamped value, the
backward pass the raw one, so a gate at 0 still receives the true one-sided gradient and can open
(a sigmoid gate has no such point: its share and its gradient vanish together).

The gates and the positional parameters (alpha, centre) learn `gate_lr_scale` times faster than the
weights, whatever the optimizer: each is stored as value / scale and read as stored * scale, while
its gradient is that of the value itself (`rate_scaled`). Any optimizer whose step is proportional to
its learning rate (SGD, Adam, AdamW, ...) therefore moves the value exactly as it would with a learning
rate of scale x lr, inside timm's train.py and its single learning rate. The scale is stored with the
layer (`gate_lr_scale` buffer); loading a state dict saved with another scale keeps the values.

A closed gate also stops what it gates from learning: at g_h = 0 the queries and keys get no gradient,
so a head whose content attention is still random (a blur that raises the loss) closes and stays closed.
With `grad_floor` > 0, the content attention and the Gaussian learn as if their gate were at least
`grad_floor` (`_blend`): the forward pass is unchanged, so is exactness, and the gates get their true
gradients; only the gradients of Q/K, alpha and the centre of nearly closed heads are raised. The one-hot part
is an exact 0/1 matrix, never a saturated softmax, and the learnable locality (alpha, centre)
lives in the Gaussian that the locality gate blends in.

How it is computed (see docs/performance.md): the positional part P_h does not depend on the
input, so it is built once per call (once per map size and parameter update in inference) as a
dense (Nq, heads, N) matrix from separable row and column factors, and added to the content
softmax. One batched GEMM then mixes the full-width input for all heads, (Nq * heads, N) @ (N, C_in),
and one GEMM applies the taps, (B * Nq, heads * C_in) @ (heads * C_in, C_out) (batched over groups for grouped kernels): the same multiply-adds
as the convolution plus those of the attention, no per-head or per-sample copies of the values.
Queries are processed in blocks (`attention_block_bytes`, by default per device type: `default_block_bytes`)
so that the attention tensor of a block stays in a CPU's cache, or, on a GPU, runs in few large kernels.
In eager mode softmax, blend and mixing GEMM are one autograd function (`_ContentMix`) that keeps the softmax
and recomputes the blended attention in its backward pass. Logits and softmax are always computed in float32,
so fp16 / bf16 autocast cannot overflow them, and no tensor of the attention holds a subnormal number (slow on
many CPUs; see `_raise_to_range_`).
In inference (autograd off, eager) a layer that is still exactly its convolution runs `F.conv2d`, and heads
whose content gate is 0 mix with their positional attention alone, one matrix read by every sample's GEMM.
"""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from timm.layers import trunc_normal_
from timm.layers.padding import pad_same

__all__ = [
    'GatedPositionalAttention2d', 'straight_through_clamp', 'rate_scaled', 'default_block_bytes',
    'RATE_SCALED_PARAMS',
]

# parameters stored as value / gate_lr_scale (the gates and the Gaussian positional attention)
RATE_SCALED_PARAMS = ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center')


def straight_through_clamp(x: torch.Tensor, min_value: float = 0., max_value: float = 1.) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass."""
    return x + (x.clamp(min_value, max_value) - x).detach()


def rate_scaled(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`stored * scale` in the forward pass; the backward pass gives `stored` the gradient of the product
    itself (not scale times it), so an optimizer step of size lr on `stored` moves the value by scale x lr."""
    return stored.detach() * scale + (stored - stored.detach())


def _floor_lift(x: torch.Tensor, gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
    """Exactly 0 in the forward pass; in the backward pass it gives x the gradient it would get from
    (max(gate, grad_floor) - gate) * x, the part of its gradient that a gate below the floor withholds."""
    return (x - x.detach()) * (gate.detach().clamp(min=grad_floor) - gate.detach())


class _FlooredBlend(torch.autograd.Function):
    """positional + gate * content (one `addcmul`); backward: content gets the gradient of max(gate, grad_floor) *
    content, gate and positional their true gradients. The attention-sized passes of `addcmul`'s own backward,
    no more (`_floor_lift` written as autograd terms costs three more forward and two more backward passes)."""

    @staticmethod
    def forward(positional: torch.Tensor, content: torch.Tensor, gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
        return torch.addcmul(positional, content, gate)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        positional, content, gate, grad_floor = inputs
        ctx.save_for_backward(content, gate)
        ctx.positional_shape = positional.shape
        ctx.grad_floor = grad_floor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        content, gate = ctx.saved_tensors
        grad_positional = grad.sum_to_size(ctx.positional_shape) if ctx.needs_input_grad[0] else None
        grad_content = grad * gate.clamp(min=ctx.grad_floor) if ctx.needs_input_grad[1] else None
        grad_gate = (grad * content).sum_to_size(gate.shape) if ctx.needs_input_grad[2] else None
        return grad_positional, grad_content, grad_gate, None


def _blend(positional: torch.Tensor, content: torch.Tensor, gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
    """positional + gate * content (gate broadcast), written in `positional`'s layout; in the backward pass
    content gets the gradient of max(gate, grad_floor) * content, gate and positional their true gradients."""
    if grad_floor > 0 and content.requires_grad:
        if not torch.jit.is_scripting():
            return _floored_blend(positional, content, gate, grad_floor)
        return torch.addcmul(positional, content, gate) + _floor_lift(content, gate, grad_floor)
    return torch.addcmul(positional, content, gate)


@torch.jit.unused
def _floored_blend(positional: torch.Tensor, content: torch.Tensor, gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
    return _FlooredBlend.apply(positional, content, gate, grad_floor)


# Subnormal floats (below float32's smallest normal, ~1.2e-38) can make CPU arithmetic, GEMMs above all, many
# times slower. The attention never produces one, by construction: positional factors are 0 or >= 1e-15 (so a
# product of two factors and a gate >= 2e-8 stays normal); content logits more than 40 below their row's
# maximum are raised to that level (probabilities >= exp(-40) / N, a change of < 1e-17 each); weights cast to
# float16 are 0 or >= its smallest normal. Defaults are arguments so that TorchScript reads them as constants.


def _exp_without_subnormals(logits: torch.Tensor, floor: float = 1e-15) -> torch.Tensor:
    """exp(logits), with values below `floor` set to 0; no intermediate value is subnormal."""
    return F.threshold(logits.clamp(min=math.log(floor) - 1.).exp(), floor, 0.)


def _raise_to_range_(logits: torch.Tensor, logit_range: float = 40.) -> torch.Tensor:
    """Fresh logits raised in place to at least `logit_range` below their row's (last dimension's) maximum, so
    that a softmax or logsumexp over them computes no subnormal exponential: each weight is >= exp(-logit_range)
    / N and moves by less than that. The raise is invisible to autograd (a straight-through estimate of a
    gradient that is < exp(-logit_range) anyway), so backward passes are those of the plain softmax."""
    if torch.compiler.is_compiling():  # compiled graphs are functional: the same raise, out of place (fused)
        floor = logits.detach().amax(dim=-1, keepdim=True) - logit_range
        return logits + (torch.maximum(logits, floor) - logits).detach()
    with torch.no_grad():
        logits.clamp_(min=logits.amax(dim=-1, keepdim=True) - logit_range)
    return logits


def _softmax_without_subnormals_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of fresh float32 logits (`_raise_to_range_`), never subnormal."""
    return _raise_to_range_(logits).softmax(dim=-1)


class _ContentMix(torch.autograd.Function):
    """x A^T per head with A = positional + gate * softmax(q k) (`_softmax_without_subnormals_`, float32):
    tokens (B, N, C) -> mixed (B, Nq, heads, C), the GEMM in the tokens' dtype (`_cast_without_subnormals`).

    Stores the softmax, not A: the backward pass recomputes A (one pass) where autograd would keep both, an
    attention-sized tensor per block less. Its gradients are those of softmax, `_blend` (content gets the
    gradient of max(gate, grad_floor) * content) and the GEMMs, in three passes over the attention and no
    temporary: the row sums r = <grad, p> also give the gate's gradient (sum of r), the gradient of the logits
    p * (grad - r) is written in the logits' layout, and max(gate, grad_floor) scales the q and k gradients.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, positional: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
        probs = _softmax_without_subnormals_(_float32_matmul(q, k))  # B, h, Nq, N
        ctx.save_for_backward(tokens, positional, q, k, probs, gate)
        ctx.grad_floor = grad_floor
        B, heads, num_queries, _ = probs.shape
        mixed = torch.bmm(_ContentMix._attention(positional, probs, gate, tokens.dtype), tokens)
        return mixed.view(B, num_queries, heads, -1)

    @staticmethod
    def _attention(positional: torch.Tensor, probs: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype):
        """(B, Nq * heads, N) attention in `dtype`, rows in the order the mixing GEMM reads."""
        B, heads, num_queries, N = probs.shape
        attn = torch.addcmul(positional, probs.transpose(1, 2), gate, out=probs.new_empty(B, num_queries, heads, N))
        return _cast_without_subnormals(attn, dtype).view(B, num_queries * heads, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        tokens, positional, q, k, probs, gate = ctx.saved_tensors
        B, heads, num_queries, N = probs.shape
        grad = grad.reshape(B, num_queries * heads, -1).to(tokens.dtype)
        grad_tokens = None
        if ctx.needs_input_grad[0]:
            attn = _ContentMix._attention(positional, probs, gate, tokens.dtype)
            grad_tokens = torch.bmm(attn.transpose(1, 2), grad)
        grad_attn = torch.bmm(grad, tokens.transpose(1, 2)).float().view(B, num_queries, heads, N)
        grad_positional = grad_q = grad_k = grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_positional = grad_attn.sum_to_size(positional.shape)
        # p * (grad - r), r = <grad, p> per row: written once, in the logits' layout, no temporary
        grad_logits = torch.mul(grad_attn.transpose(1, 2), probs, out=torch.empty_like(probs))  # B, h, Nq, N
        row_sums = grad_logits.sum(-1, keepdim=True)
        grad_logits.addcmul_(probs, row_sums, value=-1.)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            scale = gate.clamp(min=ctx.grad_floor)[:, :, None]  # h, 1, 1
            if ctx.needs_input_grad[2]:
                grad_q = (_float32_matmul(grad_logits, k.transpose(-2, -1)) * scale).to(q.dtype)
            if ctx.needs_input_grad[3]:
                grad_k = (_float32_matmul(q.transpose(-2, -1), grad_logits) * scale).to(k.dtype)
        if ctx.needs_input_grad[4]:
            grad_gate = row_sums.sum((0, 2)).view(gate.shape)
        return grad_tokens, grad_positional, grad_q, grad_k, grad_gate, None


def _content_mix(tokens: torch.Tensor, positional: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
    """Tokens (B, N, C) (`_tokens`) mixed per head with positional (Nq, heads, N) + gate (heads, 1) * softmax(q k),
    queries (B, heads, Nq, d), keys (B, heads, d, N): (B, Nq, heads, C), the GEMM in the tokens' dtype; content
    learns as if its gate were at least `grad_floor`. Scripted, traced, compiled and exported graphs get the same
    maths from standard ops (which compilers fuse)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        probs = _softmax_without_subnormals_(_float32_matmul(q, k)).transpose(1, 2)
        return _mix(tokens, _cast_without_subnormals(_blend(positional, probs, gate, grad_floor), tokens.dtype))
    return _content_mix_function(tokens, positional, q, k, gate, grad_floor)


@torch.jit.unused
def _content_mix_function(tokens: torch.Tensor, positional: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          gate: torch.Tensor, grad_floor: float) -> torch.Tensor:
    return _ContentMix.apply(tokens, positional, q, k, gate, grad_floor)


def _cast_without_subnormals(
        attn: torch.Tensor, dtype: torch.dtype, float16_tiny: float = 6.103515625e-05) -> torch.Tensor:
    """Attention weights (float32, >= 0) cast to the compute dtype. For float16, whose smallest normal is
    6.1e-5, smaller weights are set to 0 first (float32 and bfloat16 share float32's range)."""
    if dtype == torch.float16:
        attn = F.threshold(attn, float16_tiny, 0.)
    return attn.to(dtype)


def default_block_bytes(device: torch.device, cpu: int = 8 * 2 ** 20, cuda: int = 512 * 2 ** 20) -> int:
    """Default bound on the float32 attention materialised at once (`attention_block_bytes`) on `device`:
    about a CPU's last-level cache; on a GPU (tens of MB of L2, launch-bound at small kernels), 512 MiB, which
    keeps a batch of 128 at ResNet-50 stage-3 shapes in one or two blocks."""
    return cuda if device.type == 'cuda' else cpu


def _same_pad_before(size: int, kernel_size: int, stride: int) -> int:
    """Zeros TF 'SAME' padding puts before a dimension of `size` (timm's `pad_same`: the smaller half)."""
    out = (size - 1) // stride + 1
    return max((out - 1) * stride + kernel_size - size, 0) // 2


def _gaussian_1d(
        alpha: torch.Tensor,
        center: torch.Tensor,
        in_size: int,
        out_size: int,
        stride: int,
        start: int = 0,
) -> torch.Tensor:
    """Row-stochastic 1D Gaussian attention of every head, in float32.

    Args:
        alpha: (heads,) locality strength, > 0.
        center: (heads,) attention centre, as an offset from the query, in pixels.
        start: input position of the first query.
    Returns:
        (heads, out_size, in_size): weight of key k for the query at `start + stride * i`. Each row is a
        softmax over all offsets in [-(in_size - 1), in_size - 1]; offsets outside the image are
        zero tokens, so rows of border queries sum to less than 1. Weights are 0 or >= 1e-15
        (`_exp_without_subnormals`).
    """
    alpha = alpha.float()[:, None]
    center = center.float()[:, None]
    offsets = torch.arange(-(in_size - 1), in_size, device=alpha.device, dtype=torch.float32)
    log_norm = torch.logsumexp(_raise_to_range_(-alpha * (offsets - center) ** 2), dim=-1)  # heads
    keys = torch.arange(in_size, device=alpha.device, dtype=torch.float32)
    queries = torch.arange(out_size, device=alpha.device, dtype=torch.float32) * stride + start
    rel = keys[None, :] - queries[:, None]  # out_size, in_size
    logits = -alpha[:, :, None] * (rel[None] - center[:, :, None]) ** 2
    return _exp_without_subnormals(logits - log_norm[:, None, None])


def _onehot_1d(offsets: torch.Tensor, in_size: int, out_size: int, stride: int, start: int = 0) -> torch.Tensor:
    """(heads, out_size, in_size) float32: 1 where key k sits at `offsets[h]` from the query at `start + stride * i`."""
    keys = torch.arange(in_size, device=offsets.device)
    queries = torch.arange(out_size, device=offsets.device) * stride + start
    rel = keys[None, :] - queries[:, None]
    return (rel[None] == offsets[:, None, None]).float()


def _float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32, also under autocast."""
    if torch.jit.is_scripting() or a.device.type == 'meta':
        return a.float() @ b.float()  # scripted code and meta tensors do not autocast
    return _float32_matmul_no_autocast(a, b)


@torch.jit.unused
def _float32_matmul_no_autocast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float()


def _mixing_dtype(x: torch.Tensor) -> torch.dtype:
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


def _tokens(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C) in `dtype`: a view of x in its own layout (NCHW or channels-last), copied only
    to change the dtype (once per call, not per block of queries)."""
    return x.flatten(2).transpose(1, 2).to(dtype)


def _mix(tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Full-width values: (B, N, C) tokens, (B, Nq, heads, N) attention -> (B, Nq, heads, C), x A_h^T per head.

    One GEMM per sample, (Nq * heads, N) @ (N, C), writing the layout the tap projection reads.
    """
    B, Nq, heads, N = attn.shape
    return (attn.reshape(B, Nq * heads, N) @ tokens).unflatten(1, (Nq, heads))


class GatedPositionalAttention2d(nn.Module):
    """Gated positional self-attention with the interface of an `nn.Conv2d`.

    Input (B, C_in, H, W), output (B, C_out, H_out, W_out) with H_out = ceil(H / stride), exactly as
    a KxK convolution with `groups` groups and padding K // 2 (or, with `same_padding`, TF 'SAME'
    padding as timm's `Conv2dSame`: for stride 2 the zeros before a dimension depend on its size, so
    the queries sit at `query_start(H, W) + stride * (i, j)`). Heads = K * K kernel taps; every head
    reads the full-width input, and its tap's slice of the grouped kernel projects it group by group
    (block-diagonal; diagonal for depthwise), at the cost of the grouped convolution. Parameters:

        weight:        (C_out, C_in / groups, K, K) value/output projection, one tap slice per head
        bias:          (C_out,) or None
        content_gate:  (heads,) content share before clamping to [0, 1]; 0 at conversion
        locality_gate: (heads,) Gaussian share of the positional attention; 0 at conversion
        pos_log_alpha: (heads,) log locality strength of the Gaussian positional attention
        pos_center:    (heads, 2) Gaussian centre (rows, cols) relative to the query
        q, k:          C_in -> heads * qk_dim projections of the content attention

    The four gate and positional parameters are stored divided by `gate_lr_scale` (a buffer) and learn
    that many times faster than the weights (`rate_scaled`); `attention_values()` returns their values and
    `set_attention_values()` sets them.

    `attention_block_bytes` bounds the float32 attention tensor materialised at once: queries are
    processed in blocks of that size. None (default) chooses per device type (`default_block_bytes`): about
    a CPU's last-level cache, which keeps the memory-bound softmax and blend passes in cache, and on a GPU
    blocks large enough for few, large kernels. It changes speed only, never the result.

    Invariant: with both gates at 0 the layer equals `F.conv2d(x, weight, bias, stride, K // 2, 1, groups)`
    (with `same_padding`, the same on `timm.layers.pad_same(x, (K, K), (stride, stride))` without padding).
    """
    __jit_ignored_attributes__ = ['_inference_cache']  # eager inference only

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            bias: bool = True,
            groups: int = 1,
            same_padding: bool = False,
            qk_dim: int = 32,
            qk_init_std: float = 0.02,
            locality_init: float = 1.0,
            gate_lr_scale: float = 1.0,
            grad_floor: float = 0.0,
            attention_block_bytes: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}.')
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}.')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.')
        if locality_init <= 0:
            raise ValueError(f'locality_init must be > 0, got {locality_init}.')
        if not gate_lr_scale > 0:
            raise ValueError(f'gate_lr_scale must be > 0, got {gate_lr_scale}.')
        if not 0 <= grad_floor <= 1:
            raise ValueError(f'grad_floor must be in [0, 1], got {grad_floor}.')
        self.grad_floor = float(grad_floor)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        self.same_padding = same_padding
        self.num_heads = kernel_size * kernel_size
        self.qk_dim = qk_dim
        self.scale = qk_dim ** -0.5
        self.qk_init_std = qk_init_std
        self.locality_init = locality_init
        if attention_block_bytes is not None and attention_block_bytes < 1:
            raise ValueError(f'attention_block_bytes must be >= 1, got {attention_block_bytes}.')
        self.attention_block_bytes = attention_block_bytes

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.content_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.locality_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_log_alpha = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_center = nn.Parameter(torch.empty(self.num_heads, 2, **dd))
        self.register_buffer('gate_lr_scale', torch.tensor(float(gate_lr_scale), device=device, dtype=torch.float32))
        self.q = nn.Linear(in_channels, self.num_heads * qk_dim, bias=False, **dd)
        self.k = nn.Linear(in_channels, self.num_heads * qk_dim, bias=False, **dd)
        # inference only: input-independent tensors per (H, W, device), keyed by parameter versions
        self._inference_cache = {}
        self.reset_parameters()

    def tap_offsets(self) -> torch.Tensor:
        """(heads, 2) offset (rows, cols) of each head's kernel tap from the query, row-major."""
        taps = torch.arange(self.kernel_size, device=self.pos_center.device) - self.padding
        rows, cols = torch.meshgrid(taps, taps, indexing='ij')
        return torch.stack([rows.flatten(), cols.flatten()], dim=-1)

    @torch.no_grad()
    def reset_attention(self) -> None:
        """Put every attention-only parameter in its conversion state, with fresh random Q/K."""
        if self.pos_center.is_meta:
            return
        trunc_normal_(self.q.weight, std=self.qk_init_std)
        trunc_normal_(self.k.weight, std=self.qk_init_std)
        self.set_attention_values(**self.conversion_values())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # as nn.Conv2d
        if self.bias is not None:
            bound = (self.in_channels // self.groups * self.kernel_size ** 2) ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_attention()

    def conversion_values(self) -> Dict[str, torch.Tensor]:
        """Values of the gates and positional parameters (`RATE_SCALED_PARAMS`) of the exact conversion."""
        like = self.content_gate
        return {
            'content_gate': torch.zeros_like(like),
            'locality_gate': torch.zeros_like(like),
            'pos_log_alpha': torch.full_like(like, math.log(self.locality_init)),
            'pos_center': self.tap_offsets().to(like),
        }

    def conversion_state(self) -> Dict[str, torch.Tensor]:
        """State-dict entries of the attention-only parameters and buffers that make the layer equal its
        convolution.

        Keys are relative to the layer (`content_gate`, `q.weight`, `gate_lr_scale`, ...); values are in
        stored form (divided by `gate_lr_scale`). The Q/K projections keep their current (random) values:
        the content branch is silent while `content_gate` is 0.
        """
        scale = self.gate_lr_scale.detach()
        state = {name: value / scale for name, value in self.conversion_values().items()}
        state.update({
            'q.weight': self.q.weight.detach().clone(),
            'k.weight': self.k.weight.detach().clone(),
            'gate_lr_scale': scale.clone(),
        })
        return state

    def fill_conversion_state(self, state_dict: Dict[str, torch.Tensor], prefix: str = '') -> bool:
        """If `state_dict` holds a convolution's entries for this layer (`weight`, `bias` and none of
        the attention ones), add the attention entries of the exact conversion, in place.

        Returns True when entries were added.
        """
        own = self.conversion_state()
        if prefix + 'weight' not in state_dict or any(prefix + k in state_dict for k in own):
            return False
        state_dict.update({prefix + k: v for k, v in own.items()})
        return True

    def _rescale_state(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> None:
        """Re-express, in place, attention entries stored with another `gate_lr_scale` in this layer's scale,
        keeping their values. Entries without a scale (saved before it existed) were stored with scale 1."""
        if prefix + 'content_gate' not in state_dict or self.gate_lr_scale.is_meta:
            return
        saved = state_dict.get(prefix + 'gate_lr_scale')
        saved_scale = 1. if saved is None else float(saved)
        own_scale = float(self.gate_lr_scale)
        if saved_scale != own_scale:
            for name in RATE_SCALED_PARAMS:
                if prefix + name in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + name] * (saved_scale / own_scale)
        state_dict[prefix + 'gate_lr_scale'] = self.gate_lr_scale.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a convolution's entries load as the exact conversion (timm's strict checkpoint loading); attention
        # entries keep their values whatever scale they were saved with
        if not self.fill_conversion_state(state_dict, prefix):
            self._rescale_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def attention_values(self) -> Dict[str, torch.Tensor]:
        """Current values of the gates and positional parameters (stored * `gate_lr_scale`), detached."""
        stored = (self.content_gate, self.locality_gate, self.pos_log_alpha, self.pos_center)
        return {name: p.detach() * self.gate_lr_scale for name, p in zip(RATE_SCALED_PARAMS, stored)}

    @torch.jit.unused
    @torch.no_grad()
    def set_attention_values(self, **values: Any) -> None:
        """Set gates and positional parameters by value (tensors or numbers, broadcast to their shapes),
        e.g. `set_attention_values(content_gate=0.3, pos_log_alpha=torch.zeros(9))`."""
        unknown = sorted(set(values) - set(RATE_SCALED_PARAMS))
        if unknown:
            raise ValueError(f'{unknown} are not gate or positional parameters; use {list(RATE_SCALED_PARAMS)}.')
        for name, value in values.items():
            param = self.get_parameter(name)
            param.copy_(torch.as_tensor(value, dtype=param.dtype, device=param.device) / self.gate_lr_scale)

    def _content_gate(self) -> torch.Tensor:
        """(heads,) content gate in [0, 1], float32, learning at `gate_lr_scale` x the weights' rate."""
        return straight_through_clamp(rate_scaled(self.content_gate.float(), self.gate_lr_scale))

    def _locality_gate(self) -> torch.Tensor:
        """(heads,) locality gate in [0, 1], float32, learning at `gate_lr_scale` x the weights' rate."""
        return straight_through_clamp(rate_scaled(self.locality_gate.float(), self.gate_lr_scale))

    def content_share(self) -> torch.Tensor:
        """(heads,) share of content attention in [0, 1]; 0 = the head behaves as its conv tap."""
        return self.attention_values()['content_gate'].clamp(0, 1)

    def locality_share(self) -> torch.Tensor:
        """(heads,) share of the Gaussian in the positional attention, in [0, 1]; 0 = one-hot."""
        return self.attention_values()['locality_gate'].clamp(0, 1)

    def is_convolution(self) -> bool:
        """True while the layer computes exactly its convolution."""
        return bool((self.content_share() == 0).all() and (self.locality_share() == 0).all())

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def query_start(self, height: int, width: int) -> Tuple[int, int]:
        """Input position (row, col) of the first query: the query of output (i, j) sits at start + stride * (i, j).

        (0, 0) with padding K // 2; with TF 'SAME' padding, K // 2 minus the zeros before each dimension.
        """
        if not self.same_padding:
            return 0, 0
        k, s = self.kernel_size, self.stride
        return self.padding - _same_pad_before(height, k, s), self.padding - _same_pad_before(width, k, s)

    def positional_gaussian(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Separable factors (heads, H_out, H) and (heads, W_out, W) of the Gaussian attention, float32."""
        alpha = rate_scaled(self.pos_log_alpha.float(), self.gate_lr_scale).exp()
        center = rate_scaled(self.pos_center.float(), self.gate_lr_scale)
        out_h, out_w = self.output_size(height, width)
        row0, col0 = self.query_start(height, width)
        rows = _gaussian_1d(alpha, center[:, 0], height, out_h, self.stride, row0)
        cols = _gaussian_1d(alpha, center[:, 1], width, out_w, self.stride, col0)
        return rows, cols

    def positional_mixing(self, height: int, width: int) -> torch.Tensor:
        """The input-independent part of the attention, (1 - g) * P, as a dense float32 (Nq, heads, N).

        P = (1 - l) * onehot(D_h) + l * gauss, both outer products of row and column factors. Queries lead,
        heads second: the layout `forward` mixes in.
        """
        content = self._content_gate()
        locality = self._locality_gate()
        out_h, out_w = self.output_size(height, width)
        taps = self.tap_offsets()
        gauss_rows, gauss_cols = self.positional_gaussian(height, width)
        row0, col0 = self.query_start(height, width)
        onehot_rows = _onehot_1d(taps[:, 0], height, out_h, self.stride, row0)
        onehot_cols = _onehot_1d(taps[:, 1], width, out_w, self.stride, col0)
        keep = 1 - content
        onehot = torch.einsum('hiy,hjx->ijhyx', onehot_rows * (keep * (1 - locality))[:, None, None], onehot_cols)
        gauss = torch.einsum('hiy,hjx->ijhyx', gauss_rows, gauss_cols)  # H_out, W_out, heads, H, W; 0 or >= 1e-30
        # the Gaussian's share in one fused pass, with the gradient floor: 0 or normal for shares >= 2e-8
        dense = _blend(onehot, gauss, (keep * locality)[:, None, None], self.grad_floor)
        return dense.reshape(out_h * out_w, self.num_heads, height * width)

    def _queries_keys(
            self, x: torch.Tensor, heads: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled queries (B, h, Nq, d) and keys (B, h, d, N) of every head, or of `heads` (indices) only."""
        B = x.shape[0]
        row0, col0 = self.query_start(x.shape[-2], x.shape[-1])
        queries = x if self.stride == 1 else x[:, :, row0::self.stride, col0::self.stride]
        q_weight, k_weight = self.q.weight, self.k.weight
        if heads is not None:
            q_weight = q_weight.unflatten(0, (self.num_heads, -1))[heads].flatten(0, 1)
            k_weight = k_weight.unflatten(0, (self.num_heads, -1))[heads].flatten(0, 1)
        num_heads = q_weight.shape[0] // self.qk_dim
        # (B, h * d, N) = W @ x per sample: reads NCHW or channels-last x in place, no token copies
        q = torch.bmm(q_weight.expand(B, -1, -1), queries.flatten(2)).unflatten(1, (num_heads, -1))
        k = torch.bmm(k_weight.expand(B, -1, -1), x.flatten(2)).unflatten(1, (num_heads, -1))
        return q.transpose(-2, -1) * self.scale, k

    def content_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled query-key products of every head, always in float32 (see `attention_map`).

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, heads, H_out * W_out, H * W)
        """
        q, k = self._queries_keys(x)
        return _float32_matmul(q, k)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of every head, A_h = g_h * S_h(x) + (1 - g_h) * P_h, in float32.

        Logits and softmax are computed in float32 whatever the input dtype or autocast state, so
        reduced precision cannot overflow or round them; A is a (sub-)stochastic matrix.

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, H_out * W_out, heads, H * W), queries leading (the layout `forward` mixes in)
        """
        content = self._content_gate()
        positional = self.positional_mixing(x.shape[-2], x.shape[-1])
        # reading the (B, Nq, h, N) view, addcmul writes A contiguous in that layout (no extra copy)
        probs = _softmax_without_subnormals_(self.content_logits(x))
        return _blend(positional, probs.transpose(1, 2), content[:, None], self.grad_floor)

    def content_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Content attention of every head applied to the full-width input.

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, C_in, heads, H_out * W_out): for head h, the attention-weighted input x S_h^T.
        """
        probs = _softmax_without_subnormals_(self.content_logits(x)).transpose(1, 2)
        attn = _cast_without_subnormals(probs, _mixing_dtype(x))
        return _mix(_tokens(x, attn.dtype), attn).permute(0, 3, 2, 1)

    def positional_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian positional attention of every head applied to the input.

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, C_in, heads, H_out * W_out)
        """
        rows, cols = self.positional_gaussian(x.shape[-2], x.shape[-1])
        rows, cols = _cast_without_subnormals(rows, x.dtype), _cast_without_subnormals(cols, x.dtype)
        # separable: first along columns, then along rows
        t = torch.einsum('bcyx,hjx->bchyj', x, cols)  # B, C, h, H, W_out
        out = torch.einsum('bchyj,hiy->bchij', t, rows)  # B, C, h, H_out, W_out
        return out.flatten(3)

    def tap_major_weight(self) -> torch.Tensor:
        """(groups, C_out / groups, heads * C_in / groups) projection of the taps, per group and head-major:
        what `forward`'s last (grouped) GEMM reads."""
        weight = self.weight.unflatten(0, (self.groups, -1))  # G, O_g, C_g, K, K
        return weight.permute(0, 1, 3, 4, 2).flatten(2)

    def _project(self, mixed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bias + sum_h W_h (x A_h^T): (B, Nq, heads, C_in) mixed inputs, `tap_major_weight` (of those heads) ->
        (B, Nq, C_out).

        Dense layers take one GEMM; grouped ones one batched GEMM over groups, (G, B * Nq, heads * C_g) @
        (G, heads * C_g, O_g): the multiply-adds of the grouped convolution, no block-diagonal matrix.
        """
        if self.groups == 1:
            return F.linear(mixed.flatten(2), weight[0], bias)
        B, Nq, heads, C = mixed.shape
        per_group = mixed.unflatten(3, (self.groups, -1)).permute(3, 0, 1, 2, 4).reshape(self.groups, B * Nq, -1)
        out = torch.bmm(per_group, weight.transpose(1, 2))  # G, B * Nq, O_g
        out = out.transpose(0, 1).reshape(B, Nq, self.out_channels)
        return out if bias is None else out + bias

    def _head_weight(self, weight: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The slices of `tap_major_weight` (G, O_g, heads * C_g) that project `heads` (indices), contiguous."""
        return weight.unflatten(2, (self.num_heads, -1))[:, :, heads].flatten(2).contiguous()

    def _mix_and_project(
            self,
            x: torch.Tensor,
            content_part: Optional[Tuple[torch.Tensor, torch.Tensor]],
            fixed_part: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
            content_heads: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """y = bias + sum_h W_h (x A_h^T) from x (B, C_in, H, W), in blocks of queries of at most
        `attention_block_bytes` (or `default_block_bytes`) of attention.

        The heads come in two parts, each a pair (positional part of their attention, `positional_mixing`'s
        (Nq, h, N); their `tap_major_weight` slices):
            content_part: heads whose attention adds content, `content_heads` (indices; None: all heads);
            fixed_part: heads whose content gate is 0 (inference only), with their positional attention
                contiguous: it is the same for every sample, so their mixing GEMM reads it once, not per sample.
        """
        B, C, H, W = x.shape
        out_h, out_w = self.output_size(H, W)
        num_queries = out_h * out_w
        per_query = 4 * B * self.num_heads * H * W
        block_bytes = self.attention_block_bytes
        if block_bytes is None:
            block_bytes = default_block_bytes(x.device)
        num_blocks = -(-num_queries * per_query // block_bytes)  # ceil
        block = -(-num_queries // max(1, num_blocks))  # balanced blocks
        tokens = _tokens(x, _mixing_dtype(x))  # B, N, C_in
        gate = self._content_gate()[:, None]
        q, k = x, x  # unused without content
        if content_part is not None:
            gate = gate if content_heads is None else gate[content_heads]
            q, k = self._queries_keys(x, content_heads)
        outs = []
        for start in range(0, num_queries, block):
            stop = min(start + block, num_queries)
            projected: List[torch.Tensor] = []  # B, block, C_out, per part
            if fixed_part is not None:
                positional, weight = fixed_part
                attn = _cast_without_subnormals(positional[start:stop], tokens.dtype)
                projected.append(self._project(_mix(tokens, attn.expand(B, -1, -1, -1)), weight, self.bias))
            if content_part is not None:
                positional, weight = content_part
                mixed = _content_mix(tokens, positional[start:stop], q[:, :, start:stop], k, gate, self.grad_floor)
                projected.append(self._project(mixed, weight, self.bias if len(projected) == 0 else None))
            outs.append(projected[0] if len(projected) == 1 else projected[0] + projected[1])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        out = out.unflatten(1, (out_h, out_w)).permute(0, 3, 1, 2)  # channels-last layout
        if x.is_contiguous(memory_format=torch.channels_last):
            return out
        return out.contiguous()

    def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The attention computation itself, as in training: never the inference shortcuts (cached
        positional matrix, skipped content branch, `F.conv2d` while the layer is its convolution)."""
        return self._mix_and_project(x, (self.positional_mixing(x.shape[-2], x.shape[-1]), self.tap_major_weight()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not (traced or torch.is_grad_enabled()):
            return self._inference_forward(x)
        return self.attention_forward(x)

    @torch.jit.unused
    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd, reusing what does not depend on the input until a parameter changes.

        Computes the content attention only for heads whose content gate is open (none while every gate is
        exactly 0), mixes the other heads with their positional attention, one matrix for every sample, and runs
        the convolution itself while the layer is exactly its convolution.
        """
        height, width = x.shape[-2:]
        params = (self.weight, self.content_gate, self.locality_gate, self.pos_log_alpha, self.pos_center,
                  self.gate_lr_scale)
        versions = tuple((p.data_ptr(), p._version) for p in params)
        key = (height, width, str(x.device))
        entry: Optional[Tuple] = self._inference_cache.get(key)
        if entry is None or entry[0] != versions:
            entry = (versions,) + self._inference_parts(height, width)
            if len(self._inference_cache) >= 8:
                self._inference_cache.pop(next(iter(self._inference_cache)))
            self._inference_cache[key] = entry
        _, is_conv, content_part, fixed_part, content_heads = entry
        if is_conv:
            return self._conv_forward(x)
        return self._mix_and_project(x, content_part, fixed_part, content_heads)

    @torch.jit.unused
    def _inference_parts(self, height: int, width: int) -> Tuple:
        """What inference on (height, width) maps reuses: whether the layer is its convolution, and the
        content and fixed parts of `_mix_and_project` with the open heads' indices (None: all heads open)."""
        content = self.content_share()
        open_heads, closed_heads = (content > 0).nonzero().flatten(), (content == 0).nonzero().flatten()
        if open_heads.numel() == 0 and bool((self.locality_share() == 0).all()):
            return True, None, None, None
        positional = self.positional_mixing(height, width)
        weight = self.tap_major_weight()

        def part(heads: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
            return (positional[:, heads].contiguous(), self._head_weight(weight, heads)) if heads.numel() else None

        all_open = open_heads.numel() == self.num_heads
        return False, part(open_heads), part(closed_heads), None if all_open else open_heads

    @torch.jit.unused
    def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution the layer equals while both gates are 0."""
        if self.same_padding:
            x = pad_same(x, [self.kernel_size] * 2, [self.stride] * 2)
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        groups = f', groups={self.groups}' if self.groups > 1 else ''
        same = ', padding=same' if self.same_padding else ''
        return (
            f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}{groups}'
            f'{same}, heads={self.num_heads}, qk_dim={self.qk_dim}, bias={self.bias is not None}'
        )
