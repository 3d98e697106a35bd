""" Deprecated location: `timm_tcnn.published` is now `timm_tcnn.models.published`; this alias will be removed. """
import sys
import warnings

from .models import published as _moved

warnings.warn('`timm_tcnn.published` moved to `timm_tcnn.models.published`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
