""" The ImageNet-C protocol: corruption names, families, AlexNet reference errors and the CE / mCE maths.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261).

All errors and accuracies here are fractions in [0, 1]; the command prints percentages.
"""
from typing import Dict, Mapping, Optional, Sequence

__all__ = [
    'CORRUPTIONS', 'FAMILIES', 'SEVERITIES', 'ALEXNET_ERRORS', 'ALEXNET_CLEAN_ERROR',
    'corruption_family', 'corruption_error', 'relative_corruption_error', 'summarize_imagenet_c',
]

# the 15 benchmark corruptions, in the order of the paper's tables
CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)

FAMILIES = {
    'noise': ('gaussian_noise', 'shot_noise', 'impulse_noise'),
    'blur': ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur'),
    'weather': ('snow', 'frost', 'fog', 'brightness'),
    'digital': ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression'),
}

SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet top-1 error on each corruption, averaged over the 5 severities (the paper's normaliser)
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360,
    'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324, 'brightness': 0.564592,
    'contrast': 0.853204, 'elastic_transform': 0.646056, 'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}

# clean top-1 error of the AlexNet used for the table above (torchvision's, top-1 56.522%)
ALEXNET_CLEAN_ERROR = 1. - 0.56522


def corruption_family(corruption: str) -> str:
    """'noise', 'blur', 'weather' or 'digital'; 'other' for a name outside the 15."""
    for family, names in FAMILIES.items():
        if corruption in names:
            return family
    return 'other'


def corruption_error(errors: Sequence[float], corruption: str) -> float:
    """CE_c = sum over the 5 severities of the model's error / the same sum for AlexNet."""
    _check_complete(errors, corruption)
    return sum(errors) / (len(SEVERITIES) * ALEXNET_ERRORS[corruption])


def relative_corruption_error(errors: Sequence[float], clean_error: float, corruption: str) -> float:
    """Relative CE_c = sum_s (E_s - E_clean) / sum_s (E^AlexNet_s - E^AlexNet_clean)."""
    _check_complete(errors, corruption)
    n = len(SEVERITIES)
    return (sum(errors) - n * clean_error) / (n * (ALEXNET_ERRORS[corruption] - ALEXNET_CLEAN_ERROR))


def _check_complete(errors: Sequence[float], corruption: str) -> None:
    if corruption not in ALEXNET_ERRORS:
        raise ValueError(f'{corruption!r} has no AlexNet reference error; known: {", ".join(CORRUPTIONS)}')
    if len(errors) != len(SEVERITIES):
        raise ValueError(f'CE of {corruption} needs the errors of all {len(SEVERITIES)} severities, got {len(errors)}')


def summarize_imagenet_c(
        accuracies: Mapping[str, Mapping[int, float]],
        clean_accuracy: Optional[float] = None,
) -> Dict[str, object]:
    """Summarise ImageNet-C top-1 accuracies {corruption: {severity: accuracy}}.

    CE needs all 5 severities of a corruption; mCE and relative mCE are marked partial unless all
    15 corruptions are complete (they are then means over the complete ones only). Mean corruption
    accuracy is the mean over every cell present.
    """
    per_corruption = {}
    cells = []
    for corruption in [c for c in CORRUPTIONS if c in accuracies] + sorted(set(accuracies) - set(CORRUPTIONS)):
        by_severity = accuracies[corruption]
        severities = sorted(by_severity)
        cells += [by_severity[s] for s in severities]
        complete = corruption in ALEXNET_ERRORS and severities == list(SEVERITIES)
        entry = dict(
            family=corruption_family(corruption),
            severities=severities,
            complete=complete,
            mean_accuracy=sum(by_severity.values()) / len(severities),
        )
        if complete:
            errors = [1. - by_severity[s] for s in SEVERITIES]
            entry['ce'] = corruption_error(errors, corruption)
            if clean_accuracy is not None:
                entry['relative_ce'] = relative_corruption_error(errors, 1. - clean_accuracy, corruption)
        per_corruption[corruption] = entry

    complete = [c for c, e in per_corruption.items() if e['complete']]
    missing = [c for c in CORRUPTIONS if c not in complete]
    summary: Dict[str, object] = dict(
        corruptions=per_corruption,
        complete_corruptions=len(complete),
        missing_or_partial=missing,
        partial=bool(missing),
        mean_corruption_accuracy=sum(cells) / len(cells) if cells else None,
        clean_accuracy=clean_accuracy,
        mce=None,
        relative_mce=None,
    )
    if complete:
        summary['mce'] = sum(per_corruption[c]['ce'] for c in complete) / len(complete)
        if clean_accuracy is not None:
            summary['relative_mce'] = sum(per_corruption[c]['relative_ce'] for c in complete) / len(complete)
    return summary
