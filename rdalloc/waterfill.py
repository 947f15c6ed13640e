"""Exact continuous reverse water-filling for the exponential distortion model.

Problem: minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` subject to ``sum_i n_i b_i <= P`` and ``lo_i <= b_i <= hi_i``.

KKT: with ``k_i = ln beta_i``, ``c_i = ln(w_i alpha_i k_i / n_i)`` (the log marginal value per element at ``b = 0``)
and the log water level ``mu = ln lambda``, every item takes ``b_i(mu) = clip((c_i - mu) / k_i, lo_i, hi_i)``.
``g(mu) = sum_i n_i b_i(mu)`` is continuous, non-increasing and piecewise linear with breakpoints
``u_i = c_i - k_i hi_i`` (below it the item sits at ``hi``) and ``l_i = c_i - k_i lo_i`` (above it, at ``lo``).
For a fixed active set (F free, U at ``hi``, L at ``lo``) the root of ``g(mu) = P`` has the closed form

    mu* = (sum_F n_i c_i / k_i + sum_U n_i hi_i + sum_L n_i lo_i - P) / sum_F n_i / k_i.

With a shared ``beta`` this is the water level ``theta = mu / ln beta`` of DESIGN.md §2.

Algorithm (one pass over the items per iteration; every sum accumulated in float64). Each pass evaluates, at the
current level ``mu``, ``g(mu)``, the closed form ``mu*`` of its active set and the two breakpoints that enclose
``mu``. If ``mu*`` lies between them the active set is the right one and ``mu*`` is the exact root: stop.
Otherwise the bracket ``[a, b]`` with ``g(a) >= P >= g(b)`` shrinks to ``mu`` and the next level is the Newton point
``mu*`` when it lies inside the bracket, else the secant point, else (after two secant steps in a row) the midpoint.
This is the safeguarded Newton method for continuous knapsack problems (Cominetti, Mascarenhas and Silva, 2014): it
visits each linear piece at most once and in practice stops after 3-8 passes. The iteration count is reported.

Metadata: the continuous relaxation treats every item as quantized, so ``P = B - sum_i m_i``. Use
:func:`rdalloc.allocate` for integer bits, menus, eviction and metadata that depends on the bit-width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ._checks import check_budget, check_shape, check_values
from ._namespace import as_float64, float_dtype, is_jax, is_traced, namespace, to_numpy, while_loop
from .models import FULL_BITS, ExponentialModel

__all__ = ["waterfill", "WaterfillResult", "OPTIMAL", "SATURATED", "INFEASIBLE", "MAX_ITER"]

OPTIMAL, SATURATED, INFEASIBLE, MAX_ITER = 0, 1, 2, 3
_STATUS = {OPTIMAL: "optimal", SATURATED: "budget at or above the maximum: every item at hi",
           INFEASIBLE: "budget below the minimum", MAX_ITER: "iteration limit reached"}


@dataclass(frozen=True)
class WaterfillResult:
    """Solution of :func:`waterfill` and its certificate.

    bits: optimal real-valued bits per item. log_water_level: ``mu = ln lambda`` (``-inf`` when the budget is slack).
    budget / budget_used: total bits asked and spent, metadata included. distortion: ``sum_i w_i D_i(b_i)``.
    kkt_residual: largest violation of the KKT conditions in log marginal value (``|ln(marginal_i / lambda)|`` on
    free items, one-sided at the bounds). budget_residual: ``|spent - target| / max(target, 1)``.
    iterations: passes over the items. status: 0 optimal, 1 saturated, 2 infeasible, 3 iteration limit.
    Fields are 0-d arrays of the input backend (so the result can leave ``jax.jit``); ``to_dict`` gives floats.
    """

    bits: Any
    log_water_level: Any
    budget: Any
    budget_used: Any
    distortion: Any
    kkt_residual: Any
    budget_residual: Any
    iterations: Any
    status: Any

    @property
    def water_level(self) -> Any:
        return math.exp(float(self.log_water_level))

    def to_dict(self) -> dict:
        out = {f.name: float(to_numpy(getattr(self, f.name))) for f in fields(self) if f.name != "bits"}
        out["iterations"], out["status"] = int(out["iterations"]), int(out["status"])
        out["status_message"] = _STATUS[out["status"]]
        out["bits"] = to_numpy(self.bits).astype(float).tolist()
        return out


_registered = False


def _register_pytree() -> None:
    """Let a :class:`WaterfillResult` be returned from ``jax.jit`` (done on first use with JAX arrays)."""
    global _registered
    if not _registered:
        import jax

        names = [f.name for f in fields(WaterfillResult)]
        jax.tree_util.register_dataclass(WaterfillResult, data_fields=names, meta_fields=[])
        _registered = True


def waterfill(model: ExponentialModel, sizes: Any, budget: Any = None, *, average_bits: Any = None,
              weights: Any = 1.0, lo: Any = None, hi: Any = None, metadata: Any = 0.0,
              max_iter: int = 100) -> WaterfillResult:
    """Minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` s.t. ``sum_i n_i b_i + m_i <= B``, ``lo_i <= b_i <= hi_i``.

    Args:
      model: the exponential distortion model (per-item ``alpha``, shared or per-item ``beta``).
      sizes: ``n_i > 0``, elements per item (scalar or one per item).
      budget: ``B`` in total bits, metadata included; or ``average_bits``: ``B / sum_i n_i``.
      weights: importance ``w_i >= 0`` (zero-weight items stay at ``lo``).
      lo, hi: the box, default the model's quantized range; ``0 <= lo_i <= hi_i <= 16``.
      metadata: ``m_i >= 0`` bits each item carries, charged as a constant (every item is quantized here).
      max_iter: iteration cap (never reached in practice; status 3 if it is).

    Returns a :class:`WaterfillResult`. Raises ``ValueError`` for invalid or infeasible input (unless traced under
    ``jax.jit``, where an infeasible budget gives status 2 and NaN bits).
    """
    if not isinstance(model, ExponentialModel):
        raise TypeError(f"model must be an ExponentialModel, got {type(model).__name__}")
    xp = namespace(model.alpha, sizes, weights, lo, hi, metadata)
    if is_jax(xp):
        _register_pytree()
    dev = _device(model.alpha)
    n_items = model.n_items
    lo = model.lo if lo is None else lo
    hi = model.hi if hi is None else hi
    for name, value in (("sizes", sizes), ("weights", weights), ("lo", lo), ("hi", hi), ("metadata", metadata)):
        check_shape(name, value, n_items)
    check_values("sizes", sizes, positive=True)
    check_values("weights", weights, nonnegative=True)
    check_values("metadata", metadata, nonnegative=True)
    check_values("lo", lo, nonnegative=True)
    check_values("hi", hi, nonnegative=True)
    ones = xp.ones((n_items,), dtype=float_dtype(xp), device=dev)
    f = lambda v, name: as_float64(xp, v, device=dev, name=name) * ones  # noqa: E731
    alpha, beta = f(model.alpha, "alpha"), f(model.beta, "beta")
    n, w, lo_, hi_, m = f(sizes, "sizes"), f(weights, "weights"), f(lo, "lo"), f(hi, "hi"), f(metadata, "metadata")
    if not is_traced(lo_) and not is_traced(hi_):
        bad = to_numpy(lo_) > to_numpy(hi_)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"lo must be <= hi, got lo={float(to_numpy(lo_)[i])!r} > hi={float(to_numpy(hi_)[i])!r} "
                             f"at item {i}")
        if (to_numpy(hi_) > FULL_BITS).any():
            raise ValueError(f"hi must be <= {FULL_BITS}, got {float(to_numpy(hi_).max())!r}")
    elements = xp.sum(n)
    total = check_budget(budget, average_bits, elements if is_traced(elements) else float(elements))
    B = xp.asarray(total, dtype=float_dtype(xp), device=dev)
    P = B - xp.sum(m)  # payload budget

    k = xp.log(beta)
    useful = w > 0
    neg_inf = xp.asarray(-xp.inf, dtype=k.dtype, device=dev)
    c = xp.where(useful, xp.log(xp.where(useful, w, ones)) + xp.log(alpha) + xp.log(k) - xp.log(n), neg_inf)
    u = xp.where(useful, c - k * hi_, neg_inf)  # mu <= u_i: item at hi
    l = xp.where(useful, c - k * lo_, neg_inf)  # mu >= l_i: item at lo
    g_max = xp.sum(xp.where(useful, n * hi_, n * lo_))
    g_min = xp.sum(n * lo_)
    if not is_traced(P):
        p, gmin, gmax = float(P), float(g_min), float(g_max)
        scale = max(abs(gmin), 1.0)
        if p < gmin - 1e-12 * scale:
            used_meta = float(xp.sum(m))
            raise ValueError(f"budget {float(B):.6g} bits is infeasible: the box needs between {gmin + used_meta:.6g} "
                             f"and {float(xp.sum(n * hi_)) + used_meta:.6g} bits (average "
                             f"{(gmin + used_meta) / float(elements):.6g} to "
                             f"{(float(xp.sum(n * hi_)) + used_meta) / float(elements):.6g})")

    pos_inf = -neg_inf
    a0 = xp.min(xp.where(useful, u, pos_inf))  # at mu <= a0 every useful item is at hi
    b0 = xp.max(xp.where(useful, l, neg_inf))  # at mu >= b0 every item is at lo
    saturated = P >= g_max
    at_min = P <= g_min
    infeasible = P < g_min - 1e-12 * xp.maximum(xp.abs(g_min), xp.ones_like(g_min))
    # All-free closed form as the first guess (items with w = 0 sit at lo).
    inv_k = xp.where(useful, n / k, 0 * n)
    s_free = xp.sum(inv_k)
    safe_s = xp.where(s_free > 0, s_free, xp.ones_like(s_free))
    guess = (xp.sum(xp.where(useful, n * c / k, 0 * n)) + xp.sum(xp.where(useful, 0 * n, n * lo_)) - P) / safe_s
    a_fin = xp.where(saturated | at_min, xp.zeros_like(a0), a0)
    b_fin = xp.where(saturated | at_min, xp.ones_like(b0), b0)
    mu0 = xp.clip(guess, a_fin, b_fin) if not is_jax(xp) else xp.minimum(xp.maximum(guess, a_fin), b_fin)
    zero_i = xp.asarray(0, dtype=xp.int32, device=dev)

    def evaluate(mu):
        t = xp.where(useful, (c - mu) / k, neg_inf)
        at_hi = t >= hi_
        at_lo = (t <= lo_) & ~at_hi
        free = ~at_hi & ~at_lo
        g = xp.sum(xp.where(at_hi, n * hi_, xp.where(at_lo, n * lo_, n * t)))
        s_f = xp.sum(xp.where(free, inv_k, 0 * n))
        s_fc = xp.sum(xp.where(free, n * c / k, 0 * n))
        const = xp.sum(xp.where(at_hi, n * hi_, 0 * n)) + xp.sum(xp.where(at_lo, n * lo_, 0 * n))
        left = xp.maximum(xp.max(xp.where(u <= mu, u, neg_inf)), xp.max(xp.where(l <= mu, l, neg_inf)))
        right = xp.minimum(xp.min(xp.where(u >= mu, u, pos_inf)), xp.min(xp.where(l >= mu, l, pos_inf)))
        newton = (s_fc + const - P) / xp.where(s_f > 0, s_f, xp.ones_like(s_f))
        return g, s_f, newton, left, right

    def cond(state):
        mu, a, b, ga, gb, it, done, stall = state
        return ~done & (it < max_iter)

    def body(state):
        mu, a, b, ga, gb, it, done, stall = state
        g, s_f, newton, left, right = evaluate(mu)
        slack = 1e-13 * xp.maximum(xp.abs(mu), xp.ones_like(mu))
        found = ((s_f > 0) & (newton >= left - slack) & (newton <= right + slack)) | (g == P)
        a, ga = xp.where(g > P, mu, a), xp.where(g > P, g, ga)
        b, gb = xp.where(g < P, mu, b), xp.where(g < P, g, gb)
        inside = lambda x: (x > a) & (x < b)  # noqa: E731
        secant = a + (ga - P) * (b - a) / xp.where(ga > gb, ga - gb, xp.ones_like(ga))
        use_newton = (s_f > 0) & inside(newton)
        use_secant = ~use_newton & inside(secant) & (stall < 2)
        nxt = xp.where(use_newton, newton, xp.where(use_secant, secant, (a + b) / 2))
        nxt = xp.where(found, xp.where(s_f > 0, newton, mu), nxt)
        stall = xp.where(use_secant, stall + 1, zero_i)
        return nxt, a, b, ga, gb, it + 1, found, stall

    state = (mu0, a_fin, b_fin, xp.where(saturated | at_min, g_max, g_max), g_min, zero_i,
             saturated | at_min | infeasible, zero_i)
    mu, _, _, _, _, iters, done, _ = while_loop(xp, cond, body, state)
    mu = xp.where(saturated, a0, xp.where(at_min, b0, mu))
    t = xp.where(useful, (c - mu) / k, neg_inf)
    bits = xp.minimum(xp.maximum(t, lo_), hi_)
    bits = xp.where(saturated & useful, hi_, bits)
    code = lambda v: xp.asarray(v, dtype=xp.int32, device=dev)  # noqa: E731
    status = xp.where(infeasible, code(INFEASIBLE),
                      xp.where(saturated, code(SATURATED), xp.where(done, code(OPTIMAL), code(MAX_ITER))))
    bits = xp.where(infeasible, xp.nan * ones, bits)
    log_level = xp.where(saturated & (P > g_max), neg_inf, mu)

    payload = xp.sum(n * bits)
    target = xp.minimum(P, g_max)
    marginal = xp.where(useful, c - k * bits, neg_inf)  # ln of the marginal value per element
    below_hi = xp.where((bits < hi_) & useful, xp.maximum(marginal - log_level, 0 * n), 0 * n)
    above_lo = xp.where((bits > lo_) & useful, xp.maximum(log_level - marginal, 0 * n), 0 * n)
    kkt = xp.max(xp.maximum(below_hi, above_lo))
    return WaterfillResult(
        bits=bits, log_water_level=log_level, budget=B, budget_used=payload + xp.sum(m),
        distortion=xp.sum(w * alpha * xp.exp(-k * bits)), kkt_residual=kkt,
        budget_residual=xp.abs(payload - target) / xp.maximum(xp.abs(target), xp.ones_like(target)),
        iterations=iters, status=status)


def _device(x: Any):
    from array_api_compat import device

    try:
        return device(x)
    except Exception:
        return None
