""" timm-tcnn: Transformed CNNs (d'Ascoli et al., arXiv 2106.05795) for timm.

Importing the package registers the `tcnn_*` models with timm. The packages depend one way:
`cli` -> `tools` -> `weights` -> `models` -> `layers` (see docs/architecture.md).
"""
import warnings
from typing import Any

from .version import __version__
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


def __getattr__(name: str) -> Any:
    """`timm_tcnn.main`, the command line, imported only when asked for (deprecated: use `timm_tcnn.cli.main`)."""
    if name == 'main':
        warnings.warn('`timm_tcnn.main` moved to `timm_tcnn.cli.main`.', DeprecationWarning, stacklevel=2)
        from .cli import main
        return main
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
