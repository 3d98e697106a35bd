""" Deprecated location of the attention layer: import from `timm_tcnn.layers` instead. """
import warnings

from .layers import GatedPositionalAttention2d, RATE_SCALED_PARAMS, default_block_bytes, rate_scaled, straight_through_clamp

__all__ = ['GatedPositionalAttention2d', 'straight_through_clamp', 'rate_scaled', 'default_block_bytes', 'RATE_SCALED_PARAMS']

warnings.warn(
    '`timm_tcnn.attention` moved to `timm_tcnn.layers`; the old module will be removed.', DeprecationWarning,
    stacklevel=2)
