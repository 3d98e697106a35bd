""" timm-tcnn: Transformed CNNs (d'Ascoli et al., arXiv 2106.05795) for timm.

Importing the package registers the `tcnn_*` models with timm.
"""
from .version import __version__
from .layers import GatedPositionalAttention2d
from .convert import (
    attention_layers,
    attention_to_conv,
    check_convertible,
    conv_stages,
    conv_to_attention,
    convert_cnn_state_dict,
    transform_cnn,
)
from .options import TcnnOptions
from .models import TcnnModel, TcnnResNet, tcnn_class
from .variants import VARIANTS
