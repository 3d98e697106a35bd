""" Conversion between convolutions and gated positional self-attention, for layers, models and
state dicts.
"""
import logging
from typing import Any, Dict, Iterable, Iterator, List, Literal, Tuple

import torch
import torch.nn as nn

from timm.layers import Conv2dSame
from timm.layers.conv2d_same import Conv2dSameExport

from .attention import GatedPositionalAttention2d

__all__ = [
    'conv_to_attention', 'attention_to_conv', 'transform_cnn', 'convert_cnn_state_dict',
    'check_convertible', 'attention_layers',
]

_logger = logging.getLogger(__name__)

_CONVERTIBLE_TYPES = (nn.Conv2d, Conv2dSame, Conv2dSameExport)


def _same_padding(conv: nn.Conv2d) -> bool:
    """True for timm's dynamic TF 'SAME' convolutions (zeros before/after each dimension depend on its size)."""
    return isinstance(conv, (Conv2dSame, Conv2dSameExport))


def check_convertible(conv: nn.Module, name: str = 'conv') -> None:
    """Raise a ValueError naming `name` and the reason if `conv` has no exact attention form."""
    if type(conv) not in _CONVERTIBLE_TYPES:
        raise ValueError(
            f'{name}: {type(conv).__name__} is not nn.Conv2d or timm\'s Conv2dSame (subclasses such as weight-'
            f'standardised convolutions change what the convolution computes); it cannot be converted.')
    k_h, k_w = conv.kernel_size
    reasons = []
    if k_h != k_w or k_h % 2 == 0:
        reasons.append(f'kernel {k_h}x{k_w} is not square with an odd size')
    if conv.dilation != (1, 1):
        reasons.append(f'dilation={conv.dilation}')
    if conv.stride not in ((1, 1), (2, 2)):
        reasons.append(f'stride={conv.stride} (only 1 or 2 in both directions)')
    symmetric = conv.padding == (k_h // 2, k_w // 2) or conv.padding == 'same'
    if not reasons and not (symmetric or _same_padding(conv)):
        reasons.append(f'padding={conv.padding} (only kernel_size // 2 = {k_h // 2}, or TF "same")')
    if conv.padding_mode != 'zeros':
        reasons.append(f'padding_mode={conv.padding_mode!r} (only zeros)')
    if reasons:
        raise ValueError(f'{name}: cannot convert {conv}: ' + '; '.join(reasons) + '.')


def conv_to_attention(conv: nn.Conv2d, name: str = 'conv', **layer_kwargs: Any) -> GatedPositionalAttention2d:
    """Build a `GatedPositionalAttention2d` computing exactly what `conv` computes.

    `conv` is an `nn.Conv2d` (any `groups`, padding K // 2 or 'same') or timm's `Conv2dSame`.
    `layer_kwargs` are the attention options (`qk_dim`, `qk_init_std`, `locality_init`). The new layer
    lives on `conv`'s device and dtype and copies its weight and bias.
    """
    check_convertible(conv, name)
    weight = conv.weight
    layer = GatedPositionalAttention2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size[0],
        stride=conv.stride[0],
        bias=conv.bias is not None,
        groups=conv.groups,
        same_padding=_same_padding(conv),
        device=weight.device,
        dtype=weight.dtype,
        **layer_kwargs,
    )
    layer.load_state_dict(conv.state_dict())  # a convolution's entries load as the exact conversion
    layer.train(conv.training)
    return layer


def attention_to_conv(layer: GatedPositionalAttention2d, name: str = 'layer') -> nn.Conv2d:
    """Return the convolution a layer still equals (`Conv2dSame` for 'SAME' padding): both gates must be 0."""
    if not isinstance(layer, GatedPositionalAttention2d):
        raise TypeError(f'{name}: expected a GatedPositionalAttention2d, got {type(layer).__name__}.')
    if not layer.is_convolution():
        raise ValueError(
            f'{name}: the layer is no longer a convolution (content share {layer.content_share().tolist()}, '
            f'Gaussian locality share {layer.locality_share().tolist()}); only a layer whose gates are all 0 '
            f'converts back exactly.')
    weight = layer.weight
    conv_cls = Conv2dSame if layer.same_padding else nn.Conv2d
    conv = conv_cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=0 if layer.same_padding else layer.padding,
        groups=layer.groups,
        bias=layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ('weight', 'bias')})
    conv.train(layer.training)
    return conv


def attention_layers(model: nn.Module) -> Iterator[Tuple[str, GatedPositionalAttention2d]]:
    """(name, layer) of every converted layer of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, GatedPositionalAttention2d):
            yield name, module


def _stage_modules(model: nn.Module, stages: Iterable[int]) -> List[Tuple[str, nn.Module]]:
    available = [i for i in range(1, 10) if isinstance(getattr(model, f'layer{i}', None), nn.Module)]
    if not available:
        raise ValueError(
            f'{type(model).__name__} has no stages layer1, layer2, ...: transform_cnn expects a timm '
            f'ResNet-family model (resnet*, seresnet*, resnetrs*, ...).')
    stages = tuple(stages)
    if not stages:
        raise ValueError('stages is empty: name at least one 1-based stage, e.g. stages=(3, 4).')
    bad = [s for s in stages if s not in available]
    if bad:
        raise ValueError(
            f'stage index {bad} out of range: this model has stages {available} '
            f'(1-based, stage i is layer{{i}}).')
    return [(f'layer{i}', getattr(model, f'layer{i}')) for i in sorted(set(stages))]


def transform_cnn(
        model: nn.Module,
        stages: Iterable[int] = (3, 4),
        convert_strided: bool = True,
        unsupported: Literal['raise', 'skip'] = 'raise',
        **layer_kwargs: Any,
) -> nn.Module:
    """Replace, in place, the KxK (K > 1) convolutions of the chosen stages by exact attention.

    Args:
        model: a timm ResNet-family model (stages `layer1` ... `layer4`).
        stages: 1-based stage indices; (3, 4) means `layer3` and `layer4`.
        convert_strided: also convert stride-2 convolutions (the first block of a stage).
        unsupported: 'raise' a ValueError on a KxK convolution without an exact attention form
            (grouped, dilated, even kernel, other padding), or 'skip' it with a logged reason.
        **layer_kwargs: options of `GatedPositionalAttention2d` (`qk_dim`, `locality_init`, ...).
    Returns:
        `model`, whose output is unchanged.
    """
    if unsupported not in ('raise', 'skip'):
        raise ValueError(f"unsupported must be 'raise' or 'skip', got {unsupported!r}.")
    converted = 0
    for stage_name, stage in _stage_modules(model, stages):
        for name, module in list(stage.named_modules()):
            if not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1):
                continue
            full_name = f'{stage_name}.{name}'
            if module.stride != (1, 1) and not convert_strided:
                continue
            try:
                layer = conv_to_attention(module, full_name, **layer_kwargs)
            except ValueError as e:
                if unsupported == 'raise':
                    raise ValueError(f"{e} Pass unsupported='skip' to leave such convolutions as they are.") from None
                _logger.info('Skipping %s', e)
                continue
            stage.set_submodule(name, layer)
            converted += 1
    if not converted:
        raise ValueError(
            f'No convertible convolution in stages {tuple(stages)} of {type(model).__name__} '
            f'(convert_strided={convert_strided}): nothing to transform.')
    return model


def convert_cnn_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Turn a CNN state dict into one for `model`, a T-CNN of the same architecture.

    Every converted layer whose entries are those of a convolution (`weight`, `bias`) gets the
    attention parameters of its exact conversion; entries of already converted layers and of all
    other modules pass through unchanged. Returns a new dict.
    """
    out = dict(state_dict)
    for name, layer in attention_layers(model):
        layer.fill_conversion_state(out, f'{name}.' if name else '')
    return out
