""" Robustness benchmarks for timm models: ImageNet-C (CE, mCE, relative mCE), ImageNet-A/R with their
200-class masks, and ImageNet-C corruptions applied on the fly to any labelled folder. """
from .corruptions import CorruptImage, check_corruptions
from .datasets import (
    EXTRA_CORRUPTIONS,
    SampleDataset,
    imagenet_class_to_idx,
    scan_class_folders,
    scan_imagenet_c,
    subset_indices,
)
from .evaluate import ModelSpec, build_model, count_top1, masked_predictions, model_data_config, model_fingerprint
from .protocol import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    corruption_error,
    relative_corruption_error,
    summarize_imagenet_c,
)
from .results import ResultsStore, summarize_model
from .run import CellTask, Plan, evaluate_model, plan_cells

__all__ = [
    'CorruptImage', 'check_corruptions', 'EXTRA_CORRUPTIONS', 'SampleDataset', 'imagenet_class_to_idx',
    'scan_class_folders', 'scan_imagenet_c', 'subset_indices', 'ModelSpec', 'build_model', 'count_top1',
    'masked_predictions', 'model_data_config', 'model_fingerprint', 'ALEXNET_CLEAN_ERROR', 'ALEXNET_ERRORS',
    'CORRUPTIONS', 'FAMILIES', 'SEVERITIES', 'corruption_error', 'relative_corruption_error', 'summarize_imagenet_c',
    'ResultsStore', 'summarize_model', 'CellTask', 'Plan', 'evaluate_model', 'plan_cells',
]
