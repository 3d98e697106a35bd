""" Figures of an experiment report (PNG, matplotlib; none without it). """
import statistics
import warnings
from pathlib import Path
from typing import Any, Dict, List

from .spec import ARMS, ExperimentSpec

__all__ = ['write_figures']

_COLORS = {'cnn': 'tab:blue', 'tcnn': 'tab:orange'}


def _validation_curves(ax, spec: ExperimentSpec, results: Dict[str, Any]) -> None:
    for run in results['runs'].values():
        epochs = [row for row in run['epochs'] if 'eval_top1' in row]
        ax.plot([row['epoch'] for row in epochs], [row['eval_top1'] for row in epochs], color=_COLORS[run['arm']],
                alpha=0.8, label=f'{run["arm"]} seed {run["seed"]}')
    ax.set(xlabel='epoch', ylabel='validation top-1 (%)', title=f'train.py validation at {spec.train_size} px')
    ax.legend(fontsize='small')


def _corruptions(ax, table: Dict[str, Any]) -> bool:
    names = [m for m in table if '/' in m and not m.startswith('part/')]
    if not names:
        return False
    width = 0.4
    for i, arm in enumerate(ARMS):
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], [table[m][arm]['mean'] or 0 for m in names],
               width, yerr=[table[m][arm]['std'] or 0 for m in names], color=_COLORS[arm], label=arm)
    ax.set_xticks(range(len(names)), [m.split('/', 1)[1] for m in names], rotation=45, ha='right')
    ax.set(ylabel='top-1 (%)', title='accuracy per corruption (mean +- std over seeds)')
    ax.legend()
    return True


def _gates(ax, results: Dict[str, Any]) -> bool:
    drawn = False
    for seed, record in results['gates'].items():
        if not record:
            continue
        epochs = sorted(int(e) for e in record)
        for name in record[str(epochs[0])]:
            shares = [statistics.fmean(record[str(e)][name]['content_share']) for e in epochs]
            ax.plot([-1] + epochs, [0.] + shares, marker='o', label=f'{name} ({seed})')
            drawn = True
    ax.set(xlabel='epoch (-1: conversion)', ylabel='mean content share', title='content gates during fine-tuning')
    if drawn:
        ax.legend(fontsize='x-small')
    return drawn


def _attention(axes, results: Dict[str, Any]) -> bool:
    start = results['analysis'].get('conversion')
    ends = [a for name, a in results['analysis'].items() if name != 'conversion' and a]
    if not start or not ends:
        return False
    names = [layer['name'] for layer in start['layers']]
    for key, ax, label in (('content_share', axes[0], 'content share'), ('distance_mixed', axes[1], 'attention distance (px)')):
        at_start = [statistics.fmean(h[key] for h in layer['heads']) for layer in start['layers']]
        at_end = [statistics.fmean(statistics.fmean(h[key] for h in a['layers'][i]['heads']) for a in ends)
                  for i in range(len(names))]
        ax.plot(range(len(names)), at_start, marker='o', label='conversion')
        ax.plot(range(len(names)), at_end, marker='o', label='end (mean over seeds)')
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize='small')
        ax.set(ylabel=label, title=f'{label} per converted layer')
        ax.legend(fontsize='small')
    return True


def write_figures(spec: ExperimentSpec, results: Dict[str, Any], table: Dict[str, Any]) -> List[str]:
    """Write the report's PNG figures into the experiment folder; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn('matplotlib is not installed: the report has no figures (pip install timm-tcnn[analysis])')
        return []
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str, keep: bool) -> None:
        if keep:
            path = Path(spec.root) / name
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            written.append(str(path))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    _validation_curves(ax, spec, results)
    save(fig, 'validation_top1.png', any(run['epochs'] for run in results['runs'].values()))
    fig, ax = plt.subplots(figsize=(8, 4))
    save(fig, 'corruption_accuracy.png', _corruptions(ax, table))
    fig, ax = plt.subplots(figsize=(6, 4))
    save(fig, 'gates.png', _gates(ax, results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    save(fig, 'attention_by_layer.png', _attention(axes, results))
    return written
