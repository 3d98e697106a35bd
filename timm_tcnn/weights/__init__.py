""" Weights: reading checkpoints, the finite and fit checks, building models with their weights (the CNN loader),
the identity check of a conversion, converting a CNN's weights into a saved T-CNN (`convert`), publishing to the
Hugging Face Hub with a model card.

Depends on `timm_tcnn.models` (and through it `layers`) and the neutral modules; `convert`, `publish` and
`model_card` are imported on their own (`timm_tcnn.weights.convert`).
"""
from .checkpoint import CheckpointError, load_checkpoint_state_dict
from .checks import check_finite, check_fits, nonfinite_tensors
from .loading import check_model_source, create_model, create_model_with_weights, unknown_model_hint

__all__ = [
    'CheckpointError', 'load_checkpoint_state_dict', 'check_finite', 'check_fits', 'nonfinite_tensors',
    'check_model_source', 'create_model', 'create_model_with_weights', 'unknown_model_hint',
]
