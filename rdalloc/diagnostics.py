"""Fit diagnostics a user can read: is ``D(b) = alpha * beta**(-b)`` a good description of the measurements?

:func:`fit_report` fits (see :mod:`rdalloc.fit`) and reports in one call; :func:`diagnose` reports on a fit already
made. The report holds both fits — per item (each its own ``beta``) and pooled (one ``beta`` per quantizer) — with,
for each, ``beta`` and its confidence interval, ``R^2`` in log space and the largest log residual (per item and
overall), the per-bit ratios of the measurements, a test of whether the items share one ``beta``, and *flags*, each
with an explanation:

* ``eviction_off_curve`` — the measured ``D(0)`` differs from the curve's extrapolation ``alpha`` by more than
  ``eviction_factor`` (the factor is ``alpha / D(0)``; eviction is kept as measured in the model regardless);
* ``floor`` — an item stops improving at high bits: the per-bit ratio of its top quantized step,
  ``r_top = (D(b_{K-1}) / D(b_K))**(1 / (b_K - b_{K-1}))``, has ``ln r_top < floor_fraction * median ln r`` of its
  lower quantized steps;
* ``non_monotone`` — a measured distortion grows with more bits (``D(b_{k+1}) > (1 + monotone_rtol) D(b_k)``,
  over every measured width, 0 and 16 included);
* ``too_few_points`` — fewer than ``min_points`` usable quantized points (with 2 the line passes through both, so
  nothing checks it and ``beta`` has no confidence interval);
* ``poor_fit`` — the curve misses a measured point by more than the factor ``max_factor``, or ``R^2 < min_r2``;
* ``zero_measured`` — a quantized point measured as exactly 0 (left out of the log-space fit);
* ``beta_heterogeneous`` (no item) — the F-test of one shared ``beta`` against one per item rejects at
  ``shared_beta_p``.

Per-bit ratio between consecutive measured widths: ``(D(b_k) / D(b_{k+1}))**(1 / (b_{k+1} - b_k))`` — comparable with
``beta`` whatever the spacing (``inf`` when ``D(b_{k+1}) = 0 < D(b_k)``, NaN when both are 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from ._checks import check_measurements, check_quantizer_name
from .fit import DEFAULT_TOLERANCE, ExponentialFit, fit_validated

__all__ = ["Tolerances", "Flag", "FitReport", "per_bit_ratios", "shared_beta_pvalue", "diagnose", "fit_report",
           "FLAG_KINDS"]

FLAG_KINDS = ("eviction_off_curve", "floor", "non_monotone", "too_few_points", "poor_fit", "zero_measured",
              "beta_heterogeneous")


@dataclass(frozen=True)
class Tolerances:
    """Thresholds of the flags (see the module docstring); ``level`` is the confidence level of the intervals."""

    eviction_factor: float = 2.0
    floor_fraction: float = 0.5
    min_points: int = 3
    max_factor: float = DEFAULT_TOLERANCE
    min_r2: float = 0.95
    monotone_rtol: float = 0.0
    shared_beta_p: float = 1e-3
    level: float = 0.95

    def __post_init__(self):
        rules = {"eviction_factor": (lambda v: v >= 1, ">= 1"), "floor_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
                 "min_points": (lambda v: v >= 2 and float(v).is_integer(), "an integer >= 2"),
                 "max_factor": (lambda v: v >= 1, ">= 1"), "min_r2": (lambda v: v <= 1, "<= 1"),
                 "monotone_rtol": (lambda v: v >= 0, ">= 0"), "shared_beta_p": (lambda v: 0 < v < 1, "in (0, 1)"),
                 "level": (lambda v: 0 < v < 1, "in (0, 1)")}
        for name, (ok, want) in rules.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
            if not ok(value):  # NaN fails every rule; +-inf is allowed where the rule allows it (a flag switched off)
                raise ValueError(f"{name} must be {want}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Tolerances:
        return cls(**d)


@dataclass(frozen=True)
class Flag:
    """One finding: ``kind`` (one of :data:`FLAG_KINDS`), the item (``None`` for the whole fit), the number that
    triggered it (``value``) and a sentence saying what it means."""

    kind: str
    item: int | None
    value: float
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "item": self.item, "value": float(self.value), "message": self.message}

    @classmethod
    def from_dict(cls, d: dict) -> Flag:
        return cls(kind=d["kind"], item=d["item"], value=float(d["value"]), message=d["message"])


# ---- pure pieces --------------------------------------------------------------------------------------------------
def _ratios(d: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    step = np.diff(np.asarray(bits, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ratios may exceed float64
        return (d[:, :-1] / d[:, 1:]) ** (1.0 / step)[None, :]


def per_bit_ratios(distortions: Any, bits: Sequence[int]) -> np.ndarray:
    """``(N, K-1)`` per-bit ratios ``(D(b_k) / D(b_{k+1}))**(1 / (b_{k+1} - b_k))`` between consecutive widths."""
    d, bits, _ = check_measurements(distortions, bits)
    return _ratios(d, bits)


def shared_beta_pvalue(per_item: ExponentialFit, pooled: ExponentialFit) -> float:
    """p-value of the F-test of one shared ``beta`` (``pooled``) against one per item (``per_item``), same data.

    ``F = ((SSR_pooled - SSR_items) / (M - 1)) / (SSR_items / (n - N - M))`` with ``n`` usable points, ``N`` items
    with points and ``M`` of them with a slope of their own (two distinct widths). NaN without degrees of freedom.
    """
    has = pooled.fitted
    own = per_item.fitted & has
    n, N, M = int(pooled.n_points[has].sum()), int(has.sum()), int(own.sum())
    df1, df2 = M - 1, n - N - M
    if df1 <= 0 or df2 <= 0:
        return float("nan")
    ssr_items = float(np.where(own, per_item.ssr, 0.0)[has].sum())
    ssr_pooled = float(pooled.ssr[has].sum())
    extra = max(ssr_pooled - ssr_items, 0.0)
    if ssr_items <= 0:
        return 0.0 if extra > 0 else 1.0
    return float(stats.f.sf((extra / df1) / (ssr_items / df2), df1, df2))


def _fmt(x: float, digits: int = 3) -> str:
    x = None if x is None else float(x)
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _exp(x: float) -> float:
    """``e**x`` as a float, ``inf`` beyond float64's range (measurements may span it)."""
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(x)))


def _flags(fit: ExponentialFit, per_item: ExponentialFit, pooled: ExponentialFit, pvalue: float,
           tol: Tolerances) -> list[Flag]:
    """Every flag, in item order (the whole-fit flag last). Detection is vectorized; messages are written only for
    the items flagged."""
    d, bits = fit.distortions, fit.bits
    N = fit.n_items
    q = fit.quantized
    qi = np.flatnonzero(q)
    qbits = [bits[k] for k in qi]
    ratios = _ratios(d, bits)
    found: list[tuple[int, int, Flag]] = []  # (item, order of kind, flag)
    order = {kind: j for j, kind in enumerate(FLAG_KINDS)}

    def add(i, kind, value, message):
        found.append((i, order[kind], Flag(kind, i, float(value), message)))

    # too few points
    n_pts = fit.n_points
    for i in np.flatnonzero(n_pts < tol.min_points):
        usable = [b for b, u in zip(bits, fit.used[i]) if u]
        why = ("the curve passes through them exactly, so nothing checks it" if n_pts[i] == 2
               else "no curve of its own can be fitted")
        add(int(i), "too_few_points", n_pts[i],
            f"item {i} has {n_pts[i]} usable quantized point(s) (bits {usable}; zeros excluded), fewer than "
            f"{tol.min_points}: {why}, and beta has no confidence interval; measure more bit-widths")
    # zeros at quantized widths
    zero = (d == 0) & q[None, :]
    for i in np.flatnonzero(zero.any(axis=1)):
        zb = [bits[k] for k in np.flatnonzero(zero[i])]
        add(int(i), "zero_measured", len(zb),
            f"item {i} measures exactly 0 at bits {zb}: below the measurement's resolution, so left out of the "
            f"log-space fit (ln 0 = -inf) rather than given an invented floor")
    # non-monotone over every measured width
    rising = d[:, 1:] > (1.0 + tol.monotone_rtol) * d[:, :-1]
    for i in np.flatnonzero(rising.any(axis=1)):
        row, ks = d[i], np.flatnonzero(rising[i])
        pairs = ", ".join(f"D({bits[k]})={_fmt(row[k])} < D({bits[k + 1]})={_fmt(row[k + 1])}" for k in ks[:3])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            worst = float(np.max(row[ks + 1] / row[ks]))
        add(int(i), "non_monotone", worst,
            f"item {i} is non-monotone: {pairs}{' ...' if len(ks) > 3 else ''} (more bits, more distortion; "
            f"measurement noise or a quantizer artefact — check the data)")
    # floor: the top quantized step against the median of the lower ones
    if len(qi) >= 3:
        with np.errstate(divide="ignore", invalid="ignore"):
            lr = np.log(ratios[:, qi[:-1]])  # per-bit log ratios between consecutive quantized widths
        top, below = lr[:, -1], np.where(np.isfinite(lr[:, :-1]), lr[:, :-1], np.nan)
        has_ref = np.isfinite(below).any(axis=1)
        ref = np.full(N, np.nan)
        if has_ref.any():
            ref[has_ref] = np.nanmedian(below[has_ref], axis=1)
        with np.errstate(invalid="ignore"):
            floor = has_ref & ~np.isnan(top) & (ref > 0) & (top < tol.floor_fraction * ref)
        b0, b1 = qbits[-2], qbits[-1]
        for i in np.flatnonzero(floor):
            gain = _exp(top[i])
            add(int(i), "floor", gain,
                f"item {i} stops improving at high bits: {b0}->{b1} gains {_fmt(gain)}x per bit against "
                f"{_fmt(_exp(ref[i]))}x per bit below it (a floor near D={_fmt(d[i, qi[-1]])}); the curve "
                f"overstates what the top bits buy")
    # eviction off the curve
    if bits[0] == 0:
        e, a = d[:, 0], fit.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(e > 0, a / np.where(e > 0, e, 1.0), np.inf)
            off = np.isfinite(a) & ((factor > tol.eviction_factor) | (factor < 1.0 / tol.eviction_factor))
        for i in np.flatnonzero(off):
            f = float(factor[i])
            where, times = ("below", f) if f > 1 else ("above", 1.0 / f if f > 0 else math.inf)
            add(int(i), "eviction_off_curve", f,
                f"item {i}: measured D(0)={_fmt(e[i])} is {_fmt(times)}x {where} the curve's extrapolation "
                f"alpha={_fmt(a[i])} (the 0->{bits[1]} step is {_fmt(ratios[i, 0])}x per bit against "
                f"beta={_fmt(fit.beta[i])}); the model keeps eviction as measured, off the curve")
    # poor fit
    res, r2 = fit.max_log_residual, fit.r2
    with np.errstate(invalid="ignore"):
        bad_factor = res > math.log(tol.max_factor) + 1e-12
        bad_r2 = (fit.dof > 0) & (n_pts >= 3) & (r2 < tol.min_r2)
    for i in np.flatnonzero(np.isfinite(res) & (bad_factor | bad_r2)):
        k = int(np.nanargmax(np.abs(fit.log_residuals[i])))
        factor = _exp(res[i])
        add(int(i), "poor_fit", factor,
            f"item {i}: the {'pooled' if fit.pooled else 'per-item'} curve misses the measurement at b={bits[k]} by "
            f"{_fmt(factor)}x, R^2={_fmt(r2[i], 4)} (tolerance {tol.max_factor:g}x, R^2 >= {tol.min_r2:g}); the "
            f"exponential does not describe this item — choose_model() tabulates it")
    out = [f for _, _, f in sorted(found, key=lambda t: (t[0], t[1]))]
    if np.isfinite(pvalue) and pvalue < tol.shared_beta_p:
        b = per_item.beta[per_item.fitted]
        out.append(Flag("beta_heterogeneous", None, pvalue,
                        f"the items do not share one beta (F-test p={pvalue:.2g} < {tol.shared_beta_p:g}): per-item "
                        f"betas range {_fmt(b.min())}..{_fmt(b.max())} around the pooled "
                        f"{_fmt(pooled.beta[pooled.fitted][0])}; fit per item or use choose_model()"))
    return out


# ---- the report ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FitReport:
    """Diagnostics of a fit: the diagnosed ``fit`` (the one the flags judge), both the ``per_item`` and ``pooled``
    fits of the same data, the per-bit ``ratios`` ``(N, K-1)``, the shared-beta F-test ``shared_beta_pvalue``, the
    ``flags`` and the ``tolerances`` used. ``text()`` renders it; ``to_dict()`` gives plain data."""

    fit: ExponentialFit
    per_item: ExponentialFit
    pooled: ExponentialFit
    ratios: np.ndarray
    shared_beta_pvalue: float
    flags: tuple[Flag, ...]
    tolerances: Tolerances

    @property
    def ok(self) -> bool:
        """No flags."""
        return not self.flags

    def flags_for(self, item: int | None = None, kind: str | None = None) -> list[Flag]:
        """Flags of one item (``None``: all) and/or one kind."""
        return [f for f in self.flags if (item is None or f.item == item) and (kind is None or f.kind == kind)]

    def kinds(self) -> set[str]:
        return {f.kind for f in self.flags}

    def _pooled_summary(self) -> dict:
        p = self.pooled
        if not p.fitted.any():
            return {"beta": None, "beta_ci": [None, None], "r2_within": None, "max_log_residual": None, "dof": 0}
        j = int(np.argmax(p.fitted))
        ci = p.beta_interval(self.tolerances.level)[j]
        return {"beta": float(p.beta[j]), "beta_ci": [float(ci[0]), float(ci[1])], "r2_within": p.r2_overall,
                "max_log_residual": float(np.nanmax(p.max_log_residual)), "dof": int(p.dof[j])}

    def to_dict(self) -> dict:
        lvl = self.tolerances.level
        pi, po = self.per_item, self.pooled
        ci_i = pi.beta_interval(lvl)
        bits = self.fit.bits
        nan = lambda x: None if not np.isfinite(x) and not np.isinf(x) else float(x)  # noqa: E731
        kinds: dict[int, list[str]] = {}
        for fl in self.flags:
            if fl.item is not None:
                kinds.setdefault(fl.item, []).append(fl.kind)
        cols = {"beta": pi.beta, "beta_lo": ci_i[:, 0], "beta_hi": ci_i[:, 1], "alpha": pi.alpha, "r2": pi.r2,
                "max_log_residual": pi.max_log_residual, "pooled_alpha": po.alpha, "pooled_r2": po.r2,
                "pooled_max_log_residual": po.max_log_residual}  # each property computed once
        cols = {k: [nan(x) for x in v] for k, v in cols.items()}
        n_points, n_zero = pi.n_points.tolist(), pi.n_zero.tolist()
        ratios = [[nan(r) for r in row] for row in self.ratios]
        items = []
        for i in range(self.fit.n_items):
            row = {k: v[i] for k, v in cols.items()}
            row["beta_ci"] = [row.pop("beta_lo"), row.pop("beta_hi")]
            items.append({"item": i, **row, "n_points": int(n_points[i]), "n_zero": int(n_zero[i]),
                          "ratios": ratios[i], "flags": kinds.get(i, [])})
        return {"quantizer": self.fit.quantizer, "bits": list(bits), "quantized_range": [self.fit.lo, self.fit.hi],
                "n_items": self.fit.n_items, "diagnosed": "pooled" if self.fit.pooled else "per_item",
                "level": lvl, "pooled": self._pooled_summary(),
                "per_item_r2_overall": nan(pi.r2_overall) if pi.fitted.any() else None,
                "shared_beta_pvalue": nan(self.shared_beta_pvalue),
                "ratio_steps": [[bits[k], bits[k + 1]] for k in range(len(bits) - 1)], "items": items,
                "flags": [f.to_dict() for f in self.flags], "tolerances": self.tolerances.to_dict()}

    def text(self, max_rows: int = 40, max_flags: int = 3) -> str:
        """A readable report: the pooled fit, the shared-beta test, one row per item (flagged items first shown,
        then the others up to ``max_rows``) and the flags with their explanations, grouped by kind (``max_flags``
        explained per kind, the other items of that kind listed)."""
        lvl = self.tolerances.level
        f, pi, po = self.fit, self.per_item, self.pooled
        bits = f.bits
        pct = f"{100 * lvl:g}%"
        lines = [f"Distortion fit{f' for quantizer {f.quantizer!r}' if f.quantizer else ''}: {f.n_items} items at "
                 f"bits {list(bits)} (curve fitted on {f.lo}..{f.hi}; flags judge the "
                 f"{'pooled' if f.pooled else 'per-item'} fit)"]
        s = self._pooled_summary()
        if s["beta"] is None:
            lines.append("pooled: not enough usable points to fit")
        else:
            lo, hi = s["beta_ci"]
            lines.append(f"pooled:   beta = {_fmt(s['beta'], 4)} [{_fmt(lo, 4)}, {_fmt(hi, 4)}] ({pct} CI), "
                         f"within-R^2 = {_fmt(s['r2_within'], 4)}, largest |log residual| = "
                         f"{_fmt(s['max_log_residual'])} (x{_fmt(_exp(s['max_log_residual']))})")
        if pi.fitted.any():
            b = pi.beta[pi.fitted]
            lines.append(f"per item: beta {_fmt(float(b.min()))}..{_fmt(float(b.max()))} (median "
                         f"{_fmt(float(np.median(b)))}), overall R^2 = {_fmt(pi.r2_overall, 4)}")
        p = self.shared_beta_pvalue
        verdict = ("n/a" if not np.isfinite(p) else "consistent with one beta" if p >= self.tolerances.shared_beta_p
                   else "items differ")
        lines.append(f"shared beta: F-test p = {_fmt(p, 3)} ({verdict})")
        steps = [f"{bits[k]}->{bits[k + 1]}" for k in range(len(bits) - 1)]
        head = (f"{'item':>5}  {'beta [' + pct + ' CI]':<24} {'R^2':>7} {'max x':>7}  {'pool R^2':>8} {'pool x':>7}  "
                + " ".join(f"{s_:>7}" for s_ in steps) + "  flags")
        lines += ["", "per item (own beta | pooled beta); per-bit ratios D(b)/D(b') ** (1/(b'-b)):", head]
        ci = pi.beta_interval(lvl)
        with np.errstate(over="ignore"):  # (residuals may span more than float64: shown as inf)
            r2_i, x_i, r2_p, x_p = pi.r2, np.exp(pi.max_log_residual), po.r2, np.exp(po.max_log_residual)
        flagged = sorted({fl.item for fl in self.flags if fl.item is not None})
        flagged_set = set(flagged)
        rows = flagged + [i for i in range(f.n_items) if i not in flagged_set]
        shown = rows[:max(max_rows, 0)]
        for i in sorted(shown):
            beta = f"{_fmt(pi.beta[i])} [{_fmt(ci[i, 0])}, {_fmt(ci[i, 1])}]"
            lines.append(f"{i:>5}  {beta:<24} {_fmt(r2_i[i], 4):>7} {_fmt(x_i[i]):>7}  "
                         f"{_fmt(r2_p[i], 4):>8} {_fmt(x_p[i]):>7}  "
                         + " ".join(f"{_fmt(r):>7}" for r in self.ratios[i])
                         + "  " + ",".join(sorted({fl.kind for fl in self.flags_for(i)})))
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} more items (to_dict() has them all)")
        lines += ["", f"flags ({len(self.flags)}):" if self.flags else "flags: none"]
        for kind in FLAG_KINDS:
            group = self.flags_for(kind=kind)
            shown = group[:max(max_flags, 1)]
            lines += [f"  - [{kind}] {fl.message}" for fl in shown]
            if len(group) > len(shown):
                rest = [fl.item for fl in group[len(shown):]]
                listed = ", ".join(str(i) for i in rest[:20]) + (", ..." if len(rest) > 20 else "")
                lines.append(f"  - [{kind}] ... and {len(rest)} more item{'s' if len(rest) > 1 else ''}: {listed}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def diagnose(fit: ExponentialFit, *, tolerances: Tolerances | None = None) -> FitReport:
    """Diagnose ``fit`` (from :func:`rdalloc.fit.fit_exponential`): refits the same data the other way (per item or
    pooled) for the comparison, and raises the flags described in the module docstring against ``fit``."""
    if not isinstance(fit, ExponentialFit):
        raise TypeError(f"fit must be an ExponentialFit (from rdalloc.fit.fit_exponential), got {type(fit).__name__}")
    tol = Tolerances() if tolerances is None else tolerances
    if not isinstance(tol, Tolerances):
        raise TypeError(f"tolerances must be a Tolerances, got {type(tolerances).__name__}")
    per_item = fit if not fit.pooled else fit_validated(fit.distortions, fit.bits, fit.weights, False, fit.quantizer)
    pooled = fit if fit.pooled else fit_validated(fit.distortions, fit.bits, fit.weights, True, fit.quantizer)
    p = shared_beta_pvalue(per_item, pooled)
    flags = _flags(fit, per_item, pooled, p, tol)
    return FitReport(fit=fit, per_item=per_item, pooled=pooled, ratios=_ratios(fit.distortions, fit.bits),
                     shared_beta_pvalue=p, flags=tuple(flags), tolerances=tol)


def fit_report(distortions: Any, bits: Sequence[int], *, pooled: bool = True, sample_weights: Any = None,
               quantizer: str | None = None, tolerances: Tolerances | None = None) -> FitReport:
    """Fit and diagnose in one call. Unlike :func:`rdalloc.fit.fit_exponential` it does not raise for items that
    cannot be fitted: they are flagged (``too_few_points``) and their numbers are NaN.

    >>> report = fit_report(D, [0, 2, 3, 4, 6, 8, 16], quantizer="kivi")   # doctest: +SKIP
    >>> print(report.text()); report.to_dict()["pooled"]["beta"]            # doctest: +SKIP
    """
    d, bits, w = check_measurements(distortions, bits, sample_weights)
    return diagnose(fit_validated(d, bits, w, pooled, check_quantizer_name(quantizer)), tolerances=tolerances)
