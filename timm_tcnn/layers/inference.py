""" What a layer reuses between inference calls, and the bounded, value-checked cache that holds it.

With autograd off, the positional attention and the split of the heads into open (content gate > 0) and closed
ones depend only on the gate and positional parameters and the map size. A plan keeps them, keyed on the
*values* it was built from (compared exactly at each call), never on tensor versions: writes through `.data`,
`copy_`, `load_state_dict`, optimizers or `torch._foreach_*` all change values, so none can serve a stale plan.
Weights (tap kernel, queries, keys) are read at each call and never kept. A cache holds the plans of a layer
for the map sizes it has seen, evicting the least recently used beyond `max_bytes`.
"""
from collections import OrderedDict
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ['InferencePlan', 'PlanCache']


class InferencePlan(NamedTuple):
    """A layer's inference plan for one map size.

    key: the packed stored values (and scale) the plan was built from.
    is_convolution: every gate is 0: the layer is exactly its convolution.
    open_heads / closed_heads: indices of the heads with content gate > 0 / == 0 (None when there are none);
        open_heads is None also when every head is open.
    open_positional / closed_positional: (Nq, heads of the part, N) float32 positional attention of each part.
    open_gates: (open heads,) their content gates.
    """
    key: torch.Tensor
    is_convolution: bool
    open_heads: Optional[torch.Tensor] = None
    open_positional: Optional[torch.Tensor] = None
    open_gates: Optional[torch.Tensor] = None
    closed_heads: Optional[torch.Tensor] = None
    closed_positional: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        tensors = (self.key, self.open_heads, self.open_positional, self.open_gates, self.closed_heads,
                   self.closed_positional)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PlanCache:
    """Plans per (height, width, device), least recently used evicted beyond `max_bytes` in all; a plan larger
    than the budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._plans: 'OrderedDict[Tuple, InferencePlan]' = OrderedDict()

    def get(self, key: Tuple, values: torch.Tensor) -> Optional[InferencePlan]:
        """The plan for `key` if it was built from exactly `values`."""
        plan = self._plans.get(key)
        if plan is None or not torch.equal(plan.key, values):
            return None
        self._plans.move_to_end(key)
        return plan

    def put(self, key: Tuple, plan: InferencePlan) -> None:
        self._plans.pop(key, None)
        if plan.nbytes > self.max_bytes:
            return
        self._plans[key] = plan
        while sum(p.nbytes for p in self._plans.values()) > self.max_bytes:
            self._plans.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()
