""" The operations a computation issues, counted below autograd: what a GPU pays host time (launches) for,
visible on any device. Counted: aten operations, and the layer's own kernels (`timm_tcnn::` operations, one launch
each); views and allocations launch no kernel and are not counted. """
import collections
from typing import Counter, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpCounter', 'layer_step_ops']

# allocations (no kernel), and aliases whose schemas do not declare them views
_NOT_COUNTED = frozenset({
    'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided', 'detach', 'alias', 'lift_fresh',
    '_unsafe_view',
})


def _is_view(func) -> bool:
    return any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while active, by name (`ops`)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        counted = func.namespace == 'aten' and name not in _NOT_COUNTED and not _is_view(func)
        if func.namespace == 'timm_tcnn' or counted:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def layer_step_ops(layer: torch.nn.Module, x: torch.Tensor) -> Tuple[int, int, int]:
    """Operations of one training step of `layer` on `x` (forward, backward with the gradient of a sum; the
    parameters' gradients start empty, as after `zero_grad()`, and are stored as an optimizer finds them; x's is
    computed, not stored: in a network it is passed on) and of one inference call (no grad), each after a
    warm-up call that builds what is reused between calls: (forward, backward, inference)."""
    x = x.detach().requires_grad_()
    parameters = [p for p in layer.parameters() if p.requires_grad]
    layer(x).sum().backward(inputs=parameters)
    layer.zero_grad(set_to_none=True)
    with OpCounter() as forward:
        out = layer(x)
    grad = torch.ones_like(out)
    with OpCounter() as backward:  # the input's gradient computed, and passed on as in a network, not accumulated
        out.backward(grad, inputs=parameters)
    layer.zero_grad(set_to_none=True)
    with torch.no_grad():
        layer(x)
        with OpCounter() as inference:
            layer(x)
    return forward.total, backward.total, inference.total
