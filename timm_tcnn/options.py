""" Deprecated location: `timm_tcnn.options` is now `timm_tcnn.models.options`; this alias will be removed. """
import sys
import warnings

from .models import options as _moved

warnings.warn('`timm_tcnn.options` moved to `timm_tcnn.models.options`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
