""" The attention analysis of a T-CNN on a folder of images: statistics (JSON, CSV) and figures, written all or
nothing. """
import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from ..errors import InputError
from ..utils.io import atomic_directory
from .analysis import AttentionAnalyzer, LayerStats, head_rows

__all__ = ['OUTPUTS', 'read_images', 'analyze_images']

OUTPUTS = {
    'json': 'attention_stats.json',
    'csv': 'attention_stats.csv',
    'content_share': 'content_share.png',
    'distance': 'attention_distance.png',
    'query': 'query_attention.png',
}


def read_images(files: List[Path], transform, limit: int, skipped: List[Path]) -> Iterator[torch.Tensor]:
    """Preprocessed (C, H, W) images, at most `limit`, with a progress bar over the files tried;
    unreadable files are appended to `skipped`."""
    from PIL import Image, UnidentifiedImageError
    read = 0
    with tqdm(files, desc='images', unit='img', disable=None) as progress:
        for path in progress:
            if read >= limit:
                return
            try:
                with Image.open(path) as image:
                    tensor = transform(image.convert('RGB'))
            except (UnidentifiedImageError, OSError, ValueError):
                skipped.append(path)
                progress.set_postfix(skipped=len(skipped))
                continue
            read += 1
            yield tensor


def _csv_text(rows: List[Dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _to_image(tensor: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]):
    """(C, H, W) normalised input -> (H, W, 3) numpy image in [0, 1]."""
    image = tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def analyze_images(
        model: nn.Module,
        files: List[Path],
        out: Union[str, Path],
        cnn_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        max_images: int = 32,
        batch_size: int = 8,
        img_size: Optional[int] = None,
        query_pixel: Optional[Tuple[int, int]] = None,
        plot_heads: Optional[int] = None,
        plots: bool = True,
        overwrite: bool = False,
        meta: Optional[Mapping[str, Any]] = None,
        title: str = 'T-CNN',
) -> Tuple[List[LayerStats], Dict[str, Any]]:
    """Run `model` (a T-CNN in eval mode) on the image `files` and write `OUTPUTS` into `out`, all or nothing.

    `cnn_state_dict` (the source CNN) adds the weight drift per layer. Images are preprocessed with the model's
    data config at its test size (or `img_size`). Returns the per-layer statistics and the run's metadata (`meta`
    updated with what the run saw), which the JSON file also holds.
    """
    figures = None
    if plots:
        from . import plots as figures
        figures.require_matplotlib()
    analyzer = AttentionAnalyzer(model, cnn_state_dict)
    data_config = resolve_data_config({'img_size': img_size}, model=model, use_test_size=True)
    transform = create_transform(**data_config)
    img_h, img_w = data_config['input_size'][1:]
    pixel = tuple(query_pixel) if query_pixel else (img_h // 2, img_w // 2)
    if not (0 <= pixel[0] < img_h and 0 <= pixel[1] < img_w):
        raise InputError(f'--query-pixel {pixel[0]} {pixel[1]} lies outside the {img_h}x{img_w} model input.')

    skipped: List[Path] = []
    first: Optional[torch.Tensor] = None
    batch: List[torch.Tensor] = []
    seen = 0
    for tensor in read_images(files, transform, max_images, skipped):
        first = tensor if first is None else first
        batch.append(tensor)
        if len(batch) == batch_size:
            analyzer.update(torch.stack(batch))
            seen += len(batch)
            batch = []
    if batch:
        analyzer.update(torch.stack(batch))
        seen += len(batch)
    if first is None:
        raise InputError(f'none of the {len(files)} image files could be read.')
    stats = analyzer.stats()

    meta = dict(meta or {})
    meta.update({
        'images': seen,
        'skipped_images': [str(p) for p in skipped],
        'input_size': list(data_config['input_size']),
        'query_pixel': list(pixel),
    })
    report = dict(meta, layers=[asdict(layer) for layer in stats])
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / OUTPUTS['json']).write_text(json.dumps(report, indent=2) + '\n', encoding='utf-8')
        (tmp / OUTPUTS['csv']).write_text(_csv_text(head_rows(stats)), encoding='utf-8')
        if figures is not None:
            figures.plot_content_share(stats, tmp / OUTPUTS['content_share'])
            figures.plot_attention_distance(stats, tmp / OUTPUTS['distance'])
            figures.plot_query_attention(
                _to_image(first, data_config['mean'], data_config['std']),
                analyzer.query_attention(first, pixel),
                pixel,
                tmp / OUTPUTS['query'],
                max_heads=9 if plot_heads is None else plot_heads,
                title=f'{title}: mixed attention of the query at pixel {pixel}',
            )
    return stats, meta
