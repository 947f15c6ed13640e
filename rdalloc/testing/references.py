"""Exact optima computed without rdalloc's solvers, to check any allocator against.

Menu problems are given as the tables of :func:`~rdalloc.testing.menu_table`: ``W[i, k]`` the weighted distortion of
item ``i`` at the ``k``-th width (``inf``: not allowed) and ``C[i, k]`` its cost; each reference returns
``min sum_i W[i, x_i]`` over ``sum_i C[i, x_i] <= budget`` (``inf`` when nothing fits).

* :func:`brute_force_optimum` — every one of the ``K**N`` allocations (tiny ``N``).
* :func:`dynamic_program_optimum` — ``f_i(c)``, the least distortion of items ``0..i`` within ``c`` bits, for
  integer costs; ``O(N K B)``.
* :func:`milp_optimum` — the one-hot MILP solved by HiGHS (``scipy.optimize.milp``), for real costs.

Continuous water-filling (:func:`rdalloc.waterfill`'s problem):

* :func:`bisection_waterfill` — bisection on the log water level, then the closed form on the active set it finds.
* :func:`cvxpy_waterfill` — the exponential-cone program in cvxpy (accurate to about ``1e-6``; needs cvxpy).

Example::

    W, C = problem.table()
    assert brute_force_optimum(W, C, problem.budget) == dynamic_program_optimum(W, C, problem.budget)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import eye, kron

from rdalloc import ExponentialModel

__all__ = ["brute_force_optimum", "dynamic_program_optimum", "milp_optimum", "bisection_waterfill",
           "cvxpy_waterfill"]

_BRUTE_FORCE_LIMIT = 10**7  # allocations enumerated at once


def _tables(W: Any, C: Any, budget: float) -> tuple[np.ndarray, np.ndarray, float]:
    W, C = np.asarray(W, dtype=np.float64), np.asarray(C, dtype=np.float64)
    if W.ndim != 2 or W.shape != C.shape:
        raise ValueError(f"W and C must be (items, widths) tables of one shape, got {W.shape} and {C.shape}")
    if np.isnan(W).any() or not np.isfinite(C).all():
        raise ValueError("W must not contain NaN and C must be finite")
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    return W, C, float(budget)


def brute_force_optimum(W: Any, C: Any, budget: float) -> float:
    """``min sum_i W[i, x_i]`` s.t. ``sum_i C[i, x_i] <= budget`` over all ``K**N`` choices ``x`` (``inf``: none
    fits)."""
    W, C, budget = _tables(W, C, budget)
    N, K = W.shape
    if K ** N > _BRUTE_FORCE_LIMIT:
        raise ValueError(f"brute force over {N} items with {K} widths each is {K}**{N} allocations, more than "
                         f"{_BRUTE_FORCE_LIMIT}; use dynamic_program_optimum or milp_optimum")
    combo = np.indices((K,) * N).reshape(N, -1)
    rows = np.arange(N)[:, None]
    cost, value = C[rows, combo].sum(axis=0), W[rows, combo].sum(axis=0)
    return float(np.min(np.where(cost <= budget, value, np.inf)))


def dynamic_program_optimum(W: Any, C: Any, budget: float) -> float:
    """The exact optimum for integer costs: ``f_i(c) = min_k f_{i-1}(c - C[i, k]) + W[i, k]``, read at
    ``f_N(floor(budget))`` (``inf``: nothing fits)."""
    W, C, budget = _tables(W, C, budget)
    if np.any(C != np.round(C)) or np.any(C < 0):
        raise ValueError("the dynamic program needs integer costs C >= 0; use milp_optimum for real costs")
    if budget < 0:
        return float("inf")
    B = int(np.floor(budget))
    f = np.zeros(B + 1)
    for Wi, Ci in zip(W, C.astype(np.int64)):
        g = np.full(B + 1, np.inf)
        for w_k, c_k in zip(Wi, Ci):
            if np.isfinite(w_k) and c_k <= B:
                g[c_k:] = np.minimum(g[c_k:], f[:B + 1 - c_k] + w_k)
        f = g
    return float(f[B])


def milp_optimum(W: Any, C: Any, budget: float) -> float:
    """The one-hot MILP ``x[i, k]`` in ``{0, 1}``, ``sum_k x[i, k] = 1``, ``sum C x <= budget``, minimize ``sum W x``,
    solved by HiGHS (``scipy.optimize.milp``). HiGHS also stops at an absolute gap of ``1e-6``, so the objective is
    scaled to make its LP relaxation ``1e6`` (when that is 0, the smallest positive ``W``), its largest entry kept
    at most ``1e300``. Raises ``AssertionError``
    when HiGHS does not solve it."""
    W, C, budget = _tables(W, C, budget)
    N, K = W.shape
    ok = np.isfinite(W).ravel()
    c = np.where(ok, W.ravel(), 0.0)
    rows = kron(eye(N), np.ones((1, K)))
    cons = [LinearConstraint(rows, 1, 1), LinearConstraint(C.ravel()[None, :], -np.inf, budget)]
    bounds = Bounds(0, np.where(ok, 1, 0))
    lp = milp(c, constraints=cons, bounds=bounds)
    assert lp.status == 0, f"HiGHS could not solve the LP relaxation: {lp.message}"
    positive = c[c > 0]
    base = float(lp.fun) if lp.fun > 0 else float(positive.min()) if positive.size else 1.0
    scale = 1e6 / base  # python floats: a tiny base gives inf, not a warning
    if positive.size:  # the scaled objective must stay inside float64's range
        scale = min(scale, 1e300 / float(positive.max()))
    res = milp(c * scale, constraints=cons, integrality=np.ones(N * K), bounds=bounds, options={"mip_rel_gap": 1e-12})
    assert res.status == 0, f"HiGHS could not solve the MILP: {res.message}"
    return float(c @ np.round(res.x))


def _continuous(model: ExponentialModel, sizes: Any, budget: float, weights: Any, lo: Any, hi: Any,
                metadata: Any) -> tuple:
    """Per-item float64 vectors ``alpha, beta, n, w, lo, hi`` and the payload budget ``P = B - sum_i m_i``."""
    if not isinstance(model, ExponentialModel):
        raise TypeError(f"model must be an ExponentialModel, got {type(model).__name__}")
    shape = (model.n_items,)
    lo = model.lo if lo is None else lo
    hi = model.hi if hi is None else hi
    alpha, beta, n, w, lo, hi, m = (np.broadcast_to(np.asarray(x, dtype=np.float64), shape)
                                    for x in (model.alpha, model.beta, sizes, weights, lo, hi, metadata))
    return alpha, beta, n, w, lo, hi, float(budget) - float(m.sum())


def bisection_waterfill(model: ExponentialModel, sizes: Any, budget: float, *, weights: Any = 1.0, lo: Any = None,
                        hi: Any = None, metadata: Any = 0.0) -> np.ndarray:
    """Optimal real bits of :func:`rdalloc.waterfill`'s problem, by bisection and the closed form.

    With ``k_i = ln beta_i`` and ``c_i = ln(w_i alpha_i k_i / n_i)`` (a sum of logs, so any positive finite weight,
    subnormal included, is followed), ``b_i(mu) = clip((c_i - mu) / k_i, lo_i, hi_i)``
    and ``g(mu) = sum_i n_i b_i(mu)`` is non-increasing. Bisection on ``mu`` until the bracket stops shrinking finds
    the active set (free F, at ``hi`` U, at ``lo`` L); the root of ``g(mu) = P`` on it is
    ``mu* = (sum_F n c / k + sum_U n hi + sum_L n lo - P) / sum_F n / k``. A budget that buys every item ``hi``
    gives ``hi`` (``lo`` for zero-weight items, which gain nothing); one below ``sum_i n_i lo_i`` (to ``1e-12``
    relative) raises ``ValueError``.
    """
    alpha, beta, n, w, lo, hi, P = _continuous(model, sizes, budget, weights, lo, hi, metadata)
    floor = float(n @ lo)
    if P < floor - 1e-12 * max(floor, 1.0):
        raise ValueError(f"budget {budget!r} is infeasible: the box needs at least {floor + budget - P!r} bits")
    k = np.log(beta)
    with np.errstate(divide="ignore"):  # summed from logs (a subnormal weight keeps its digits); -inf for zero weight:
        c = np.log(w) + np.log(alpha) + np.log(k) - np.log(n)  # such an item stays at lo
    live = np.isfinite(c)
    top = np.where(live, hi, lo)
    if P >= float(n @ top):
        return top

    def bits(mu):
        return np.clip((c - mu) / k, lo, hi)

    a, b = float(np.min((c - k * hi)[live])), float(np.max((c - k * lo)[live]))  # g(a) = n @ top > P >= g(b)
    for _ in range(2000):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        a, b = (mid, b) if n @ bits(mid) > P else (a, mid)
    x = bits(0.5 * (a + b))
    free = (x > lo) & (x < hi)
    if not free.any():  # the budget sits on a breakpoint of g: every item at a bound
        return x
    at_hi = ~free & (x >= hi)
    slope = np.sum(n[free] / k[free])
    at_lo = ~free & ~at_hi
    mu = (np.sum(n[free] * c[free] / k[free]) + n[at_hi] @ hi[at_hi] + n[at_lo] @ lo[at_lo] - P) / slope
    return np.where(free, np.clip((c - mu) / k, lo, hi), x)


def cvxpy_waterfill(model: ExponentialModel, sizes: Any, budget: float, *, weights: Any = 1.0, lo: Any = None,
                    hi: Any = None, metadata: Any = 0.0) -> tuple[float, np.ndarray]:
    """``(distortion, bits)`` of :func:`rdalloc.waterfill`'s problem from cvxpy's exponential-cone program (Clarabel at
    ``1e-10``; accurate to about ``1e-6``). Raises ``ImportError`` without cvxpy and ``AssertionError`` when the solver
    does not report an optimum. It cannot follow subnormal or tiny weights: their terms ``w alpha beta**(-b)`` sit far
    below the solver's absolute tolerance, so their bits are not determined (use :func:`bisection_waterfill`)."""
    try:
        import cvxpy as cp
    except ImportError as e:
        raise ImportError("cvxpy_waterfill needs cvxpy: pip install 'rdalloc[test]'") from e
    alpha, beta, n, w, lo, hi, P = _continuous(model, sizes, budget, weights, lo, hi, metadata)
    b = cp.Variable(n.size)
    objective = cp.sum(cp.multiply(w * alpha, cp.exp(-cp.multiply(np.log(beta), b))))
    scale = n.mean()  # a well-scaled budget row lets the interior-point solver reach 1e-10
    prob = cp.Problem(cp.Minimize(objective), [(n / scale) @ b <= P / scale, b >= lo, b <= hi])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)
    assert prob.status == cp.OPTIMAL, f"cvxpy did not solve the water-filling program: status {prob.status}"
    return float(prob.value), np.asarray(b.value)
