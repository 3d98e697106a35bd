""" Transformed CNNs (T-CNN) for timm: every variant of `variants.VARIANTS`, registered with timm.

A T-CNN is built by the CNN's own timm entrypoint (same architecture arguments, `features_only`, `device`,
`dtype`), then `transform_cnn` recasts the spatial convolutions of its `tcnn_stages` as exact gated positional
self-attention. Pretrained tags are the CNN's tags, whose weights (`timm/<cnn>.<tag>`) convert on load: a
freshly converted T-CNN computes the same logits as its CNN.

Paper: Transformed CNNs: recasting pre-trained convolutional layers with self-attention
(d'Ascoli et al., 2021) - https://arxiv.org/abs/2106.05795
"""
import sys
from functools import lru_cache, partial
from typing import Any, Callable, Dict, Mapping, Set

import torch
import torch.nn as nn
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.layers import register_notrace_module
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_arch_pretrained_cfgs,
    list_pretrained,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._builder import pretrained_cfg_for_features
from timm.models.resnet import ResNet

from ..layers import RATE_SCALED_PARAMS, GatedPositionalAttention2d
from ..utils.hub import HubWeightsUnavailable, hub_unavailable_message, require_hub_weights
from .convert import attention_layers, transform_cnn
from .options import TcnnOptions
from .published import PAPER_IDS, PAPER_NAME, published_cfgs
from .state_dicts import describe_mismatch
from .variants import VARIANTS, Variant

__all__ = ['TcnnModel', 'TcnnResNet', 'tcnn_class', 'create_tcnn']

register_notrace_module(GatedPositionalAttention2d)

_OPTION_ATTRIBUTES = ('tcnn_options', 'tcnn_stages', 'tcnn_convert_strided')


class TcnnModel:
    """What a T-CNN adds to its CNN's class (see `tcnn_class`): attributes `tcnn_options` (`TcnnOptions`),
    `tcnn_stages` and `tcnn_convert_strided` (its fields), a `no_weight_decay` that also holds the gates and
    positional parameters, and checkpoint mismatches explained as model kwargs."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`; a mismatch also says which model kwargs would fit the checkpoint."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            raise RuntimeError(f'{e}\n{describe_mismatch(state_dict, self)}') from None

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The CNN's own set plus gates and positional parameters: decaying them would pull the model off its
        conversion."""
        inherited = getattr(super(), 'no_weight_decay', None)
        own = {f'{name}.{param}' for name, _ in attention_layers(self) for param in RATE_SCALED_PARAMS}
        return (set(inherited()) if inherited is not None else set()) | own


@lru_cache(maxsize=None)
def tcnn_class(cnn_class: type) -> type:
    """The T-CNN class of a timm CNN class: `TcnnModel` mixed into it (one class per CNN class)."""
    ignored = [*getattr(cnn_class, '__jit_ignored_attributes__', []), *_OPTION_ATTRIBUTES]  # TorchScript: eager only
    return type(f'Tcnn{cnn_class.__name__}', (TcnnModel, cnn_class),
                {'__module__': __name__, '__jit_ignored_attributes__': ignored})


TcnnResNet = tcnn_class(ResNet)


def _build(row: Variant, own_features: bool = False, **kwargs: Any) -> nn.Module:
    """The CNN built by its own entrypoint (no weights), its `tcnn_stages` converted; with `own_features`, the
    CNN's own `features_only` model (`Variant.own_features`)."""
    options = TcnnOptions.from_kwargs(kwargs, row.options)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith('tcnn_')}
    if own_features:
        kwargs['features_only'] = True
    model = model_entrypoint(row.cnn)(pretrained=False, **kwargs)
    transform_cnn(model, options.stages, options.convert_strided, **options.layer_kwargs())
    model.__class__ = tcnn_class(type(model))
    model.tcnn_options = options
    model.tcnn_stages, model.tcnn_convert_strided = options.stages, options.convert_strided
    return model


def _require_weights(variant: str, kwargs: Mapping[str, Any]) -> None:
    """Fail in seconds, as the command line does, when the Hub weights are neither cached nor downloadable."""
    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, str) and f'{variant}.{tag}' not in list_pretrained(f'{variant}.*'):
        tags = [name.split('.', 1)[1] for name in list_pretrained(f'{variant}.*')]
        raise RuntimeError(f'Unknown pretrained tag {tag!r} for {variant}: available tags are {tags}.')
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.state_dict is None and not cfg.file and cfg.hf_hub_id:
        require_hub_weights(cfg.hf_hub_id, kwargs.get('cache_dir'))


def _model_keys(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, Any]:
    """The entries of a checkpoint that `model` holds: a features model has no head."""
    keys = model.state_dict().keys()
    return {k: v for k, v in state_dict.items() if k in keys}


def create_tcnn(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered T-CNN; CNN weights (Hub, cache, `pretrained_cfg_overlay=dict(file=...)`) convert on load
    (the converted layers' state-dict hook), T-CNN weights load as they are.

    `features_only` is the CNN's: timm's wrapper (`feature_cfg`, the row's unless given) around the converted
    classifier once its weights are loaded, or, for a row with `own_features` (and neither `feature_cls` nor
    `feature_cfg` given, as the CNN's entrypoint decides), the CNN's own features class converted and loaded
    (the checkpoint's head left out). Either way `output_stride` and every other argument reach the CNN's
    entrypoint, so a value the CNN refuses fails with the CNN's own error."""
    row = VARIANTS[variant]
    if pretrained:
        _require_weights(variant, kwargs)
    try:
        if row.own_features and kwargs.get('features_only') and not {'feature_cls', 'feature_cfg'} & kwargs.keys():
            kwargs.pop('features_only')
            model = build_model_with_cfg(
                partial(_build, row, True), variant, pretrained, pretrained_filter_fn=_model_keys, **kwargs)
            model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
            return model
        feature_cfg = dict(kwargs.pop('feature_cfg', None) or row.feature_cfg)
        return build_model_with_cfg(partial(_build, row), variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    except LocalEntryNotFoundError as e:
        hf_hub_id = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg')).hf_hub_id
        raise HubWeightsUnavailable(hub_unavailable_message(hf_hub_id, 'not in the local cache')) from e


def _cnn_cfgs(row: Variant) -> Dict[str, Dict[str, Any]]:
    """Every pretrained tag of the CNN as a tag of the T-CNN, the CNN's default first, Hub ids spelt out."""
    cfgs = {}
    for name, cfg in get_arch_pretrained_cfgs(row.cnn).items():
        if not cfg.has_weights or not cfg.tag:
            continue
        cfg = cfg.to_dict()
        cfg.pop('architecture'), cfg.pop('tag')
        cfg.update(
            paper_ids=PAPER_IDS,
            paper_name=PAPER_NAME,
            notes=(f'Weights of the CNN {name}, converted on load; the T-CNN computes the same function until '
                   'fine-tuned.',),
        )
        cfgs[f'{row.name}.{name.split(".", 1)[1]}'] = cfg
    return cfgs


default_cfgs = generate_default_cfgs({
    **{name: cfg for row in VARIANTS.values() for name, cfg in _cnn_cfgs(row).items()},
    # fine-tuned weights listed in published_weights.json
    **published_cfgs({row.name: row.options.to_kwargs() for row in VARIANTS.values()}),
})


def _entrypoint(row: Variant) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_tcnn(row.name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = row.name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'T-CNN of timm\'s {row.cnn}, stages {row.options.stages} converted by default.'
    return entrypoint


for _row in VARIANTS.values():
    setattr(sys.modules[__name__], _row.name, register_model(_entrypoint(_row)))
del _row
