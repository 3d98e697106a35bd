""" What a layer reuses between inference calls, and the bounded, value-checked cache that holds it.

With autograd off, the positional attention and the split of the heads into open (content gate > 0) and closed
ones depend only on the gate and positional parameters and the map size. A plan keeps them, keyed on the
*values* it was built from (compared exactly at each call), never on tensor versions: writes through `.data`,
`copy_`, `load_state_dict`, optimizers or `torch._foreach_*` all change values, so none can serve a stale plan.
Weights (tap kernel, queries, keys) are read at each call and never kept. A layer keeps the plans of the map
sizes it has seen in a `BoundedCache` (`inference_cache_bytes`).
"""
from typing import NamedTuple, Optional

import torch

__all__ = ['InferencePlan']


class InferencePlan(NamedTuple):
    """A layer's inference plan for one map size.

    key: the packed stored values (and scale) the plan was built from.
    is_convolution: every gate is 0: the layer is exactly its convolution.
    open_heads / closed_heads: indices of the heads with content gate > 0 / == 0 (None when there are none);
        open_heads is None also when every head is open.
    open_positional / closed_positional: (Nq, heads of the part, N) float32 positional attention of each part.
    open_gates: (open heads,) their content gates.
    head_order: the open heads then the closed ones, when both exist (None: every head in its own order): the
        order of the one copy of the tap weight per call, whose two parts are then views.
    """
    key: torch.Tensor
    is_convolution: bool
    open_heads: Optional[torch.Tensor] = None
    open_positional: Optional[torch.Tensor] = None
    open_gates: Optional[torch.Tensor] = None
    closed_heads: Optional[torch.Tensor] = None
    closed_positional: Optional[torch.Tensor] = None
    head_order: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        tensors = (self.key, self.open_heads, self.open_positional, self.open_gates, self.closed_heads,
                   self.closed_positional, self.head_order)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
