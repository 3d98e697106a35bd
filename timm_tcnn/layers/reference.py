""" The layer's definition written plainly: the reference every fast path is tested against.

Unfolded one-hot taps (`F.unfold`, the convolution's own patches), the Gaussian applied separably, the content
attention by an explicit softmax over all keys, the tap projection within each group; autograd throughout, no
gradient floor (it changes gradients only), no blocks, no caches, no subnormal handling.
"""
import torch
import torch.nn.functional as F

from timm.layers.padding import pad_same

from .numerics import rate_scaled, straight_through_clamp

__all__ = ['reference_forward']


def reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """y = bias + sum_h W_h . (x A_h^T) of a `GatedPositionalAttention2d`, from its definition: (B, C_in, H, W) ->
    (B, C_out, H_out, W_out), float32 attention."""
    B, C, H, W = x.shape
    heads, stride, k = layer.num_heads, layer.stride, layer.kernel_size
    content = straight_through_clamp(rate_scaled(layer.content_gate, layer.gate_lr_scale))
    locality = straight_through_clamp(rate_scaled(layer.locality_gate, layer.gate_lr_scale))
    if layer.same_padding:
        patches = F.unfold(pad_same(x, [k, k], [stride, stride]), k, stride=stride)
    else:
        patches = F.unfold(x, k, padding=k // 2, stride=stride)
    onehot = patches.unflatten(1, (C, heads))  # B, C, heads, Nq
    rows, cols = layer.positional_gaussian(H, W)  # heads, Ho, H and heads, Wo, W
    gauss = torch.einsum('bcyx,hjx,hiy->bchij', x.float(), cols, rows).flatten(3)
    out_h, out_w = layer.output_size(H, W)
    row0, col0 = layer.query_start(H, W)
    tokens = x.flatten(2).transpose(1, 2).float()  # B, N, C
    queries = x[:, :, row0::stride, col0::stride][:, :, :out_h, :out_w].flatten(2).transpose(1, 2).float()
    q_weight, k_weight = (w.flatten(0, 1).float() for w in layer.query_key_weights())  # heads * d, C each
    q = F.linear(queries, q_weight).unflatten(-1, (heads, layer.qk_dim))  # B, Nq, h, d
    key = F.linear(tokens, k_weight).unflatten(-1, (heads, layer.qk_dim))  # B, N, h, d
    attn = (torch.einsum('bnhd,bmhd->bhnm', q, key) * layer.scale).softmax(-1)
    content_out = torch.einsum('bhnm,bmc->bchn', attn, tokens)
    mixed = (onehot.float() * ((1 - content) * (1 - locality))[:, None] + gauss * ((1 - content) * locality)[:, None]
             + content_out * content[:, None])
    weight = layer.weight.float().flatten(2).unflatten(0, (layer.groups, -1))  # G, O_g, C_g, heads
    out = torch.einsum('gocl,bgcln->bgon', weight, mixed.unflatten(1, (layer.groups, -1))).flatten(1, 2)
    if layer.bias is not None:
        out = out + layer.bias.float()[:, None]
    return out.unflatten(-1, (out_h, out_w)).to(x.dtype)
