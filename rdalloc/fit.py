"""Distortion models from measurements: ``D(b) = alpha * beta**(-b)`` per item or pooled per quantizer, a tabulated
model and its lower convex hull, and the automatic choice between the two.

Measurements are a table ``D[i, k]`` (items x bit-widths) measured at strictly increasing integer ``bits`` in
``[0, 16]``, from any array-API backend (numpy, torch, JAX); everything here runs in float64 numpy (the data is small).

**What is fitted.** Only the *quantized points* ``0 < b_k < 16``. Eviction ``D(0)`` and full precision ``D(16)`` are
kept as measured values (they become :class:`~rdalloc.models.ExponentialModel`'s ``eviction`` and ``full``), never
forced onto the curve: eviction usually lies well below the curve's extrapolation ``alpha`` (docs/design.md §2), and
``D(16)`` is 0. The model's quantized range ``[lo, hi]`` is the smallest and largest quantized width measured.

**Estimator.** In log space ``y_ik = ln D_ik = a_i - k_i b_k + e_ik`` with ``a_i = ln alpha_i`` and ``k_i = ln beta_i``,
fitted by weighted least squares with sample weights ``w_ik >= 0``. With the weighted item means
``xbar_i = sum_k w_ik b_k / W_i``, ``ybar_i = sum_k w_ik y_ik / W_i`` (``W_i = sum_k w_ik``) and
``Sxx_i = sum_k w_ik (b_k - xbar_i)**2``, ``Sxy_i = sum_k w_ik (b_k - xbar_i)(y_ik - ybar_i)``:

* per item (each item its own ``alpha_i`` and ``beta_i``)::

      k_i = -Sxy_i / Sxx_i,        a_i = ybar_i + k_i xbar_i

* pooled per quantizer (one shared ``beta``, one ``alpha_i`` per item: the fixed-effects, or *within*, estimator)::

      k = -sum_i Sxy_i / sum_i Sxx_i,        a_i = ybar_i + k xbar_i

  This is the exact least-squares solution of the dummy-variable design ``[one_hot(item) | -b]`` in closed form
  (Frisch–Waugh–Lovell: demeaning within items removes the intercepts); the pooled slope is the ``Sxx``-weighted mean
  of the per-item slopes.

**Uncertainty.** ``se(k) = sqrt(s2 / Sxx)`` with ``s2 = sum w r**2 / dof``, ``dof = n_i - 2`` per item and
``n - N - 1`` pooled (``n_i`` points of item ``i``, ``n`` in all, ``N`` items); the confidence interval of ``beta`` is
``exp(k -/+ t_{dof, (1+level)/2} se)``. Weights are relative (analytic) weights: scaling them all changes nothing;
a weight of 0 leaves a point out.

**Zeros.** A measured distortion of exactly 0 at a quantized width is *censored*: the error is below what the
measurement resolves, and ``ln 0 = -inf`` carries no magnitude. It is left out of the fit (weight 0), counted in
:attr:`ExponentialFit.n_zero` and flagged by :mod:`rdalloc.diagnostics`; it is never replaced by an invented floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ._checks import check_distortion_table, check_measurements, check_menu, check_quantizer_name, check_vector
from .cost import FULL_BITS, item_cost
from .models import ExponentialModel, TabulatedModel

__all__ = ["ExponentialFit", "fit_exponential", "tabulate", "lower_hull", "ModelChoice", "choose_model",
           "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 1.3
"""Default fit tolerance as a factor: the curve is accepted for an item when it is within 1.3x of every measured
quantized point (``max |ln D_measured - ln D_curve| <= ln 1.3``)."""


# ---- estimators -------------------------------------------------------------------------------------------------
def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray, pooled: bool, slope_items: np.ndarray | None = None):
    """Closed-form weighted least squares of ``y_ik = a_i - k_i x_k`` (see the module docstring).

    ``y`` must be finite wherever ``w > 0``. Items without usable points (or, per item, without two distinct widths)
    get NaN. Pooled, ``slope_items`` (default all) are the items the shared ``k`` is estimated from; every item with
    points gets its ``a_i = ybar_i + k xbar_i``. Returns ``(a, k, se_k, dof)``, each ``(N,)``.
    """
    N = y.shape[0]
    y = np.where(w > 0, y, 0.0)
    W = w.sum(axis=1)
    has = W > 0
    safe = np.where(has, W, 1.0)
    xbar = (w * x).sum(axis=1) / safe
    ybar = (w * y).sum(axis=1) / safe
    dx = x[None, :] - xbar[:, None]
    n = (w > 0).sum(axis=1)  # widths are distinct, so n_i >= 2 means a slope is identified
    sxx = np.where(n >= 2, (w * dx * dx).sum(axis=1), 0.0)  # exactly 0 for one point (no rounding residue)
    sxy = np.where(n >= 2, (w * dx * (y - ybar[:, None])).sum(axis=1), 0.0)
    nan = np.full(N, np.nan)
    if pooled:
        use = has if slope_items is None else has & slope_items
        sxx_all = sxx[use].sum()
        if not use.any() or sxx_all <= 0:
            return nan, nan, nan, np.zeros(N, dtype=int)
        k = np.where(has, -sxy[use].sum() / sxx_all, np.nan)
    else:
        ok = sxx > 0
        k = np.where(ok, -sxy / np.where(ok, sxx, 1.0), np.nan)
    a = ybar + k * xbar
    r = np.where(w > 0, y - (a[:, None] - k[:, None] * x[None, :]), 0.0)
    ssr = np.where(np.isfinite(k), (w * r * r).sum(axis=1), np.nan)
    if pooled:
        dof_all = int(n[use].sum() - use.sum() - 1)
        se_all = math.sqrt(ssr[use].sum() / dof_all / sxx_all) if dof_all > 0 else np.nan
        return a, np.where(has, k, np.nan), np.where(has, se_all, np.nan), np.where(has, dof_all, 0)
    dof = n - 2
    good = np.isfinite(k) & (dof > 0)
    se = np.where(good, np.sqrt(np.where(good, ssr, 0.0) / np.maximum(dof, 1) / np.where(good, sxx, 1.0)), np.nan)
    return a, k, se, np.maximum(dof, 0)


@dataclass(frozen=True, eq=False)
class ExponentialFit:
    """A fitted ``D_i(b) = alpha_i * beta_i**(-b)`` together with the measurements it came from.

    Attributes:
      alpha, beta: ``(N,)`` float64 (``beta`` is constant when ``pooled``); NaN for an item that could not be fitted.
      pooled: one shared ``beta`` (fixed-effects fit) or one per item.
      bits: every measured width; distortions: the ``(N, K)`` measurements; weights: ``(N, K)`` weights the fit used
        (0 at eviction, full precision, zeros and user-zeroed points).
      log_beta_se, dof: standard error of ``ln beta`` per item and its residual degrees of freedom (NaN / 0 when
        there are none: two points determine the line exactly).
      quantizer: the quantizer the measurements describe.
      slope_items: pooled only: boolean ``(N,)``, the items the shared ``beta`` was estimated from (``None``: all);
        the others get only their ``alpha`` (see :func:`choose_model`).
    """

    alpha: np.ndarray
    beta: np.ndarray
    pooled: bool
    bits: tuple[int, ...]
    distortions: np.ndarray
    weights: np.ndarray
    log_beta_se: np.ndarray
    dof: np.ndarray
    quantizer: str | None = None
    slope_items: np.ndarray | None = None

    # ---- the measurements -------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.distortions.shape[0])

    @property
    def quantized(self) -> np.ndarray:
        """Boolean ``(K,)``: the columns at ``0 < b < 16`` (the fitted ones)."""
        b = np.asarray(self.bits)
        return (b > 0) & (b < FULL_BITS)

    @property
    def lo(self) -> int:
        return int(np.asarray(self.bits)[self.quantized].min())

    @property
    def hi(self) -> int:
        return int(np.asarray(self.bits)[self.quantized].max())

    @property
    def eviction(self) -> np.ndarray | None:
        """Measured ``D(0)`` per item, or ``None`` when 0 was not measured."""
        return self.distortions[:, 0].copy() if self.bits[0] == 0 else None

    @property
    def full(self) -> np.ndarray | None:
        """Measured ``D(16)`` per item, or ``None`` when 16 was not measured (the model then uses 0)."""
        return self.distortions[:, -1].copy() if self.bits[-1] == FULL_BITS else None

    @property
    def used(self) -> np.ndarray:
        """Boolean ``(N, K)``: points the fit used."""
        return self.weights > 0

    @property
    def n_points(self) -> np.ndarray:
        """Usable quantized points per item."""
        return self.used.sum(axis=1)

    @property
    def n_zero(self) -> np.ndarray:
        """Quantized points per item measured as exactly 0 (left out of the fit)."""
        return ((self.distortions == 0) & self.quantized[None, :]).sum(axis=1)

    @property
    def fitted(self) -> np.ndarray:
        """Boolean ``(N,)``: items with a finite ``alpha`` and ``beta``."""
        return np.isfinite(self.alpha) & np.isfinite(self.beta)

    # ---- the curve and its residuals --------------------------------------------------------------------------
    def curve(self, bits: Any) -> np.ndarray:
        """``alpha_i * beta_i**(-b)`` as ``(N, len(bits))`` (the curve only; eviction and full are not applied)."""
        b = np.asarray(bits, dtype=np.float64).reshape(-1)
        return self.alpha[:, None] * np.exp(-np.log(self.beta)[:, None] * b[None, :])

    @property
    def log_residuals(self) -> np.ndarray:
        """``ln D_measured - ln D_curve`` at the used points, NaN elsewhere (``(N, K)``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log(self.distortions)
            pred = np.log(self.alpha)[:, None] - np.log(self.beta)[:, None] * np.asarray(self.bits, float)[None, :]
            return np.where(self.used, y - pred, np.nan)

    @property
    def max_log_residual(self) -> np.ndarray:
        """Largest ``|ln D_measured - ln D_curve|`` per item (``exp`` of it is the worst factor); NaN if unfitted."""
        r = np.abs(self.log_residuals)
        out = np.full(self.n_items, np.nan)
        ok = self.fitted & self.used.any(axis=1)
        out[ok] = np.nanmax(r[ok], axis=1) if ok.any() else out[ok]
        return out

    def _sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Weighted residual and total sums of squares per item (in log space, about the item's weighted mean)."""
        w = self.weights
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(self.used, np.log(np.where(self.used, self.distortions, 1.0)), 0.0)
        W = w.sum(axis=1)
        ybar = (w * y).sum(axis=1) / np.where(W > 0, W, 1.0)
        sst = (w * (y - ybar[:, None]) ** 2).sum(axis=1)
        r = np.nan_to_num(self.log_residuals, nan=0.0)
        with np.errstate(over="ignore"):  # residuals of measurements spanning float64's range: inf, flagged
            ssr = np.where(self.fitted, (w * r * r).sum(axis=1), np.nan)
        return ssr, sst

    @property
    def r2(self) -> np.ndarray:
        """Weighted ``R^2 = 1 - SSR_i / SST_i`` per item in log space (1 for a flat item fitted exactly, else 0)."""
        ssr, sst = self._sums()
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(sst > 0, 1.0 - ssr / np.where(sst > 0, sst, 1.0), np.where(ssr <= 0, 1.0, 0.0))
        return np.where(self.fitted, r2, np.nan)

    @property
    def r2_overall(self) -> float:
        """``1 - sum_i SSR_i / sum_i SST_i`` over fitted items: for a pooled fit the *within* R^2, the share of each
        item's own variation across bit-widths that the shared slope explains (intercepts do not inflate it)."""
        ssr, sst = self._sums()
        ok = self.fitted
        total = sst[ok].sum()
        if not ok.any():
            return float("nan")
        return float(1.0 - ssr[ok].sum() / total) if total > 0 else float(1.0 if ssr[ok].sum() <= 0 else 0.0)

    @property
    def ssr(self) -> np.ndarray:
        """Weighted residual sum of squares per item (log space)."""
        return self._sums()[0]

    def beta_interval(self, level: float = 0.95) -> np.ndarray:
        """``(N, 2)`` confidence interval of ``beta`` per item: ``exp(ln beta -/+ t_{dof, (1+level)/2} se)``.

        NaN where there are no residual degrees of freedom, inf where the bound exceeds float64. For a pooled fit every
        row is the shared interval.
        """
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        dof = np.asarray(self.dof)
        t = np.where(dof > 0, stats.t.ppf(0.5 + level / 2, np.maximum(dof, 1)), np.nan)
        k = np.log(self.beta)
        half = t * self.log_beta_se
        with np.errstate(over="ignore"):  # a fit of points spanning float64 has an interval reaching inf
            return np.stack([np.exp(k - half), np.exp(k + half)], axis=1)

    # ---- the model --------------------------------------------------------------------------------------------
    @property
    def model(self) -> ExponentialModel:
        """The fitted :class:`ExponentialModel`: ``lo``/``hi`` the quantized range fitted, measured ``eviction`` and
        ``full`` kept as measured. Raises ``ValueError`` if an item could not be fitted or has ``beta <= 1``."""
        if not self.fitted.all():
            i = int(np.argmin(self.fitted))
            raise ValueError(f"item {i} could not be fitted ({int(self.n_points[i])} usable quantized points at "
                             f"distinct widths; see rdalloc.diagnostics or use choose_model)")
        if (self.beta <= 1).any():
            i = int(np.argmax(self.beta <= 1))
            raise ValueError(f"the fitted beta of item {i} is {float(self.beta[i])!r} <= 1: its distortion does not "
                             f"fall with more bits (see rdalloc.diagnostics, or use choose_model / tabulate)")
        beta = float(self.beta[0]) if self.pooled else self.beta.copy()
        full = self.full
        return ExponentialModel(alpha=self.alpha.copy(), beta=beta, eviction=self.eviction, lo=float(self.lo),
                                hi=float(self.hi), full=0.0 if full is None else full, quantizer=self.quantizer)

    def to_dict(self) -> dict:
        return {"kind": "exponential_fit", "pooled": self.pooled, "bits": list(self.bits),
                "alpha": self.alpha.tolist(), "beta": self.beta.tolist(), "log_beta_se": self.log_beta_se.tolist(),
                "dof": np.asarray(self.dof).astype(int).tolist(), "distortions": self.distortions.tolist(),
                "weights": self.weights.tolist(), "quantizer": self.quantizer,
                "slope_items": None if self.slope_items is None else np.asarray(self.slope_items, bool).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ExponentialFit:
        if not isinstance(d, dict) or d.get("kind") != "exponential_fit":
            raise ValueError(f"not an exponential fit: kind={d.get('kind') if isinstance(d, dict) else d!r}")
        f = lambda key: np.asarray(d[key], dtype=np.float64)  # noqa: E731
        return cls(alpha=f("alpha"), beta=f("beta"), pooled=bool(d["pooled"]), bits=tuple(int(b) for b in d["bits"]),
                   distortions=f("distortions"), weights=f("weights"), log_beta_se=f("log_beta_se"),
                   dof=np.asarray(d["dof"], dtype=int), quantizer=d.get("quantizer"),
                   slope_items=None if d.get("slope_items") is None else np.asarray(d["slope_items"], dtype=bool))


def fit_validated(d: np.ndarray, bits: tuple[int, ...], w: np.ndarray, pooled: bool, quantizer: str | None,
         slope_items: np.ndarray | None = None) -> ExponentialFit:
    """The fit on input validated by :func:`~rdalloc._checks.check_measurements`; items that cannot be fitted get
    NaN (no error). Shared with :mod:`rdalloc.diagnostics`, which fits the same measurements both ways."""
    b = np.asarray(bits, dtype=np.float64)
    q = (b > 0) & (b < FULL_BITS)
    w = np.where(q[None, :] & (d > 0), w, 0.0)
    with np.errstate(divide="ignore"):
        y = np.log(np.where(w > 0, d, 1.0))
    a, k, se, dof = _wls(b, y, w, pooled, slope_items if pooled else None)
    with np.errstate(over="ignore", under="ignore"):  # out of float64's range: inf or 0, refused by fit_exponential
        alpha, beta = np.exp(a), np.exp(k)
    return ExponentialFit(alpha=alpha, beta=beta, pooled=bool(pooled), bits=bits, distortions=d, weights=w,
                          log_beta_se=se, dof=np.asarray(dof, dtype=int), quantizer=quantizer,
                          slope_items=slope_items.copy() if pooled and slope_items is not None else None)


def _trimmed_pooled_fit(d, bits, w, log_tol: float, quantizer) -> ExponentialFit:
    """Pooled fit whose shared slope comes only from items within ``log_tol`` of the curve.

    Start from every item; while some slope item misses its curve by more than the tolerance, take the worst tenth
    of those (at least one) out of the slope estimate and refit — never leaving no item with a slope. Items out of
    the slope still get their ``alpha`` and are judged against the final curve.
    """
    slope = np.ones(d.shape[0], dtype=bool)
    fit = fit_validated(d, bits, w, True, quantizer, slope)
    while True:
        res = fit.max_log_residual
        with np.errstate(invalid="ignore"):
            bad = slope & fit.fitted & (res > log_tol + 1e-12)
        if not bad.any():
            return fit
        n_drop = max(1, math.ceil(0.1 * bad.sum()))
        worst = np.argsort(np.where(bad, -res, np.inf), kind="stable")[:n_drop]
        trial_slope = slope.copy()
        trial_slope[worst] = False
        trial = fit_validated(d, bits, w, True, quantizer, trial_slope)
        if not trial.fitted.any():
            return fit
        slope, fit = trial_slope, trial


def fit_exponential(distortions: Any, bits: Sequence[int], *, pooled: bool = True, sample_weights: Any = None,
                    quantizer: str | None = None) -> ExponentialFit:
    """Fit ``D_i(b) = alpha_i * beta**(-b)`` (pooled) or ``alpha_i * beta_i**(-b)`` (per item) to measurements.

    Args:
      distortions: ``(N, K)`` measured distortion of item ``i`` at ``bits[k]`` (any array-API backend), finite and
        ``>= 0``.
      bits: ``K`` strictly increasing integer widths in ``[0, 16]`` with at least two quantized ones; 0 and 16 are
        kept as measured endpoints.
      pooled: one shared ``beta`` for the quantizer (closed-form fixed-effects fit) or one per item.
      sample_weights: relative weights ``>= 0``: a scalar, one per width ``(K,)`` or one per measurement ``(N, K)``.
      quantizer: the quantizer's name, carried into the model (and plans made from it).

    Returns an :class:`ExponentialFit`; its ``.model`` is the :class:`ExponentialModel`. Raises ``ValueError`` when
    an item has too few usable points (per item: two distinct widths; pooled: one, and two distinct widths somewhere)
    — zeros and zero-weight points do not count.

    Two items measured on ``D(b) = alpha_i 4**(-b)`` at 2, 4 and 8 bits, and at eviction (kept as measured, off the
    curve):

    >>> import numpy as np
    >>> d = np.array([[0.5, 1 / 16, 1 / 256, 1 / 65536], [0.5, 2 / 16, 2 / 256, 2 / 65536]])
    >>> fit = fit_exponential(d, [0, 2, 4, 8])
    >>> round(float(fit.beta[0]), 9), np.round(fit.alpha, 9).tolist(), fit.model.eviction.tolist()
    (4.0, [1.0, 2.0], [0.5, 0.5])
    >>> fit.model.lo, fit.model.hi
    (2.0, 8.0)
    """
    d, bits, w = check_measurements(distortions, bits, sample_weights)
    fit = fit_validated(d, bits, w, pooled, check_quantizer_name(quantizer))
    if not fit.fitted.all():
        i = int(np.argmin(fit.fitted))
        q = fit.quantized
        qb = [b for b, keep in zip(bits, q) if keep]
        need = "one usable point per item and two distinct widths in all" if pooled else "two distinct widths"
        raise ValueError(f"distortions of item {i} leave {int(fit.n_points[i])} usable quantized point(s) "
                         f"(values {d[i, q].tolist()} at bits {qb}; zeros and zero-weight points are left out); "
                         f"a {'pooled' if pooled else 'per-item'} fit needs {need}")
    for name, v in (("alpha", fit.alpha), ("beta", fit.beta)):
        bad = (v == 0) | np.isinf(v)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"distortions of item {i} ({d[i].tolist()} at bits {list(bits)}) give a fitted {name} "
                             f"of {float(v[i])!r}: its logarithm lies outside float64's range; rescale the "
                             f"distortions")
    return fit


# ---- tabulated model and its hull ---------------------------------------------------------------------------------
def tabulate(distortions: Any, bits: Sequence[int], *, quantizer: str | None = None) -> TabulatedModel:
    """A :class:`TabulatedModel` straight from measurements (validated as for :func:`fit_exponential`, except that
    any number of quantized widths is fine here)."""
    d, bits = check_distortion_table(distortions, bits)
    return TabulatedModel(bits=bits, distortion=d, quantizer=check_quantizer_name(quantizer))


def lower_hull(model: TabulatedModel | ExponentialModel, sizes: Any = 1.0, *, metadata: Any = 0.0,
               menu: Sequence[int] | None = None) -> np.ndarray:
    """Boolean ``(N, K)``: which (item, bit-width) points lie on the item's lower convex hull in (cost, distortion).

    Cost is :func:`rdalloc.cost.item_cost` ``C_i(b) = n_i b + m_i [0 < b < 16]``. Per item: sort the feasible points
    by cost, keep those strictly better than every cheaper point (the decreasing branch; of equal-cost points the
    lower), then drop every point strictly above the chord of its kept neighbours until none is. These are exactly
    the points that minimize ``D_i(b) + lambda C_i(b)`` for some ``lambda >= 0`` (collinear points are kept, as
    :func:`rdalloc.allocate` keeps them). Columns follow ``menu`` (default: the table's ``bits``; required for an
    exponential model).
    """
    if isinstance(model, TabulatedModel):
        menu = model.bits if menu is None else check_menu(menu)
    elif isinstance(model, ExponentialModel):
        if menu is None:
            raise TypeError("lower_hull of an ExponentialModel needs menu= (the bit-widths to consider)")
        menu = check_menu(menu)
    else:
        raise TypeError(f"model must be a TabulatedModel or ExponentialModel, got {type(model).__name__}")
    D, ok = model.table(menu)
    N, K = D.shape
    n = check_vector(sizes, N, "sizes", positive=True)
    m = check_vector(metadata, N, "metadata")
    C = np.asarray(item_cost(np.asarray(menu, dtype=np.float64)[None, :], n[:, None], m[:, None]))
    D = np.where(ok, D, np.inf)
    order = np.lexsort((D, C), axis=-1)
    Cs, Ds = np.take_along_axis(C, order, 1), np.take_along_axis(D, order, 1)
    best_before = np.concatenate([np.full((N, 1), np.inf), np.minimum.accumulate(Ds, axis=1)[:, :-1]], axis=1)
    keep = np.isfinite(Ds) & (Ds < best_before)
    cols = np.arange(K)
    while True:
        prev = np.maximum.accumulate(np.where(keep, cols, -1), axis=1)
        prev = np.concatenate([np.full((N, 1), -1), prev[:, :-1]], axis=1)
        nxt = np.minimum.accumulate(np.where(keep, cols, K)[:, ::-1], axis=1)[:, ::-1]
        nxt = np.concatenate([nxt[:, 1:], np.full((N, 1), K)], axis=1)
        inner = keep & (prev >= 0) & (nxt < K)
        p, q = np.clip(prev, 0, K - 1), np.clip(nxt, 0, K - 1)
        Cp, Dp = np.take_along_axis(Cs, p, 1), np.take_along_axis(Ds, p, 1)
        Cn, Dn = np.take_along_axis(Cs, q, 1), np.take_along_axis(Ds, q, 1)
        with np.errstate(invalid="ignore"):
            lhs = (Ds - Dp) * (Cn - Cp)
            rhs = (Dn - Dp) * (Cs - Cp)
            above = inner & (lhs - rhs > 1e-12 * (np.abs(lhs) + np.abs(rhs)))
        if not above.any():
            break
        keep = keep & ~above
    out = np.zeros_like(keep)
    np.put_along_axis(out, order, keep, 1)
    return out


# ---- automatic choice ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ModelChoice:
    """Per item, the exponential curve where it fits, the measurements where it does not — as one table.

    Attributes:
      model: a :class:`TabulatedModel` over ``menu``: exponential items are evaluated from their curve on the fitted
        range (eviction and full precision as measured), tabulated items take their measured values and only the
        widths that were measured (``allowed`` is false elsewhere, and the cell holds NaN).
      exponential: boolean ``(N,)``: the item uses its curve.
      max_factor: ``(N,)`` worst factor between the curve and a measured quantized point (NaN if not fitted).
      tolerance: the factor an item's curve had to stay within.
      fit: the :class:`ExponentialFit` behind the choice.
    """

    model: TabulatedModel
    exponential: np.ndarray
    max_factor: np.ndarray
    tolerance: float
    fit: ExponentialFit

    @property
    def quantizer(self) -> str | None:
        return self.model.quantizer

    @property
    def exponential_items(self) -> list[int]:
        return np.flatnonzero(self.exponential).tolist()

    @property
    def tabulated_items(self) -> list[int]:
        return np.flatnonzero(~self.exponential).tolist()

    def reason(self, item: int) -> str:
        """Why item ``item`` got the model it got."""
        f = self.max_factor[item]
        beta = self.fit.beta[item]
        if self.exponential[item]:
            return f"exponential: the curve is within {f:.3g}x of every measured point (tolerance {self.tolerance:g}x)"
        if not np.isfinite(f) or not np.isfinite(beta):
            return (f"tabulated: too few usable quantized points to fit a curve "
                    f"({int(self.fit.n_points[item])} usable)")
        if beta <= 1:
            return f"tabulated: fitted beta {beta:.3g} <= 1 (distortion does not fall with bits)"
        return f"tabulated: the curve misses a measured point by {f:.3g}x (tolerance {self.tolerance:g}x)"

    def summary(self) -> str:
        n = len(self.exponential)
        lines = [f"{int(self.exponential.sum())} of {n} items use the exponential curve "
                 f"({'pooled' if self.fit.pooled else 'per-item'} beta, tolerance {self.tolerance:g}x); "
                 f"{int((~self.exponential).sum())} the measured table."]
        lines += [f"  item {i}: {self.reason(i)}" for i in self.tabulated_items]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": "model_choice", "model": self.model.to_dict(), "exponential": self.exponential.tolist(),
                "max_factor": self.max_factor.tolist(), "tolerance": self.tolerance, "fit": self.fit.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelChoice:
        if not isinstance(d, dict) or d.get("kind") != "model_choice":
            raise ValueError(f"not a model choice: kind={d.get('kind') if isinstance(d, dict) else d!r}")
        return cls(model=TabulatedModel.from_dict(d["model"]), exponential=np.asarray(d["exponential"], dtype=bool),
                   max_factor=np.asarray(d["max_factor"], dtype=np.float64), tolerance=float(d["tolerance"]),
                   fit=ExponentialFit.from_dict(d["fit"]))


def choose_model(distortions: Any, bits: Sequence[int], *, menu: Sequence[int] | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, pooled: bool = True, sample_weights: Any = None,
                 quantizer: str | None = None) -> ModelChoice:
    """Use the exponential curve for the items it fits within ``tolerance``, the measurements for the others.

    An item takes its curve when the fit gives it a finite ``beta > 1`` and
    ``max_k |ln D_ik - ln(alpha_i beta_i**(-b_k))| <= ln(tolerance)`` over its usable quantized points, i.e. the curve
    is within a factor ``tolerance`` of every measurement it replaces. With ``pooled=True`` (the default) the curve
    is the quantizer's shared-``beta`` fit, estimated from the items it describes: while some item misses the pooled
    curve by more than ``tolerance``, the worst tenth of those (at least one) leave the slope estimate and the curve
    is refitted; finally every item is judged against the final curve. So one item that decays at its own rate
    falls back to its table instead of dragging the quantizer's ``beta`` (and every other item) off.

    The result is one :class:`TabulatedModel` over ``menu`` (default: the measured ``bits``) that
    :func:`rdalloc.allocate` takes as is: at quantized widths in ``[lo, hi]`` exponential items read the curve
    (so the menu may include widths that were not measured), at 0 and 16 every item reads its measured value
    (16 not measured: 0, full precision is exact; 0 not measured: not allowed). Tabulated items are allowed only at
    measured widths (and 16).
    """
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        raise TypeError(f"tolerance must be a number (a factor >= 1), got {tolerance!r}") from None
    if not np.isfinite(tol) or tol < 1:
        raise ValueError(f"tolerance must be a finite factor >= 1, got {tolerance!r}")
    d, bits, w = check_measurements(distortions, bits, sample_weights)
    quantizer = check_quantizer_name(quantizer)
    fit = _trimmed_pooled_fit(d, bits, w, math.log(tol), quantizer) if pooled else \
        fit_validated(d, bits, w, False, quantizer)
    menu = bits if menu is None else check_menu(menu)
    max_factor = np.exp(fit.max_log_residual)
    with np.errstate(invalid="ignore"):
        expo = fit.fitted & (fit.beta > 1) & (fit.max_log_residual <= math.log(tol) + 1e-12)
    N = d.shape[0]
    table = np.full((N, len(menu)), np.nan)
    allowed = np.zeros((N, len(menu)), dtype=bool)
    for j, b in enumerate(menu):
        measured = b in bits
        col = d[:, bits.index(b)] if measured else None
        if b == 0:
            if measured:
                table[:, j], allowed[:, j] = col, True
        elif b == FULL_BITS:
            table[:, j], allowed[:, j] = (col if measured else 0.0), True
        else:
            if fit.lo <= b <= fit.hi:
                with np.errstate(invalid="ignore", over="ignore"):
                    table[expo, j] = fit.curve([b])[expo, 0]
                allowed[expo, j] = True
            if measured:
                table[~expo, j], allowed[~expo, j] = col[~expo], True
    if not allowed.any(axis=1).all():
        i = int(np.argmin(allowed.any(axis=1)))
        raise ValueError(f"menu {list(menu)} leaves item {i} ({'exponential' if expo[i] else 'tabulated'}) with no "
                         f"feasible bit-width; measured bits are {list(bits)}, fitted range [{fit.lo}, {fit.hi}]")
    model = TabulatedModel(bits=menu, distortion=table, allowed=None if allowed.all() else allowed,
                           quantizer=fit.quantizer)
    return ModelChoice(model=model, exponential=expo, max_factor=max_factor, tolerance=tol, fit=fit)
