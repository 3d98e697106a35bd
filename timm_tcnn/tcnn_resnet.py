""" Transformed ResNet-RS (T-CNN) models for timm.

`tcnn_resnet{50,101,152,200,270,350,420}rs` are timm's ResNet-RS with the 3x3 convolutions of the
chosen stages recast as exact gated positional self-attention (`GatedPositionalAttention2d`).
Pretrained weights are timm's ResNet-RS checkpoints (`timm/resnetrs50.tf_in1k`, ...), converted
on load; a freshly converted model computes the same logits as its CNN.

Paper: Transformed CNNs: recasting pre-trained convolutional layers with self-attention
(d'Ascoli et al., 2021) - https://arxiv.org/abs/2106.05795
"""
import inspect
import re
from functools import partial
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from huggingface_hub.errors import LocalEntryNotFoundError
from timm.layers import get_attn, register_notrace_module
from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, list_pretrained, register_model,
)
from timm.models.resnet import Bottleneck, ResNet

from .attention import GatedPositionalAttention2d
from .convert import attention_layers, convert_cnn_state_dict, transform_cnn
from .hub import HubWeightsUnavailable, hub_unavailable_message
from .published import published_cfgs

__all__ = ['TcnnResNet', 'RESNETRS_DEPTHS', 'tcnn_and_cnn_names', 'conversion_options', 'describe_mismatch']

register_notrace_module(GatedPositionalAttention2d)

# default learning-rate multiplier of the gates and positional parameters (docs/experiments.md)
GATE_LR_SCALE = 30.0
# default gradient floor of closed gates (docs/experiments.md)
GRAD_FLOOR = 0.1

# ResNet-RS depth -> blocks per stage (timm/models/resnet.py)
RESNETRS_DEPTHS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
}


class TcnnResNet(ResNet):
    """A timm `ResNet` whose KxK convolutions in `tcnn_stages` are gated positional self-attention.

    Args:
        tcnn_stages: 1-based stages to convert; (4,) is `layer4`.
        tcnn_convert_strided: also convert the stride-2 convolution of a stage's first block.
        tcnn_qk_dim: width of each head's queries and keys in the content attention.
        tcnn_qk_init_std: std of the (truncated normal) Q/K initialisation.
        tcnn_locality_init: initial strength alpha of the Gaussian positional attention.
        tcnn_gate_lr_scale: the gates and positional parameters learn this many times faster than the
            weights, with any optimizer (see `GatedPositionalAttention2d`).
        tcnn_grad_floor: the content attention and the Gaussian of a (nearly) closed gate learn as if the gate
            were this open; the forward pass is unchanged (see `GatedPositionalAttention2d`).
        **kwargs: `timm.models.resnet.ResNet` arguments.
    """

    def __init__(
            self,
            *args: Any,
            tcnn_stages: Sequence[int] = (4,),
            tcnn_convert_strided: bool = True,
            tcnn_qk_dim: int = 32,
            tcnn_qk_init_std: float = 0.02,
            tcnn_locality_init: float = 1.0,
            tcnn_gate_lr_scale: float = GATE_LR_SCALE,
            tcnn_grad_floor: float = GRAD_FLOOR,
            **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.tcnn_stages = tuple(tcnn_stages)
        self.tcnn_convert_strided = tcnn_convert_strided
        transform_cnn(
            self,
            stages=self.tcnn_stages,
            convert_strided=tcnn_convert_strided,
            qk_dim=tcnn_qk_dim,
            qk_init_std=tcnn_qk_init_std,
            locality_init=tcnn_locality_init,
            gate_lr_scale=tcnn_gate_lr_scale,
            grad_floor=tcnn_grad_floor,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, with a mismatch explained in terms of variants and class counts."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            raise RuntimeError(f'{e}\n{describe_mismatch(state_dict, self)}') from None

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Gates and positional parameters: decaying them would pull the model off its conversion."""
        keep = ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center')
        return {f'{name}.{param}' for name, _ in attention_layers(self) for param in keep}


def tcnn_and_cnn_names(model_name: str) -> Tuple[str, str]:
    """('tcnn_resnet50rs.tag', 'resnetrs50.tag') for a T-CNN or ResNet-RS name, tag optional (default tf_in1k)."""
    name, _, tag = model_name.partition('.')
    match = re.fullmatch(r'(?:tcnn_resnet(\d+)rs|resnetrs(\d+))', name)
    depth = int(next(g for g in match.groups() if g)) if match else None
    if depth not in RESNETRS_DEPTHS:
        known = ', '.join(f'tcnn_resnet{d}rs' for d in RESNETRS_DEPTHS)
        raise ValueError(
            f'{model_name!r} is not a ResNet-RS T-CNN or CNN name: use one of {known} or resnetrs{{50,...,420}}. '
            f'Other timm ResNets convert through the Python API (timm_tcnn.transform_cnn).')
    tag = tag or 'tf_in1k'
    return f'tcnn_resnet{depth}rs.{tag}', f'resnetrs{depth}.{tag}'


def conversion_options(**overrides: Any) -> Dict[str, Any]:
    """Every `tcnn_*` option of `TcnnResNet` with its default, updated by `overrides` (spelt out in saved configs)."""
    params = inspect.signature(TcnnResNet.__init__).parameters
    options = {name: p.default for name, p in params.items() if name.startswith('tcnn_')}
    unknown = set(overrides) - set(options)
    if unknown:
        raise TypeError(f'Unknown T-CNN options {sorted(unknown)}; known: {sorted(options)}.')
    options.update(overrides)
    options['tcnn_stages'] = list(options['tcnn_stages'])
    return options


def _blocks_per_stage(state_dict: Mapping[str, Any]) -> Tuple[int, ...]:
    blocks: Dict[int, int] = {}
    for key in state_dict:
        match = re.match(r'layer(\d+)\.(\d+)\.', key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    return tuple(blocks[i] for i in sorted(blocks))


def _num_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    fc = state_dict.get('fc.weight')
    return None if fc is None else int(fc.shape[0])


def describe_mismatch(state_dict: Mapping[str, Any], model: nn.Module) -> str:
    """What a checkpoint holds vs what `model` is: variant by blocks per stage, CNN or T-CNN, classes."""
    ckpt_blocks, model_blocks = _blocks_per_stage(state_dict), _blocks_per_stage(model.state_dict())
    fits = [f'tcnn_resnet{d}rs' for d, blocks in RESNETRS_DEPTHS.items() if blocks == ckpt_blocks]
    kind = 'a T-CNN' if any(k.endswith('.content_gate') for k in state_dict) else 'a CNN'
    lines = [f'The checkpoint is {kind} with blocks per stage {ckpt_blocks}; this model has {model_blocks}.']
    if ckpt_blocks != model_blocks:
        lines.append(
            f'It fits {" or ".join(fits)}.' if fits else 'No tcnn_resnet*rs variant has these blocks per stage.')
    ckpt_classes, model_classes = _num_classes(state_dict), _num_classes(model.state_dict())
    if ckpt_classes is not None and ckpt_classes != model_classes:
        lines.append(f'It has {ckpt_classes} classes, this model {model_classes}: pass num_classes={ckpt_classes}.')
    return ' '.join(lines)


def _checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """CNN checkpoints are converted; already converted ones pass through unchanged."""
    return convert_cnn_state_dict(state_dict, model)


def _create_tcnn_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> TcnnResNet:
    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, str) and f'{variant}.{tag}' not in list_pretrained(f'{variant}.*'):
        tags = [name.split('.', 1)[1] for name in list_pretrained(f'{variant}.*')]
        raise RuntimeError(f'Unknown pretrained tag {tag!r} for {variant}: available tags are {tags}.')
    try:
        return build_model_with_cfg(
            TcnnResNet,
            variant,
            pretrained,
            pretrained_filter_fn=_checkpoint_filter_fn,
            **kwargs,
        )
    except LocalEntryNotFoundError as e:
        hf_hub_id = get_pretrained_cfg(f'{variant}.{tag}' if isinstance(tag, str) else variant).hf_hub_id
        raise HubWeightsUnavailable(hub_unavailable_message(
            hf_hub_id, 'not in the local cache, and offline mode is on or the Hub could not be reached')) from e


def _resnetrs_args(depth: int) -> Dict[str, Any]:
    """Architecture arguments of timm's `resnetrs{depth}`."""
    return dict(
        block=Bottleneck, layers=RESNETRS_DEPTHS[depth], stem_width=32, stem_type='deep',
        replace_stem_pool=True, avg_down=True, block_args=dict(attn_layer=partial(get_attn('se'), rd_ratio=0.25)),
    )


def _cfg_from_cnn(cnn_tag: str) -> Dict[str, Any]:
    """The CNN's pretrained config (sizes, crop, interpolation, mean/std, pool size), Hub weights spelt out."""
    cfg = get_pretrained_cfg(cnn_tag).to_dict()
    cfg.update(
        hf_hub_id=f'timm/{cnn_tag}',
        url='',
        paper_ids='arXiv:2106.05795',
        paper_name='Transformed CNNs: recasting pre-trained convolutional layers with self-attention',
        notes=(f'Weights of the CNN {cnn_tag}, converted on load; the T-CNN computes the same '
               'function until fine-tuned.',),
    )
    return cfg


default_cfgs = generate_default_cfgs({
    # the CNN weights converted on load come first: tf_in1k stays each architecture's default tag
    **{f'tcnn_resnet{depth}rs.tf_in1k': _cfg_from_cnn(f'resnetrs{depth}.tf_in1k') for depth in RESNETRS_DEPTHS},
    # fine-tuned weights listed in published_weights.json
    **published_cfgs(conversion_options(), [f'tcnn_resnet{depth}rs' for depth in RESNETRS_DEPTHS]),
})


@register_model
def tcnn_resnet50rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-50."""
    return _create_tcnn_resnet('tcnn_resnet50rs', pretrained, **dict(_resnetrs_args(50), **kwargs))


@register_model
def tcnn_resnet101rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-101."""
    return _create_tcnn_resnet('tcnn_resnet101rs', pretrained, **dict(_resnetrs_args(101), **kwargs))


@register_model
def tcnn_resnet152rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-152."""
    return _create_tcnn_resnet('tcnn_resnet152rs', pretrained, **dict(_resnetrs_args(152), **kwargs))


@register_model
def tcnn_resnet200rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-200."""
    return _create_tcnn_resnet('tcnn_resnet200rs', pretrained, **dict(_resnetrs_args(200), **kwargs))


@register_model
def tcnn_resnet270rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-270."""
    return _create_tcnn_resnet('tcnn_resnet270rs', pretrained, **dict(_resnetrs_args(270), **kwargs))


@register_model
def tcnn_resnet350rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-350."""
    return _create_tcnn_resnet('tcnn_resnet350rs', pretrained, **dict(_resnetrs_args(350), **kwargs))


@register_model
def tcnn_resnet420rs(pretrained: bool = False, **kwargs) -> TcnnResNet:
    """T-CNN of ResNet-RS-420."""
    return _create_tcnn_resnet('tcnn_resnet420rs', pretrained, **dict(_resnetrs_args(420), **kwargs))
