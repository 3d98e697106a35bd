""" The T-CNN options (`tcnn_*` model kwargs), validated where they enter. """
import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..errors import InputError

__all__ = ['TcnnOptions', 'UnknownOptionError', 'PREFIX', 'GATE_LR_SCALE', 'GRAD_FLOOR']

PREFIX = 'tcnn_'
# default learning-rate multiplier of the gates and positional parameters (docs/experiments.md)
GATE_LR_SCALE = 30.0
# default gradient floor of nearly closed gates (docs/experiments.md)
GRAD_FLOOR = 0.1


class UnknownOptionError(InputError, TypeError):
    """An unknown `tcnn_*` option: a TypeError as for any unknown model kwarg, and bad input on the command line."""


def _stages(value: Any) -> Tuple[int, ...]:
    """An int or a sequence of ints >= 0 -> sorted unique tuple; anything else is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    if not ok or not value:
        raise InputError(
            f'tcnn_stages={value!r}: expected a stage number or a non-empty sequence of them, e.g. 4 or (3, 4) '
            f'(stage i = the convolutions whose output is 2^(i+1) times smaller than the input).')
    return tuple(sorted(set(value)))


@dataclasses.dataclass(frozen=True)
class TcnnOptions:
    """How a CNN becomes a T-CNN. As model kwargs each field is spelt `tcnn_<field>`.

    Attributes:
        stages: stages to convert; stage i holds the convolutions whose output has reduction 2^(i+1) at
            output_stride 32 (1 -> 4, 2 -> 8, 3 -> 16, 4 -> 32), the same stages at output_stride 16 or 8.
            An int means one stage.
        convert_strided: also convert stride-2 convolutions.
        qk_dim: width of each head's queries and keys in the content attention, >= 1.
        qk_init_std: std of the (truncated normal) Q/K initialisation, >= 0.
        locality_init: initial strength alpha of the Gaussian positional attention, > 0.
        gate_lr_scale: the gates and positional parameters learn this many times faster than the weights, with
            any optimizer (see `GatedPositionalAttention2d`), > 0.
        grad_floor: the content attention and the Gaussian of a gate below this value learn as if the gate were
            this open; the forward pass is unchanged (see `GatedPositionalAttention2d`), in [0, 1].
    """
    stages: Union[int, Tuple[int, ...]] = (4,)
    convert_strided: bool = True
    qk_dim: int = 32
    qk_init_std: float = 0.02
    locality_init: float = 1.0
    gate_lr_scale: float = GATE_LR_SCALE
    grad_floor: float = GRAD_FLOOR

    def __post_init__(self):
        object.__setattr__(self, 'stages', _stages(self.stages))
        if not isinstance(self.convert_strided, bool):
            raise InputError(f'tcnn_convert_strided={self.convert_strided!r}: expected True or False.')
        if isinstance(self.qk_dim, bool) or not isinstance(self.qk_dim, int) or self.qk_dim < 1:
            raise InputError(f'tcnn_qk_dim={self.qk_dim!r}: expected an integer >= 1.')
        if not _is_number(self.qk_init_std) or not self.qk_init_std >= 0:
            raise InputError(f'tcnn_qk_init_std={self.qk_init_std!r}: expected a number >= 0.')
        if not _is_number(self.locality_init) or not self.locality_init > 0:
            raise InputError(f'tcnn_locality_init={self.locality_init!r}: expected a number > 0.')
        if not _is_number(self.gate_lr_scale) or not self.gate_lr_scale > 0:
            raise InputError(f'tcnn_gate_lr_scale={self.gate_lr_scale!r}: expected a number > 0.')
        if not _is_number(self.grad_floor) or not 0 <= self.grad_floor <= 1:
            raise InputError(f'tcnn_grad_floor={self.grad_floor!r}: expected a number in [0, 1].')

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The model kwargs, `tcnn_stages`, ..."""
        return tuple(PREFIX + f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], defaults: Optional['TcnnOptions'] = None) -> 'TcnnOptions':
        """Options from `tcnn_*` kwargs (other keys are ignored) over `defaults`; an unknown `tcnn_*` key raises
        `UnknownOptionError` (a TypeError, as for any unknown model kwarg)."""
        given = {k: v for k, v in kwargs.items() if k.startswith(PREFIX)}
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise UnknownOptionError(f'Unknown T-CNN options {unknown}; known: {list(cls.names())}.')
        return dataclasses.replace(defaults or cls(), **{k[len(PREFIX):]: v for k, v in given.items()})

    def to_kwargs(self) -> Dict[str, Any]:
        """Every option as a model kwarg, stages as a list (as `config.json` stores them)."""
        return {PREFIX + k: list(v) if k == 'stages' else v for k, v in dataclasses.asdict(self).items()}

    def layer_kwargs(self) -> Dict[str, Any]:
        """The options of `GatedPositionalAttention2d`."""
        return dict(qk_dim=self.qk_dim, qk_init_std=self.qk_init_std, locality_init=self.locality_init,
                    gate_lr_scale=self.gate_lr_scale, grad_floor=self.grad_floor)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
