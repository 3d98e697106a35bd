""" The T-CNN models: options, the variants table, conversion of CNNs, what state dicts say, registration with timm.

Importing this package registers every `tcnn_*` variant (and its pretrained tags) with timm. Depends only on
`timm_tcnn.layers` and the neutral modules (`errors`, `utils`).
"""
from .convert import (
    attention_layers,
    attention_to_conv,
    check_convertible,
    conv_stages,
    conv_to_attention,
    convert_cnn_state_dict,
    convolution_of,
    transform_cnn,
)
from .options import GATE_LR_SCALE, GRAD_FLOOR, PREFIX, TcnnOptions, UnknownOptionError
from .state_dicts import (
    ATTENTION_PARAMS,
    attention_layer_names,
    checkpoint_options,
    describe_mismatch,
    fitting_variants,
)
from .tcnn import TcnnModel, TcnnResNet, create_tcnn, tcnn_class
from .variants import VARIANTS, Variant, conversion_options, tcnn_and_cnn_names, variant

__all__ = [
    'attention_layers', 'attention_to_conv', 'check_convertible', 'conv_stages', 'conv_to_attention',
    'convert_cnn_state_dict', 'convolution_of', 'transform_cnn', 'GATE_LR_SCALE', 'GRAD_FLOOR', 'PREFIX', 'TcnnOptions',
    'UnknownOptionError', 'ATTENTION_PARAMS', 'attention_layer_names', 'checkpoint_options', 'describe_mismatch',
    'fitting_variants', 'TcnnModel', 'TcnnResNet', 'create_tcnn', 'tcnn_class', 'VARIANTS', 'Variant',
    'conversion_options', 'tcnn_and_cnn_names', 'variant',
]
