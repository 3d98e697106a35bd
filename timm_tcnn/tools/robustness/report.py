""" The robustness results as text: one model's summary, and two models side by side. """
from typing import Any, Dict, List, Optional

from .protocol import SEVERITIES

__all__ = ['format_summary', 'format_comparison']


def _pct(x: Optional[float], digits: int = 2) -> str:
    return '-' if x is None else f'{100 * x:.{digits}f}'


def format_summary(entry: Dict[str, Any]) -> List[str]:
    s = entry['summary']
    lines = [f'== {entry["label"]}  [fingerprint {entry["fingerprint"]["id"]}]']
    for name, title in (('imagenet-val', 'ImageNet val'), ('imagenet-a', 'ImageNet-A'), ('imagenet-r', 'ImageNet-R')):
        if s.get(name) is not None:
            lines.append(f'{title} top-1: {_pct(s[name])}')
    c = s.get('imagenet-c')
    if c:
        cells = {(x['corruption'], x['severity']): x['top1'] for x in entry['cells'].values()
                 if x['benchmark'] == 'imagenet-c'}
        lines.append(f'ImageNet-C top-1 (%) by severity; CE (%) vs AlexNet '
                     f'[{c["complete_corruptions"]}/15 corruptions complete]')
        lines.append(f'  {"corruption":<18}' + ''.join(f'{i:>7}' for i in SEVERITIES) + f'{"mean":>8}{"CE":>8}'
                     + (f'{"relCE":>8}' if c['clean_accuracy'] is not None else ''))
        for name, x in c['corruptions'].items():
            row = f'  {name:<18}' + ''.join(f'{_pct(cells.get((name, i))):>7}' for i in SEVERITIES)
            row += f'{_pct(x["mean_accuracy"]):>8}{_pct(x.get("ce"), 1):>8}'
            if c['clean_accuracy'] is not None:
                row += f'{_pct(x.get("relative_ce"), 1):>8}'
            lines.append(row)
        partial = ' (PARTIAL: over the complete corruptions only)' if c['partial'] else ''
        lines.append(f'  mCE {_pct(c["mce"], 1)}  relative mCE {_pct(c["relative_mce"], 1)}  '
                     f'clean top-1 {_pct(c["clean_accuracy"])}{partial}')
        lines.append(f'  mean corruption accuracy {_pct(c["mean_corruption_accuracy"])}')
    k = s.get('corrupt')
    if k:
        lines.append(f'On-the-fly corruptions: clean top-1 {_pct(k["clean_accuracy"])}, mean corruption accuracy '
                     f'{_pct(k["mean_corruption_accuracy"])}')
        for name, x in k['corruptions'].items():
            lines.append(f'  {name:<18} mean top-1 {_pct(x["mean_accuracy"]):>7} over severities '
                         f'{",".join(map(str, x["severities"]))}')
    return lines


def _comparison_rows(summary: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Named scalar results of a summary, all as fractions (CE/mCE too)."""
    rows: Dict[str, Optional[float]] = {
        'ImageNet val top-1': summary.get('imagenet-val'),
        'ImageNet-A top-1': summary.get('imagenet-a'),
        'ImageNet-R top-1': summary.get('imagenet-r'),
    }
    c = summary.get('imagenet-c')
    if c:
        rows['ImageNet-C mean corruption accuracy'] = c['mean_corruption_accuracy']
        rows['ImageNet-C mCE (lower is better)'] = c['mce']
        rows['ImageNet-C relative mCE (lower is better)'] = c['relative_mce']
        for name, x in c['corruptions'].items():
            rows[f'  {name} mean top-1'] = x['mean_accuracy']
    k = summary.get('corrupt')
    if k:
        rows['on-the-fly clean top-1'] = k['clean_accuracy']
        rows['on-the-fly mean corruption accuracy'] = k['mean_corruption_accuracy']
        for name, x in k['corruptions'].items():
            rows[f'  {name} (on the fly) mean top-1'] = x['mean_accuracy']
    return rows


def format_comparison(first: Dict[str, Any], second: Dict[str, Any]) -> List[str]:
    """Table of MODEL, OTHER_MODEL and MODEL - OTHER_MODEL, in percent."""
    a, b = _comparison_rows(first['summary']), _comparison_rows(second['summary'])
    lines = [f'== {first["label"]} vs {second["label"]} (percent; difference = first - second)',
             f'  {"":<44}{"first":>9}{"second":>9}{"diff":>9}']
    for name in a:
        if a[name] is None and b.get(name) is None:
            continue
        diff = None if a[name] is None or b.get(name) is None else a[name] - b[name]
        lines.append(f'  {name:<44}{_pct(a[name]):>9}{_pct(b.get(name)):>9}'
                     f'{"-" if diff is None else f"{100 * diff:+.2f}":>9}')
    return lines
