"""One water level across processes: ``torch.distributed`` ranks each hold a shard of the items.

Every rank calls :func:`waterfill` with its own items and the *global* budget; the solver runs the same iterations on
every rank, combining per-shard sums and maxima with ``all_reduce`` of a few float64 scalars. Each rank gets its
share of the one global plan: bits for its items, and the global water level and certificate (identical on all
ranks). Collectives per solve: 4 to set up (elements, metadata, the first pass: sums and a maximum), 1 per Newton
iteration, 2 to finish (sums and the KKT maximum).

On JAX no such wrapper is needed: ``jax.jit`` of :func:`rdalloc.waterfill` on items sharded over devices (a
``NamedSharding``) compiles the scalar reductions into XLA collectives and gives the single-device plan.

Errors about the input itself (NaN, shapes) are raised on the rank that holds the bad item; validate shards before
a collective solve if ranks must not wait on each other.
"""

from __future__ import annotations

from typing import Any

from .models import ExponentialModel
from .waterfill import WaterfillResult
from .waterfill import waterfill as _waterfill

__all__ = ["TorchReducer", "waterfill"]


class TorchReducer:
    """Sums and maxima over the ranks of a ``torch.distributed`` group (``calls`` counts the collectives)."""

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
        self.dist, self.group, self.calls = dist, group, 0

    def _reduce(self, values, op):
        import numpy as np
        import torch

        like = values[0]
        device = like.device if isinstance(like, torch.Tensor) else "cpu"
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        self.dist.all_reduce(flat, op=op, group=self.group)
        self.calls += 1
        if isinstance(like, torch.Tensor):  # hand back what the solver's backend computes with
            return [x.to(like.dtype) for x in flat.unbind(0)]
        return [np.asarray(x, dtype=np.float64) for x in flat.tolist()]

    def sum(self, values: tuple) -> tuple:
        return tuple(self._reduce(values, self.dist.ReduceOp.SUM))

    def max(self, value: Any) -> Any:
        return self._reduce((value,), self.dist.ReduceOp.MAX)[0]


def waterfill(model: ExponentialModel, sizes: Any, budget: Any = None, *, average_bits: Any = None,
              group: Any = None, reducer: TorchReducer | None = None, **kwargs) -> WaterfillResult:
    """:func:`rdalloc.waterfill` over this rank's items with a budget shared by all ranks of ``group``.

    ``budget`` is the global total; ``average_bits`` is per element over all ranks' items. The result's ``bits`` are
    this rank's; every other field is global.
    """
    reducer = reducer or TorchReducer(group)
    return _waterfill(model, sizes, budget, average_bits=average_bits, reducer=reducer, **kwargs)
