""" What the converted layers of a T-CNN attend to: per-head diagnostics on real inputs.

Every converted layer (`GatedPositionalAttention2d`, K*K heads) mixes, per head h,

    A_h = (1 - g_h) * P_h + g_h * S_h(x),   P_h = (1 - l_h) * onehot(D_h) + l_h * gauss(alpha_h, c_h)

over the keys of the layer's input grid (H x W pixels) plus the zero tokens outside it: the one-hot
head of tap D_h reads a zero token when its tap falls outside the image, and the Gaussian puts the
rest of its mass (offsets up to H - 1, W - 1) on zero tokens too. The content attention S_h only
sees in-image keys. `AttentionAnalyzer` rebuilds these maps densely from the layer's pieces
(gates, `positional_gaussian`, `tap_offsets`, `q`, `k`, `scale`), feeds the model batches of images,
captures each layer's input with a forward hook and accumulates, per head:

    distance_*   mean attention distance, in pixels of the layer's input grid, averaged over queries
                 and images. Zero tokens count at their own position, so a one-hot head is at
                 exactly |D_h| (0, 1 or sqrt(2) for 3x3) at every query, borders included.
    entropy_*    entropy (nats) of the attention row, zero tokens being keys like the others.
    in_image_*   share of the attention mass on in-image keys (the rest reads zero tokens).

for the positional (P), content (S) and mixed (A) attention; per layer, the relative weight drift
from the source CNN and the identity error (layer output vs `F.conv2d`) while the layer is still a
convolution. docs/analysis.md gives the full definitions.

The attention of a layer in parts, as the layer computes it (`content_logits`, `positional_gaussian`,
`attention_map`, `content_attention`, `positional_attention`), is here too: no forward pass reads them.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.padding import pad_same

from ..errors import InputError
from ..layers import GatedPositionalAttention2d
from ..layers.functions import floored_blend
from ..layers.numerics import (
    attention_dtype,
    autocast_off,
    cast_without_subnormals,
    mixing_dtype,
    softmax_without_subnormals_,
    tokens_of,
)
from ..layers.positional import gaussian_factors, positional_mixing, split_values
from ..models.convert import attention_layers
from ..utils.numerics import error_ratio

__all__ = [
    'HeadStats', 'LayerStats', 'QueryAttention', 'AttentionMaps', 'AttentionAnalyzer',
    'positional_offset_attention', 'query_positions', 'attention_maps', 'head_rows', 'content_logits',
    'positional_gaussian', 'attention_map', 'content_attention', 'positional_attention',
]

# upper bound on the elements of one (batch, heads, queries, keys) block of dense attention
_BLOCK_ELEMENTS = 1 << 22


@dataclass
class HeadStats:
    """Diagnostics of one head, averaged over every query of every image seen."""
    head: int
    tap: Tuple[int, int]  # (rows, cols) offset of the head's kernel tap
    content_share: float  # g_h
    locality_share: float  # l_h
    alpha: float  # locality strength of the Gaussian
    gaussian_center: Tuple[float, float]  # centre c_h of the Gaussian, offset from the query
    positional_center: Tuple[float, float]  # mean offset of the positional attention P_h
    distance_positional: float
    distance_content: float
    distance_mixed: float
    entropy_positional: float
    entropy_content: float
    entropy_mixed: float
    in_image_positional: float
    in_image_mixed: float


@dataclass
class LayerStats:
    """Diagnostics of one converted layer."""
    name: str
    kernel_size: int
    stride: int
    input_sizes: List[Tuple[int, int]]  # distinct (H, W) input grids seen
    images: int
    is_convolution: bool  # both gates of every head at 0
    weight_drift: Optional[float]  # |W - W_cnn|_F / |W_cnn|_F, None without the source CNN
    identity_error: Optional[float]  # max |out - conv| / max |conv|, None once not a convolution
    identity_reference: Optional[str]  # 'cnn' (source CNN's kernel) or 'layer' (the layer's own kernel)
    heads: List[HeadStats] = field(default_factory=list)


@dataclass
class AttentionMaps:
    """Dense attention of every head over the in-image keys (N = H * W, row-major) for nq queries."""
    positional: torch.Tensor  # (heads, nq, N)
    content: torch.Tensor  # (B, heads, nq, N)
    mixed: torch.Tensor  # (B, heads, nq, N)


@dataclass
class QueryAttention:
    """Attention maps of one query pixel in one layer, over that layer's input grid (H, W)."""
    name: str
    query: Tuple[int, int]  # (row, col) of the query on the layer's input grid
    grid_size: Tuple[int, int]
    content_share: torch.Tensor  # (heads,)
    taps: torch.Tensor  # (heads, 2)
    positional: torch.Tensor  # (heads, H, W)
    content: torch.Tensor  # (heads, H, W)
    mixed: torch.Tensor  # (heads, H, W)


def content_logits(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Scaled query-key products of every head of `layer`, in float32 (float64 for float64 maps), also under
    autocast: (B, C_in, H, W) -> (B, heads, H_out * W_out, H * W)."""
    H, W = x.shape[-2], x.shape[-1]
    h, d = layer.num_heads, layer.qk_dim
    row0, col0 = layer.query_start(H, W)
    queries = x[:, :, row0 :: layer.stride, col0 :: layer.stride] if layer.stride > 1 else x
    q_weight, k_weight = (w.flatten(0, 1) for w in layer.query_key_weights())
    q = F.linear(queries.flatten(2).transpose(1, 2), q_weight).unflatten(-1, (h, d))  # B, Nq, h, d
    k = F.linear(x.flatten(2).transpose(1, 2), k_weight).unflatten(-1, (h, d))  # B, N, h, d
    dtype = attention_dtype(q.dtype)
    with autocast_off(x.device):
        logits = q.permute(0, 2, 1, 3).to(dtype) @ k.permute(0, 2, 3, 1).to(dtype)
    return logits * layer.scale


def positional_gaussian(
        layer: GatedPositionalAttention2d, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Separable factors (heads, H_out, H) and (heads, W_out, W) of the Gaussian attention of `layer`."""
    _, _, log_alpha, center = split_values(layer._values())
    return gaussian_factors(log_alpha, center, layer._tables(height, width, layer.pos_center.device))


def attention_map(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Attention of every head of `layer`, A_h = g_h * S_h(x) + (1 - g_h) * P_h, in the attention's dtype:
    (B, C_in, H, W) -> (B, H_out * W_out, heads, H * W), queries leading. Logits and softmax are float32 (float64
    for a float64 layer) whatever the input dtype or autocast state; A is a (sub-)stochastic matrix."""
    values = layer._values()
    tables = layer._tables(x.shape[-2], x.shape[-1], layer.pos_center.device)
    positional = positional_mixing(values, tables, layer.grad_floor)  # (1 - g) * P, (Nq, heads, N)
    probs = softmax_without_subnormals_(content_logits(layer, x))
    return floored_blend(positional, probs.transpose(1, 2), values[: layer.num_heads, None], layer.grad_floor)


def content_attention(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Content attention of every head of `layer` applied to the full-width input: (B, C_in, H, W) ->
    (B, C_in, heads, H_out * W_out), for head h the attention-weighted input x S_h^T."""
    probs = softmax_without_subnormals_(content_logits(layer, x))  # B, h, Nq, N
    attn = cast_without_subnormals(probs, mixing_dtype(x))
    return torch.matmul(attn, tokens_of(x, attn.dtype)[:, None]).permute(0, 3, 1, 2)


def positional_attention(layer: GatedPositionalAttention2d, x: torch.Tensor) -> torch.Tensor:
    """Gaussian positional attention of every head of `layer` applied to the input: (B, C_in, H, W) ->
    (B, C_in, heads, H_out * W_out), separable (columns, then rows)."""
    rows, cols = positional_gaussian(layer, x.shape[-2], x.shape[-1])
    rows, cols = cast_without_subnormals(rows, x.dtype), cast_without_subnormals(cols, x.dtype)
    t = torch.einsum('bcyx,hjx->bchyj', x, cols)  # B, C, h, H, W_out
    return torch.einsum('bchyj,hiy->bchij', t, rows).flatten(3)


def _neg_xlogx(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p)


def _offset_profile(factor: torch.Tensor, stride: int, start: int = 0) -> torch.Tensor:
    """Per-query 1D Gaussian weights -> weights of each offset.

    Args:
        factor: (heads, out_size, in_size), weight of key k for the query at `start + stride * i`.
    Returns:
        (heads, 2 * in_size - 1): weight of offsets -(in_size - 1) ... in_size - 1. The weights
        depend on the offset only, so each is read where some query sees it; with stride 2 the
        most negative offset (the most positive one when queries start at 1, TF 'SAME' padding) can be
        out of every query's sight and gets the mass that completes the profile to 1 (the row softmax
        covers exactly these offsets, the out-of-image ones being zero tokens).
    """
    heads, out_size, in_size = factor.shape
    offsets = torch.arange(in_size)[None, :] - stride * torch.arange(out_size)[:, None] - start
    profile = factor.new_full((heads, 2 * in_size - 1), float('nan'))
    profile[:, (offsets + in_size - 1).flatten()] = factor.flatten(1)
    missing = profile.isnan()[0]
    if missing.any():
        end = 0 if bool(missing[0]) else -1
        assert int(missing.sum()) == 1 and bool(missing[end]), 'only offset +-(in_size - 1) can be unseen'
        profile[:, end] = 0.
        profile[:, end] = (1 - profile.sum(-1)).clamp_min(0)
    return profile


def positional_offset_attention(layer: GatedPositionalAttention2d, height: int, width: int) -> torch.Tensor:
    """Positional attention P_h of every head as a distribution over offsets from the query.

    Returns:
        (heads, 2 * R_y + 1, 2 * R_x + 1) float32 with R_y = max(H - 1, K // 2), R_x likewise:
        entry [h, R_y + dy, R_x + dx] is the weight of the key at offset (dy, dx), a pixel or a zero
        token outside the image. Every slice sums to 1 and is the same for every query.
    """
    p = layer.padding
    r_y, r_x = max(height - 1, p), max(width - 1, p)
    with torch.no_grad():
        rows, cols = positional_gaussian(layer, height, width)
        row0, col0 = layer.query_start(height, width)
        rows = _offset_profile(rows.detach().float().cpu(), layer.stride, row0)
        cols = _offset_profile(cols.detach().float().cpu(), layer.stride, col0)
    gauss = torch.zeros(layer.num_heads, 2 * r_y + 1, 2 * r_x + 1)
    gauss[:, r_y - height + 1:r_y + height, r_x - width + 1:r_x + width] = rows[:, :, None] * cols[:, None, :]
    onehot = torch.zeros_like(gauss)
    taps = layer.tap_offsets().cpu()
    onehot[torch.arange(layer.num_heads), taps[:, 0] + r_y, taps[:, 1] + r_x] = 1.
    locality = layer.locality_share().float().cpu()[:, None, None]
    return (1 - locality) * onehot + locality * gauss


def query_positions(layer: GatedPositionalAttention2d, height: int, width: int) -> torch.Tensor:
    """(H_out * W_out, 2) (row, col) of every query on the input grid, row-major."""
    out_h, out_w = layer.output_size(height, width)
    row0, col0 = layer.query_start(height, width)
    rows, cols = torch.meshgrid(
        torch.arange(out_h) * layer.stride + row0, torch.arange(out_w) * layer.stride + col0, indexing='ij')
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def _positional_in_image(offset_attn: torch.Tensor, queries: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(heads, nq, H * W): the offset distribution read at the in-image keys of each query."""
    r_y, r_x = offset_attn.shape[-2] // 2, offset_attn.shape[-1] // 2
    dy = torch.arange(height)[None, :] - queries[:, :1] + r_y  # nq, H
    dx = torch.arange(width)[None, :] - queries[:, 1:] + r_x  # nq, W
    return offset_attn[:, dy[:, :, None], dx[:, None, :]].flatten(2)


def _content(layer: GatedPositionalAttention2d, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, heads, nq, H * W) float32 content attention softmax(q k^T * scale) of the given queries."""
    q_weight, k_weight = (w.flatten(0, 1) for w in layer.query_key_weights())  # heads * d, C each
    tokens = x.flatten(2).transpose(1, 2).to(q_weight.dtype)  # B, N, C
    query_tokens = x[:, :, queries[:, 0], queries[:, 1]].transpose(1, 2).to(q_weight.dtype)  # B, nq, C
    heads, dim = layer.num_heads, layer.qk_dim
    q = F.linear(query_tokens, q_weight).float().unflatten(-1, (heads, dim)).transpose(1, 2)
    k = F.linear(tokens, k_weight).float().unflatten(-1, (heads, dim)).transpose(1, 2)
    return ((q * layer.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _query_blocks(layer: GatedPositionalAttention2d, height: int, width: int, batch: int) -> Iterator[torch.Tensor]:
    """Query positions in blocks of bounded (batch, heads, nq, N) size."""
    queries = query_positions(layer, height, width)
    size = max(1, _BLOCK_ELEMENTS // (batch * layer.num_heads * height * width))
    yield from queries.split(size)


def attention_maps(
        layer: GatedPositionalAttention2d,
        x: torch.Tensor,
        queries: Optional[torch.Tensor] = None,
) -> AttentionMaps:
    """Dense positional, content and mixed attention of `layer` on its input, over in-image keys.

    Args:
        x: (B, C_in, H, W) the layer's input.
        queries: (nq, 2) query positions on the input grid (default: all, `query_positions`).
    What a head reads from zero tokens is left out, so rows sum to at most 1 and

        layer(x) = bias + sum_h W[:, :, D_h + K // 2] @ (x.flatten(2) @ mixed[:, h].transpose(-1, -2)).
    """
    H, W = x.shape[-2:]
    queries = query_positions(layer, H, W) if queries is None else queries.cpu()
    device = layer.qk.weight.device
    with torch.no_grad():
        positional = _positional_in_image(positional_offset_attention(layer, H, W), queries, H, W)
        content = _content(layer, x.detach().float().to(device), queries.to(device)).cpu()
        share = layer.content_share().float().cpu()[:, None, None]
        mixed = (1 - share) * positional + share * content
    return AttentionMaps(positional=positional, content=content, mixed=mixed)


class _LayerAccumulator:
    """Running sums, over images and queries, of one layer's per-head diagnostics."""

    KEYS = (
        'distance_positional', 'distance_content', 'distance_mixed',
        'entropy_positional', 'entropy_content', 'entropy_mixed',
        'in_image_positional', 'in_image_mixed', 'center_y', 'center_x',
    )

    def __init__(
            self,
            layer: GatedPositionalAttention2d,
            cnn_weight: Optional[torch.Tensor],
            cnn_bias: Optional[torch.Tensor],
    ):
        self.layer = layer
        self.cnn_weight = cnn_weight
        self.cnn_bias = cnn_bias
        self.sums = {key: torch.zeros(layer.num_heads, dtype=torch.float64) for key in self.KEYS}
        self.queries = 0
        self.images = 0
        self.sizes = set()
        self.max_diff = 0.
        self.max_ref = 0.

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        layer = self.layer
        B, _, H, W = x.shape
        self.images += B
        self.sizes.add((H, W))
        if layer.is_convolution():  # the attention path, not the inference shortcut to F.conv2d
            self._update_identity(x, layer.attention_forward(x))
        device = layer.qk.weight.device
        x = x.detach().float()
        offset_attn = positional_offset_attention(layer, H, W)  # heads, 2Ry + 1, 2Rx + 1
        r_y, r_x = offset_attn.shape[-2] // 2, offset_attn.shape[-1] // 2
        oy, ox = torch.meshgrid(torch.arange(-r_y, r_y + 1.), torch.arange(-r_x, r_x + 1.), indexing='ij')
        g = layer.content_share().double().cpu()
        pos = offset_attn.double()
        # query-independent positional numbers, and the entropy of all of (1 - g) P's mass
        distance_pos = (pos * (oy ** 2 + ox ** 2).sqrt()).sum((-2, -1))
        entropy_pos = _neg_xlogx(pos).sum((-2, -1))
        entropy_pos_scaled = _neg_xlogx((1 - g)[:, None, None] * pos).sum((-2, -1))
        center = (pos * oy).sum((-2, -1)), (pos * ox).sum((-2, -1))
        key_y, key_x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
        keys = torch.stack([key_y.flatten(), key_x.flatten()], -1).float()  # N, 2
        gh = g.float()[:, None, None]
        for queries in _query_blocks(layer, H, W, B):
            nq = len(queries)
            dist = torch.cdist(queries.float(), keys)  # nq, N
            positional = _positional_in_image(offset_attn, queries, H, W)  # heads, nq, N
            content = _content(layer, x.to(device), queries.to(device)).cpu()  # B, heads, nq, N
            mixed = (1 - gh) * positional + gh * content
            distance_content = (content * dist).sum(-1).double().sum((0, 2))  # heads
            # zero-token keys of a query: all of (1 - g) P minus its in-image part
            zero_tokens = entropy_pos_scaled[:, None] - _neg_xlogx((1 - gh) * positional).double().sum(-1)
            entropy_mixed = _neg_xlogx(mixed).double().sum(-1) + zero_tokens  # B, heads, nq
            s = self.sums
            s['distance_content'] += distance_content
            s['distance_mixed'] += (1 - g) * distance_pos * B * nq + g * distance_content
            s['entropy_content'] += _neg_xlogx(content).double().sum(-1).sum((0, 2))
            s['entropy_mixed'] += entropy_mixed.sum((0, 2))
            s['in_image_positional'] += positional.double().sum((-2, -1)) * B
            s['in_image_mixed'] += mixed.double().sum(-1).sum((0, 2))
            s['distance_positional'] += distance_pos * B * nq
            s['entropy_positional'] += entropy_pos * B * nq
            s['center_y'] += center[0] * B * nq
            s['center_x'] += center[1] * B * nq
            self.queries += B * nq

    def _update_identity(self, x: torch.Tensor, out: torch.Tensor) -> None:
        layer = self.layer
        weight = layer.weight if self.cnn_weight is None else self.cnn_weight.to(layer.weight)
        bias = layer.bias if self.cnn_weight is None else self.cnn_bias
        bias = None if bias is None else bias.to(layer.weight)
        if layer.same_padding:
            ref = F.conv2d(pad_same(x, [layer.kernel_size] * 2, [layer.stride] * 2), weight, bias, layer.stride, 0,
                           1, layer.groups)
        else:
            ref = F.conv2d(x, weight, bias, layer.stride, layer.padding, 1, layer.groups)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(ref).all())  # else the error is inf
        self.max_diff = max(self.max_diff, (out - ref).abs().max().item() if finite else math.inf)
        self.max_ref = max(self.max_ref, ref.abs().max().item() if finite else math.inf)

    def stats(self, name: str) -> LayerStats:
        layer = self.layer
        if not self.queries:
            raise RuntimeError(f'{name}: no input seen; run the model on images first (AttentionAnalyzer.update).')
        mean = {key: (value / self.queries).tolist() for key, value in self.sums.items()}
        taps = layer.tap_offsets().tolist()
        values = layer.attention_values()
        alpha = values['pos_log_alpha'].float().exp().tolist()
        centers = values['pos_center'].float().tolist()
        heads = [
            HeadStats(
                head=h,
                tap=tuple(taps[h]),
                content_share=float(layer.content_share()[h]),
                locality_share=float(layer.locality_share()[h]),
                alpha=alpha[h],
                gaussian_center=tuple(centers[h]),
                positional_center=(mean['center_y'][h], mean['center_x'][h]),
                **{key: mean[key][h] for key in self.KEYS if not key.startswith('center')},
            )
            for h in range(layer.num_heads)
        ]
        drift = None
        if self.cnn_weight is not None:
            ref = self.cnn_weight.double()
            drift = ((layer.weight.detach().double().cpu() - ref).norm() / ref.norm()).item()
        is_conv = layer.is_convolution()
        return LayerStats(
            name=name,
            kernel_size=layer.kernel_size,
            stride=layer.stride,
            input_sizes=sorted(self.sizes),
            images=self.images,
            is_convolution=is_conv,
            weight_drift=drift,
            identity_error=error_ratio(self.max_diff, self.max_ref) if is_conv else None,
            identity_reference=('layer' if self.cnn_weight is None else 'cnn') if is_conv else None,
            heads=heads,
        )


def _cnn_entries(
        name: str,
        layer: GatedPositionalAttention2d,
        cnn_state_dict: Mapping[str, torch.Tensor],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = cnn_state_dict.get(f'{name}.weight')
    if weight is None or tuple(weight.shape) != tuple(layer.weight.shape):
        found = 'missing' if weight is None else f'of shape {tuple(weight.shape)}'
        raise InputError(
            f'The source CNN has no convolution {name}.weight of shape {tuple(layer.weight.shape)} ({found}): '
            f'give the CNN this T-CNN was converted from (same architecture).')
    bias = cnn_state_dict.get(f'{name}.bias')
    if (bias is None) != (layer.bias is None):
        raise InputError(
            f'The source CNN convolution {name} {"has no" if bias is None else "has a"} bias, the converted layer '
            f'{"has one" if layer.bias is not None else "does not"}: give the CNN this T-CNN was converted from.')
    return weight.detach().float().cpu(), None if bias is None else bias.detach().float().cpu()


class AttentionAnalyzer:
    """Per-head diagnostics of every converted layer of `model`, accumulated over batches of images.

    Args:
        model: a model holding `GatedPositionalAttention2d` layers (a `tcnn_*` model, or any model
            after `transform_cnn`).
        cnn_state_dict: state dict of the source CNN (same module names); enables weight drift and
            makes the identity error compare with the CNN's convolutions.

    `update(images)` runs the model in eval mode without gradients, with forward hooks on the
    converted layers (removed afterwards); `stats()` returns one `LayerStats` per layer.
    """

    def __init__(self, model: nn.Module, cnn_state_dict: Optional[Mapping[str, torch.Tensor]] = None):
        self.model = model
        self.layers = dict(attention_layers(model))
        if not self.layers:
            raise InputError(
                f'{type(model).__name__} has no converted layers (GatedPositionalAttention2d): analyse a tcnn_* '
                f'model (e.g. tcnn_resnet50rs) or convert a CNN first with timm_tcnn.transform_cnn.')
        self._accumulators = {}
        for name, layer in self.layers.items():
            weight, bias = _cnn_entries(name, layer, cnn_state_dict) if cnn_state_dict is not None else (None, None)
            self._accumulators[name] = _LayerAccumulator(layer, weight, bias)

    def _run(self, images: torch.Tensor, hook) -> torch.Tensor:
        handles = [layer.register_forward_hook(hook(name)) for name, layer in self.layers.items()]
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                return self.model(images)
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()

    def update(self, images: torch.Tensor) -> torch.Tensor:
        """Accumulate the diagnostics of a batch (B, C, H, W); returns the model's output."""
        def hook(name):
            def fn(module, args, out):
                self._accumulators[name].update(args[0])
            return fn
        return self._run(images, hook)

    def stats(self) -> List[LayerStats]:
        """Diagnostics of every converted layer, in module order, averaged over all images seen."""
        return [acc.stats(name) for name, acc in self._accumulators.items()]

    def query_attention(self, image: torch.Tensor, pixel: Sequence[int]) -> List[QueryAttention]:
        """Attention maps of every converted layer for the query nearest to `pixel` of one image.

        Args:
            image: (C, H, W) or (1, C, H, W) model input.
            pixel: (row, col) in pixels of `image`; it is mapped to each layer's grid and to the
                nearest query of that layer (queries sit on a stride-`s` grid of the input).
        """
        image = image if image.ndim == 4 else image[None]
        if image.shape[0] != 1:
            raise ValueError(f'query_attention takes one image, got a batch of {image.shape[0]}.')
        img_h, img_w = image.shape[-2:]
        y, x = pixel
        if not (0 <= y < img_h and 0 <= x < img_w):
            raise ValueError(f'query pixel ({y}, {x}) lies outside the {img_h}x{img_w} input image.')
        inputs = {}

        def hook(name):
            def fn(module, args, out):
                inputs[name] = args[0].detach()
            return fn
        self._run(image, hook)
        result = []
        for name, layer in self.layers.items():
            feat = inputs[name]
            H, W = feat.shape[-2:]
            out_h, out_w = layer.output_size(H, W)
            s = layer.stride
            i = min(round(min(y * H // img_h, H - 1) / s), out_h - 1)
            j = min(round(min(x * W // img_w, W - 1) / s), out_w - 1)
            maps = attention_maps(layer, feat, torch.tensor([[s * i, s * j]]))
            result.append(QueryAttention(
                name=name,
                query=(s * i, s * j),
                grid_size=(H, W),
                content_share=layer.content_share().float().cpu(),
                taps=layer.tap_offsets().cpu(),
                positional=maps.positional[:, 0].view(-1, H, W),
                content=maps.content[0, :, 0].view(-1, H, W),
                mixed=maps.mixed[0, :, 0].view(-1, H, W),
            ))
        return result


def head_rows(stats: Sequence[LayerStats]) -> List[Dict[str, object]]:
    """One flat dict per (layer, head), for CSV files and data frames."""
    rows = []
    for layer in stats:
        for head in layer.heads:
            rows.append({
                'layer': layer.name,
                'kernel_size': layer.kernel_size,
                'stride': layer.stride,
                'input_sizes': ' '.join(f'{h}x{w}' for h, w in layer.input_sizes),
                'images': layer.images,
                'is_convolution': layer.is_convolution,
                'weight_drift': layer.weight_drift,
                'identity_error': layer.identity_error,
                'identity_reference': layer.identity_reference,
                'head': head.head,
                'tap_y': head.tap[0],
                'tap_x': head.tap[1],
                'content_share': head.content_share,
                'locality_share': head.locality_share,
                'alpha': head.alpha,
                'gaussian_center_y': head.gaussian_center[0],
                'gaussian_center_x': head.gaussian_center[1],
                'positional_center_y': head.positional_center[0],
                'positional_center_x': head.positional_center[1],
                'distance_positional': head.distance_positional,
                'distance_content': head.distance_content,
                'distance_mixed': head.distance_mixed,
                'entropy_positional': head.entropy_positional,
                'entropy_content': head.entropy_content,
                'entropy_mixed': head.entropy_mixed,
                'in_image_positional': head.in_image_positional,
                'in_image_mixed': head.in_image_mixed,
            })
    return rows
