""" The attention layer: gated positional self-attention that starts as an exact convolution.

Dependencies run one way inside the package: `numerics` <- `positional` <- `positional_kernels` (Triton, imported
only where the kernels run), `numerics` <- `functions` <- `gated_attention`; `config` holds the choices of
computation (made once per layer, for its device and dtype), `inference` what the layer reuses between inference
calls. The definition written plainly that every path is tested against is the tests' (`tests/reference.py`).
"""
from .config import LayerChoices, choose, positional_kernels_enabled, set_positional_kernels
from .gated_attention import RATE_SCALED_PARAMS, GatedPositionalAttention2d
from .numerics import default_block_bytes, rate_scaled, straight_through_clamp

__all__ = [
    'LayerChoices', 'choose', 'set_positional_kernels', 'positional_kernels_enabled', 'RATE_SCALED_PARAMS',
    'GatedPositionalAttention2d', 'default_block_bytes', 'rate_scaled', 'straight_through_clamp',
]
