""" Conversion between convolutions and gated positional self-attention, for layers, models and
state dicts.
"""
import bisect
import itertools
import logging
import math
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import Conv2dSameExport

from ..errors import InputError
from ..layers import GatedPositionalAttention2d
from .options import TcnnOptions

__all__ = [
    'conv_to_attention', 'attention_to_conv', 'transform_cnn', 'convert_cnn_state_dict',
    'check_convertible', 'attention_layers', 'conv_stages', 'convolution_of',
]

_logger = logging.getLogger(__name__)

_CONVERTIBLE_TYPES = (nn.Conv2d, Conv2dSame, Conv2dSameExport)


def _same_padding(conv: nn.Conv2d) -> bool:
    """True for timm's dynamic TF 'SAME' convolutions (zeros before/after each dimension depend on its size)."""
    return isinstance(conv, (Conv2dSame, Conv2dSameExport))


def check_convertible(conv: nn.Module, name: str = 'conv') -> None:
    """Raise an InputError (a ValueError) naming `name` and the reason if `conv` has no exact attention form."""
    if type(conv) not in _CONVERTIBLE_TYPES:
        raise InputError(
            f'{name}: {type(conv).__name__} is not nn.Conv2d or timm\'s Conv2dSame (subclasses such as weight-'
            f'standardised convolutions change what the convolution computes); it cannot be converted.')
    k_h, k_w = conv.kernel_size
    reasons = []
    if k_h != k_w or k_h % 2 == 0:
        reasons.append(f'kernel {k_h}x{k_w} is not square with an odd size')
    d_h, d_w = conv.dilation
    if d_h != d_w:
        reasons.append(f'dilation={conv.dilation} (only the same in both directions)')
    if conv.stride not in ((1, 1), (2, 2)):
        reasons.append(f'stride={conv.stride} (only 1 or 2 in both directions)')
    symmetric = conv.padding == (d_h * (k_h // 2), d_w * (k_w // 2)) or conv.padding == 'same'
    if not reasons and not (symmetric or _same_padding(conv)):
        reasons.append(f'padding={conv.padding} (only dilation * (kernel_size // 2) = {d_h * (k_h // 2)}, '
                       f'or TF "same")')
    if conv.padding_mode != 'zeros':
        reasons.append(f'padding_mode={conv.padding_mode!r} (only zeros)')
    if reasons:
        raise InputError(f'{name}: cannot convert {conv}: ' + '; '.join(reasons) + '.')


def conv_to_attention(conv: nn.Conv2d, name: str = 'conv', **layer_kwargs: Any) -> GatedPositionalAttention2d:
    """Build a `GatedPositionalAttention2d` computing exactly what `conv` computes.

    `conv` is an `nn.Conv2d` (any `groups` and dilation, padding dilation * (K // 2) or 'same') or timm's
    `Conv2dSame`.
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
        dilation=conv.dilation[0],
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
    return convolution_of(layer)


def convolution_of(layer: GatedPositionalAttention2d) -> nn.Conv2d:
    """The convolution with `layer`'s weight, bias and geometry, whatever its gates (its conversion source)."""
    weight = layer.weight
    conv_cls = Conv2dSame if layer.same_padding else nn.Conv2d
    conv = conv_cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=0 if layer.same_padding else layer.padding,
        dilation=layer.dilation,
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


def _is_spatial(module: nn.Module) -> bool:
    """A convolution with a KxK kernel, K > 1, or a converted layer."""
    if isinstance(module, GatedPositionalAttention2d):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _is_candidate(module: nn.Module, stride: Optional[Tuple[int, int]] = None) -> bool:
    """A spatial convolution over overlapping windows: a KxK kernel, K > 1, larger than `stride` (the
    convolution's stride at output_stride 32; default its own). Patchify and downsampling convolutions
    (kernel == stride) tokenise rather than mix, and are left alone."""
    if isinstance(module, GatedPositionalAttention2d):
        return True
    if not _is_spatial(module):
        return False
    return any(k > s for k, s in zip(module.kernel_size, stride or module.stride))


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, GatedPositionalAttention2d)):
            return module.in_channels
    raise InputError(f'{type(model).__name__} has no convolution: transform_cnn expects a CNN.')


def _feature_stages(model: nn.Module) -> List[Tuple[nn.Module, int]]:
    """(module, reduction) of every stage timm's `feature_info` names, in order; [] without a usable one."""
    info = getattr(model, 'feature_info', None)
    info = getattr(info, 'info', info)  # a features_only model's FeatureInfo keeps every stage in `.info`
    if not isinstance(info, (list, tuple)):
        return []
    modules = dict(model.named_modules())
    try:
        return [(modules[entry['module']], int(entry['reduction'])) for entry in info]
    except (KeyError, TypeError):
        return []


def _dilation_factors(reductions: Sequence[int]) -> List[int]:
    """Per feature stage, how much smaller than at output_stride 32 its reduction is: timm turns a stage's
    stride 2 into dilation once the reduction reaches `output_stride`, so a stage whose reduction equals the
    previous stage's lost a factor 2."""
    factors = [1]
    for previous, reduction in zip(reductions, reductions[1:]):
        factors.append(factors[-1] * (2 if reduction == previous else 1))
    return factors


def _layout(model: nn.Module, input_size: int) -> Dict[str, Tuple[float, Tuple[int, int]]]:
    """(output reduction, stride) at output_stride 32 of every spatial convolution of `model`, by name, in module
    order, from one forward pass on the meta device.

    Without dilation both are what the pass measures. A stage of timm's `feature_info` that lost its stride to
    dilation (`_dilation_factors`) counts its measured reductions times its factor, and its first spatial
    convolution in execution order (the one timm built with stride 1 instead of 2) gets its stride back.
    """
    spatial = {module: name for name, module in model.named_modules() if _is_spatial(module)}
    stages = _feature_stages(model)
    clock = itertools.count()
    ran: Dict[str, Tuple[int, int]] = {}  # name -> (time, output height)
    finished: Dict[int, int] = {}  # feature stage -> time its module returned

    def record(module, _, output):
        ran.setdefault(spatial[module], (next(clock), output.shape[-2]))

    def finish(index):
        def hook(*_):
            finished.setdefault(index, next(clock))
        return hook

    meta = {name: torch.empty_like(t, device='meta') for name, t in
            [*model.named_parameters(), *model.named_buffers()]}
    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(record) for module in spatial]
    handles += [module.register_forward_hook(finish(i)) for i, (module, _) in enumerate(stages)]
    try:
        model.eval()
        x = torch.empty(2, _first_conv_channels(model), input_size, input_size, device='meta')
        with torch.enable_grad():  # converted layers: the attention computation (no data-dependent shortcut)
            torch.func.functional_call(model, meta, (x,), strict=False)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    ends = [finished.get(i) for i in range(len(stages))]
    if None in ends or ends != sorted(ends):  # feature_info that does not describe this forward pass
        ends, factors = [], [1]
    else:
        factors = _dilation_factors([reduction for _, reduction in stages])
    modules = {name: module for module, name in spatial.items()}
    layout, restored = {}, set()
    for name, (time, height) in sorted(ran.items(), key=lambda item: item[1][0]):
        stage = min(bisect.bisect(ends, time), len(factors) - 1)
        module = modules[name]
        stride = module.stride if isinstance(module, nn.Conv2d) else (module.stride, module.stride)
        if stage > 0 and factors[stage] > factors[stage - 1] and stage not in restored:
            restored.add(stage)
            stride = tuple(s * factors[stage] // factors[stage - 1] for s in stride)
        layout[name] = (input_size / height * factors[stage], stride)
    return {name: layout[name] for name in spatial.values() if name in layout}


def _stages_and_strides(model: nn.Module, input_size: int = 256) -> Dict[str, Tuple[int, Tuple[int, int]]]:
    """(stage, stride at output_stride 32) of every spatial convolution `conv_stages` lists."""
    modules = dict(model.named_modules())
    return {
        name: (round(math.log2(reduction)) - 1, stride)
        for name, (reduction, stride) in _layout(model, input_size).items()
        if round(math.log2(reduction)) >= 1 and _is_candidate(modules[name], stride)
    }


def conv_stages(model: nn.Module, input_size: int = 256) -> Dict[str, int]:
    """Stage of every spatial convolution (and converted layer) of `model`, by name, in module order.

    Stage i holds the convolutions whose output is 2^(i+1) times smaller than the model's input at output_stride
    32: 0 for a stem at reduction 2, then 1, 2, 3, 4 for reductions 4, 8, 16, 32 (timm's `feature_info`
    reductions); convolutions at full resolution are not listed. A model built with `output_stride=16` or 8
    has the same stages: the stages of its `feature_info` whose stride became dilation keep their numbers (and
    their first convolution counts as strided). Found from one forward pass on the meta device (no memory, no
    compute; the model itself is untouched).
    """
    return {name: stage for name, (stage, _) in _stages_and_strides(model, input_size).items()}


def _targets(
    model: nn.Module,
    stages: Tuple[int, ...],
    convert_strided: bool,
) -> List[Tuple[str, nn.Conv2d]]:
    """(name, conv) of the convolutions to convert, or an InputError naming the stages the model has."""
    if not any(_is_candidate(module) for module in model.modules()):
        raise InputError(
            f'{type(model).__name__} has no spatial convolution (KxK, K > 1, kernel larger than stride): '
            f'transform_cnn converts CNNs, not vision transformers or MLPs.'
        )
    layout = _stages_and_strides(model)
    available = sorted({stage for stage, _ in layout.values()})
    bad = [s for s in stages if s not in available]
    if bad:
        raise InputError(
            f'{type(model).__name__} has no stage {bad}: its stages are {available} (stage i = the convolutions '
            f'whose output has reduction 2^(i+1) at output_stride 32: 1 -> 4, 2 -> 8, 3 -> 16, 4 -> 32).'
        )
    modules = dict(model.named_modules())
    return [
        (name, modules[name])
        for name, (stage, stride) in layout.items()
        if stage in stages and isinstance(modules[name], nn.Conv2d) and (convert_strided or stride == (1, 1))
    ]


def transform_cnn(
    model: nn.Module,
    stages: Union[int, Sequence[int]] = (3, 4),
    convert_strided: bool = True,
    unsupported: Literal['raise', 'skip'] = 'raise',
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace, in place, the spatial convolutions of the chosen stages by exact attention: all or nothing.

    Args:
        model: any timm CNN (or any module holding convolutions that runs on a (B, C, H, W) image).
        stages: stage numbers; stage i holds the convolutions whose output has reduction 2^(i+1) at
            output_stride 32 (`conv_stages`; a dilated model keeps the numbers), so for
            ResNets (3, 4) means `layer3` and `layer4`, for ConvNeXt `stages.2` and `stages.3`.
            Spatial convolutions are KxK, K > 1, with kernel larger than stride (patchify layers stay).
        convert_strided: also convert stride-2 convolutions (the first block of a stage).
        unsupported: 'raise' an InputError naming every convolution without an exact attention form (dilated,
            even kernel, other padding, ...), or 'skip' them with a logged reason.
        **layer_kwargs: options of `GatedPositionalAttention2d` (`qk_dim`, `locality_init`, ...).
    Returns:
        `model`, whose output is unchanged. If anything fails, `model` is left as it was.
    """
    if unsupported not in ('raise', 'skip'):
        raise InputError(f"unsupported must be 'raise' or 'skip', got {unsupported!r}.")
    stages = TcnnOptions(stages=stages).stages
    layers, refused = [], []
    for name, conv in _targets(model, stages, convert_strided):
        try:
            check_convertible(conv, name)
        except ValueError as e:
            refused.append(str(e))
            continue
        layers.append((name, conv))
    if refused and unsupported == 'raise':
        raise InputError(' '.join(refused) + " Pass unsupported='skip' to leave such convolutions as they are.")
    for reason in refused:
        _logger.info('Skipping %s', reason)
    if not layers:
        raise InputError(
            f'No convertible convolution in stages {stages} of {type(model).__name__} '
            f'(convert_strided={convert_strided}): nothing to transform.'
        )
    # build every layer before replacing any: a failure leaves the model untouched. The layers draw their random
    # Q/K from a fork of the generator, so building a T-CNN draws what building its CNN draws: with one seed both
    # get the same classifier initialisation, and train.py gives both the same data order
    with torch.random.fork_rng(devices=[]):
        new = [(name, conv_to_attention(conv, name, **layer_kwargs)) for name, conv in layers]
    for name, layer in new:
        model.set_submodule(name, layer)
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
