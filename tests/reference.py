""" The layer's definition written plainly, from the formulas of `gated_attention.py`'s docstring: the reference every
computation path is tested against.

Dense and per head, in plain tensor operations, with nothing shared with the fast paths: its own query and key
positions, one-hot taps, Gaussian, softmax, straight-through clamp and rate scaling, and the gradient floor as
defined (the forward pass unchanged; the content attention learns as if its gate were at least the floor, the
Gaussian as if its share (1 - g) (l) were). Autograd throughout; float64 inputs are computed in float64, every
other dtype in float32. Slow (every head's attention is a (B, Nq, N) tensor): for checks on small maps.
"""
from typing import Tuple

import torch

__all__ = ['reference_forward']


def _stored_value(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """stored * scale, whose gradient reaches `stored` unscaled (the value's own gradient)."""
    return stored.detach() * scale + (stored - stored.detach())


def _clamped(value: torch.Tensor) -> torch.Tensor:
    """value clamped to [0, 1] forward; the identity backward."""
    return value + (value.clamp(0., 1.) - value).detach()


def _learns_at_least(share: torch.Tensor, term: torch.Tensor, floor: float) -> torch.Tensor:
    """share * term forward; backward, `term` gets the gradient of max(share, floor) * term (share its own)."""
    lift = (share.clamp(min=floor) - share).detach() if floor > 0 else torch.zeros_like(share)
    return share * term + lift * (term - term.detach())


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(-1, keepdim=True).values.detach()
    return shifted.exp() / shifted.exp().sum(-1, keepdim=True)


def _first_query(size: int, kernel_size: int, stride: int, dilation: int, same_padding: bool) -> int:
    """Input position of the first query along a dimension: the centre of the first window."""
    if not same_padding:
        return 0  # symmetric padding dilation * (K // 2): windows centred on the query
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel_size - 1) + 1 - size, 0)
    return dilation * (kernel_size // 2) - total // 2  # TF 'SAME': the smaller half of the zeros before


def _positions(layer, height: int, width: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Nq, 2) query and (N, 2) key positions (row, col), row-major."""
    k, s, r, same = layer.kernel_size, layer.stride, layer.dilation, layer.same_padding
    rows = _first_query(height, k, s, r, same) + s * torch.arange(-(-height // s), device=device)
    cols = _first_query(width, k, s, r, same) + s * torch.arange(-(-width // s), device=device)
    queries = torch.cartesian_prod(rows, cols)
    keys = torch.cartesian_prod(torch.arange(height, device=device), torch.arange(width, device=device))
    return queries, keys


def _gaussian_factor(offsets: torch.Tensor, alpha: torch.Tensor, centre: torch.Tensor, size: int) -> torch.Tensor:
    """G(o; c) = exp(-alpha (o - c)^2) / sum over o' in [-(size - 1), size - 1] of exp(-alpha (o' - c)^2), per head:
    offsets (Nq, N) -> (heads, Nq, N)."""
    every = torch.arange(1 - size, size, device=offsets.device, dtype=alpha.dtype)
    log_norm = torch.logsumexp(-alpha[:, None] * (every[None] - centre[:, None]).square(), -1)
    return torch.exp(-alpha[:, None, None] * (offsets[None] - centre[:, None, None]).square() - log_norm[:, None, None])


def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """y = bias + sum_h W_h . (x A_h^T) of a `GatedPositionalAttention2d`, from its definition: (B, C_in, H, W) ->
    (B, C_out, H_out, W_out), in x's dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, H, W = x.shape
    K, heads, d, floor = layer.kernel_size, layer.kernel_size ** 2, layer.qk_dim, layer.grad_floor
    scale = layer.gate_lr_scale.to(dtype)
    gate = _clamped(_stored_value(layer.content_gate.to(dtype), scale))
    locality = _clamped(_stored_value(layer.locality_gate.to(dtype), scale))
    alpha = _stored_value(layer.pos_log_alpha.to(dtype), scale).exp()
    centre = _stored_value(layer.pos_center.to(dtype), scale)  # heads, 2

    queries, keys = _positions(layer, H, W, x.device)
    offsets = (keys[None] - queries[:, None]).to(dtype)  # Nq, N, 2: key minus query
    taps = torch.cartesian_prod(torch.arange(K), torch.arange(K)).to(x.device) - K // 2  # heads, 2 (row-major)
    onehot = (offsets[None] == (layer.dilation * taps).to(dtype)[:, None, None]).all(-1).to(dtype)  # heads, Nq, N
    gauss = (_gaussian_factor(offsets[..., 0], alpha, centre[:, 0], H)
             * _gaussian_factor(offsets[..., 1], alpha, centre[:, 1], W))

    tokens = x.to(dtype).flatten(2).transpose(1, 2)  # B, N, C
    query_tokens = tokens[:, queries[:, 0] * W + queries[:, 1]]  # B, Nq, C
    projection = layer.qk.weight.to(dtype).view(heads, 2, d, C)  # per head: d query rows, then d key rows
    q = torch.einsum('bnc,hdc->bhnd', query_tokens, projection[:, 0])
    k = torch.einsum('bnc,hdc->bhnd', tokens, projection[:, 1])
    content = _softmax(torch.einsum('bhqd,bhkd->bhqk', q, k) / d ** 0.5)  # B, heads, Nq, N

    keep = 1 - gate
    positional = (keep * (1 - locality))[:, None, None] * onehot + _learns_at_least(
        (keep * locality)[:, None, None], gauss, floor)
    attn = positional[None] + _learns_at_least(gate[None, :, None, None], content, floor)
    mixed = torch.einsum('bhqk,bkc->bhqc', attn, tokens)  # B, heads, Nq, C

    groups, weight = layer.groups, layer.weight.to(dtype).flatten(2)  # C_out, C_in / groups, heads
    c_group, o_group = C // groups, layer.out_channels // groups
    out = torch.cat([
        torch.einsum('och,bhqc->boq', weight[g * o_group:(g + 1) * o_group], mixed[..., g * c_group:(g + 1) * c_group])
        for g in range(groups)], 1)
    if layer.bias is not None:
        out = out + layer.bias.to(dtype)[:, None]
    return out.unflatten(-1, (-(-H // layer.stride), -(-W // layer.stride))).to(x.dtype)
