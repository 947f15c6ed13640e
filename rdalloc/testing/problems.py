"""Allocation problems as data, so that strategies can draw them and references and checks can read them.

A :class:`MenuProblem` is :func:`rdalloc.allocate`'s problem: minimize ``sum_i w_i D_i(b_i)`` subject to
``sum_i C_i(b_i) <= B`` with ``b_i`` in a menu and ``C_i(b) = n_i b + m_i [0 < b < 16]``. A :class:`ContinuousProblem`
is :func:`rdalloc.waterfill`'s: the same objective for an exponential model, ``sum_i n_i b_i + m_i <= B`` and
``lo_i <= b_i <= hi_i`` with real ``b_i``.

Example::

    problem = MenuProblem(ExponentialModel(alpha, eviction=2 * alpha), menu=(0, 2, 4, 8, 16), sizes=64.0,
                          budget=3.0 * 64 * len(alpha), metadata=32.0)
    W, C = problem.table()  # what the references in rdalloc.testing.references read
    result = problem.allocate()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rdalloc import ExponentialModel, TabulatedModel, allocate, waterfill
from rdalloc.cost import item_cost

__all__ = ["MenuProblem", "ContinuousProblem", "menu_table"]


def menu_table(model: ExponentialModel | TabulatedModel, menu: Sequence[int], sizes: Any, weights: Any = 1.0,
               metadata: Any = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The menu problem as two ``(N, K)`` float64 tables: ``W[i, k] = w_i D_i(menu[k])`` (``inf`` where item ``i``
    cannot take ``menu[k]``) and ``C[i, k] = C_i(menu[k])``. Every exact reference reads these tables.

    >>> W, C = menu_table(ExponentialModel(np.array([1.0, 4.0])), (1, 2, 16), sizes=8.0)
    """
    D, ok = model.table(menu)
    shape = (D.shape[0],)
    n, w, m = (np.broadcast_to(np.asarray(x, dtype=np.float64), shape) for x in (sizes, weights, metadata))
    W = np.where(ok, w[:, None] * np.where(ok, D, 0.0), np.inf)
    C = np.stack([np.asarray(item_cost(b, n, m)) for b in menu], axis=1)
    return W, C


@dataclass(frozen=True)
class MenuProblem:
    """``min sum_i w_i D_i(b_i)`` s.t. ``sum_i n_i b_i + m_i [0 < b_i < 16] <= budget``, ``b_i`` in ``menu``.

    ``sizes``, ``weights`` and ``metadata`` are a scalar or one float per item; ``budget`` is in total bits.
    """

    model: ExponentialModel | TabulatedModel
    menu: tuple[int, ...]
    sizes: Any
    budget: float
    weights: Any = 1.0
    metadata: Any = 0.0

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, C)`` of :func:`menu_table`."""
        return menu_table(self.model, self.menu, self.sizes, self.weights, self.metadata)

    def allocate(self, **options) -> Any:
        """Solve with :func:`rdalloc.allocate` (``options``: its keyword arguments, e.g. ``max_nodes``)."""
        return allocate(self.model, self.sizes, self.budget, weights=self.weights, menu=self.menu,
                        metadata=self.metadata, **options)


@dataclass(frozen=True)
class ContinuousProblem:
    """``min sum_i w_i alpha_i beta_i**(-b_i)`` s.t. ``sum_i n_i b_i + m_i <= budget``, ``lo_i <= b_i <= hi_i``.

    ``sizes``, ``weights``, ``lo``, ``hi`` and ``metadata`` are a scalar or one float per item.
    """

    model: ExponentialModel
    sizes: Any
    budget: float
    weights: Any = 1.0
    lo: Any = 1.0
    hi: Any = 8.0
    metadata: Any = 0.0

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """``sizes``, ``weights``, ``lo``, ``hi`` and ``metadata`` as float64 vectors, one entry per item."""
        shape = (self.model.n_items,)
        return {name: np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), shape)
                for name in ("sizes", "weights", "lo", "hi", "metadata")}

    def waterfill(self, **options) -> Any:
        """Solve with :func:`rdalloc.waterfill` (``options``: its keyword arguments, e.g. ``max_iter``)."""
        return waterfill(self.model, self.sizes, self.budget, weights=self.weights, lo=self.lo, hi=self.hi,
                         metadata=self.metadata, **options)
