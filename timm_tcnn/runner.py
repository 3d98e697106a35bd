""" Deprecated location: `timm_tcnn.runner` is now `timm_tcnn.tools.runner`; this alias will be removed. """
import sys
import warnings

from .tools import runner as _moved

warnings.warn('`timm_tcnn.runner` moved to `timm_tcnn.tools.runner`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
