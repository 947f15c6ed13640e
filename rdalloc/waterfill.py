"""Exact continuous reverse water-filling for the exponential distortion model.

Problem: minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` subject to ``sum_i n_i b_i <= P`` and ``lo_i <= b_i <= hi_i``.

KKT: with ``k_i = ln beta_i``, ``c_i = ln(w_i alpha_i k_i / n_i)`` (the log marginal value per element at ``b = 0``)
and the log water level ``mu = ln lambda``, every item takes ``b_i(mu) = clip((c_i - mu) / k_i, lo_i, hi_i)``.
``g(mu) = sum_i n_i b_i(mu)`` is continuous, non-increasing and piecewise linear with breakpoints
``u_i = c_i - k_i hi_i`` (below it the item sits at ``hi``) and ``l_i = c_i - k_i lo_i`` (above it, at ``lo``).
For a fixed active set (F free, U at ``hi``, L at ``lo``) the root of ``g(mu) = P`` has the closed form

    mu* = (sum_F n_i c_i / k_i + sum_U n_i hi_i + sum_L n_i lo_i - P) / sum_F n_i / k_i.

With a shared ``beta`` this is the water level ``theta = mu / ln beta`` of docs/design.md §2.

Algorithm. Each evaluation of ``g(mu)`` also gives the slope ``s(mu) = sum_F n_i / k_i`` of its linear piece; since
``g`` is linear on the piece, ``mu* = mu + (g(mu) - P) / s(mu)`` is the closed form above. The next level is that
Newton point when it lies inside the bracket ``[a, b]`` (``g(a) >= P >= g(b)``), else the secant point, else (after
two secant steps in a row) the midpoint: the safeguarded Newton method for continuous knapsack problems (Cominetti,
Mascarenhas and Silva, 2014), which visits each linear piece at most once. It stops when ``|g(mu) - P| <= 64 eps
g_max`` — the closed form of the right piece meets the budget to rounding — or when the bracket has shrunk to a few
ulps. Every sum is accumulated in float64.

Passes over the items. Eager single-process solves of ``N >= 2**16`` items (numpy, torch, array_api_strict) first
solve a strided sample of about ``N**(2/3)`` items for a bracket ``[a, b]`` of the level. Pass 1 computes the per-item
constants ``ck = c / k`` and ``1 / k`` and, with the chunk still in cache, classifies every item against ``[a, b]``:
``g(a)``, the slope of the items free on all of it, and the few percent with a breakpoint inside, kept. Newton then
runs on the kept items only (``g`` on ``[a, b]`` is ``g(a)`` plus their change and a linear term); a root outside
``[a, b]`` (a misleading sample) falls back to Newton over all items. Pass 2 writes the bits and the certificate.
Both passes run over chunks whose temporaries stay in the CPU cache: 10–14 ``exp``-passes in all at ``N = 10**7``
(``benchmarks/solver.py``). Traced solves (JAX) of ``N >= 2**16`` items cannot compact (shapes are static): they run
Newton over all items from the sampled level (3 evaluations where the all-free level takes 4), the passes fused by
XLA inside ``lax.while_loop``. Smaller problems and sharded solves (``reducer``) run Newton from the all-free level
over all items (2–4 iterations).

Metadata: the continuous relaxation treats every item as quantized, so ``P = B - sum_i m_i``. Use
:func:`rdalloc.allocate` for integer bits, menus, eviction and metadata that depends on the bit-width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import array_api_compat

from ._checks import check_budget, check_ordered, check_shape, check_values
from ._namespace import as_float64, float_dtype, is_jax, is_traced, namespace, to_numpy, while_loop
from .models import FULL_BITS, ExponentialModel
from .status import INFEASIBLE, MAX_ITER, MESSAGES, OPTIMAL, SATURATED

__all__ = ["waterfill", "WaterfillResult", "OPTIMAL", "SATURATED", "INFEASIBLE", "MAX_ITER"]



@dataclass(frozen=True)
class WaterfillResult:
    """Solution of :func:`waterfill` and its certificate.

    bits: optimal real-valued bits per item. log_water_level: ``mu = ln lambda`` (``-inf`` when the budget is slack).
    budget / budget_used: total bits asked and spent, metadata included. distortion: ``sum_i w_i D_i(b_i)``.
    kkt_residual: largest violation of the KKT conditions in log marginal value (``|ln(marginal_i / lambda)|`` on
    free items, one-sided at the bounds). budget_residual: ``|spent - target| / max(target, 1)``.
    iterations: evaluations of ``g`` (the classifying pass counts as one; the rest run on the kept items). status:
    a code of :mod:`rdalloc.status` (``OPTIMAL``, ``SATURATED``, ``INFEASIBLE`` or ``MAX_ITER``).
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
        out["status_message"] = MESSAGES[out["status"]]
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
      max_iter: iteration cap (never reached in practice; status ``MAX_ITER`` if it is).
      reducer: combines per-shard sums and maxima when the items are split over processes (see
        :mod:`rdalloc.distributed`); ``None`` for a single process. Collectives per solve: 4 to set up, 1 per
        iteration, 2 to finish — each a handful of scalars.

    Returns a :class:`WaterfillResult`. Raises ``ValueError`` for invalid or infeasible input (unless traced under
    ``jax.jit``, where an infeasible budget gives status ``INFEASIBLE`` and NaN bits).
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
    check_values("hi", hi, nonnegative=True, at_most=FULL_BITS)
    f = lambda v, name: as_float64(xp, v, device=dev, name=name)  # noqa: E731  (scalars stay 0-d)
    alpha, beta = f(model.alpha, "alpha"), f(model.beta, "beta")
    n, w, lo_, hi_, m = f(sizes, "sizes"), f(weights, "weights"), f(lo, "lo"), f(hi, "hi"), f(metadata, "metadata")
    check_ordered(lo_, hi_, n_items)
    reducer = _LOCAL if reducer is None else reducer
    static = is_jax(xp) or any(is_traced(x) for x in (alpha, beta, n, w, lo_, hi_, m))  # no host syncs
    total_of = lambda x: reducer.sum((xp.sum(x) if x.ndim else x * n_items,))[0]  # noqa: E731
    elements = total_of(n)
    total = check_budget(budget, average_bits, elements if is_traced(elements) else float(elements))
    B = xp.asarray(total, dtype=float_dtype(xp), device=dev)
    m_total = total_of(m)
    P = B - m_total  # payload budget
    # ``mu_min`` (the lowest level keeping every item at lo) matters only when P == g_min: eager single-process
    # solves compute it in a separate pass in that case; otherwise it rides along with the first pass.
    local = not static and reducer is _LOCAL
    all_useful = local and (w.ndim == 0 and float(w) > 0 or w.ndim and bool(xp.min(w) > 0))
    box_scalar = lo_.ndim == 0 and hi_.ndim == 0
    # Eager single-process solves of many items first solve a strided sample for a bracket [a, b] of the level, so
    # that pass 1 can also classify the items against it (see _sample_bracket).
    bracket = _sample_bracket(xp, n_items, alpha, beta, w, n, lo_, hi_, P, elements, max_iter) \
        if local and n_items >= _SAMPLED else None

    # Pass 1: per-item constants ck, 1/k, and the sums that give the all-free closed form and [g_min, g_max].
    def start(alpha, beta, w, n, lo, hi):
        k, inv_k, useful, ck, nk = _constants(xp, alpha, beta, w, n, all_useful)
        if is_jax(xp):  # materialize the logs once: XLA would otherwise recompute them inside every reduction
            import jax

            ck, inv_k = jax.lax.optimization_barrier((ck, inv_k))
            useful, nk = w > 0, n * inv_k
        zero = xp.zeros_like(ck)
        if all_useful:  # with a bracket the all-free level (the first two sums) is not needed
            per = lambda x: x if n.ndim else x + zero  # noqa: E731  (n and x both 0-d: one term per item)
            sums = ((zero[0], zero[0]) if bracket is not None else (_dot(xp, n, ck), _dot(xp, n, per(inv_k)))) + \
                (() if box_scalar else (_dot(xp, n, per(hi)), _dot(xp, n, per(lo))))
        else:
            sums = (xp.where(useful, n * ck, zero), xp.where(useful, nk + zero, zero),
                    n * xp.where(useful, hi, lo) + zero, n * lo + zero, xp.where(useful, zero, n * lo + zero))
        level = None if local else xp.where(useful, (ck - lo) / inv_k, -xp.inf)  # the level where it reaches lo
        kept = ()
        if bracket is not None:  # classify against [a, b] while the chunk is in cache
            kept, more = _classify(xp, bracket[0], bracket[1], ck, inv_k, n, lo, hi)
            sums = sums + more
        return (ck, inv_k), sums, level, kept  # 1/k stays a scalar when beta is

    (ck, inv_k), sums, mu_min, kept = _Chunked(xp, n_items, (alpha, beta, w, n, lo_, hi_), reducer).run(start)
    s_nck, s_all = sums[0], sums[1]
    if all_useful:  # no item sits at lo for want of weight
        g_max, g_min, sums = (hi_ * elements, lo_ * elements, sums[2:]) if box_scalar else (sums[2], sums[3], sums[4:])
        s_lo_useless = 0 * g_min
    else:
        g_max, g_min, s_lo_useless, sums = sums[2], sums[3], sums[4], sums[5:]
    over = _Chunked(xp, n_items, (ck, inv_k, n, lo_, hi_), reducer)
    if not is_traced(P):
        p, gmin = float(P), float(g_min)
        if p < gmin - 1e-12 * max(abs(gmin), 1.0):
            meta, top = float(m_total), float(total_of(n * hi_ + xp.zeros_like(ck)))
            raise ValueError(f"budget {float(B):.6g} bits is infeasible: the box needs between {gmin + meta:.6g} "
                             f"and {top + meta:.6g} bits (average {(gmin + meta) / float(elements):.6g} to "
                             f"{(top + meta) / float(elements):.6g})")
    saturated = P >= g_max
    at_min = P <= g_min
    infeasible = P < g_min - 1e-12 * xp.maximum(xp.abs(g_min), xp.ones_like(g_min))
    if local:
        mu_min = -xp.inf * xp.ones_like(P)
        if bool(at_min & ~saturated):
            mu_min = over.run(lambda ck, inv_k, n, lo, hi: ((), (), xp.where(ck > -xp.inf, (ck - lo) / inv_k,
                                                                                -xp.inf), ()))[2]
    eps = float(xp.finfo(P.dtype).eps)
    tol = 64 * eps * xp.maximum(g_max, xp.ones_like(g_max))  # |g(mu) - P| at rounding level
    mu0 = (s_nck + s_lo_useless - P) / _safe(xp, s_all)  # every useful item free
    big = xp.asarray(float(xp.finfo(mu0.dtype).max) / 4, dtype=mu0.dtype, device=dev)
    zero_i = xp.asarray(0, dtype=xp.int32, device=dev)
    done0 = saturated | infeasible | at_min
    # Bracket: a with g(a) >= P, b with g(b) <= P (open ends at -/+big until an evaluation closes them).
    if bracket is not None:
        start_level = bracket[2]
    elif static and reducer is _LOCAL and n_items >= _SAMPLED:  # traced: the sampled level as Newton's start
        mu_s, ok = _sample_level(xp, n_items, alpha, beta, w, n, lo_, hi_, P, elements, max_iter)[:2]
        start_level = xp.where(ok, mu_s, mu0)
    else:
        start_level = mu0
    state = (start_level, -big, big, g_max, g_min, zero_i, done0, zero_i)
    if bracket is not None and not bool(done0):
        state = _solve_in_bracket(xp, bracket, sums, kept, P, tol, eps, state, max_iter)
    if isinstance(state, tuple):  # safeguarded Newton over all items (from the all-free level or a checked bracket)
        mu, iters, done = _newton(xp, lambda mu: over.sums(_g_and_slope(xp, mu)), P, tol, eps, state, max_iter)
    else:
        mu, iters, done = state.mu, state.iters, state.done
    mu = xp.where(at_min & ~saturated, mu_min, mu)  # everything at lo: the lowest level that keeps it there
    level = xp.where(saturated, -big, mu)  # lambda = 0 when the budget is slack (-big keeps the residual finite)
    force = static or bool(saturated | at_min)  # eager: skip the fix-ups the data does not need

    def finish(ck, inv_k, n, lo, hi):
        """Bits, and per item: payload, distortion and KKT violation in log marginal value.

        ``e_i = ln(marginal_i) = k_i (ck_i - b_i)``; ``w_i D_i(b_i) = (n_i / k_i) exp(e_i)``. ``r_i = e_i - mu`` is 0 on
        free items, >= 0 at ``hi``, <= 0 at ``lo``; the residual is the largest violation (rounding only).
        """
        bits = _clip(xp, ck - mu * inv_k, lo, hi)
        if force:
            useful = ck > -xp.inf
            bits = xp.where(saturated, xp.where(useful, hi, lo) + 0 * bits, xp.where(at_min, lo + 0 * bits, bits))
        e = (1.0 / inv_k) * (ck - bits)
        r = e - level
        if all_useful:  # r is finite: masks multiply
            kkt = xp.max(_sel(xp, bits < hi, r)), -xp.min(_sel(xp, bits > lo, r))
            kkt = xp.maximum(xp.maximum(kkt[0], kkt[1]), xp.zeros_like(kkt[0]))
        else:
            zero = xp.zeros_like(bits)
            kkt = xp.maximum(xp.maximum(xp.where(bits < hi, r, zero), xp.where(bits > lo, -r, zero)), zero)
        return (bits,), (_dot(xp, n, bits), _dot(xp, n, inv_k * xp.exp(e))), kkt, ()

    (bits,), (payload, distortion), kkt, _ = over.run(finish)
    if static:
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


_SAMPLED = 1 << 16  # eager single-process solves from this many items on start from a sampled bracket


def _dot(xp, n, x):
    """``sum(n * x)`` without the temporary; a 0-d factor multiplies the other's sum (both 0-d: ``n * x``)."""
    if n.ndim == 0:
        return n * xp.sum(x)
    if x.ndim == 0:
        return x * xp.sum(n)
    # torch's dot is fused; numpy's goes to a threaded BLAS that can take milliseconds per call on a busy machine
    return n @ x if array_api_compat.is_torch_namespace(xp) else xp.sum(n * x)


def _clip(xp, x, lo, hi):
    """``min(max(x, lo), hi)``; numpy's own clip for 0-d bounds is the fastest (and slow for array bounds)."""
    if lo.ndim == 0 and hi.ndim == 0 and array_api_compat.is_numpy_namespace(xp):
        return xp.clip(x, lo, hi)
    return xp.minimum(xp.maximum(x, lo), hi)


def _sel(xp, mask, x):
    """``x`` where ``mask`` else 0, for finite ``x`` (numpy's ``where`` on a random mask costs several passes)."""
    if array_api_compat.is_numpy_namespace(xp):
        return x * xp.astype(mask, x.dtype)
    return xp.where(mask, x, xp.zeros_like(x))


def _safe(xp, x):
    return xp.where(x > 0, x, xp.ones_like(x))


def _g_and_slope(xp, mu):
    """Per item ``n clip(t, lo, hi)`` and, on free items, ``n / k``: their sums are ``g(mu)`` and its slope size."""
    def at(ck, inv_k, n, lo, hi):
        t = ck - mu * inv_k
        return _dot(xp, n, _clip(xp, t, lo, hi)), _dot(xp, n, _sel(xp, (t > lo) & (t < hi), inv_k))
    return at


def _newton(xp, evaluate, P, tol, eps, state, max_iter):
    """Safeguarded Newton on the piecewise-linear ``g`` (module docstring); ``evaluate(mu) = (g(mu), slope size)``.

    ``state = (mu, a, b, g(a), g(b), iterations, done, stall)``; returns ``(mu, iterations, done)``.
    """
    big = -state[1]

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
        newton = mu + (g - P) / _safe(xp, s)
        secant = a + (ga - P) * xp.where(bounded, b - a, xp.zeros_like(a)) / _safe(xp, ga - gb)
        use_newton = (s > 0) & inside(newton)
        use_secant = ~use_newton & bounded & inside(secant) & (stall < 2)
        far = xp.where(a > -big, a + xp.maximum(xp.abs(a), xp.ones_like(a)), b - xp.maximum(xp.abs(b), xp.ones_like(b)))
        mid = xp.where(bounded, (a + b) / 2, far)
        nxt = xp.where(use_newton, newton, xp.where(use_secant, secant, mid))
        nxt = xp.where(found, mu, nxt)
        stall = xp.where(use_secant, stall + 1, xp.zeros_like(stall))
        return nxt, a, b, ga, gb, it + 1, found, stall

    mu, _, _, _, _, iters, done, _ = while_loop(xp, cond, body, state)
    return mu, iters, done


@dataclass
class _Solved:
    mu: Any
    iters: Any
    done: Any


def _sample_level(xp, n_items, alpha, beta, w, n, lo, hi, P, elements, max_iter):
    """The exact level ``mu_s`` of a strided sample of about ``N**(2/3)`` items, its budget scaled by its share of
    the elements, with what a bracket needs: ``(mu_s, ok, slope, spread)``; no host syncs (``ok`` is False when the
    sample is degenerate: budget outside its box, nothing useful, or Newton not converged)."""
    stride = max(n_items // max(int(n_items ** (2 / 3)), 1 << 13), 2)
    cut = lambda x: x if x.ndim == 0 else x[::stride]  # noqa: E731
    alpha, beta, w, n, lo, hi = (cut(x) for x in (alpha, beta, w, n, lo, hi))
    _, inv_k, useful, ck, _ = _constants(xp, alpha, beta, w, n, False)
    ones = xp.ones_like(ck)
    n_tot = xp.sum(n * ones)
    P_s = P * (n_tot / elements)
    gmin, gmax = xp.sum(n * lo * ones), xp.sum(n * xp.where(useful, hi, lo) * ones)
    s_all = xp.sum(xp.where(useful, n * inv_k * ones, 0 * ones))
    inside = (P_s > gmin) & (P_s < gmax) & (s_all > 0)
    mu0 = (xp.sum(xp.where(useful, n * ck, 0 * ones)) + xp.sum(xp.where(useful, 0 * ones, n * lo * ones)) - P_s) / \
        _safe(xp, s_all)
    eps = float(xp.finfo(P.dtype).eps)
    big = xp.asarray(float(xp.finfo(P.dtype).max) / 4, dtype=P.dtype, device=_device(P))
    zero_i = xp.asarray(0, dtype=xp.int32, device=_device(P))
    sample = lambda mu: tuple(xp.sum(x) for x in _g_and_slope(xp, mu)(ck, inv_k, n, lo, hi))  # noqa: E731
    mu_s, _, done = _newton(xp, sample, P_s, 64 * eps * gmax, eps, (mu0, -big, big, gmax, gmin, zero_i, ~inside,
                                                                    zero_i), max_iter)
    t = ck - mu_s * inv_k
    bits = xp.minimum(xp.maximum(t, lo), hi)
    slope = xp.sum(xp.where((t > lo) & (t < hi), n * inv_k * ones, 0 * ones))
    spread = 8 * xp.sqrt(xp.sum((n * (bits - P_s / n_tot)) ** 2))  # 8 standard errors of the sampled g
    return mu_s, inside & done & (slope > 0) & (xp.abs(mu_s) < big), slope, spread


def _sample_bracket(xp, n_items, alpha, beta, w, n, lo, hi, P, elements, max_iter):
    """A bracket ``(a, b, mu_s)`` for the level, ``mu_s`` the sampled level (:func:`_sample_level`) and ``a, b`` 8
    standard errors of the sampled ``g`` either side of it along the sample's slope; ``None`` if the sample is
    degenerate. Only a guess: pass 1 checks it."""
    mu_s, ok, slope, spread = _sample_level(xp, n_items, alpha, beta, w, n, lo, hi, P, elements, max_iter)
    if not bool(ok):
        return None
    return mu_s - spread / slope, mu_s + spread / slope, mu_s


def _classify(xp, a, b, ck, inv_k, n, lo, hi):
    """Items with a breakpoint inside ``[a, b]`` (kept: ck, 1/k, n, lo, hi), and sums ``g(a)``, ``S_free`` (the slope
    size of the items free on all of ``[a, b]``)."""
    ta, tb = ck - a * inv_k, ck - b * inv_k
    free = (tb >= lo) & (ta <= hi)
    keep = xp.nonzero((ta > lo) & (tb < hi) & ~free)[0]  # few: one scan of the mask, then gathers
    kept = tuple(x if x.ndim == 0 else xp.take(x, keep, axis=0) for x in (ck, inv_k, n, lo, hi))
    return kept, (_dot(xp, n, _clip(xp, ta, lo, hi)), _dot(xp, n, _sel(xp, free, inv_k)))


def _solve_in_bracket(xp, bracket, sums, kept, P, tol, eps, state, max_iter):
    """The level from pass 1's classification against ``[a, b]``: on the bracket
    ``g(mu) = g(a) - (mu - a) S_free + sum_kept n (clip(t(mu)) - clip(t(a)))``, solved by Newton on the kept items
    (:class:`_Solved`). If the root is outside ``[a, b]`` (a misleading sample), the checked end narrows the bracket
    and the Newton start state for a solve over all items is returned."""
    a, b, mu_s = bracket
    g_a, s_free = sums
    dev = _device(P)
    zero_i, one, no = (xp.asarray(v, dtype=xp.int32, device=dev) for v in (0, 1, 0))
    no = no != 0
    base = g_a - xp.sum(_g_and_slope(xp, a)(*kept)[0])

    def compact(mu):
        g, s = (xp.sum(x) for x in _g_and_slope(xp, mu)(*kept))
        return base + g - (mu - a) * s_free, s + s_free

    gb = compact(b)[0]
    if bool(g_a < P):  # the root lies below a
        return (state[0], state[1], a, state[3], g_a, one, no, zero_i)
    if bool(gb > P):  # the root lies above b
        return (state[0], b, state[2], gb, state[4], one, no, zero_i)
    mu, iters, done = _newton(xp, compact, P, tol, eps, (mu_s, a, b, g_a, gb, one, no, zero_i), max_iter)
    return _Solved(mu, iters, done)


def _constants(xp, alpha, beta, w, n, all_useful):
    """``k = ln beta``, ``1/k``, ``w > 0``, ``ck = ln(w alpha k / n) / k`` (``-inf`` where ``w = 0``) and ``n / k``."""
    k = xp.log(beta)
    inv_k = 1.0 / k
    if all_useful:
        return k, inv_k, None, xp.log(w * alpha * k / n) * inv_k, None
    useful = w > 0
    prod = w * alpha * k / n
    ck = xp.where(useful, xp.log(xp.where(useful, prod, xp.ones_like(prod))) * inv_k, -xp.inf)
    return k, inv_k, useful, ck, n * inv_k


class _Chunked:
    """Passes over the items, in cache-sized chunks on eager backends (numpy, torch, array_api_strict), whole on JAX.

    A chunk's temporaries stay in the CPU cache (L2/L3), so a pass of a dozen elementwise operations costs about one
    trip through memory; XLA fuses the same operations on JAX. Sums are float64 over chunks (a different summation
    order than one ``sum``, both accurate to rounding).
    """

    CHUNK = 1 << 17  # numpy: fewer, larger chunks (its per-call overhead dominates below this)
    CHUNK_THREADED = 1 << 15  # torch: below its intra-op parallel grain, so no thread hand-offs per operation

    def __init__(self, xp, n_items: int, arrays: tuple, reducer: Any = None):
        self.xp, self.n, self.arrays, self.reducer = xp, n_items, arrays, reducer or _LOCAL
        size = self.CHUNK if array_api_compat.is_numpy_namespace(xp) else self.CHUNK_THREADED
        whole = is_jax(xp) or n_items <= size or any(is_traced(a) for a in arrays)
        self.slices = [slice(None)] if whole else [slice(i, min(i + size, n_items)) for i in range(0, n_items, size)]

    def _parts(self, sl):
        return tuple(a if a.ndim == 0 else a[sl] for a in self.arrays)

    def sums(self, fn) -> tuple:
        """``tuple(sum(x) for x in fn(*chunk))`` accumulated over all chunks."""
        xp, total = self.xp, None
        for sl in self.slices:
            part = tuple(xp.sum(x) for x in fn(*self._parts(sl)))
            total = part if total is None else tuple(a + b for a, b in zip(total, part))
        return self.reducer.sum(total)

    def run(self, fn):
        """``fn`` returns (arrays, sums, maxima, kept) per chunk: each array concatenated, sums summed, the max of
        maxima (``None``: none), the kept arrays (any length per chunk) concatenated."""
        xp, arrays, sums, peak, kept = self.xp, None, None, None, []
        for sl in self.slices:
            v, s, mx, k = fn(*self._parts(sl))
            if arrays is None:  # whole outputs, filled chunk by chunk (scalars stay scalars)
                arrays = v if len(self.slices) == 1 else tuple(
                    x if x.ndim == 0 else xp.empty((self.n,), dtype=x.dtype, device=_device(x)) for x in v)
            if len(self.slices) > 1:
                for out, x in zip(arrays, v):
                    if x.ndim:
                        out[sl] = x
            s = tuple(xp.sum(x) for x in s)
            sums = s if sums is None else tuple(a + b for a, b in zip(sums, s))
            if mx is not None:
                peak = xp.max(mx) if peak is None else xp.maximum(peak, xp.max(mx))
            kept.append(k)
        kept = tuple(x if x.ndim == 0 or len(kept) == 1 else xp.concat([p[j] for p in kept])
                     for j, x in enumerate(kept[0]))
        return arrays, self.reducer.sum(sums), None if peak is None else self.reducer.max(peak), kept


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
