""" Deprecated location: `timm_tcnn.convert` is now `timm_tcnn.models.convert`; this alias will be removed. """
import sys
import warnings

from .models import convert as _moved

warnings.warn('`timm_tcnn.convert` moved to `timm_tcnn.models.convert`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
