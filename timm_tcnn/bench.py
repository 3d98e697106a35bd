""" Deprecated location: `timm_tcnn.bench` is now `timm_tcnn.tools.bench`; this alias will be removed. """
import sys
import warnings

from .tools import bench as _moved

warnings.warn('`timm_tcnn.bench` moved to `timm_tcnn.tools.bench`.', DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
