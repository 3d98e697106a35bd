""" timm-tcnn: Transformed CNNs (d'Ascoli et al., arXiv 2106.05795) for timm.

Importing the package registers the `tcnn_*` models with timm. The packages depend one way:
`cli` -> `tools` -> `weights` -> `models` -> `layers` (see docs/architecture.md).
"""
from .layers import GatedPositionalAttention2d
from .models import (
    VARIANTS,
    TcnnModel,
    TcnnOptions,
    TcnnResNet,
    attention_layers,
    attention_to_conv,
    check_convertible,
    conv_stages,
    conv_to_attention,
    convert_cnn_state_dict,
    tcnn_class,
    transform_cnn,
)
from .version import __version__

__all__ = [
    '__version__', 'GatedPositionalAttention2d', 'VARIANTS', 'TcnnModel', 'TcnnOptions', 'TcnnResNet',
    'attention_layers', 'attention_to_conv', 'check_convertible', 'conv_stages', 'conv_to_attention',
    'convert_cnn_state_dict', 'tcnn_class', 'transform_cnn',
]
