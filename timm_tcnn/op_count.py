""" Deprecated location: `timm_tcnn.op_count` is now `timm_tcnn.tools.op_count`; this alias will be removed. """
import sys
import warnings

from .tools import op_count as _moved

warnings.warn('`timm_tcnn.op_count` moved to `timm_tcnn.tools.op_count`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
