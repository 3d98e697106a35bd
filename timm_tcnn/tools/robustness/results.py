""" The incremental results store: one JSON file plus CSV and PNG views, all written atomically.

JSON and CSV are rewritten after every cell; the PNG plot at most once a minute and at the end of
each model's run. Layout of the JSON file:

    {"format": "timm-tcnn-robustness/1",
     "models": {<fingerprint id>: {"fingerprint": {...}, "label": str, "clean_accuracy_given": float | null,
                                   "problems": [str], "cells": {<cell key>: <cell>}, "summary": {...}}}}

A cell key is 'imagenet-c/<corruption>/<severity>', 'corrupt/<corruption>/<severity>' (severity 0:
clean), 'imagenet-a', 'imagenet-r' or 'imagenet-val'. A cell holds correct/total/unreadable counts,
top-1 (fraction) and its `source` (folder, image count, preprocessing); a rerun skips a cell whose
stored source equals the current one.
"""
import csv
import io
import json
import os
import time
import warnings
from typing import Any, Dict, Optional

from ...errors import InputError
from ...utils.io import atomic_write
from .protocol import FAMILIES, corruption_family, summarize_imagenet_c

__all__ = ['FORMAT', 'cell_key', 'summarize_model', 'ResultsStore']

FORMAT = 'timm-tcnn-robustness/1'


def cell_key(benchmark: str, corruption: Optional[str] = None, severity: Optional[int] = None) -> str:
    return benchmark if corruption is None else f'{benchmark}/{corruption}/{severity}'




def _grid(cells: Dict[str, Dict[str, Any]], benchmark: str) -> Dict[str, Dict[int, float]]:
    """{corruption: {severity: top-1}} of one benchmark's scored cells."""
    grid: Dict[str, Dict[int, float]] = {}
    for cell in cells.values():
        if cell['benchmark'] == benchmark and cell['top1'] is not None:
            grid.setdefault(cell['corruption'], {})[cell['severity']] = cell['top1']
    return grid


def summarize_model(entry: Dict[str, Any]) -> Dict[str, Any]:
    """Summary of a model entry: ImageNet-C CE/mCE, A/R/val top-1 and on-the-fly corruption accuracy."""
    cells = entry['cells']

    def top1(key: str) -> Optional[float]:
        return cells[key]['top1'] if key in cells else None

    clean = entry.get('clean_accuracy_given')
    if clean is None:
        clean = top1('imagenet-val')
    summary: Dict[str, Any] = {
        'imagenet-val': top1('imagenet-val'),
        'imagenet-a': top1('imagenet-a'),
        'imagenet-r': top1('imagenet-r'),
    }
    imagenet_c = _grid(cells, 'imagenet-c')
    if imagenet_c:
        summary['imagenet-c'] = summarize_imagenet_c(imagenet_c, clean)
    corrupt = _grid(cells, 'corrupt')
    if corrupt:
        clean_cell = corrupt.pop('clean', {}).get(0)
        scored = [acc for by_severity in corrupt.values() for acc in by_severity.values()]
        summary['corrupt'] = dict(
            clean_accuracy=clean_cell,
            mean_corruption_accuracy=sum(scored) / len(scored) if scored else None,
            corruptions={c: dict(family=corruption_family(c), severities=sorted(s),
                                 mean_accuracy=sum(s.values()) / len(s)) for c, s in corrupt.items()},
        )
    return summary


class ResultsStore:
    """Results of one or more models in `directory`/robustness.{json,csv,png}."""

    def __init__(self, directory: str, plot_interval: float = 60.):
        self.plot_interval = plot_interval  # seconds between PNG redraws (JSON and CSV: every cell)
        self._last_plot = time.monotonic()
        self.json_path = os.path.join(directory, 'robustness.json')
        self.csv_path = os.path.join(directory, 'robustness.csv')
        self.png_path = os.path.join(directory, 'robustness.png')
        self.data: Dict[str, Any] = {'format': FORMAT, 'models': {}}
        if os.path.exists(self.json_path):
            try:
                with open(self.json_path, encoding='utf-8') as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(f'{self.json_path} is not a readable results file ({e}); '
                                 'move it away or choose another --out folder') from e
            if not isinstance(data, dict) or data.get('format') != FORMAT:
                raise InputError(f'{self.json_path} is not a {FORMAT} results file; '
                                 'move it away or choose another --out folder')
            self.data = data

    def model(self, fingerprint: Dict[str, Any], label: str, clean_accuracy: Optional[float]) -> Dict[str, Any]:
        """The entry of the model with this fingerprint, created if new; per-run fields refreshed."""
        entry = self.data['models'].setdefault(fingerprint['id'], {'cells': {}})
        entry.update(fingerprint=fingerprint, label=label, problems=[])
        if clean_accuracy is not None or 'clean_accuracy_given' not in entry:
            entry['clean_accuracy_given'] = clean_accuracy
        entry['summary'] = summarize_model(entry)
        return entry

    @staticmethod
    def finished(entry: Dict[str, Any], key: str, source: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The stored cell if it was evaluated on the same source, else None."""
        cell = entry['cells'].get(key)
        return cell if cell is not None and cell.get('source') == source else None

    def put(self, entry: Dict[str, Any], key: str, cell: Dict[str, Any]) -> None:
        entry['cells'][key] = cell
        self.save()

    def save(self, final: bool = False) -> None:
        """Recompute summaries and rewrite JSON and CSV atomically; the PNG too if `final` or not
        redrawn for `plot_interval` seconds."""
        for entry in self.data['models'].values():
            entry['summary'] = summarize_model(entry)
        atomic_write(self.json_path, json.dumps(self.data, indent=1, sort_keys=False).encode('utf-8'))
        atomic_write(self.csv_path, self._csv().encode('utf-8'))
        if final or time.monotonic() - self._last_plot >= self.plot_interval:
            png = self._png()
            if png is not None:
                atomic_write(self.png_path, png)
            self._last_plot = time.monotonic()

    def _csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator='\n')
        writer.writerow(['model', 'fingerprint', 'benchmark', 'corruption', 'family', 'severity',
                         'top1', 'correct', 'total', 'unreadable', 'folder'])
        for fid, entry in self.data['models'].items():
            for cell in entry['cells'].values():
                corruption = cell.get('corruption')
                writer.writerow([
                    entry['label'], fid, cell['benchmark'], corruption or '',
                    corruption_family(corruption) if corruption and corruption != 'clean' else '',
                    '' if cell.get('severity') is None else cell['severity'],
                    '' if cell['top1'] is None else f'{100 * cell["top1"]:.3f}',
                    cell['correct'], cell['total'], cell['unreadable'], cell['source'].get('folder', ''),
                ])
        return out.getvalue()

    def _png(self) -> Optional[bytes]:
        """Top-1 vs severity, one panel per (benchmark, family), one line per (model, corruption)."""
        rows = [b for b in ('imagenet-c', 'corrupt')
                if any(_grid(e['cells'], b) for e in self.data['models'].values())]
        if not rows:
            return None
        try:
            import matplotlib
        except ImportError:
            warnings.warn('matplotlib is not installed: no robustness.png (pip install matplotlib)')
            return None
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        present = {corruption_family(c) for e in self.data['models'].values() for b in rows
                   for c in _grid(e['cells'], b) if c != 'clean'}
        families = [f for f in list(FAMILIES) + ['other'] if f in present] or ['other']
        fig, axes = plt.subplots(len(rows), len(families), figsize=(4 * len(families), 3.4 * len(rows)),
                                 squeeze=False, sharey=True)
        styles = ['-', '--', ':', '-.']
        names = sorted({c for e in self.data['models'].values() for b in rows for c in _grid(e['cells'], b)})
        colors = {name: f'C{i % 10}' for i, name in enumerate(names)}
        for r, benchmark in enumerate(rows):
            for c, family in enumerate(families):
                ax = axes[r][c]
                ax.set_title(f'{"ImageNet-C" if benchmark == "imagenet-c" else "on-the-fly"}: {family}')
                ax.set_xlabel('severity')
                ax.set_xticks(range(6))
                ax.grid(alpha=0.3)
                for m, entry in enumerate(self.data['models'].values()):
                    grid = _grid(entry['cells'], benchmark)
                    clean = grid.pop('clean', {}).get(0) if benchmark == 'corrupt' else entry['summary'].get(
                        'imagenet-c', {}).get('clean_accuracy')
                    for corruption, by_severity in sorted(grid.items()):
                        if corruption_family(corruption) != family:
                            continue
                        points = ({0: clean} if clean is not None else {}) | by_severity
                        xs = sorted(points)
                        ax.plot(xs, [100 * points[x] for x in xs], styles[m % len(styles)], marker='o',
                                color=colors[corruption], label=f'{corruption} ({entry["label"]})')
                if ax.lines:
                    ax.legend(fontsize=6)
            axes[r][0].set_ylabel('top-1 (%)')
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format='png', dpi=90)
        plt.close(fig)
        return buffer.getvalue()
