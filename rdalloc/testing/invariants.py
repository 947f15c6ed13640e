"""Invariant checks for any allocation: each raises ``AssertionError`` saying what is wrong, and returns nothing.

* :func:`assert_within_budget` — ``sum_i C_i(b_i) <= B`` with ``C_i(b) = n_i b + m_i [0 < b < 16]``.
* :func:`assert_in_menu` / :func:`assert_in_box` — every width on the menu (and allowed by the item's model), or
  every real width in ``[lo_i, hi_i]``.
* :func:`assert_kkt` — the KKT conditions of the continuous problem: one level ``lambda >= 0`` with the marginal value
  ``v_i = w_i alpha_i ln(beta_i) beta_i**(-b_i) / n_i`` equal to it on free items, at most it at ``lo``, at least it
  at ``hi``, and the budget spent whenever ``lambda > 0``.
* :func:`assert_certificate` — ``dual_bound <= lower_bound <= distortion``; ``OPTIMAL`` only with the gap within the
  solver's tolerance; given the exact optimum, a valid bound and a distortion that agrees with the status.
* :func:`assert_allocation` — all of the above that apply to an :class:`~rdalloc.Allocation` of a
  :class:`~rdalloc.testing.MenuProblem`.

Example::

    r = problem.allocate()
    assert_allocation(problem, r, optimum=dynamic_program_optimum(*problem.table(), problem.budget))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rdalloc import ExponentialModel, TabulatedModel
from rdalloc.cost import item_cost
from rdalloc.status import OPTIMAL, SATURATED

from .problems import MenuProblem

__all__ = ["assert_within_budget", "assert_in_menu", "assert_in_box", "assert_kkt", "assert_certificate",
           "assert_allocation"]


def _vector(x: Any, n_items: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(x, dtype=np.float64), (n_items,))


def assert_within_budget(bits: Any, sizes: Any, budget: float, metadata: Any = 0.0, *, rtol: float = 0.0) -> None:
    """``sum_i n_i b_i + m_i [0 < b_i < 16] <= budget (1 + rtol)``."""
    b = np.asarray(bits, dtype=np.float64)
    cost = float(np.sum(np.asarray(item_cost(b, _vector(sizes, b.size), _vector(metadata, b.size)))))
    limit = float(budget) * (1 + rtol)
    if not cost <= limit:
        raise AssertionError(f"the allocation costs {cost!r} bits, {cost - float(budget):.6g} over the budget "
                             f"{float(budget)!r}")


def assert_in_menu(bits: Any, menu: Sequence[int], model: ExponentialModel | TabulatedModel | None = None) -> None:
    """Every ``b_i`` is on ``menu``, and with ``model`` one that item ``i`` may take (``model.table(menu)``: eviction
    needs a measured ``D(0)``, an exponential's widths lie in ``[lo, hi]``, a table's ``allowed``)."""
    b = np.asarray(bits)
    menu = tuple(int(m) for m in menu)
    off = ~np.isin(b, menu)
    if off.any():
        i = int(np.argmax(off))
        raise AssertionError(f"item {i} has {b[i].item()!r} bits, not on the menu {list(menu)} "
                             f"({int(off.sum())} such items)")
    if model is not None:
        _, ok = model.table(menu)
        taken = ok[np.arange(b.size), np.searchsorted(menu, b)]
        if not taken.all():
            i = int(np.argmin(taken))
            raise AssertionError(f"item {i} has {int(b[i])} bits, which its model does not allow "
                                 f"(allowed: {[m for m, a in zip(menu, ok[i]) if a]})")


def assert_in_box(bits: Any, lo: Any, hi: Any, *, atol: float = 0.0) -> None:
    """``lo_i - atol <= b_i <= hi_i + atol`` for every item."""
    b = np.asarray(bits, dtype=np.float64)
    lo, hi = _vector(lo, b.size), _vector(hi, b.size)
    for name, bad in (("not a number", np.isnan(b)), ("below lo", b < lo - atol), ("above hi", b > hi + atol)):
        if bad.any():
            i = int(np.argmax(bad))
            raise AssertionError(f"item {i} has {float(b[i])!r} bits: {name} (box [{float(lo[i])!r}, "
                                 f"{float(hi[i])!r}], {int(bad.sum())} such items)")


def assert_kkt(model: ExponentialModel, sizes: Any, bits: Any, budget: float, *, weights: Any = 1.0, lo: Any = None,
               hi: Any = None, metadata: Any = 0.0, tol: float = 1e-8, rtol: float = 1e-11,
               atol: float = 1e-9) -> None:
    """The KKT conditions of ``min sum_i w_i alpha_i beta_i**(-b_i)`` s.t. ``sum_i n_i b_i + m_i <= budget``,
    ``lo_i <= b_i <= hi_i`` (:func:`rdalloc.waterfill`'s problem; box default: the model's ``[lo, hi]``).

    In log marginal value ``ln v_i`` (``v_i = w_i alpha_i ln(beta_i) beta_i**(-b_i) / n_i``) some ``ln lambda`` must
    lie within ``tol`` of every free item's, above every item's at ``lo`` and below every item's at ``hi`` (an item is
    at a bound within ``atol`` bits). The spent ``sum_i n_i b_i + m_i`` may exceed the budget by ``rtol`` relative and
    must meet it to ``rtol`` unless ``lambda = 0`` is possible (no item wants more bits).
    """
    b = np.asarray(bits, dtype=np.float64)
    N = b.size
    lo = _vector(model.lo if lo is None else lo, N)
    hi = _vector(model.hi if hi is None else hi, N)
    alpha, beta, n, w, m = (_vector(x, N) for x in (model.alpha, model.beta, sizes, weights, metadata))
    assert_in_box(b, lo, hi, atol=atol)
    with np.errstate(divide="ignore"):  # summed from logs: a subnormal weight keeps its digits (0: -inf)
        log_v = np.log(w) + np.log(alpha) + np.log(np.log(beta)) - np.log(n) - b * np.log(beta)
    at_lo, at_hi = b <= lo + atol, b >= hi - atol
    # ln lambda >= ln v_i where b_i could rise (free or at lo); <= ln v_i where it could fall (free or at hi)
    need_above = np.where(~at_hi, log_v, -np.inf)
    need_below = np.where(~at_lo, log_v, np.inf)
    i, j = int(np.argmax(need_above)), int(np.argmin(need_below))
    if need_above[i] - need_below[j] > 2 * tol:
        def state(k):
            return "at lo" if at_lo[k] else "at hi" if at_hi[k] else "free"

        raise AssertionError(f"KKT conditions fail by {need_above[i] - need_below[j]:.3g} in log marginal value: "
                             f"item {i} ({state(i)}, {float(b[i])!r} bits) needs ln(lambda) >= "
                             f"{float(need_above[i])!r}, item {j} ({state(j)}, {float(b[j])!r} bits) needs "
                             f"ln(lambda) <= {float(need_below[j])!r}")
    spent, budget = float(n @ b + m.sum()), float(budget)
    if spent > budget * (1 + rtol):
        raise AssertionError(f"the allocation spends {spent!r} bits, over the budget {budget!r}")
    if np.isfinite(need_above[i]) and spent < budget * (1 - rtol):
        raise AssertionError(f"complementary slackness fails: item {i} wants more bits (ln v = "
                             f"{float(need_above[i])!r}) but only {spent!r} of {budget!r} bits are spent")


def assert_certificate(result: Any, optimum: float | None = None, *, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """The certificate of an :class:`~rdalloc.Allocation` (or any object with its fields ``distortion``,
    ``lower_bound``, ``dual_bound``, ``multiplier``, ``budget`` and ``status``) is valid.

    Always: ``dual_bound <= lower_bound <= distortion + rtol |distortion| + atol``; status ``OPTIMAL`` only with
    ``gap <= rtol (|distortion| + multiplier budget) + atol`` (:func:`rdalloc.allocate`'s tolerance). Given the exact
    ``optimum``: ``lower_bound <= optimum (1 + rtol) + atol``; ``distortion >= optimum - max(rtol |optimum|, atol)``;
    with status ``OPTIMAL`` or ``SATURATED`` the distortion equals the optimum to ``max(rtol |optimum|, atol)``,
    otherwise it exceeds it by at most ``gap (1 + rtol) + atol``.
    """
    d, lb, q = (float(np.asarray(getattr(result, f))) for f in ("distortion", "lower_bound", "dual_bound"))
    status = int(np.asarray(result.status))
    gap = max(d - lb, 0.0)
    if not q <= lb:
        raise AssertionError(f"dual bound {q!r} above the lower bound {lb!r}")
    if not lb <= d + rtol * abs(d) + atol:
        raise AssertionError(f"lower bound {lb!r} above the distortion {d!r}")
    if status == OPTIMAL:
        tol = rtol * (abs(d) + float(np.asarray(result.multiplier)) * float(np.asarray(result.budget))) + atol
        if gap > tol:
            raise AssertionError(f"status OPTIMAL with a gap of {gap!r}, above the tolerance {tol!r}")
    if optimum is None:
        return
    optimum = float(optimum)
    if not lb <= optimum * (1 + rtol) + atol:
        raise AssertionError(f"lower bound {lb!r} above the exact optimum {optimum!r}: not a bound")
    close = max(rtol * abs(optimum), atol)
    if d < optimum - close:
        raise AssertionError(f"distortion {d!r} below the exact optimum {optimum!r}: infeasible, or a wrong reference")
    if status in (OPTIMAL, SATURATED) and abs(d - optimum) > close:
        raise AssertionError(f"status {'OPTIMAL' if status == OPTIMAL else 'SATURATED'} with distortion {d!r}, but the "
                             f"exact optimum is {optimum!r}")
    if status not in (OPTIMAL, SATURATED) and d - optimum > gap * (1 + rtol) + atol:
        raise AssertionError(f"distortion {d!r} is {d - optimum!r} above the exact optimum {optimum!r}, more than the "
                             f"reported gap {gap!r}")


def assert_allocation(problem: MenuProblem, result: Any, optimum: float | None = None, *, rtol: float = 1e-9,
                      atol: float = 1e-12) -> None:
    """An :class:`~rdalloc.Allocation` of ``problem``: widths on the menu and allowed, within the budget (from the
    widths and as reported), the reported distortion that of the widths (to ``rtol``), and :func:`assert_certificate`.
    """
    bits = np.asarray(result.bits)
    assert_in_menu(bits, problem.menu, problem.model)
    assert_within_budget(bits, problem.sizes, problem.budget, problem.metadata)
    if not result.usage.total_bits <= problem.budget:
        raise AssertionError(f"reported usage {result.usage.total_bits!r} bits over the budget {problem.budget!r}")
    W, _ = problem.table()
    chosen = float(W[np.arange(bits.size), np.searchsorted(problem.menu, bits)].sum())
    d = float(np.asarray(result.distortion))
    if abs(d - chosen) > rtol * abs(chosen):
        raise AssertionError(f"reported distortion {d!r}, but the widths give {chosen!r}")
    assert_certificate(result, optimum, rtol=rtol, atol=atol)
