""" Gated positional self-attention on NCHW maps, initialisable as an exact convolution.

A KxK convolution with dilation r and padding r * (K // 2) is multi-head self-attention with one head per
kernel tap (Cordonnier et al., ICLR 2020): head h attends, one-hot, to the pixel at its tap offset r * D_h from
the query (a zero token when that pixel lies outside the image) and projects what it reads with
the tap's C_out x C_in slice of the kernel. `GatedPositionalAttention2d` keeps that structure and
adds, per head, what attention can learn and a convolution cannot:

    A_h = (1 - g_h) * P_h + g_h * S_h(x)                        (content gate g_h)
    P_h = (1 - l_h) * onehot(r D_h) + l_h * gauss(alpha_h, c_h) (locality gate l_h)
    S_h = softmax(q_h(x) k_h(x)^T / sqrt(d))                    (content attention)
    y   = bias + sum_h W[:, :, D_h] . (x A_h^T)

with the Gaussian separable over the key's offset (dy, dx) from the query, in pixels:
gauss(alpha, c)[q, k] = G(dy; c_0) G(dx; c_1), G(o; c) = exp(-alpha (o - c)^2) / sum_o' exp(-alpha (o' - c)^2)
with o' over every offset -(size - 1) ... size - 1 of that dimension (keys outside the image are zero tokens, so
rows of border queries sum to less than 1), and the centre c_h starting at r * D_h.

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
`grad_floor`: the forward pass is unchanged, so is exactness, and the gates get their true gradients;
only the gradients of Q/K, alpha and the centre of nearly closed heads are raised. The one-hot part is an
exact 0/1 matrix, never a saturated softmax, and the learnable locality (alpha, centre) lives in the
Gaussian that the locality gate blends in.

How it is computed (docs/performance.md): the positional part does not depend on the input, so it is
built once per call (`positional.py`) as a dense (Nq, heads, N) matrix; one batched GEMM mixes the
full-width input for all heads, (Nq * heads, N) @ (N, C_in), and one GEMM applies the taps, (B * Nq,
heads * C_in) @ (heads * C_in, C_out) (batched over groups for grouped kernels): the multiply-adds of the
convolution plus those of the attention. Which computation runs is chosen in one place (`choices`, from
`config.choose`); every path is tested against `tests/reference.py`.
"""
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.padding import pad_same

from .cache import BoundedCache
from .config import LayerChoices, choose, register
from .functions import AttentionMix, MixGeometry, ScaledValues, content_mix, content_mix_reference, query_blocks
from .inference import InferencePlan
from .numerics import (
    attention_dtype,
    cast_without_subnormals,
    mixing_dtype,
    rate_scaled,
    straight_through_clamp,
    tokens_of,
)
from .positional import (
    ClosedFormPositional,
    PositionalTables,
    cached_positional_tables,
    positional_mixing,
    positional_tables,
    query_start,
)

__all__ = ['GatedPositionalAttention2d', 'RATE_SCALED_PARAMS']

# parameters stored as value / gate_lr_scale (the gates and the Gaussian positional attention)
RATE_SCALED_PARAMS = ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center')


class GatedPositionalAttention2d(nn.Module):
    """Gated positional self-attention with the interface of an `nn.Conv2d`.

    Input (B, C_in, H, W), output (B, C_out, H_out, W_out) with H_out = ceil(H / stride), exactly as
    a KxK convolution with `groups` groups, `dilation` and padding dilation * (K // 2) (or, with `same_padding`, TF
    'SAME' padding as timm's `Conv2dSame`: for stride 2 the zeros before a dimension depend on its size, so the
    queries sit at `query_start(H, W) + stride * (i, j)`). Heads = K * K kernel taps; every head reads the full-width
    input, and its tap's slice of the grouped kernel projects it group by group (block-diagonal; diagonal for
    depthwise), at the cost of the grouped convolution. Parameters:

        weight:        (C_out, C_in / groups, K, K) value/output projection, one tap slice per head
        bias:          (C_out,) or None
        content_gate:  (heads,) content share before clamping to [0, 1]; 0 at conversion
        locality_gate: (heads,) Gaussian share of the positional attention; 0 at conversion
        pos_log_alpha: (heads,) log locality strength of the Gaussian positional attention
        pos_center:    (heads, 2) Gaussian centre (rows, cols) relative to the query
        qk:            C_in -> heads * 2 * qk_dim, the queries and keys of the content attention in one
                       projection: per head, its qk_dim query rows then its qk_dim key rows (`query_key_weights()`)

    The four gate and positional parameters are stored divided by `gate_lr_scale` (a buffer) and learn
    that many times faster than the weights (`rate_scaled`); `attention_values()` returns their values and
    `set_attention_values()` sets them.

    `attention_block_bytes` bounds the float32 attention tensor materialised at once: queries are
    processed in blocks of that size. None (default) chooses per device type (`default_block_bytes`). It
    changes speed only, never the result. `inference_cache_bytes` bounds what the layer keeps between
    inference calls (`inference.py`) besides the plan of the latest map size, which it always keeps.

    Invariant: with both gates at 0 the layer equals `F.conv2d(x, weight, bias, stride, dilation * (K // 2), dilation,
    groups)` (with `same_padding`, the same on `timm.layers.pad_same(x, (K, K), (stride, stride), (dilation,
    dilation))` without padding).
    """
    __jit_ignored_attributes__ = ['_plans', 'choices']  # eager only
    __jit_unused_properties__ = ['inference_cache_bytes']

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            bias: bool = True,
            groups: int = 1,
            dilation: int = 1,
            same_padding: bool = False,
            qk_dim: int = 32,
            qk_init_std: float = 0.02,
            locality_init: float = 1.0,
            gate_lr_scale: float = 1.0,
            grad_floor: float = 0.0,
            attention_block_bytes: Optional[int] = None,
            inference_cache_bytes: int = 64 * 2 ** 20,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}.')
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}.')
        if dilation < 1:
            raise ValueError(f'dilation must be >= 1, got {dilation}.')
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.')
        if locality_init <= 0:
            raise ValueError(f'locality_init must be > 0, got {locality_init}.')
        if not gate_lr_scale > 0:
            raise ValueError(f'gate_lr_scale must be > 0, got {gate_lr_scale}.')
        if not 0 <= grad_floor <= 1:
            raise ValueError(f'grad_floor must be in [0, 1], got {grad_floor}.')
        if attention_block_bytes is not None and attention_block_bytes < 1:
            raise ValueError(f'attention_block_bytes must be >= 1, got {attention_block_bytes}.')
        if inference_cache_bytes < 0:
            raise ValueError(f'inference_cache_bytes must be >= 0, got {inference_cache_bytes}.')
        self.grad_floor = float(grad_floor)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.padding = dilation * (kernel_size // 2)
        self.groups = groups
        self.same_padding = same_padding
        self.num_heads = kernel_size * kernel_size
        self.qk_dim = qk_dim
        self.scale = qk_dim ** -0.5
        self.qk_init_std = qk_init_std
        self.locality_init = locality_init
        self.attention_block_bytes = attention_block_bytes

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.content_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.locality_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_log_alpha = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_center = nn.Parameter(torch.empty(self.num_heads, 2, **dd))
        self.register_buffer('gate_lr_scale', torch.tensor(float(gate_lr_scale), device=device, dtype=torch.float32))
        self.qk = nn.Linear(in_channels, 2 * self.num_heads * qk_dim, bias=False, **dd)
        self._plans = BoundedCache(inference_cache_bytes, keep_newest=True)
        self.choices: LayerChoices = self.choose_computation()
        register(self)
        self.reset_parameters()

    @torch.jit.unused
    def choose_computation(self) -> LayerChoices:
        """Decide, for the layer's device and dtype, how its eager forward pass computes (`config.choose`); done when
        the layer is built, moved or cast, and when a process-wide switch changes. Returns the new `choices`."""
        self.choices = choose(self.weight.device, self.weight.dtype, self.stride, self.groups)
        return self.choices

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.choose_computation()
        return module

    # ---- parameters, conversion and state dicts

    def tap_offsets(self) -> torch.Tensor:
        """(heads, 2) offset (rows, cols) of each head's kernel tap from the query, row-major: dilation x D_h."""
        taps = (torch.arange(self.kernel_size, device=self.pos_center.device) - self.kernel_size // 2) * self.dilation
        rows, cols = torch.meshgrid(taps, taps, indexing='ij')
        return torch.stack([rows.flatten(), cols.flatten()], dim=-1)

    @torch.no_grad()
    def reset_attention(self) -> None:
        """Put every attention-only parameter in its conversion state, with fresh random Q/K."""
        if self.pos_center.is_meta:
            return
        trunc_normal_(self.qk.weight, std=self.qk_init_std)
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

        Keys are relative to the layer (`content_gate`, `qk.weight`, `gate_lr_scale`, ...); values are in
        stored form (divided by `gate_lr_scale`). The Q/K projection keeps its current (random) values:
        the content branch is silent while `content_gate` is 0.
        """
        scale = self.gate_lr_scale.detach()
        state = {name: value / scale for name, value in self.conversion_values().items()}
        state.update({
            'qk.weight': self.qk.weight.detach().clone(),
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

    def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a convolution's entries load as the exact conversion (timm's strict checkpoint loading); attention entries
        # keep their values whatever scale they were saved with
        if not self.fill_conversion_state(state_dict, prefix):
            self._rescale_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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

    def content_share(self) -> torch.Tensor:
        """(heads,) share of content attention in [0, 1]; 0 = the head behaves as its conv tap."""
        return self.attention_values()['content_gate'].clamp(0, 1)

    def locality_share(self) -> torch.Tensor:
        """(heads,) share of the Gaussian in the positional attention, in [0, 1]; 0 = one-hot."""
        return self.attention_values()['locality_gate'].clamp(0, 1)

    def is_convolution(self) -> bool:
        """True while the layer computes exactly its convolution."""
        return bool((self.content_share() == 0).all() and (self.locality_share() == 0).all())

    @property
    def inference_cache_bytes(self) -> int:
        """Bound on what the layer keeps between inference calls (`inference.py`)."""
        return self._plans.max_bytes

    @inference_cache_bytes.setter
    def inference_cache_bytes(self, value: int) -> None:
        if value < 0:
            raise ValueError(f'inference_cache_bytes must be >= 0, got {value}.')
        self._plans.max_bytes = value
        self._plans.trim()

    # ---- geometry

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def query_start(self, height: int, width: int) -> Tuple[int, int]:
        """Input position (row, col) of the first query: the query of output (i, j) sits at start + stride * (i, j).

        (0, 0) with padding dilation * (K // 2); with TF 'SAME' padding, that minus the zeros before each dimension.
        """
        k, s, same, d = self.kernel_size, self.stride, self.same_padding, self.dilation
        return query_start(height, k, s, same, d), query_start(width, k, s, same, d)

    def attention_dtype(self) -> torch.dtype:
        """The dtype of the layer's attention, gates and positional values: float64 for a float64 layer, else float32
        (under autocast too)."""
        return attention_dtype(self.pos_center.dtype)

    def _tables(self, height: int, width: int, device: torch.device) -> PositionalTables:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return positional_tables(
                self.kernel_size,
                self.stride,
                height,
                width,
                self.same_padding,
                device,
                self.attention_dtype(),
                dilation=self.dilation,
            )
        return self._cached_tables(height, width, device)

    @torch.jit.unused
    def _positional_builder(self, height: int, width: int, device: torch.device) -> Any:
        """What builds the positional attention in the eager training path: the Triton kernels where the layer's
        choices say so and they agree with the closed form on this shape (`config.py`), else the closed form."""
        if self.choices.positional_kernels:
            from .positional_kernels import checked_kernels  # imports Triton

            kernels = checked_kernels(
                self.kernel_size, self.stride, height, width, self.same_padding, device, dilation=self.dilation
            )
            if kernels is not None:
                return kernels
        return ClosedFormPositional(self._tables(height, width, device))

    @torch.jit.unused
    def _cached_tables(self, height: int, width: int, device: torch.device) -> PositionalTables:
        return cached_positional_tables(
            self.kernel_size,
            self.stride,
            int(height),
            int(width),
            self.same_padding,
            device,
            self.dilation,
            self.attention_dtype(),
        )

    def _block(self, batch: int, height: int, width: int) -> int:
        """Queries per block: the float32 attention of a block stays within `attention_block_bytes` (by default the
        layer's `choices.block_bytes`)."""
        block_bytes = self.attention_block_bytes
        if block_bytes is None:
            block_bytes = self.choices.block_bytes
        out_h, out_w = self.output_size(height, width)
        num_queries = out_h * out_w
        per_query = 4 * batch * self.num_heads * height * width
        num_blocks = -(-num_queries * per_query // block_bytes)  # ceil
        return -(-num_queries // max(1, num_blocks))  # balanced blocks

    # ---- the attention's parts (timm_tcnn.tools.analysis has the attention itself in parts)

    def _values(self) -> torch.Tensor:
        """(5 * heads,) values in the attention's dtype: content gate, locality gate (in [0, 1]), log alpha, centre
        (`split_values`), rate-scaled and straight-through, in standard operations (`ScaledValues` in the eager
        paths)."""
        scale, dtype = self.gate_lr_scale, self.attention_dtype()
        return torch.cat(
            [
                straight_through_clamp(rate_scaled(self.content_gate.to(dtype), scale)),
                straight_through_clamp(rate_scaled(self.locality_gate.to(dtype), scale)),
                rate_scaled(self.pos_log_alpha.to(dtype), scale),
                rate_scaled(self.pos_center.to(dtype), scale).flatten(),
            ]
        )

    @torch.jit.unused
    def _scaled_values(self) -> torch.Tensor:
        return ScaledValues.apply(
            self.content_gate, self.locality_gate, self.pos_log_alpha, self.pos_center, self.gate_lr_scale
        )

    def query_key_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views (heads, d, C_in) of the query and key weights in the joint projection `qk`."""
        return self.qk.weight.view(self.num_heads, 2, self.qk_dim, -1).unbind(1)

    def _qk_weight(self, heads: torch.Tensor) -> torch.Tensor:
        """The joint projection's rows of `heads` (indices), in its layout: (heads * 2 * d, C_in)."""
        return self.qk.weight.view(self.num_heads, -1, self.in_channels).index_select(0, heads).flatten(0, 1)

    def tap_major_weight(
        self, heads: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
    ) -> torch.Tensor:
        """(groups, C_out / groups, heads * C_in / groups) projection of the taps (of `heads`, indices, if given),
        per group and head-major: what the last (grouped) GEMM reads, in `dtype` (the weight's if None). One copy of
        the weight (two to select heads in another dtype)."""
        weight = self.weight.view(self.groups, self.out_channels // self.groups, -1, self.num_heads)
        weight = weight.permute(0, 1, 3, 2)  # G, O_g, heads, C_g
        if heads is not None:
            weight = weight.index_select(2, heads).flatten(2)
            return weight if dtype is None else weight.to(dtype)
        if dtype is None or dtype == weight.dtype:
            return weight.reshape(weight.shape[0], weight.shape[1], -1)
        return weight.new_empty(weight.shape, dtype=dtype).copy_(weight).flatten(2)  # the layout and the cast at once

    def _project(
        self,
        mixed: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        add_to: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """add_to + bias + sum_h W_h (x A_h^T): (B, Nq, heads, C_in) mixed inputs, `tap_major_weight` (of those
        heads) -> (B * Nq, C_out).

        Dense layers take one GEMM; grouped ones one batched GEMM over groups, (G, B * Nq, heads * C_g) @
        (G, heads * C_g, O_g): the multiply-adds of the grouped convolution, no block-diagonal matrix.
        """
        B, Nq, heads, C = mixed.shape
        if self.groups == 1:
            flat, weight = mixed.reshape(B * Nq, heads * C), weight.flatten(0, 1)
            base = add_to if add_to is not None else bias
            if base is None:
                return torch.mm(flat, weight.t())
            out = torch.addmm(base, flat, weight.t())
            return out if add_to is None or bias is None else out + bias
        per_group = mixed.unflatten(3, (self.groups, -1)).permute(3, 0, 1, 2, 4).reshape(self.groups, B * Nq, -1)
        out = torch.bmm(per_group, weight.transpose(1, 2)).transpose(0, 1).reshape(B * Nq, self.out_channels)
        if bias is not None:
            out = out + bias
        return out if add_to is None else out + add_to

    def _to_map(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B * Nq, C_out) (or `_project_channels_first`'s (B, C_out, Nq)) -> (B, C_out, H_out, W_out),
        channels-last when x is."""
        out_h, out_w = self.output_size(x.shape[-2], x.shape[-1])
        if out.dim() == 3:
            return out.view(x.shape[0], self.out_channels, out_h, out_w)
        out = out.view(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        if x.is_contiguous(memory_format=torch.channels_last):
            return out
        return out.contiguous()

    def _project_channels_first(
        self,
        mixed: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        add_to: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`_project` of a dense layer written channels first, (B, C_out, Nq): one GEMM per sample against the
        shared weight, so that an NCHW map needs no transposing copy. Inference only (autograd would expand the
        weight's gradient over the batch)."""
        B, Nq = mixed.shape[:2]
        flat, weight = mixed.reshape(B, Nq, -1).transpose(1, 2), weight.flatten(0, 1).expand(B, -1, -1)
        if add_to is not None:
            out = torch.baddbmm(add_to, weight, flat)
            return out if bias is None else out + bias[:, None]
        return torch.bmm(weight, flat) if bias is None else torch.baddbmm(bias[:, None], weight, flat)

    def _geometry(self, x: torch.Tensor, block: int, queries_everywhere: bool) -> MixGeometry:
        H, W = x.shape[-2], x.shape[-1]
        return MixGeometry(
            H, W, self.stride, self.query_start(H, W), self.qk_dim, self.scale, block, queries_everywhere
        )

    # ---- the computations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._standard_ops_forward(x)
        if not torch.is_grad_enabled():  # nothing to differentiate: the inference plan
            return self._inference_forward(x)
        return self.attention_forward(x)

    @torch.jit.unused
    def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The attention computation itself, as in training, whatever the grad mode: never the inference
        shortcuts (reused positional attention, skipped content branch, `F.conv2d` while the layer is its
        convolution)."""
        B, C, H, W = x.shape
        values = self._scaled_values()
        builder = self._positional_builder(H, W, x.device)
        geometry = self._geometry(x, self._block(B, H, W), self.choices.queries_everywhere)
        mixed = AttentionMix.apply(x, self.qk.weight, values, builder, geometry, self.grad_floor)
        return self._to_map(self._project(mixed, self.tap_major_weight(dtype=mixed.dtype), self.bias), x)

    def _standard_ops_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training computation in standard operations, all queries at once: scripted, traced, exported and
        compiled graphs (compilers fuse what the autograd functions fuse by hand). Stride-2 layers project queries
        at their positions only: the fewest multiply-adds, whatever the device."""
        H, W = x.shape[-2], x.shape[-1]
        values = self._values()
        positional = positional_mixing(values, self._tables(H, W, x.device), self.grad_floor)
        geometry = self._geometry(x, 0, self.stride == 1)
        mixed = content_mix_reference(x, self.qk.weight, positional, values, geometry, self.grad_floor)
        return self._to_map(self._project(mixed, self.tap_major_weight(), self.bias), x)

    @torch.jit.unused
    def _stored_values(self) -> torch.Tensor:
        """The gate and positional parameters as stored, and the scale: what an inference plan is built from."""
        return torch.cat(
            [
                self.content_gate,
                self.locality_gate,
                self.pos_log_alpha,
                self.pos_center.flatten(),
                self.gate_lr_scale.view(1),
            ]
        )

    @torch.jit.unused
    def _inference_plan(self, height: int, width: int, device: torch.device) -> InferencePlan:
        stored = self._stored_values()
        key = (height, width, device)
        plan = self._plans.get(key)
        if plan is None or not torch.equal(plan.key, stored):
            plan = self._build_plan(height, width, device, stored.clone())
            self._plans.put(key, plan, plan.nbytes)
        return plan

    @torch.jit.unused
    def _build_plan(self, height: int, width: int, device: torch.device, stored: torch.Tensor) -> InferencePlan:
        values = self._scaled_values()
        gate, locality = values[: self.num_heads], values[self.num_heads : 2 * self.num_heads]
        open_heads, closed_heads = (gate > 0).nonzero().flatten(), (gate == 0).nonzero().flatten()
        if open_heads.numel() == 0 and bool((locality == 0).all()):
            return InferencePlan(stored, True)
        positional = positional_mixing(values, self._tables(height, width, device))
        closed = {}
        if closed_heads.numel():
            closed = dict(closed_heads=closed_heads, closed_positional=positional[:, closed_heads].contiguous())
        if open_heads.numel() == 0:
            return InferencePlan(stored, False, **closed)
        if open_heads.numel() == self.num_heads:  # one part: no indexing
            return InferencePlan(stored, False, open_positional=positional, open_gates=gate.clone())
        return InferencePlan(
            stored,
            False,
            open_heads=open_heads,
            open_positional=positional[:, open_heads].contiguous(),
            open_gates=gate[open_heads],
            head_order=torch.cat([open_heads, closed_heads]),
            **closed,
        )

    @torch.jit.unused
    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd, reusing the plan for x's map size (`inference.py`).

        Runs the convolution itself while the layer is exactly its convolution; otherwise mixes the closed heads
        with their positional attention alone, one matrix read by every sample's GEMM, and computes the content
        attention only for the open heads.
        """
        B, C, H, W = x.shape
        plan = self._inference_plan(H, W, x.device)
        if plan.is_convolution:
            return self._conv_forward(x)
        tokens = tokens_of(x, mixing_dtype(x))
        # one copy of the tap weight, open heads first: each part's weight is a view of it
        order = plan.head_order if plan.head_order is not None else plan.closed_heads
        weight = self.tap_major_weight(order, tokens.dtype)
        num_open = 0 if plan.open_positional is None else plan.open_positional.shape[1]
        split = num_open * (self.in_channels // self.groups)
        channels_first = self.choices.channels_first_projection and not x.is_contiguous(
            memory_format=torch.channels_last
        )
        project = self._project_channels_first if channels_first else self._project
        out: Optional[torch.Tensor] = None
        if plan.closed_positional is not None:
            positional = cast_without_subnormals(plan.closed_positional, tokens.dtype)
            out = self._mix_closed(tokens, positional, weight[..., split:], channels_first)
        if plan.open_positional is not None:
            geometry = self._geometry(x, self._block(B, H, W), self.choices.queries_everywhere)
            qk_weight = self.qk.weight if plan.open_heads is None else self._qk_weight(plan.open_heads)
            mixed = content_mix(x, qk_weight, plan.open_positional, plan.open_gates, geometry, for_backward=False)[0]
            out = project(mixed, weight[..., :split], self.bias if out is None else None, out)
        return self._to_map(out, x)

    @torch.jit.unused
    def _mix_closed(
        self, tokens: torch.Tensor, positional: torch.Tensor, weight: torch.Tensor, channels_first: bool
    ) -> torch.Tensor:
        """bias + the closed heads' part of the output, from tokens (B, N, C_in) and their positional attention
        (Nq, heads, N), in blocks of queries whose mixed inputs (B, block, heads, C_in) stay within the layer's block
        bytes: (B * Nq, C_out), or (B, C_out, Nq) `channels_first`. Mixing every query at once and projecting after
        took 13% longer at 448 px stage 3's stride-1 layers on CPU (188 against 163 ms, batch 8)."""
        B, _, C = tokens.shape
        num_queries, heads = positional.shape[:2]
        block_bytes = self.attention_block_bytes or self.choices.block_bytes
        block = max(1, block_bytes // (B * heads * C * tokens.element_size()))
        if block >= num_queries:  # one block: projected straight into the output
            mixed = torch.matmul(positional.flatten(0, 1), tokens).view(B, num_queries, heads, C)
            project = self._project_channels_first if channels_first else self._project
            return project(mixed, weight, self.bias)
        if channels_first:
            out = tokens.new_empty(B, self.out_channels, num_queries)
        else:
            out = tokens.new_empty(B, num_queries, self.out_channels)
        for start, stop in query_blocks(num_queries, block):
            mixed = torch.matmul(positional[start:stop].flatten(0, 1), tokens).view(B, stop - start, heads, C)
            if channels_first:
                out[:, :, start:stop] = self._project_channels_first(mixed, weight, self.bias)
            else:
                out[:, start:stop] = self._project(mixed, weight, self.bias).view(B, stop - start, -1)
        return out if channels_first else out.view(B * num_queries, -1)

    @torch.jit.unused
    def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution the layer equals while both gates are 0."""
        if self.same_padding:
            x = pad_same(x, [self.kernel_size] * 2, [self.stride] * 2, [self.dilation] * 2)
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        groups = f', groups={self.groups}' if self.groups > 1 else ''
        groups += f', dilation={self.dilation}' if self.dilation > 1 else ''
        same = ', padding=same' if self.same_padding else ''
        return (
            f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}{groups}'
            f'{same}, heads={self.num_heads}, qk_dim={self.qk_dim}, bias={self.bias is not None}'
        )
