""" Transformed ResNet-RS (T-CNN) models for timm.

`tcnn_resnet{50,101,152,200,270,350,420}rs` are timm's ResNet-RS with the 3x3 convolutions of the
chosen stages recast as exact gated positional self-attention (`GatedPositionalAttention2d`).
Pretrained weights are timm's ResNet-RS checkpoints (`timm/resnetrs50.tf_in1k`, ...), converted
on load; a freshly converted model computes the same logits as its CNN.

Paper: Transformed CNNs: recasting pre-trained convolutional layers with self-attention
(d'Ascoli et al., 2021) - https://arxiv.org/abs/2106.05795
"""
from functools import partial
from typing import Any, Dict, Sequence, Set

import torch
import torch.nn as nn

from timm.layers import get_attn, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.resnet import Bottleneck, ResNet

from .attention import GatedPositionalAttention2d
from .convert import attention_layers, convert_cnn_state_dict, transform_cnn

__all__ = ['TcnnResNet', 'RESNETRS_DEPTHS']

register_notrace_module(GatedPositionalAttention2d)

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
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Gates and positional parameters: decaying them would pull the model off its conversion."""
        keep = ('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center')
        return {f'{name}.{param}' for name, _ in attention_layers(self) for param in keep}


def _checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """CNN checkpoints are converted; already converted ones pass through unchanged."""
    return convert_cnn_state_dict(state_dict, model)


def _create_tcnn_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> TcnnResNet:
    return build_model_with_cfg(
        TcnnResNet,
        variant,
        pretrained,
        pretrained_filter_fn=_checkpoint_filter_fn,
        **kwargs,
    )


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
    f'tcnn_resnet{depth}rs.tf_in1k': _cfg_from_cnn(f'resnetrs{depth}.tf_in1k') for depth in RESNETRS_DEPTHS
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
