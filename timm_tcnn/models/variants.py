""" The registered T-CNNs: one row per variant, read by every other module (registry, CLI, publishing, benchmarks).

A row names the T-CNN, the timm CNN it is converted from (every pretrained tag of the CNN is a tag of the
T-CNN) and the T-CNN's default options. Adding a family or a model is one `_row(...)` line below.
This module is a leaf: it imports no other module of the package but `options` and `errors`.
"""
import dataclasses
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import InputError
from .options import TcnnOptions

__all__ = ['Variant', 'VARIANTS', 'variant', 'tcnn_and_cnn_names', 'conversion_options']


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered T-CNN.

    Attributes:
        name: the T-CNN's model name, e.g. `tcnn_resnet50rs`.
        cnn: the timm CNN it is built and converted from, e.g. `resnetrs50`.
        options: its default `tcnn_*` options.
        feature_cfg: `build_model_with_cfg`'s feature_cfg for `features_only`, as the CNN's family uses it.
        own_features: the CNN's `features_only` model is a class of its own (timm's EfficientNetFeatures,
            MobileNetV3Features: the CNN's entrypoint builds it unless `feature_cls` or `feature_cfg` is given), not
            timm's wrapper around the classifier; the T-CNN's is then that class, converted, and `output_stride`
            is the CNN's whenever the features class takes it and the classifier does not.
    """
    name: str
    cnn: str
    options: TcnnOptions = TcnnOptions()
    feature_cfg: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    own_features: bool = False


# families whose features_only wrapper needs more than timm's default (FeatureListNet on out_indices 0..4)
_FLAT = dict(flatten_sequential=True)
_FLAT4 = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))


def _row(cnn: str, name: Optional[str] = None, feature_cfg: Optional[Mapping[str, Any]] = None,
         own_features: bool = False, **options: Any) -> Variant:
    return Variant(name or f'tcnn_{cnn}', cnn, TcnnOptions(**options), MappingProxyType(dict(feature_cfg or {})),
                   own_features)


def _table(*rows: Variant) -> Mapping[str, Variant]:
    return MappingProxyType({row.name: row for row in rows})


# default stages: (4,), the last, lowest-resolution stage (7x7 at 224 px); attention cost grows with the square
# of the number of tokens, so stage 3 costs 16x more per layer (see the README for the measured throughput)
VARIANTS: Mapping[str, Variant] = _table(
    *(_row(f'resnetrs{depth}', f'tcnn_resnet{depth}rs') for depth in (50, 101, 152, 200, 270, 350, 420)),
    _row('resnet18'),
    _row('resnet26d'),
    _row('resnet50d'),
    _row('resnext50_32x4d'),
    _row('seresnext50_32x4d'),
    _row('regnety_032'),
    *(_row(f'convnext_{size}', feature_cfg=_FLAT4) for size in ('atto', 'nano', 'tiny', 'small', 'base')),
    _row('efficientnet_b0', feature_cfg=_FLAT, own_features=True),
    _row('mobilenetv3_large_100', feature_cfg=_FLAT, own_features=True),
    _row('cspresnet50', feature_cfg=_FLAT),
)


def variant(name: str) -> Variant:
    """The row of a T-CNN name (a tag after '.' is ignored)."""
    arch = name.partition('.')[0]
    if arch not in VARIANTS:
        raise InputError(f'{name!r} is not a registered T-CNN; registered: {", ".join(VARIANTS)}.')
    return VARIANTS[arch]


def tcnn_and_cnn_names(model_name: str) -> Tuple[str, str]:
    """('tcnn_resnet50rs.tag', 'resnetrs50.tag') for a T-CNN or CNN name, tag optional (default: none, i.e. the
    CNN's default tag)."""
    arch, _, tag = model_name.partition('.')
    suffix = f'.{tag}' if tag else ''
    for row in VARIANTS.values():
        if arch in (row.name, row.cnn):
            return row.name + suffix, row.cnn + suffix
    raise InputError(
        f'{model_name!r} is neither a registered T-CNN nor its CNN: use one of {", ".join(VARIANTS)} or '
        f'{", ".join(row.cnn for row in VARIANTS.values())}. Other timm CNNs convert through the Python API '
        f'(timm_tcnn.transform_cnn).')


def conversion_options(variant_name: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """Every `tcnn_*` option of a variant (default: the package defaults) updated by `overrides`, validated,
    spelt out as model kwargs (as saved configs hold them)."""
    defaults = variant(variant_name).options if variant_name else TcnnOptions()
    return TcnnOptions.from_kwargs(overrides, defaults).to_kwargs()
