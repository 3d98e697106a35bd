""" Deprecated location: `timm_tcnn.variants` is now `timm_tcnn.models.variants`; this alias will be removed. """
import sys
import warnings

from .models import variants as _moved

warnings.warn('`timm_tcnn.variants` moved to `timm_tcnn.models.variants`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
