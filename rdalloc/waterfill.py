"""Exact continuous reverse water-filling for the exponential distortion model.

Problem: minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` subject to ``sum_i n_i b_i <= P`` and ``lo_i <= b_i <= hi_i``.

KKT: with ``k_i = ln beta_i``, ``c_i = ln(w_i alpha_i k_i / n_i)`` (the log marginal value per element at ``b = 0``)
and the log water level ``mu = ln lambda``, every item takes ``b_i(mu) = clip((c_i - mu) / k_i, lo_i, hi_i)``.
``g(mu) = sum_i n_i b_i(mu)`` is continuous, non-increasing and piecewise linear with breakpoints
``u_i = c_i - k_i hi_i`` (below it the item sits at ``hi``) and ``l_i = c_i - k_i lo_i`` (above it, at ``lo``).
For a fixed active set (F free, U at ``hi``, L at ``lo``) the root of ``g(mu) = P`` has the closed form

    mu* = (sum_F n_i c_i / k_i + sum_U n_i hi_i + sum_L n_i lo_i - P) / sum_F n_i / k_i.

With a shared ``beta`` this is the water level ``theta = mu / ln beta`` of DESIGN.md §2.

Algorithm. One pass computes the per-item constants ``ck = c / k``, ``1 / k``, ``n / k`` and the all-free closed
form, the first level. Each further pass evaluates ``g(mu)`` and the slope ``s(mu) = sum_F n_i / k_i`` of its linear
piece; since ``g`` is linear on the piece, ``mu* = mu + (g(mu) - P) / s(mu)`` is the closed form above. The next
level is that Newton point when it lies inside the bracket ``[a, b]`` (``g(a) >= P >= g(b)``), else the secant point,
else (after two secant steps in a row) the midpoint: the safeguarded Newton method for continuous knapsack problems
(Cominetti, Mascarenhas and Silva, 2014), which visits each linear piece at most once. It stops when
``|g(mu) - P| <= 64 eps g_max`` — the closed form of the right piece meets the budget to rounding — or when the bracket
has shrunk to a few ulps. In practice: 1 setup pass, 2–4 evaluation passes, 1 pass to write the bits and the
certificate. Every sum is accumulated in float64. On numpy and torch each pass runs over cache-sized chunks (its
temporaries never leave the CPU cache); on JAX the passes are fused by XLA inside ``lax.while_loop``.

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
              max_iter: int = 100, reducer: Any = None) -> WaterfillResult:
    """Minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` s.t. ``sum_i n_i b_i + m_i <= B``, ``lo_i <= b_i <= hi_i``.

    Args:
      model: the exponential distortion model (per-item ``alpha``, shared or per-item ``beta``).
      sizes: ``n_i > 0``, elements per item (scalar or one per item).
      budget: ``B`` in total bits, metadata included; or ``average_bits``: ``B / sum_i n_i``.
      weights: importance ``w_i >= 0`` (zero-weight items stay at ``lo``).
      lo, hi: the box, default the model's quantized range; ``0 <= lo_i <= hi_i <= 16``.
      metadata: ``m_i >= 0`` bits each item carries, charged as a constant (every item is quantized here).
      max_iter: iteration cap (never reached in practice; status 3 if it is).
      reducer: combines per-shard sums and maxima when the items are split over processes (see
        :mod:`rdalloc.distributed`); ``None`` for a single process. Collectives per solve: 4 to set up, 1 per
        iteration, 2 to finish — each a handful of scalars.

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
    f = lambda v, name: as_float64(xp, v, device=dev, name=name)  # noqa: E731  (scalars stay 0-d)
    alpha, beta = f(model.alpha, "alpha"), f(model.beta, "beta")
    n, w, lo_, hi_, m = f(sizes, "sizes"), f(weights, "weights"), f(lo, "lo"), f(hi, "hi"), f(metadata, "metadata")
    if not is_traced(lo_) and not is_traced(hi_):
        lo_np, hi_np = np.broadcast_to(to_numpy(lo_), (n_items,)), np.broadcast_to(to_numpy(hi_), (n_items,))
        bad = lo_np > hi_np
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"lo must be <= hi, got lo={float(lo_np[i])!r} > hi={float(hi_np[i])!r} at item {i}")
        if (hi_np > FULL_BITS).any():
            raise ValueError(f"hi must be <= {FULL_BITS}, got {float(hi_np.max())!r}")
    reducer = _LOCAL if reducer is None else reducer
    total_of = lambda x: reducer.sum((xp.sum(x) if x.ndim else x * n_items,))[0]  # noqa: E731
    elements = total_of(n)
    total = check_budget(budget, average_bits, elements if is_traced(elements) else float(elements))
    B = xp.asarray(total, dtype=float_dtype(xp), device=dev)
    m_total = total_of(m)
    P = B - m_total  # payload budget
    # One pass: per-item constants ck, 1/k, n/k, and the sums that give the all-free closed form and [g_min, g_max].
    def start(alpha, beta, w, n, lo, hi):
        k, inv_k, useful, ck, nk = _constants(xp, alpha, beta, w, n)
        zero = xp.zeros_like(ck)
        sums = (xp.where(useful, n * ck, zero), xp.where(useful, zero, n * lo + zero), xp.where(useful, nk + zero, zero),
                n * xp.where(useful, hi, lo) + zero, n * lo + zero, n * hi + zero)
        at_lo_level = xp.where(useful, (ck - lo) / inv_k, -xp.inf)  # the level at which the item reaches lo
        return (ck, inv_k, nk), sums, at_lo_level  # 1/k and n/k stay scalars when beta and n are

    (ck, inv_k, nk), (s_nck, s_lo_useless, s_all, g_max, g_min, g_top), mu_min = \
        _Chunked(xp, n_items, (alpha, beta, w, n, lo_, hi_), reducer).finish(start)
    over = _Chunked(xp, n_items, (ck, inv_k, nk, n, lo_, hi_, w, alpha), reducer)
    if not is_traced(P):
        p, gmin = float(P), float(g_min)
        if p < gmin - 1e-12 * max(abs(gmin), 1.0):
            meta, top = float(m_total), float(g_top)
            raise ValueError(f"budget {float(B):.6g} bits is infeasible: the box needs between {gmin + meta:.6g} "
                             f"and {top + meta:.6g} bits (average {(gmin + meta) / float(elements):.6g} to "
                             f"{(top + meta) / float(elements):.6g})")
    saturated = P >= g_max
    at_min = P <= g_min
    infeasible = P < g_min - 1e-12 * xp.maximum(xp.abs(g_min), xp.ones_like(g_min))
    eps = float(xp.finfo(P.dtype).eps)
    tol = 64 * eps * xp.maximum(g_max, xp.ones_like(g_max))  # |g(mu) - P| at rounding level
    safe = lambda x: xp.where(x > 0, x, xp.ones_like(x))  # noqa: E731
    mu0 = (s_nck + s_lo_useless - P) / safe(s_all)  # every useful item free
    big = xp.asarray(float(xp.finfo(mu0.dtype).max) / 4, dtype=mu0.dtype, device=dev)
    zero_i = xp.asarray(0, dtype=xp.int32, device=dev)

    def evaluate(mu):
        """One pass: ``g(mu) = sum n clip(t, lo, hi)`` and its slope magnitude ``sum over free items of n / k``."""
        def at(ck, inv_k, nk, n, lo, hi, w, alpha):
            t = ck - mu * inv_k
            return n * xp.clip(t, lo, hi), xp.where((t > lo) & (t < hi), nk, xp.zeros_like(t))
        return over.sums(at)

    def cond(state):
        return ~state[6] & (state[5] < max_iter)

    def body(state):
        mu, a, b, ga, gb, it, _, stall = state
        g, s = evaluate(mu)
        found = xp.abs(g - P) <= tol
        a, ga = xp.where(g > P, mu, a), xp.where(g > P, g, ga)
        b, gb = xp.where(g < P, mu, b), xp.where(g < P, g, gb)
        found = found | ((b - a) <= 4 * eps * xp.maximum(xp.abs(a), xp.abs(b)))
        inside = lambda x: (x > a) & (x < b)  # noqa: E731
        bounded = (a > -big) & (b < big)
        newton = mu + (g - P) / safe(s)
        secant = a + (ga - P) * xp.where(bounded, b - a, xp.zeros_like(a)) / safe(ga - gb)
        use_newton = (s > 0) & inside(newton)
        use_secant = ~use_newton & bounded & inside(secant) & (stall < 2)
        far = xp.where(a > -big, a + xp.maximum(xp.abs(a), xp.ones_like(a)), b - xp.maximum(xp.abs(b), xp.ones_like(b)))
        mid = xp.where(bounded, (a + b) / 2, far)
        nxt = xp.where(use_newton, newton, xp.where(use_secant, secant, mid))
        nxt = xp.where(found, mu, nxt)
        stall = xp.where(use_secant, stall + 1, zero_i)
        return nxt, a, b, ga, gb, it + 1, found, stall

    # Bracket: a with g(a) >= P, b with g(b) <= P (open ends at -/+big until an evaluation closes them).
    state = (mu0, -big, big, g_max, g_min, zero_i, saturated | infeasible | at_min, zero_i)
    mu, _, _, _, _, iters, done, _ = while_loop(xp, cond, body, state)
    mu = xp.where(at_min & ~saturated, mu_min, mu)  # everything at lo: the lowest level that keeps it there
    level = xp.where(saturated, -xp.inf * xp.ones_like(mu), mu)  # lambda = 0 when the budget is slack

    def finish(ck, inv_k, nk, n, lo, hi, w, alpha):
        """Bits, and per item: payload, distortion and KKT violation in log marginal value.

        ``r_i = ln(marginal_i) - mu = k_i (ck_i - b_i) - mu`` is 0 on free items, >= 0 at ``hi``, <= 0 at ``lo``;
        the residual is the largest violation (rounding only, by construction).
        """
        k, useful = 1.0 / inv_k, w > 0
        bits = xp.clip(ck - mu * inv_k, lo, hi)
        bits = xp.where(saturated, xp.where(useful, hi, lo) + 0 * bits, xp.where(at_min, lo + 0 * bits, bits))
        r = xp.where(useful, k * (ck - bits) - level, -xp.inf)
        zero = xp.zeros_like(bits)
        kkt = xp.maximum(xp.where(bits < hi, xp.maximum(r, zero), zero), xp.where(bits > lo, xp.maximum(-r, zero), zero))
        return (bits,), (n * bits, w * alpha * xp.exp(-k * bits)), kkt

    (bits,), (payload, distortion), kkt = over.finish(finish)
    bits = xp.where(infeasible, xp.nan, bits)
    code = lambda v: xp.asarray(v, dtype=xp.int32, device=dev)  # noqa: E731
    status = xp.where(infeasible, code(INFEASIBLE),
                      xp.where(saturated, code(SATURATED), xp.where(done, code(OPTIMAL), code(MAX_ITER))))
    target = xp.minimum(P, g_max)
    return WaterfillResult(
        bits=bits, log_water_level=xp.where(saturated, -xp.inf * xp.ones_like(mu), mu), budget=B,
        budget_used=payload + m_total, distortion=distortion, kkt_residual=kkt,
        budget_residual=xp.abs(payload - target) / xp.maximum(xp.abs(target), xp.ones_like(target)),
        iterations=iters, status=status)


def _constants(xp, alpha, beta, w, n):
    """``k = ln beta``, ``1/k``, ``w > 0``, ``ck = ln(w alpha k / n) / k`` (``-inf`` where ``w = 0``) and ``n / k``."""
    k = xp.log(beta)
    inv_k = 1.0 / k
    useful = w > 0
    prod = w * alpha * k / n
    ck = xp.where(useful, xp.log(xp.where(useful, prod, xp.ones_like(prod))) * inv_k, -xp.inf)
    return k, inv_k, useful, ck, n * inv_k


class _Chunked:
    """Passes over the items, in cache-sized chunks on eager backends (numpy, torch, array_api_strict), whole on JAX.

    A chunk's temporaries stay in the CPU cache, so a pass of a dozen elementwise operations costs about one trip
    through memory; XLA fuses the same operations on JAX. Sums are float64 over chunks (a different summation order
    than one ``sum``, both accurate to rounding).
    """

    CHUNK = 1 << 15

    def __init__(self, xp, n_items: int, arrays: tuple, reducer: Any = None):
        self.xp, self.n, self.arrays, self.reducer = xp, n_items, arrays, reducer or _LOCAL
        whole = is_jax(xp) or n_items <= self.CHUNK or any(is_traced(a) for a in arrays)
        self.slices = [slice(None)] if whole else [slice(i, min(i + self.CHUNK, n_items)) for i in range(0, n_items, self.CHUNK)]

    def _parts(self, sl):
        return tuple(a if a.ndim == 0 else a[sl] for a in self.arrays)

    def sums(self, fn) -> tuple:
        """``tuple(sum(x) for x in fn(*chunk))`` accumulated over all chunks."""
        xp, total = self.xp, None
        for sl in self.slices:
            part = tuple(xp.sum(x) for x in fn(*self._parts(sl)))
            total = part if total is None else tuple(a + b for a, b in zip(total, part))
        return self.reducer.sum(total)

    def finish(self, fn):
        """``fn`` returns (arrays, sums, maxima) per chunk: each array concatenated, sums summed, the max of maxima."""
        xp, arrays, sums, peak = self.xp, None, None, None
        for sl in self.slices:
            v, s, mx = fn(*self._parts(sl))
            if arrays is None:  # whole outputs, filled chunk by chunk (scalars stay scalars)
                arrays = v if len(self.slices) == 1 else tuple(
                    x if x.ndim == 0 else xp.empty((self.n,), dtype=x.dtype, device=_device(x)) for x in v)
            if len(self.slices) > 1:
                for out, x in zip(arrays, v):
                    if x.ndim:
                        out[sl] = x
            s = tuple(xp.sum(x) for x in s)
            sums = s if sums is None else tuple(a + b for a, b in zip(sums, s))
            peak = xp.max(mx) if peak is None else xp.maximum(peak, xp.max(mx))
        return arrays, self.reducer.sum(sums), self.reducer.max(peak)


class _Local:
    """The single-process reducer: sums and maxima are already global."""

    @staticmethod
    def sum(values: tuple) -> tuple:
        return values

    @staticmethod
    def max(value: Any) -> Any:
        return value


_LOCAL = _Local()


def _device(x: Any):
    from array_api_compat import device

    try:
        return device(x)
    except Exception:
        return None
