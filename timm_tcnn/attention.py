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
(a sigmoid gate has no such point: its share and its gradient vanish together). The one-hot part
is computed as a convolution-style unfold, never through a saturated softmax, so it is exact and
the learnable locality (alpha, centre) lives in the Gaussian that the locality gate blends in.

The Gaussian positional attention is separable (a product of a row and a column softmax over
the offsets a map of that size can have, zero outside the image), so applying it costs
O(H + W) per query instead of O(H * W).
"""
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import use_fused_attn, trunc_normal_

__all__ = ['GatedPositionalAttention2d', 'straight_through_clamp']


def straight_through_clamp(x: torch.Tensor, min_value: float = 0., max_value: float = 1.) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass."""
    return x + (x.clamp(min_value, max_value) - x).detach()


def _gaussian_1d(
        alpha: torch.Tensor,
        center: torch.Tensor,
        in_size: int,
        out_size: int,
        stride: int,
) -> torch.Tensor:
    """Row-stochastic 1D Gaussian attention of every head, in float32.

    Args:
        alpha: (heads,) locality strength, > 0.
        center: (heads,) attention centre, as an offset from the query, in pixels.
    Returns:
        (heads, out_size, in_size): weight of key k for the query at `stride * i`. Each row is a
        softmax over all offsets in [-(in_size - 1), in_size - 1]; offsets outside the image are
        zero tokens, so rows of border queries sum to less than 1.
    """
    alpha = alpha.float()[:, None]
    center = center.float()[:, None]
    offsets = torch.arange(-(in_size - 1), in_size, device=alpha.device, dtype=torch.float32)
    log_norm = torch.logsumexp(-alpha * (offsets - center) ** 2, dim=-1)  # heads
    keys = torch.arange(in_size, device=alpha.device, dtype=torch.float32)
    queries = torch.arange(out_size, device=alpha.device, dtype=torch.float32) * stride
    rel = keys[None, :] - queries[:, None]  # out_size, in_size
    logits = -alpha[:, :, None] * (rel[None] - center[:, :, None]) ** 2
    return torch.exp(logits - log_norm[:, None, None])


class GatedPositionalAttention2d(nn.Module):
    """Gated positional self-attention with the interface of an `nn.Conv2d`.

    Input (B, C_in, H, W), output (B, C_out, H_out, W_out) with H_out = ceil(H / stride), exactly as
    a KxK convolution with padding K // 2. Heads = K * K kernel taps. Parameters:

        weight:        (C_out, C_in, K, K) value/output projection, one tap slice per head
        bias:          (C_out,) or None
        content_gate:  (heads,) content share before clamping to [0, 1]; 0 at conversion
        locality_gate: (heads,) Gaussian share of the positional attention; 0 at conversion
        pos_log_alpha: (heads,) log locality strength of the Gaussian positional attention
        pos_center:    (heads, 2) Gaussian centre (rows, cols) relative to the query
        q, k:          C_in -> heads * qk_dim projections of the content attention

    Invariant: with both gates at 0 the layer equals `F.conv2d(x, weight, bias, stride, K // 2)`.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 3,
            stride: int = 1,
            bias: bool = True,
            qk_dim: int = 32,
            qk_init_std: float = 0.02,
            locality_init: float = 1.0,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}.')
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride}.')
        if locality_init <= 0:
            raise ValueError(f'locality_init must be > 0, got {locality_init}.')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.num_heads = kernel_size * kernel_size
        self.qk_dim = qk_dim
        self.scale = qk_dim ** -0.5
        self.qk_init_std = qk_init_std
        self.locality_init = locality_init
        self.fused_attn = use_fused_attn()

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.content_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.locality_gate = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_log_alpha = nn.Parameter(torch.empty(self.num_heads, **dd))
        self.pos_center = nn.Parameter(torch.empty(self.num_heads, 2, **dd))
        self.q = nn.Linear(in_channels, self.num_heads * qk_dim, bias=False, **dd)
        self.k = nn.Linear(in_channels, self.num_heads * qk_dim, bias=False, **dd)
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
        for name, value in self.conversion_state().items():
            self.get_parameter(name).copy_(value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # as nn.Conv2d
        if self.bias is not None:
            bound = (self.in_channels * self.kernel_size ** 2) ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_attention()

    def conversion_state(self) -> Dict[str, torch.Tensor]:
        """Values of the attention-only parameters that make the layer equal its convolution.

        Keys are relative to the layer (`content_gate`, `q.weight`, ...). The Q/K projections keep
        their current (random) values: the content branch is silent while `content_gate` is 0.
        """
        like = self.content_gate
        return {
            'content_gate': torch.zeros_like(like),
            'locality_gate': torch.zeros_like(like),
            'pos_log_alpha': torch.full_like(like, math.log(self.locality_init)),
            'pos_center': self.tap_offsets().to(like),
            'q.weight': self.q.weight.detach().clone(),
            'k.weight': self.k.weight.detach().clone(),
        }

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a convolution's entries load as the exact conversion (timm's strict checkpoint loading)
        self.fill_conversion_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def content_share(self) -> torch.Tensor:
        """(heads,) share of content attention in [0, 1]; 0 = the head behaves as its conv tap."""
        return self.content_gate.detach().clamp(0, 1)

    def locality_share(self) -> torch.Tensor:
        """(heads,) share of the Gaussian in the positional attention, in [0, 1]; 0 = one-hot."""
        return self.locality_gate.detach().clamp(0, 1)

    def is_convolution(self) -> bool:
        """True while the layer computes exactly its convolution."""
        return bool((self.content_share() == 0).all() and (self.locality_share() == 0).all())

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def positional_gaussian(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Separable factors (heads, H_out, H) and (heads, W_out, W) of the Gaussian attention, float32."""
        alpha = self.pos_log_alpha.float().exp()
        out_h, out_w = self.output_size(height, width)
        rows = _gaussian_1d(alpha, self.pos_center[:, 0], height, out_h, self.stride)
        cols = _gaussian_1d(alpha, self.pos_center[:, 1], width, out_w, self.stride)
        return rows, cols

    def content_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Content attention of every head applied to the full-width input.

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, C_in, heads, H_out * W_out): for head h, the attention-weighted input x S_h^T.
        """
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, N, C
        query_tokens = x[:, :, ::self.stride, ::self.stride].flatten(2).transpose(1, 2)  # B, Nq, C
        q = self.q(query_tokens).unflatten(-1, (self.num_heads, self.qk_dim)).transpose(1, 2)  # B, h, Nq, d
        k = self.k(tokens).unflatten(-1, (self.num_heads, self.qk_dim)).transpose(1, 2)  # B, h, N, d
        v = tokens.unsqueeze(1)  # B, 1, N, C
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v.expand(-1, self.num_heads, -1, -1))
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return out.permute(0, 3, 1, 2)  # B, C, h, Nq

    def positional_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian positional attention of every head applied to the input.

        Args:
            x: (B, C_in, H, W)
        Returns:
            (B, C_in, heads, H_out * W_out)
        """
        B, C, H, W = x.shape
        rows, cols = self.positional_gaussian(H, W)
        rows, cols = rows.to(x.dtype), cols.to(x.dtype)
        # separable: first along columns, then along rows
        t = torch.einsum('bcyx,hjx->bchyj', x, cols)  # B, C, h, H, W_out
        out = torch.einsum('bchyj,hiy->bchij', t, rows)  # B, C, h, H_out, W_out
        return out.flatten(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        out_h, out_w = self.output_size(H, W)
        content = straight_through_clamp(self.content_gate).to(x.dtype)
        locality = straight_through_clamp(self.locality_gate).to(x.dtype)
        # (B, C_in * heads, Nq): what the one-hot head of each tap reads, zero outside the image
        mixed = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        mixed = mixed.unflatten(1, (C, self.num_heads)) * ((1 - content) * (1 - locality))[:, None]
        mixed = mixed + self.positional_attention(x) * ((1 - content) * locality)[:, None]
        mixed = mixed + self.content_attention(x) * content[:, None]
        out = self.weight.flatten(1) @ mixed.flatten(1, 2)  # B, C_out, Nq
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.unflatten(-1, (out_h, out_w))

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
            f'heads={self.num_heads}, qk_dim={self.qk_dim}, bias={self.bias is not None}'
        )
