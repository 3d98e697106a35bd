""" Figures of an experiment report (PNG, matplotlib; none without it). """
import statistics
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .curves import curve_order, curve_stats
from .spec import ExperimentSpec

__all__ = ['write_figures']

_COLORS = {'cnn': 'tab:blue', 'tcnn': 'tab:orange', 'scratch': 'tab:green'}


def _mean_band(ax, xs: List[float], stats: List[Dict[str, Any]], arm: str) -> None:
    """An arm's mean over seeds, with its std as a band."""
    means = [s['mean'] for s in stats]
    stds = [s['std'] or 0. for s in stats]
    ax.plot(xs, means, marker='o', color=_COLORS[arm], label=arm)
    ax.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                    color=_COLORS[arm], alpha=0.2)


def _learning_curves(fig, spec: ExperimentSpec, results: Dict[str, Any]) -> bool:
    """One panel per curve (train.py's validation top-1, each label part and group, content share)."""
    from matplotlib.ticker import MaxNLocator
    stats = {arm: curve_stats(results['runs'], arm) for arm in spec.arms}
    keys = sorted({k for s in stats.values() for k in s}, key=curve_order)
    if not keys:
        return False
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig.set_size_inches(4.5 * columns, 3.5 * rows)
    for index, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, index + 1)
        for arm in spec.arms:
            curve = stats[arm].get(key)
            if curve:
                _mean_band(ax, list(curve), list(curve.values()), arm)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label = {'validation_top1': "train.py's validation top-1 (%)", 'top1': 'top-1 at the test size (%)',
                 'content_share': 'mean content share'}.get(key, f'{key} (%)')
        ax.set(xlabel='epochs done', ylabel=label, title=label)
        ax.legend(fontsize='small')
    return True


def _accuracy_against_time(ax, spec: ExperimentSpec, results: Dict[str, Any]) -> bool:
    """Mean validation top-1 against training hours, the starting CNN's included for the routes from it (epochs
    assumed to take equal time within a run)."""
    drawn = False
    for arm in spec.arms:
        curve = curve_stats(results['runs'], arm).get('validation_top1')
        times = results['times'][arm]
        if not curve or times['train_seconds']['mean'] is None:
            continue
        last = max(curve)
        start = times['before_seconds'] or 0.
        hours = [(start + times['train_seconds']['mean'] * done / last) / 3600 for done in curve]
        _mean_band(ax, hours, list(curve.values()), arm)
        drawn = True
    ax.set(xlabel='training wall clock (hours, the starting CNN\'s included where known)',
           ylabel='validation top-1 (%)', title='accuracy against training time')
    if drawn:
        ax.legend(fontsize='small')
    return drawn


def _corruptions(ax, table: Dict[str, Any]) -> bool:
    names = [m for m in table if '/' in m and not m.startswith('part/')]
    if not names:
        return False
    width = 0.4
    for i, arm in enumerate(('tcnn', 'cnn')):
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], [table[m][arm]['mean'] or 0 for m in names],
               width, yerr=[table[m][arm]['std'] or 0 for m in names], color=_COLORS[arm], label=arm)
    ax.set_xticks(range(len(names)), [m.split('/', 1)[1] for m in names], rotation=45, ha='right')
    ax.set(ylabel='top-1 (%)', title='accuracy per corruption (mean +- std over seeds)')
    ax.legend()
    return True


def _gates(ax, results: Dict[str, Any]) -> bool:
    from matplotlib.ticker import MaxNLocator
    drawn = False
    for seed, record in results['gates'].items():
        if not record:
            continue
        epochs = sorted(int(e) for e in record)
        for name in record[str(epochs[0])]:
            shares = [statistics.fmean(record[str(e)][name]['content_share']) for e in epochs]
            ax.plot([0] + [e + 1 for e in epochs], [0.] + shares, marker='o', label=f'{name} ({seed})')
            drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel='epochs done (0: conversion)', ylabel='mean content share', title='content gates during fine-tuning')
    if drawn:
        ax.legend(fontsize='x-small')
    return drawn


def _attention(axes, results: Dict[str, Any]) -> bool:
    start = results['analysis'].get('conversion')
    ends = [a for name, a in results['analysis'].items() if name != 'conversion' and a]
    if not start or not ends:
        return False
    names = [layer['name'] for layer in start['layers']]
    for key, ax, label in (
        ('content_share', axes[0], 'content share'),
        ('distance_mixed', axes[1], 'attention distance (px)'),
    ):
        at_start = [statistics.fmean(h[key] for h in layer['heads']) for layer in start['layers']]
        at_end = [
            statistics.fmean(statistics.fmean(h[key] for h in a['layers'][i]['heads']) for a in ends)
            for i in range(len(names))
        ]
        ax.plot(range(len(names)), at_start, marker='o', label='conversion')
        ax.plot(range(len(names)), at_end, marker='o', label='end (mean over seeds)')
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize='small')
        ax.set(ylabel=label, title=f'{label} per converted layer')
        ax.legend(fontsize='small')
    return True


def write_figures(spec: ExperimentSpec, results: Dict[str, Any], tables: Dict[Tuple[str, str], Any]) -> List[str]:
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

    fig = plt.figure()
    save(fig, 'learning_curves.png', _learning_curves(fig, spec, results))
    fig, ax = plt.subplots(figsize=(6, 4))
    save(fig, 'accuracy_time.png', _accuracy_against_time(ax, spec, results))
    fig, ax = plt.subplots(figsize=(8, 4))
    save(fig, 'corruption_accuracy.png', _corruptions(ax, tables.get(('tcnn', 'cnn'), {})))
    fig, ax = plt.subplots(figsize=(6, 4))
    save(fig, 'gates.png', _gates(ax, results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    save(fig, 'attention_by_layer.png', _attention(axes, results))
    return written
