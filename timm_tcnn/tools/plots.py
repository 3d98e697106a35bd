""" Figures of the attention diagnostics (`timm_tcnn.analysis`), drawn with matplotlib's Agg backend.

matplotlib is imported when a figure is drawn, so the rest of the package works without it.
Every function writes one PNG atomically (temporary file, then `os.replace`) and returns its path.
"""
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..utils.io import atomic_path
from .analysis import LayerStats, QueryAttention

__all__ = ['require_matplotlib', 'plot_content_share', 'plot_attention_distance', 'plot_query_attention']

PathLike = Union[str, os.PathLike]


def require_matplotlib():
    """Return `matplotlib.pyplot` on the Agg backend, or raise an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            'Drawing the attention figures needs matplotlib: pip install matplotlib '
            '(or skip the figures with `timm-tcnn analyze --no-plots`).') from e
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format='png', dpi=110, bbox_inches='tight')
    finally:
        require_matplotlib().close(fig)
    return path


def plot_content_share(stats: Sequence[LayerStats], path: PathLike) -> Path:
    """Heat map layer x head of the content share g (0 = positional, as the convolution; 1 = content)."""
    plt = require_matplotlib()
    heads = max(len(layer.heads) for layer in stats)
    share = np.full((len(stats), heads), np.nan)
    for i, layer in enumerate(stats):
        share[i, :len(layer.heads)] = [h.content_share for h in layer.heads]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * heads, 1.2 + 0.4 * len(stats)))
    im = ax.imshow(share, vmin=0, vmax=1, cmap='viridis', aspect='auto')
    for (i, j), value in np.ndenumerate(share):
        if not np.isnan(value):
            ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7,
                    color='white' if value < 0.6 else 'black')
    ax.set_xticks(range(heads))
    ax.set_xticklabels(
        [str(tuple(h.tap)) for h in max(stats, key=lambda layer: len(layer.heads)).heads], rotation=90, fontsize=7)
    ax.set_yticks(range(len(stats)))
    ax.set_yticklabels([layer.name for layer in stats], fontsize=8)
    ax.set_xlabel('head (kernel tap offset)')
    ax.set_title('Content share g per head')
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)


def plot_attention_distance(stats: Sequence[LayerStats], path: PathLike) -> Path:
    """Mean attention distance per layer (averaged over heads): positional, content and mixed attention."""
    plt = require_matplotlib()
    kinds = (('positional', 'tab:blue'), ('content', 'tab:orange'), ('mixed', 'tab:green'))
    x = np.arange(len(stats))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(stats), 3.6))
    for k, (kind, color) in enumerate(kinds):
        per_head = [[getattr(h, f'distance_{kind}') for h in layer.heads] for layer in stats]
        means = np.array([np.mean(d) for d in per_head])
        offset = (k - (len(kinds) - 1) / 2) * width
        ax.bar(x + offset, means, width, color=color, alpha=0.75, label=kind)
        for i, d in enumerate(per_head):  # heads as dots over the bar
            ax.plot(np.full(len(d), x[i] + offset), d, '.', color='black', markersize=3)
    ax.set_xticks(x)
    ax.set_xticklabels([layer.name for layer in stats], rotation=30, ha='right', fontsize=8)
    ax.set_ylabel("mean attention distance\n(pixels of the layer's input)")
    ax.set_title('Attention distance per layer (bars: mean over heads, dots: heads)')
    ax.legend(fontsize=8)
    return _save(fig, path)


def _pick_heads(query: QueryAttention, max_heads: int) -> Sequence[int]:
    """The `max_heads` heads with the largest content share (ties in head order), in head order."""
    order = sorted(range(len(query.content_share)), key=lambda h: -float(query.content_share[h]))
    return sorted(order[:max_heads])


def plot_query_attention(
        image: np.ndarray,
        queries: Sequence[QueryAttention],
        pixel: Sequence[int],
        path: PathLike,
        max_heads: int = 9,
        title: Optional[str] = None,
) -> Path:
    """Mixed attention of each layer's heads for one query, drawn over the input image.

    Args:
        image: (H, W, 3) input image with values in [0, 1].
        queries: one `QueryAttention` per layer (`AttentionAnalyzer.query_attention`).
        pixel: (row, col) of the query in the image, marked with a cross.
        max_heads: heads per layer; the ones with the largest content share are shown.
    Colour and opacity follow the square root of the attention weight (1 = all of it on one key). A
    cell's title gives the head's tap, its content share g and, when some of its attention reads
    zero tokens outside the image (invisible here), that share as 'pad'.
    """
    plt = require_matplotlib()
    from matplotlib.patches import Rectangle
    img_h, img_w = image.shape[:2]
    extent = (0, img_w, img_h, 0)
    cols = min(max_heads, max(len(q.content_share) for q in queries))
    fig, axes = plt.subplots(
        len(queries), cols + 1, figsize=(1.6 * (cols + 1), 1.75 * len(queries)), squeeze=False)
    cmap = plt.get_cmap('inferno')
    for row, query in zip(axes, queries):
        grid_h, grid_w = query.grid_size
        cell_h, cell_w = img_h / grid_h, img_w / grid_w
        row[0].imshow(image, extent=extent)
        row[0].plot(pixel[1], pixel[0], 'c+', markersize=9, markeredgewidth=1.5)
        row[0].set_title(f'{query.name}\n{grid_h}x{grid_w} grid', fontsize=7)
        heads = _pick_heads(query, cols)
        for ax in row[1 + len(heads):]:
            ax.set_axis_off()
        for ax, h in zip(row[1:], heads):
            attn = query.mixed[h].numpy()
            level = np.sqrt(np.clip(attn, 0, 1))  # square root: faint content attention stays visible
            rgba = cmap(level)
            rgba[..., 3] = 0.85 * level
            ax.imshow(image, extent=extent)
            ax.imshow(rgba, extent=extent, interpolation='nearest')
            ax.add_patch(Rectangle(
                (query.query[1] * cell_w, query.query[0] * cell_h), cell_w, cell_h,
                fill=False, edgecolor='cyan', linewidth=1, clip_on=False))
            pad = 1 - float(attn.sum())
            label = f'{tuple(query.taps[h].tolist())} g={float(query.content_share[h]):.2f}'
            ax.set_title(label + (f'\npad {pad:.0%}' if pad > 0.005 else ''), fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    title = title or f'Mixed attention of the query at pixel {tuple(pixel)}'
    fig.suptitle(f'{title} (cyan: query cell; colour: sqrt of the attention weight)', fontsize=9)
    return _save(fig, path)
