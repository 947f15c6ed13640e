"""Distortion-model mismatch: what allocating with one quantizer's curve costs when another quantizer is used.

Each quantizer has its own distortion curve (docs/design.md §1): the decay ``beta`` differs from quantizer to quantizer
and the per-item ``alpha`` differ too. An allocation is optimal only for the curve it was computed with.
:func:`compare_models` quantifies the damage for one problem (item sizes, weights, budget):

* ``b_true = argmin_b sum_i w_i D_i^true(b_i)`` and ``b_assumed = argmin_b sum_i w_i D_i^assumed(b_i)`` over the same
  feasible set — continuous by :func:`rdalloc.waterfill` (on the intersection of the two models' ranges) or, with
  ``menu=``, integer by :func:`rdalloc.allocate`;
* the rank agreement of the two bit orders: Spearman's ``rho`` and Kendall's ``tau_b`` (ties counted) of
  ``b_true`` against ``b_assumed`` (negative: the assumed curve inverts which items deserve bits);
* the **penalty** ``sum_i w_i D_i^true(b_assumed_i) - sum_i w_i D_i^true(b_true_i) >= 0`` — the distortion
  predicted by the true model for the mismatched allocation minus the true model's own optimum — and its ratio;
* the uniform allocation at the same budget, evaluated under the true model: a mismatch can be worse than uniform.

:func:`check_quantizer` is the guard adapters call when applying a plan or model: it warns with
:class:`ModelMismatchWarning` when the quantizer at hand is not the one the model was fitted for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ._checks import check_budget, check_menu, check_vector
from ._namespace import to_numpy
from .cost import FULL_BITS
from .models import ExponentialModel, TabulatedModel

__all__ = ["ModelMismatchWarning", "check_quantizer", "MismatchReport", "compare_models", "evaluate_distortion"]


class ModelMismatchWarning(UserWarning):
    """A plan or model fitted for one quantizer is applied with another: its allocation may be worse than uniform."""


def _name(x: Any, arg: str) -> str | None:
    q = getattr(x, "quantizer", x)
    if q is not None and not isinstance(q, str):
        raise TypeError(f"{arg} must be a quantizer name (str), None, or an object with a .quantizer attribute "
                        f"(Plan, ExponentialModel, TabulatedModel), got {type(x).__name__} {x!r}")
    return q


def check_quantizer(plan_or_model_quantizer: Any, quantizer: Any, *, stacklevel: int = 1) -> bool:
    """Warn (:class:`ModelMismatchWarning`) if ``quantizer`` is not the one the plan's or model's curve was fitted for.

    ``plan_or_model_quantizer`` is a name, ``None``, or anything with a ``.quantizer`` (a :class:`~rdalloc.Plan`, a
    model, a :class:`~rdalloc.fit.ModelChoice`); ``quantizer`` is the name of the quantizer about to be applied (or
    such an object). Names compare case-insensitively, ignoring surrounding spaces. When either name is unknown
    (``None``) nothing can be checked and nothing is warned. Returns ``True`` when no mismatch was found.
    ``stacklevel=1`` attributes the warning to the caller of this function; an adapter passes 2 to point at its own
    caller.
    """
    fitted, used = _name(plan_or_model_quantizer, "plan_or_model_quantizer"), _name(quantizer, "quantizer")
    if fitted is None or used is None or fitted.strip().lower() == used.strip().lower():
        return True
    warnings.warn(f"distortion-model mismatch: the allocation was computed with the distortion curve of quantizer "
                  f"{fitted!r} but is applied with {used!r}; each quantizer has its own curve, and allocating with the "
                  f"wrong one can be worse than uniform — refit for {used!r} (rdalloc.fit_exponential) or measure "
                  f"the penalty (rdalloc.compare_models)", ModelMismatchWarning, stacklevel=stacklevel + 1)
    return False


def evaluate_distortion(model: ExponentialModel | TabulatedModel, bits: Any, weights: Any = 1.0) -> float:
    """``sum_i w_i D_i(b_i)`` under ``model`` (float64). Exponential: the curve at ``b`` in ``[lo, hi]``, measured
    eviction at 0 and ``full`` at 16 (``inf`` elsewhere, or at 0 without eviction). Tabulated: ``b_i`` must be a
    measured width (``inf`` where not allowed)."""
    if not isinstance(model, (ExponentialModel, TabulatedModel)):
        raise TypeError(f"model must be an ExponentialModel or TabulatedModel, got {type(model).__name__}")
    N = model.n_items
    b = np.asarray(to_numpy(bits) if hasattr(bits, "shape") else bits, dtype=np.float64)
    if b.shape != (N,):
        raise ValueError(f"bits must have shape ({N},) to match the model's {N} items, got shape {b.shape}")
    w = check_vector(weights, N, "weights")
    d = np.full(N, np.inf)
    if isinstance(model, ExponentialModel):
        alpha = np.asarray(to_numpy(model.alpha), dtype=np.float64)
        beta = np.broadcast_to(np.asarray(to_numpy(model.beta) if hasattr(model.beta, "shape") else model.beta,
                                          dtype=np.float64), (N,))
        on = (b >= model.lo) & (b <= model.hi)
        d = np.where(on, alpha * np.exp(-np.log(beta) * np.where(on, b, 0.0)), d)
        full = np.broadcast_to(np.asarray(to_numpy(model.full) if hasattr(model.full, "shape") else model.full,
                                          dtype=np.float64), (N,))
        d = np.where(b == FULL_BITS, full, d)
        if model.can_evict:
            ev = np.asarray(to_numpy(model.eviction) if hasattr(model.eviction, "shape") else model.eviction,
                            dtype=np.float64)
            d = np.where(b == 0, np.broadcast_to(ev, (N,)), d)
    else:
        table, ok = model.table()
        for k, width in enumerate(model.bits):
            d = np.where((b == width) & ok[:, k], table[:, k], d)
    with np.errstate(invalid="ignore"):
        return float(np.sum(np.where(w > 0, w * d, 0.0)))


def _rank(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau_b; NaN when either allocation is constant (no order to compare)."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic)


@dataclass(frozen=True, eq=False)
class MismatchReport:
    """What allocating with ``assumed`` costs when ``true`` is the quantizer's real curve (see the module docstring).

    Attributes:
      true_quantizer, assumed_quantizer: the models' quantizer names. solver: ``"waterfill"`` (continuous) or
      ``"allocate"`` (menu). budget: total bits, metadata charged. bits_true, bits_assumed: the two allocations.
      distortion_optimal: ``sum w D^true(b_true)``. distortion_mismatched: ``sum w D^true(b_assumed)``.
      distortion_uniform: ``sum w D^true(b_uniform)`` — continuous: every item at ``(B - sum m) / sum n`` clipped to
      the range; menu: every item at the largest menu width that fits the budget and the true model allows (``None``
      if none). spearman, kendall: rank correlations of ``bits_true`` and ``bits_assumed`` (NaN if either is constant).
    """

    true_quantizer: str | None
    assumed_quantizer: str | None
    solver: str
    budget: float
    bits_true: np.ndarray
    bits_assumed: np.ndarray
    distortion_optimal: float
    distortion_mismatched: float
    distortion_uniform: float | None
    spearman: float
    kendall: float

    @property
    def penalty(self) -> float:
        """``distortion_mismatched - distortion_optimal`` (>= 0 up to solver tolerance)."""
        return self.distortion_mismatched - self.distortion_optimal

    @property
    def relative_penalty(self) -> float:
        """``penalty / distortion_optimal`` (``inf`` if the optimum is 0 and the penalty is not)."""
        if self.distortion_optimal > 0:
            return self.penalty / self.distortion_optimal
        return 0.0 if self.penalty <= 0 else math.inf

    @property
    def order_inverted(self) -> bool:
        """The assumed curve ranks the items against the true one: Spearman's ``rho < 0`` (``summary`` calls
        ``rho <= -0.5`` reversed and ``|rho| < 0.5`` nearly unrelated)."""
        return bool(self.spearman < 0)

    @property
    def worse_than_uniform(self) -> bool:
        return self.distortion_uniform is not None and self.distortion_mismatched > self.distortion_uniform

    def summary(self) -> str:
        t, a = self.true_quantizer or "true", self.assumed_quantizer or "assumed"
        lines = [f"allocating with {a!r}'s curve when {t!r}'s is true ({self.solver}, budget {self.budget:.6g} bits):",
                 f"  distortion under {t!r}: optimal {self.distortion_optimal:.6g}, with {a!r}'s allocation "
                 f"{self.distortion_mismatched:.6g} (penalty {self.penalty:.4g}, {100 * self.relative_penalty:+.3g}%)"]
        if self.distortion_uniform is not None:
            lines.append(f"  uniform allocation: {self.distortion_uniform:.6g}"
                         f"{' — the mismatched allocation is WORSE than uniform' if self.worse_than_uniform else ''}")
        rho = self.spearman
        note = ("" if not np.isfinite(rho) else " — the assumed curve reverses the bit order" if rho <= -0.5
                else " — the two bit orders are nearly unrelated" if rho < 0.5 else "")
        lines.append(f"  bit-order agreement: Spearman {rho:.3g}, Kendall {self.kendall:.3g}{note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"true_quantizer": self.true_quantizer, "assumed_quantizer": self.assumed_quantizer,
                "solver": self.solver, "budget": self.budget, "bits_true": self.bits_true.tolist(),
                "bits_assumed": self.bits_assumed.tolist(), "distortion_optimal": self.distortion_optimal,
                "distortion_mismatched": self.distortion_mismatched, "distortion_uniform": self.distortion_uniform,
                "spearman": self.spearman, "kendall": self.kendall, "penalty": self.penalty,
                "relative_penalty": self.relative_penalty, "order_inverted": self.order_inverted,
                "worse_than_uniform": self.worse_than_uniform}

    @classmethod
    def from_dict(cls, d: dict) -> MismatchReport:
        return cls(true_quantizer=d["true_quantizer"], assumed_quantizer=d["assumed_quantizer"], solver=d["solver"],
                   budget=float(d["budget"]), bits_true=np.asarray(d["bits_true"], dtype=np.float64),
                   bits_assumed=np.asarray(d["bits_assumed"], dtype=np.float64),
                   distortion_optimal=float(d["distortion_optimal"]),
                   distortion_mismatched=float(d["distortion_mismatched"]),
                   distortion_uniform=None if d["distortion_uniform"] is None else float(d["distortion_uniform"]),
                   spearman=float(d["spearman"]), kendall=float(d["kendall"]))


def compare_models(true_model: ExponentialModel | TabulatedModel, assumed_model: ExponentialModel | TabulatedModel,
                   sizes: Any, budget: Any = None, *, average_bits: Any = None, weights: Any = 1.0,
                   menu: Sequence[int] | None = None, metadata: Any = 0.0) -> MismatchReport:
    """Allocate with each model for the same problem and measure, under ``true_model``, what ``assumed_model`` costs.

    Args:
      true_model: the curve of the quantizer actually applied. assumed_model: the curve the allocation is made with.
      sizes, budget / average_bits, weights, metadata: the allocation problem (as for :func:`rdalloc.waterfill`).
      menu: ``None`` for the continuous relaxation (both models exponential; box = the intersection of their
        ``[lo, hi]``); a menu of widths for integer allocation with :func:`rdalloc.allocate` (either model type).

    Returns a :class:`MismatchReport`.
    """
    for name, m in (("true_model", true_model), ("assumed_model", assumed_model)):
        if not isinstance(m, (ExponentialModel, TabulatedModel)):
            raise TypeError(f"{name} must be an ExponentialModel or TabulatedModel, got {type(m).__name__}")
    N = true_model.n_items
    if assumed_model.n_items != N:
        raise ValueError(f"the models must describe the same items: true_model has {N}, assumed_model has "
                         f"{assumed_model.n_items}")
    n = check_vector(sizes, N, "sizes", positive=True)
    w = check_vector(weights, N, "weights")
    m = check_vector(metadata, N, "metadata")
    B = float(check_budget(budget, average_bits, float(n.sum())))
    if menu is None:
        solver = "waterfill"
        bt, ba, uniform = _continuous(true_model, assumed_model, n, w, m, B)
    else:
        solver = "allocate"
        bt, ba, uniform = _discrete(true_model, assumed_model, n, w, m, B, check_menu(menu))
    rho, tau = _rank(bt, ba)
    return MismatchReport(
        true_quantizer=true_model.quantizer, assumed_quantizer=assumed_model.quantizer, solver=solver, budget=B,
        bits_true=bt, bits_assumed=ba, distortion_optimal=evaluate_distortion(true_model, bt, w),
        distortion_mismatched=evaluate_distortion(true_model, ba, w),
        distortion_uniform=None if uniform is None else evaluate_distortion(true_model, uniform, w),
        spearman=rho, kendall=tau)


def _continuous(true_model, assumed_model, n, w, m, B):
    from .waterfill import waterfill

    for name, mod in (("true_model", true_model), ("assumed_model", assumed_model)):
        if not isinstance(mod, ExponentialModel):
            raise TypeError(f"{name} must be an ExponentialModel for the continuous comparison (menu=None), got "
                            f"{type(mod).__name__}; pass menu= to compare tabulated models")
    lo, hi = max(float(true_model.lo), float(assumed_model.lo)), min(float(true_model.hi), float(assumed_model.hi))
    if lo > hi:
        raise ValueError(f"the models' quantized ranges do not overlap: true_model [{true_model.lo}, {true_model.hi}], "
                         f"assumed_model [{assumed_model.lo}, {assumed_model.hi}]")
    solve = lambda model: waterfill(model, n, budget=B, weights=w, lo=lo, hi=hi, metadata=m)  # noqa: E731
    bt = np.asarray(to_numpy(solve(true_model).bits), dtype=np.float64)
    ba = np.asarray(to_numpy(solve(assumed_model).bits), dtype=np.float64)
    level = (B - m.sum()) / n.sum()
    uniform = np.full(n.shape, min(max(level, lo), hi))
    return bt, ba, uniform


def _discrete(true_model, assumed_model, n, w, m, B, menu):
    from .allocate import allocate  # integer / menu allocation

    solve = lambda model: allocate(model, n, budget=B, weights=w, menu=menu, metadata=m)  # noqa: E731
    bt = np.asarray(to_numpy(solve(true_model).bits), dtype=np.float64)
    ba = np.asarray(to_numpy(solve(assumed_model).bits), dtype=np.float64)
    _, ok = true_model.table(menu)
    uniform = None
    for k in range(len(menu) - 1, -1, -1):
        b = menu[k]
        cost = float(np.sum(n * b + (m if 0 < b < FULL_BITS else 0.0)))
        if ok[:, k].all() and cost <= B * (1 + 1e-12):
            uniform = np.full(n.shape, float(b))
            break
    return bt, ba, uniform
