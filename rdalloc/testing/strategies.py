"""Hypothesis strategies that draw valid allocation problems (needs hypothesis: ``pip install 'rdalloc[test]'``).

* :func:`exponential_models` / :func:`tabulated_models` — models of ``n_items`` items, with or without eviction.
* :func:`menus` — strictly increasing widths in ``[0, 16]``, with or without eviction (0) and full precision (16).
* :func:`menu_problems` — :class:`~rdalloc.testing.MenuProblem` instances: either model, unequal sizes, metadata,
  weights (zero and subnormal included) and a budget at an edge (the cheapest allocation, 0 when every item can be
  evicted; the richest), in between, or beyond the richest.
* :func:`continuous_problems` — :class:`~rdalloc.testing.ContinuousProblem` instances for :func:`rdalloc.waterfill`,
  budgets likewise.

Example::

    from hypothesis import given
    from rdalloc.testing import assert_within_budget
    from rdalloc.testing.strategies import menu_problems

    @given(menu_problems(max_items=20, integral=True))
    def test_within_budget(problem):
        bits = my_allocate(problem)
        assert_within_budget(bits, problem.sizes, problem.budget, problem.metadata)
"""

from __future__ import annotations

import math

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as e:  # users import this module explicitly; the rest of rdalloc.testing works without it
    raise ImportError("rdalloc.testing.strategies needs hypothesis: pip install 'rdalloc[test]'") from e

from rdalloc import ExponentialModel, TabulatedModel
from rdalloc.models import FULL_BITS

from .problems import ContinuousProblem, MenuProblem

__all__ = ["exponential_models", "tabulated_models", "menus", "menu_problems", "continuous_problems", "BUDGETS"]

BUDGETS = ("minimum", "maximum", "between", "beyond")
"""Where :func:`menu_problems` and :func:`continuous_problems` put the budget: exactly the cheapest allocation's cost,
exactly the richest's, uniformly in between, or up to a quarter of the range beyond the richest."""


def _floats(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(lo, hi, allow_subnormal=False)


def _vectors(n_items: int, elements: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(elements, min_size=n_items, max_size=n_items).map(np.array)


def _zero_or(lo: float, hi: float) -> st.SearchStrategy:
    return st.one_of(st.just(0.0), _floats(lo, hi))


def _weights(n_items: int, tiny: bool = False) -> st.SearchStrategy:
    """All 1, or each 0 or in ``[1e-3, 3]``; ``tiny``: also subnormal or tiny, in ``[5e-324, 1e-300]``."""
    each = _zero_or(1e-3, 3.0)
    if tiny:
        each = st.one_of(each, st.floats(5e-324, 1e-300, allow_subnormal=True))
    return st.one_of(st.just(1.0), _vectors(n_items, each))


@st.composite
def exponential_models(draw, n_items: int, *, eviction: bool | None = None, lo: float | None = None,
                       hi: float | None = None) -> ExponentialModel:
    """``alpha`` log-uniform in ``[1e-3, 1e3]``; ``beta`` in ``[1.5, 8]`` shared or per item; eviction (drawn unless
    ``eviction`` says) at 0 to 3 times ``alpha``, off the curve; the quantized range ``[lo, hi]`` drawn on integers
    in ``[1, 15]`` unless given."""
    alpha = np.exp(draw(_vectors(n_items, _floats(math.log(1e-3), math.log(1e3)))))
    beta = draw(st.one_of(_floats(1.5, 8.0), _vectors(n_items, _floats(1.5, 8.0))))
    evict = draw(st.booleans()) if eviction is None else eviction
    ev = alpha * draw(_vectors(n_items, _floats(0.0, 3.0))) if evict else None
    lo = float(draw(st.integers(1, 8))) if lo is None else lo
    hi = float(draw(st.integers(int(math.ceil(lo)), FULL_BITS - 1))) if hi is None else hi
    return ExponentialModel(alpha, beta, eviction=ev, lo=lo, hi=hi)


@st.composite
def tabulated_models(draw, n_items: int, bits: tuple[int, ...]) -> TabulatedModel:
    """Distortion 0 or in ``[1e-3, 100]`` at every width of ``bits``, in any order (points off the convex hull,
    even rising ones); ``allowed`` either absent or a mask that leaves every item at least one width."""
    K = len(bits)
    d = draw(st.lists(_vectors(K, _zero_or(1e-3, 100.0)), min_size=n_items, max_size=n_items))
    allowed = None
    if draw(st.booleans()):
        rows = st.lists(st.booleans(), min_size=K, max_size=K).filter(any)
        allowed = np.array(draw(st.lists(rows, min_size=n_items, max_size=n_items)), dtype=bool)
    return TabulatedModel(bits=bits, distortion=np.array(d).reshape(n_items, K), allowed=allowed)


@st.composite
def menus(draw, *, eviction: bool | None = None, full: bool | None = None) -> tuple[int, ...]:
    """Strictly increasing widths: at least one in ``[1, 15]``, plus 0 (eviction) and 16 (full precision) when
    ``eviction`` and ``full`` say so, or as drawn."""
    widths = draw(st.sets(st.integers(1, FULL_BITS - 1), min_size=1, max_size=8))
    if draw(st.booleans()) if eviction is None else eviction:
        widths.add(0)
    if draw(st.booleans()) if full is None else full:
        widths.add(FULL_BITS)
    return tuple(sorted(widths))


def _budget(draw, cheapest: float, richest: float, integral: bool) -> float:
    where = draw(st.sampled_from(BUDGETS))
    if where == "minimum":
        return cheapest
    if where == "maximum":
        return richest
    share = draw(_floats(0.0, 1.0) if where == "between" else _floats(1.0, 1.25))
    budget = cheapest + share * (richest - cheapest)
    return float(max(math.floor(budget), cheapest)) if integral else budget


def _tiny_beside_normal(w) -> bool:
    """Weights below ``1e-3`` (subnormal or tiny) only beside one of at least ``1e-3``."""
    w = np.asarray(w)
    return bool(np.max(w) >= 1e-3 or not np.any(w > 0))


@st.composite
def menu_problems(draw, max_items: int = 8, *, integral: bool = False, kinds: tuple[str, ...] = ("exponential",
                  "tabulated"), menu: tuple[int, ...] | None = None, tiny_weights: bool = False) -> MenuProblem:
    """A :class:`~rdalloc.testing.MenuProblem` of 1 to ``max_items`` items: a model of one of ``kinds``; a menu
    (:func:`menus` unless given; it needs a width in ``[1, 15]``) that every item can use; sizes in ``[1, 128]``
    (equal or not); metadata in ``[0, 64]``; weights 0 or in ``[1e-3, 3]`` (or all 1), see below; a budget placed as
    :data:`BUDGETS` says. Sizes and metadata are multiples of 1/16, so that sums of costs are exact in float64 in
    any order: :func:`rdalloc.allocate` decides feasibility on its own summation with no slack, so a cheapest budget
    summed in another order could fall an ulp short and be refused. ``integral``: integers, and an integer budget,
    so that :func:`~rdalloc.testing.dynamic_program_optimum` applies. ``tiny_weights``: weights may also be subnormal
    or tiny (``[5e-324, 1e-300]``) beside at least one in ``[1e-3, 3]``: the references read the same products
    ``w_i D_i(b)`` as the solver, but an optimum made of subnormal terms alone has too few digits for the checks'
    relative tolerance (``1e-9``). Off by default: products that underflow break properties that hold in exact
    arithmetic (scaling every weight by 0.5 turns 5e-324 into 0)."""
    n_items = draw(st.integers(1, max_items))
    menu = draw(menus()) if menu is None else tuple(menu)
    if draw(st.sampled_from(kinds)) == "exponential":
        narrowest = min(b for b in menu if 0 < b < FULL_BITS)  # in [lo, hi], so every item can take it
        lo, hi = float(draw(st.integers(1, narrowest))), float(draw(st.integers(narrowest, FULL_BITS - 1)))
        model = draw(exponential_models(n_items, eviction=(0 in menu) and draw(st.booleans()), lo=lo, hi=hi))
    else:
        model = draw(tabulated_models(n_items, menu))
    step = 1 if integral else 16  # 1/16: exact sums of costs, so the budget edges are exact

    def number(lo, hi):
        return st.integers(lo * step, hi * step).map(lambda k: k / step)

    sizes = draw(st.one_of(number(1, 128), _vectors(n_items, number(1, 128))))
    metadata = draw(st.one_of(number(0, 64), _vectors(n_items, number(0, 64))))
    weights = draw(_weights(n_items, tiny=tiny_weights).filter(_tiny_beside_normal))
    problem = MenuProblem(model, menu, sizes, 0.0, weights, metadata)
    W, C = problem.table()
    ok = np.isfinite(W)
    cheapest = float(np.where(ok, C, np.inf).min(axis=1).sum())
    richest = float(np.where(ok, C, -np.inf).max(axis=1).sum())
    return MenuProblem(model, menu, sizes, _budget(draw, cheapest, richest, integral), weights, metadata)


@st.composite
def continuous_problems(draw, max_items: int = 60, *, tiny_weights: bool = False) -> ContinuousProblem:
    """A :class:`~rdalloc.testing.ContinuousProblem` of 1 to ``max_items`` items: an exponential model; sizes in
    ``[1, 200]`` (any float: the solver's feasibility slack is relative, so budget edges need no exact sums); weights
    0 or in ``[1e-3, 3]``, at least one in ``[1e-3, 3]`` (or all 1), and with ``tiny_weights`` also subnormal or tiny
    (``[5e-324, 1e-300]``: :func:`~rdalloc.testing.bisection_waterfill` works in logs and follows them; off by
    default, as a budget within 1e-300 of the cheapest beside such weights is refused by ``waterfill`` as outside
    float64's reliable range); a box ``0 <= lo_i <= hi_i <= 16`` (the model's ``[1, 8]`` or
    drawn per item); metadata in ``[0, 64]`` (or none); a budget placed as :data:`BUDGETS` says."""
    n_items = draw(st.integers(1, max_items))
    model = draw(exponential_models(n_items, eviction=False, lo=1.0, hi=8.0))
    sizes = draw(st.one_of(_floats(1.0, 200.0), _vectors(n_items, _floats(1.0, 200.0))))
    weights = draw(_weights(n_items, tiny=tiny_weights).filter(lambda w: np.max(w) >= 1e-3))
    if draw(st.booleans()):
        lo, hi = 1.0, 8.0
    else:
        lo = draw(_vectors(n_items, _floats(0.0, 12.0)))
        hi = lo + draw(_vectors(n_items, _floats(0.0, 4.0)))
    metadata = draw(_zero_or(0.0, 64.0))
    problem = ContinuousProblem(model, sizes, 0.0, weights, lo, hi, metadata)
    a = problem.arrays
    fixed = float(a["metadata"].sum())
    cheapest, richest = fixed + float(a["sizes"] @ a["lo"]), fixed + float(a["sizes"] @ a["hi"])
    return ContinuousProblem(model, sizes, _budget(draw, cheapest, richest, False), weights, lo, hi, metadata)
