""" Deprecated location: `timm_tcnn.analysis` is now `timm_tcnn.tools.analysis`; this alias will be removed. """
import sys
import warnings

from .tools import analysis as _moved

warnings.warn('`timm_tcnn.analysis` moved to `timm_tcnn.tools.analysis`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
