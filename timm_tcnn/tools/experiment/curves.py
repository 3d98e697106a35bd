""" Per-epoch curves of an experiment's runs, as mean and std over seeds (read by the report and its figures). """
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ['CURVE_TITLES', 'mean_std', 'curve_order', 'curve_stats']

CURVE_TITLES = {
    'validation_top1': "train.py's own validation top-1 (%, its recipe's preprocessing)",
    'top1': "top-1 (%) at the test size (validate.py's preprocessing)",
    'content_share': 'mean content share over heads',
}


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean, sample std (None for fewer than two values) and count of `values`."""
    return dict(mean=statistics.fmean(values) if values else None,
                std=statistics.stdev(values) if len(values) > 1 else None, n=len(values))


def curve_order(key: str) -> Tuple[int, str]:
    """Curves in reading order: the top-1 curves, the label parts and groups, the content share."""
    return (0 if key in ('validation_top1', 'top1') else 2 if key == 'content_share' else 1, key)


def curve_stats(runs: Dict[str, Dict[str, Any]], arm: str) -> Dict[str, Dict[int, Dict[str, Optional[float]]]]:
    """{curve key: {epochs done: mean/std over seeds}} of an arm."""
    values: Dict[str, Dict[int, List[float]]] = {}
    for run in runs.values():
        if run['arm'] == arm:
            for done, row in run['curves'].items():
                for key, value in row.items():
                    values.setdefault(key, {}).setdefault(int(done), []).append(value)
    return {key: {done: mean_std(v) for done, v in sorted(epochs.items())} for key, epochs in values.items()}
