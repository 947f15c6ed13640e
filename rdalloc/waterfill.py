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
Both passes run over chunks whose temporaries stay in the CPU cache (timings: ``benchmarks/solver.py``). Traced
solves (JAX) of ``N >= 2**16`` items cannot compact (shapes are static): they run Newton over all items from the
sampled level, the passes fused by XLA inside ``lax.while_loop``. Smaller problems and sharded solves (``reducer``)
run Newton from the all-free level over all items.

Groups (``groups=``: one budget per group of items). The same Newton runs on every group at once, one level and one
bracket per group, each sum a segment sum, one pass over all items per iteration until every group has stopped by
its own rule (no sampled bracket, no chunks); each group's bits equal its own solve's to rounding.

Metadata: the continuous relaxation treats every item as quantized, so ``P = B - sum_i m_i``. Use
:func:`rdalloc.allocate` for integer bits, menus, eviction and metadata that depends on the bit-width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._checks import waterfill_iv
from ._namespace import (
    device,
    is_jax,
    is_traced,
    masked,
    positive_or_one,
    register_pytree,
    segment_max,
    segment_sum,
    to_numpy,
    while_loop,
)
from .models import ExponentialModel
from .status import CHECK_FAILED, INFEASIBLE, MAX_ITER, MESSAGES, OPTIMAL, SATURATED

__all__ = ["waterfill", "WaterfillResult", "OPTIMAL", "SATURATED", "INFEASIBLE", "MAX_ITER"]


@dataclass(frozen=True)
class WaterfillResult:
    """Solution of :func:`waterfill` and its certificate.

    bits: optimal real-valued bits per item. log_water_level: ``mu = ln lambda`` (``-inf`` when the budget is slack).
    budget / budget_used: total bits asked and spent, metadata included. distortion: ``sum_i w_i D_i(b_i)``.
    kkt_residual: largest violation of the KKT conditions in log marginal value (``|ln(marginal_i / lambda)|`` on
    free items, one-sided at the bounds). budget_residual: ``|spent - target| / (target + metadata)``, the
    miss relative to the whole spend the answer should reach (the payload budget ``B - metadata`` is known to a
    rounding of ``B`` only, so a payload that is a sliver of a metadata-dominated budget is judged at ``B``'s scale).
    iterations: evaluations of ``g`` (the classifying pass counts as one; the rest run on the kept items). status:
    a code of :mod:`rdalloc.status` (``OPTIMAL``, ``SATURATED``, ``INFEASIBLE``, ``MAX_ITER`` or ``CHECK_FAILED``).
    Fields are 0-d arrays of the input backend (so the result can leave ``jax.jit``), one per group for a grouped
    solve; ``to_dict`` gives floats (lists when grouped).
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
        """``lambda = exp(mu)``: a float, or a numpy array of one per group."""
        level = to_numpy(self.log_water_level)
        return math.exp(float(level)) if level.ndim == 0 else np.exp(level)

    def to_dict(self) -> dict:
        plain = lambda x, kind: to_numpy(x).astype(kind).tolist()  # noqa: E731  (a number, or a list per group)
        out = {f.name: plain(getattr(self, f.name), float) for f in fields(self) if f.name != "bits"}
        out["iterations"], out["status"] = plain(self.iterations, int), plain(self.status, int)
        status = out["status"]
        out["status_message"] = MESSAGES[status] if isinstance(status, int) else [MESSAGES[c] for c in status]
        out["bits"] = plain(self.bits, float)
        return out


def waterfill(model: ExponentialModel, sizes: Any, budget: Any = None, *, average_bits: Any = None,
              groups: Any = None, weights: Any = 1.0, lo: Any = None, hi: Any = None, metadata: Any = 0.0,
              max_iter: int = 100, reducer: Any = None) -> WaterfillResult:
    """Minimize ``sum_i w_i alpha_i beta_i**(-b_i)`` s.t. ``sum_i n_i b_i + m_i <= B``, ``lo_i <= b_i <= hi_i``.

    Args:
      model: the exponential distortion model (per-item ``alpha``, shared or per-item ``beta``).
      sizes: ``n_i > 0``, elements per item (scalar or one per item).
      budget: ``B`` in total bits, metadata included; or ``average_bits``: ``B / sum_i n_i``.
      groups: ``None``, or one integer group id ``g_i`` in ``[0, G)`` per item, every group non-empty: then
        ``budget`` (or ``average_bits``, per element of the group) is a vector of ``G`` budgets and every group is
        solved on its own, ``sum_{g_i = g} n_i b_i + m_i <= B_g``, all in one vectorized call (one Newton per group,
        its sums segment sums). Group ids rather than a leading batch axis: groups may differ in size and items
        keep any order (one budget per (layer, kv-head) over its tokens, or per sequence of a batch); ``G`` is the
        budget's length, so it is static under ``jax.jit``.
      weights: importance ``w_i >= 0`` (zero-weight items stay at ``lo``).
      lo, hi: the box, default the model's quantized range; ``0 <= lo_i <= hi_i <= 16``.
      metadata: ``m_i >= 0`` bits each item carries, charged as a constant (every item is quantized here).
      max_iter: iteration cap (never reached in practice; status ``MAX_ITER`` if it is).
      reducer: combines per-shard sums and maxima when the items are split over processes (see
        :mod:`rdalloc.distributed`); ``None`` for a single process. Collectives per solve: 4 to set up, 1 per
        iteration, 2 to finish — each a handful of scalars.

    Returns a :class:`WaterfillResult` (grouped: every field but ``bits`` one per group, each equal to the group's
    own solve up to rounding). Raises ``ValueError`` for invalid or infeasible input, naming the group when grouped
    (unless traced under ``jax.jit``, where an infeasible budget gives status ``INFEASIBLE`` and NaN bits); for
    ``beta <= 1 + 1e-6`` (no precision left in the bits: use :func:`rdalloc.allocate`) or sizes whose total bits
    overflow float64; and, the final check, for a spend above ``B (1 + 1e-9)`` (traced: status ``CHECK_FAILED``,
    which also marks an answer that claims the optimum without meeting the budget to ``1e-9``).
    Results do not depend on the units of ``sizes``/``budget`` or of ``weights``/``alpha`` (tolerances are relative;
    ``c_i`` is summed from logs, so any positive finite ``w_i alpha_i / n_i`` is representable).

    Two items of 64 elements, the first four times as important, at 3 bits on average: each factor of ``beta = 4``
    in importance is worth one bit.

    >>> import numpy as np
    >>> r = waterfill(ExponentialModel(np.array([4.0, 1.0]), beta=4.0), 64, average_bits=3.0)
    >>> r.bits.tolist(), int(r.status) == OPTIMAL
    ([3.5, 2.5], True)
    """
    xp, alpha, beta, n, w, lo, hi, m, groups, elements, B = waterfill_iv(model, sizes, budget, average_bits, weights,
                                                                         lo, hi, metadata, groups, reducer)
    if is_jax(xp):
        register_pytree(WaterfillResult)
    if groups is not None:
        return _waterfill_grouped(xp, (alpha, beta, w, n, lo, hi), m, groups, B, elements, max_iter)
    reducer = _LOCAL if reducer is None else reducer
    n_items = model.n_items
    traced = is_jax(xp) or any(is_traced(x) for x in (alpha, beta, n, w, lo, hi, m))  # no host syncs
    local = not traced and reducer is _LOCAL
    m_total = reducer.sum((xp.sum(m) if m.ndim else m * n_items,))[0]
    P = B - m_total  # payload budget
    # Eager single-process solves of many items first solve a strided sample for a bracket of the level, so that
    # the first pass can also classify the items against it.
    bracket = _sample_bracket(xp, n_items, (alpha, beta, w, n, lo, hi), P, elements, max_iter) \
        if local and n_items >= _SAMPLED else None
    first = _first_pass(xp, n_items, (alpha, beta, w, n, lo, hi), elements, bracket, local, reducer)
    if not traced:
        _raise_if_infeasible(xp, B, P, first, n, hi, m_total, elements, reducer)
    over = _Chunked(xp, n_items, (first.ck, first.inv_k, n, lo, hi), reducer)
    saturated = P >= first.g_max
    at_min = P <= first.g_min
    infeasible = P < first.g_min - _INFEASIBLE_RTOL * (first.g_min + m_total)
    # the level is sought for the budget within the boxes' reach (beyond it the answer is a box end, and a budget
    # far beyond, per element, would overflow the start level)
    reach = xp.maximum(xp.minimum(P, first.g_max), first.g_min)
    start = _start_level(xp, first, bracket, n_items, (alpha, beta, w, n, lo, hi), reach, elements, max_iter,
                         traced and reducer is _LOCAL)
    solved = _solve_level(xp, first, bracket, over, reach, start, saturated | infeasible | at_min, max_iter)
    mu_min = first.mu_min if not local else _lowest_level_at_lo(xp, over, P, at_min & ~saturated)
    mu = xp.where(at_min & ~saturated, mu_min, solved.mu)  # everything at lo: the lowest level that keeps it there
    level = xp.where(saturated, -_big(xp, P), mu)  # lambda = 0 when the budget is slack (finite residual)
    force = traced or bool(saturated | at_min)  # eager: skip the fix-ups the data does not need
    out = over.run(_final_pass(xp, mu, level, saturated, at_min, force, first.all_useful))
    (bits,) = out.arrays
    if not traced and not bool(xp.abs(out.sums["distortion"]) < xp.inf):
        raise ValueError("the weighted distortion of the answer, sum_i w_i alpha_i beta^(-b_i), overflows float64: "
                         "scale weights down (the allocation does not depend on their common scale)")
    bits = xp.where(infeasible, xp.nan, bits) if traced else bits
    code = lambda v: xp.asarray(int(v), dtype=xp.int32, device=device(P))  # noqa: E731
    status = xp.where(infeasible, code(INFEASIBLE), xp.where(saturated, code(SATURATED),
                                                             xp.where(solved.done, code(OPTIMAL), code(MAX_ITER))))
    # the spend the answer should reach: the budget, within what the boxes allow (a budget a rounding below the
    # cheapest point, accepted as feasible, is met by the cheapest point)
    payload, target = out.sums["payload"], reach
    residual = _relative(xp, payload - target, target + m_total)
    status = _checked_spend(xp, payload + m_total, B, residual, status, infeasible, traced, code)
    return WaterfillResult(
        bits=bits, log_water_level=xp.where(saturated, -xp.inf * xp.ones_like(mu), mu), budget=B,
        budget_used=payload + m_total, distortion=out.sums["distortion"], kkt_residual=out.peak,
        budget_residual=residual,
        iterations=solved.iterations, status=status)


_SAMPLED = 1 << 16  # eager single-process solves from this many items on start from a sampled bracket
_INFEASIBLE_RTOL = 1e-12  # a budget below the cheapest box point by less than this share of it is rounding
_SPEND_RTOL = 1e-9  # the final check: budget_used <= B (1 + rtol), rtol this or 64 eps of a lower precision


def _checked_spend(xp, used, B, residual, status, infeasible, traced: bool, code):
    """The final check of a solve: the spent budget (metadata included) may exceed ``B`` by rounding only,
    ``used <= B (1 + rtol)`` with ``rtol = max(1e-9, 64 eps)`` of the dtype. Eager solves raise ``ValueError``
    otherwise (never a silent overspend); traced solves cannot raise and report ``CHECK_FAILED`` instead of any other
    status (one per group when grouped). ``OPTIMAL`` also needs the budget met, ``budget_residual <= rtol``; else the
    status is ``CHECK_FAILED`` too (eager or traced)."""
    rtol = max(_SPEND_RTOL, 64 * float(xp.finfo(B.dtype).eps))
    over = ~infeasible & (used > B * (1 + rtol))
    status = xp.where((status == code(OPTIMAL)) & (residual > rtol), code(CHECK_FAILED), status)
    if not traced and bool(xp.any(over)):
        raise ValueError(f"waterfill spent {to_numpy(used).tolist()} bits against a budget of "
                         f"{to_numpy(B).tolist()}: the input is outside the range float64 solves reliably (sizes, "
                         f"weights and alpha far apart in scale); rescale sizes or weights")
    return xp.where(over, code(CHECK_FAILED), status)


def _relative(xp, diff, target):
    """``|diff| / |target|`` (``|diff|`` where the target is 0): a residual that does not depend on units."""
    scale = xp.abs(target)
    return xp.abs(diff) / xp.where(scale > 0, scale, xp.ones_like(scale))


class _FirstPass(NamedTuple):
    """What the first pass over the items gives: the per-item constants ``ck = c / k`` and ``1 / k`` (a scalar when
    ``beta`` is), the range ``[g_min, g_max]`` of ``g``, the sums of the all-free closed form (``n_ck``, ``slope``:
    ``sum n c / k`` and ``sum n / k`` over useful items; ``lo_useless``: ``sum n lo`` over the others), the sums at
    the bracket's lower end (``g_a``, ``slope_free``) and the items kept for Newton inside it; ``mu_min`` the lowest
    level keeping every item at ``lo`` (only where no host sync may decide whether it is needed)."""

    ck: Any
    inv_k: Any
    g_max: Any
    g_min: Any
    n_ck: Any
    slope: Any
    lo_useless: Any
    g_a: Any
    slope_free: Any
    kept: tuple
    mu_min: Any
    all_useful: bool


def _first_pass(xp, n_items: int, items: tuple, elements, bracket, local: bool, reducer) -> _FirstPass:
    """Per-item constants and the sums that give the all-free closed form and ``[g_min, g_max]``; with a bracket the
    items are also classified against it while the chunk is in cache (:func:`_classify`)."""
    alpha, beta, w, n, lo, hi = items
    all_useful = local and (w.ndim == 0 and float(w) > 0 or w.ndim and bool(xp.min(w) > 0))
    box_scalar = lo.ndim == 0 and hi.ndim == 0

    def chunk(alpha, beta, w, n, lo, hi):
        k, inv_k, useful, ck, nk = _constants(xp, alpha, beta, w, n, all_useful)
        if is_jax(xp):  # materialize the logs once: XLA would otherwise recompute them inside every reduction
            import jax

            ck, inv_k = jax.lax.optimization_barrier((ck, inv_k))
            useful, nk = w > 0, n * inv_k
        zero = xp.zeros_like(ck)
        if all_useful:  # no item sits at lo for want of weight
            per = lambda x: x if n.ndim else x + zero  # noqa: E731  (n and x both 0-d: one term per item)
            sums = {} if bracket is not None else {"n_ck": _dot(xp, n, ck), "slope": _dot(xp, n, per(inv_k))}
            if not box_scalar:
                sums.update(g_max=_dot(xp, n, per(hi)), g_min=_dot(xp, n, per(lo)))
        else:
            sums = {"n_ck": xp.where(useful, n * ck, zero), "slope": xp.where(useful, nk + zero, zero),
                    "g_max": n * xp.where(useful, hi, lo) + zero, "g_min": n * lo + zero,
                    "lo_useless": xp.where(useful, zero, n * lo + zero)}
        kept = ()
        if bracket is not None:
            kept, at_a = _classify(xp, bracket.a, bracket.b, ck, inv_k, n, lo, hi)
            sums.update(at_a)
        level_at_lo = None if local else xp.where(useful, (ck - lo) / inv_k, -xp.inf)
        return _Part(arrays=(ck, inv_k), sums=sums, peak=level_at_lo, kept=kept)

    part = _Chunked(xp, n_items, items, reducer).run(chunk)
    sums = part.sums
    g_max, g_min = (hi * elements, lo * elements) if all_useful and box_scalar else (sums["g_max"], sums["g_min"])
    ck, inv_k = part.arrays
    return _FirstPass(ck=ck, inv_k=inv_k, g_max=g_max, g_min=g_min, n_ck=sums.get("n_ck"),
                      slope=sums.get("slope"), lo_useless=sums.get("lo_useless", 0 * g_min), g_a=sums.get("g_a"),
                      slope_free=sums.get("slope_free"), kept=part.kept, mu_min=part.peak, all_useful=all_useful)


def _solve_level(xp, first: _FirstPass, bracket, over: _Chunked, P, start, done, max_iter: int) -> _Newton:
    """The level with ``g(mu) = P`` by safeguarded Newton from ``start`` (nothing to do when ``done``): on the items
    kept inside the sampled bracket when there is one, then over all items if the root lies outside it."""
    eps = float(xp.finfo(P.dtype).eps)
    tol = 64 * eps * first.g_max  # |g(mu) - P| at rounding level
    big, zero_i = _big(xp, P), xp.asarray(0, dtype=xp.int32, device=device(P))
    state = _Newton(mu=start, a=-big, b=big, g_a=first.g_max, g_b=first.g_min, iterations=zero_i, done=done,
                    secant_steps=zero_i)
    if bracket is not None and not bool(done):
        state = _solve_in_bracket(xp, bracket, first, P, tol, eps, big, state, max_iter)
    return _newton(xp, lambda mu: over.sums(_g_and_slope(xp, mu)), P, tol, eps, big, state, max_iter)


def _big(xp, like):
    """A finite stand-in for infinity (a quarter of the largest float): the open ends of a bracket."""
    return xp.asarray(float(xp.finfo(like.dtype).max) / 4, dtype=like.dtype, device=device(like))


def _raise_if_infeasible(xp, B, P, first: _FirstPass, n, hi, m_total, elements, reducer) -> None:
    """``ValueError`` giving the feasible range when the payload budget ``P`` is below ``g_min``."""
    p, gmin = float(P), float(first.g_min)
    if p < gmin - _INFEASIBLE_RTOL * (gmin + float(m_total)):
        top_terms = n * hi + xp.zeros_like(first.ck)
        top = float(reducer.sum((xp.sum(top_terms),))[0])
        raise ValueError(f"budget {float(B):.6g} bits is infeasible: "
                         f"{_box_range(gmin, top, float(m_total), float(elements))}")


def _box_range(g_min: float, g_max: float, metadata: float, elements: float) -> str:
    """The feasible range of the budget, for an error message."""
    return (f"the box needs between {g_min + metadata:.6g} and {g_max + metadata:.6g} bits (average "
            f"{(g_min + metadata) / elements:.6g} to {(g_max + metadata) / elements:.6g})")


def _waterfill_grouped(xp, items: tuple, m, groups, B, elements, max_iter: int) -> WaterfillResult:
    """:func:`waterfill` with one budget per group: the ungrouped solve's Newton run on every group at once, each
    level in its own bracket, each sum a segment sum over the items (one pass over all items per iteration, no
    sampled bracket, no chunks). Every group stops by its own rule, so each meets its budget as its own solve does."""
    alpha, beta, w, n, lo, hi = items
    G = B.shape[0]
    traced = is_jax(xp) or any(is_traced(x) for x in (*items, m, B, groups))
    ones = xp.ones(groups.shape, dtype=B.dtype, device=device(B))
    per_group = lambda x: segment_sum(xp, x * ones, groups, G)  # noqa: E731
    per_item = lambda v: xp.take(v, groups)  # noqa: E731
    _, inv_k, useful, ck, nk = _constants(xp, alpha, beta, w, n, False)
    zero = xp.zeros_like(ck)
    m_total = per_group(m)
    P = B - m_total  # payload budgets
    g_max, g_min = per_group(n * xp.where(useful, hi, lo)), per_group(n * lo)
    infeasible = P < g_min - _INFEASIBLE_RTOL * (g_min + m_total)
    if not traced and bool(xp.any(infeasible)):
        g = int(np.argmax(to_numpy(infeasible)))
        top = per_group(n * hi)
        raise ValueError(f"budget {float(B[g]):.6g} bits of group {g} is infeasible: "
                         f"{_box_range(float(g_min[g]), float(top[g]), float(m_total[g]), float(elements[g]))}")
    saturated, at_min = P >= g_max, P <= g_min
    slope = per_group(xp.where(useful, nk, zero))
    mu0 = (per_group(xp.where(useful, n * ck, zero)) + per_group(xp.where(useful, zero, n * lo)) - P) / \
        positive_or_one(xp, slope)

    def evaluate(mu):
        t = ck - per_item(mu) * inv_k
        return per_group(n * _clip(xp, t, lo, hi)), per_group(masked(xp, (t > lo) & (t < hi), nk + zero))

    eps = float(xp.finfo(P.dtype).eps)
    big, zero_i = _big(xp, P), xp.zeros((G,), dtype=xp.int32, device=device(P))
    start = _Newton(mu=mu0, a=-big * xp.ones_like(P), b=big * xp.ones_like(P), g_a=g_max, g_b=g_min,
                    iterations=zero_i, done=saturated | infeasible | at_min, secant_steps=zero_i)
    solved = _newton(xp, evaluate, P, 64 * eps * g_max, eps, big, start, max_iter)
    mu_min = segment_max(xp, xp.where(useful, (ck - lo) / inv_k, -xp.inf), groups, G)
    mu = xp.where(at_min & ~saturated, mu_min, solved.mu)  # everything at lo: the lowest level that keeps it there
    level = xp.where(saturated, -big, mu)
    bits, e, r = _bits_at(xp, per_item(mu), per_item(level), per_item(saturated), per_item(at_min), True, ck, inv_k,
                          lo, hi)
    kkt = segment_max(xp, xp.maximum(xp.maximum(xp.where(bits < hi, r, zero), xp.where(bits > lo, -r, zero)), zero),
                      groups, G)
    bits = xp.where(per_item(infeasible), xp.nan, bits) if traced else bits
    code = lambda v: xp.asarray(int(v), dtype=xp.int32, device=device(P))  # noqa: E731
    status = xp.where(infeasible, code(INFEASIBLE), xp.where(saturated, code(SATURATED),
                                                             xp.where(solved.done, code(OPTIMAL), code(MAX_ITER))))
    payload, target = per_group(n * bits), xp.maximum(xp.minimum(P, g_max), g_min)
    residual = _relative(xp, payload - target, target + m_total)
    status = _checked_spend(xp, payload + m_total, B, residual, status, infeasible, traced, code)
    return WaterfillResult(
        bits=bits, log_water_level=xp.where(saturated, -xp.inf * xp.ones_like(mu), mu), budget=B,
        budget_used=payload + m_total, distortion=per_group(n * inv_k * xp.exp(e)), kkt_residual=kkt,
        budget_residual=residual,
        iterations=solved.iterations, status=status)


def _start_level(xp, first: _FirstPass, bracket, n_items: int, items: tuple, P, elements, max_iter: int,
                 traced_local: bool):
    """Newton's first level: the sampled one (bracketed eager solves; traced single-process solves of many items,
    which cannot compact), else the all-free closed form ``(sum_F n c / k + sum_L n lo - P) / sum_F n / k``."""
    if bracket is not None:
        return bracket.start
    mu0 = (first.n_ck + first.lo_useless - P) / positive_or_one(xp, first.slope)
    if traced_local and n_items >= _SAMPLED:
        sample = _sample_level(xp, n_items, items, P, elements, max_iter)
        return xp.where(sample.ok, sample.level, mu0)
    return mu0


def _lowest_level_at_lo(xp, over: _Chunked, P, needed: bool):
    """The lowest level that keeps every item at ``lo`` (needed only when ``P == g_min``: a separate pass), else
    ``-inf``."""
    if not bool(needed):
        return -xp.inf * xp.ones_like(P)
    return over.run(lambda ck, inv_k, n, lo, hi: _Part(peak=xp.where(ck > -xp.inf, (ck - lo) / inv_k, -xp.inf))).peak


def _final_pass(xp, mu, level, saturated, at_min, force: bool, all_useful: bool) -> Callable:
    """Per chunk: the bits at ``mu`` and the certificate's terms — payload, distortion and KKT violation in log
    marginal value.

    ``e_i = ln(marginal_i) = k_i (ck_i - b_i)``; ``w_i D_i(b_i) = (n_i / k_i) exp(e_i)``. ``r_i = e_i - mu`` is 0 on
    free items, >= 0 at ``hi``, <= 0 at ``lo``; the residual is the largest violation (rounding only). ``force``
    puts every item at its end of the box when the budget is slack or at the minimum.
    """
    def chunk(ck, inv_k, n, lo, hi):
        bits, e, r = _bits_at(xp, mu, level, saturated, at_min, force, ck, inv_k, lo, hi)
        if all_useful:  # r is finite: masks multiply
            kkt = xp.max(masked(xp, bits < hi, r)), -xp.min(masked(xp, bits > lo, r))
            kkt = xp.maximum(xp.maximum(kkt[0], kkt[1]), xp.zeros_like(kkt[0]))
        else:
            zero = xp.zeros_like(bits)
            kkt = xp.maximum(xp.maximum(xp.where(bits < hi, r, zero), xp.where(bits > lo, -r, zero)), zero)
        # n exp(e) / k with n inside the exp: the marginal per element e can exceed float64 where n e does not
        with np.errstate(over="ignore"):  # a weighted distortion beyond float64 is refused by the caller
            distortion = xp.sum(inv_k * xp.exp(e + xp.log(n)))
        return _Part(arrays=(bits,), sums={"payload": _dot(xp, n, bits), "distortion": distortion}, peak=kkt)
    return chunk


def _bits_at(xp, mu, level, saturated, at_min, force: bool, ck, inv_k, lo, hi):
    """Per item: the bits at ``mu``, ``e = ln(marginal) = k (ck - b)`` and ``r = e - level`` (:func:`_final_pass`;
    the level arguments are scalars or one value per item)."""
    bits = _clip(xp, ck - mu * inv_k, lo, hi)
    if force:
        useful = ck > -xp.inf
        bits = xp.where(saturated, xp.where(useful, hi, lo) + 0 * bits, xp.where(at_min, lo + 0 * bits, bits))
    e = (1.0 / inv_k) * (ck - bits)
    return bits, e, e - level


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


def _g_and_slope(xp, mu):
    """Per item ``n clip(t, lo, hi)`` and, on free items, ``n / k``: their sums are ``g(mu)`` and its slope size."""
    def at(ck, inv_k, n, lo, hi):
        t = ck - mu * inv_k
        return _dot(xp, n, _clip(xp, t, lo, hi)), _dot(xp, n, masked(xp, (t > lo) & (t < hi), inv_k))
    return at


class _Newton(NamedTuple):
    """The safeguarded Newton iteration: the next level ``mu`` to evaluate, the bracket ``[a, b]`` with
    ``g(a) >= P >= g(b)`` (open ends at ``-/+big``), evaluations so far, whether the stopping rule held, and the
    secant steps in a row."""

    mu: Any
    a: Any
    b: Any
    g_a: Any
    g_b: Any
    iterations: Any
    done: Any
    secant_steps: Any


def _newton(xp, evaluate, P, tol, eps, big, state: _Newton, max_iter: int) -> _Newton:
    """Safeguarded Newton on the piecewise-linear ``g`` (module docstring) from ``state``;
    ``evaluate(mu) = (g(mu), slope size)``. Runs in ``lax.while_loop`` on JAX. With one level per group (1-d state),
    every group iterates until its own stopping rule or cap holds; the others keep their state."""

    def running(s: _Newton):
        return ~s.done & (s.iterations < max_iter)

    def step(s: _Newton) -> _Newton:
        mu, a, b, ga, gb = s.mu, s.a, s.b, s.g_a, s.g_b
        g, slope = evaluate(mu)
        found = xp.abs(g - P) <= tol
        a, ga = xp.where(g > P, mu, a), xp.where(g > P, g, ga)
        b, gb = xp.where(g < P, mu, b), xp.where(g < P, g, gb)
        found = found | ((b - a) <= 4 * eps * xp.maximum(xp.abs(a), xp.abs(b)))
        inside = lambda x: (x > a) & (x < b)  # noqa: E731
        bounded = (a > -big) & (b < big)
        newton = mu + (g - P) / positive_or_one(xp, slope)
        secant = a + (ga - P) * xp.where(bounded, b - a, xp.zeros_like(a)) / positive_or_one(xp, ga - gb)
        use_newton = (slope > 0) & inside(newton)
        use_secant = ~use_newton & bounded & inside(secant) & (s.secant_steps < 2)
        far = xp.where(a > -big, a + xp.maximum(xp.abs(a), xp.ones_like(a)), b - xp.maximum(xp.abs(b), xp.ones_like(b)))
        mid = xp.where(bounded, (a + b) / 2, far)
        nxt = xp.where(use_newton, newton, xp.where(use_secant, secant, mid))
        new = _Newton(mu=xp.where(found, mu, nxt), a=a, b=b, g_a=ga, g_b=gb, iterations=s.iterations + 1,
                      done=found, secant_steps=xp.where(use_secant, s.secant_steps + 1, xp.zeros_like(s.secant_steps)))
        if s.mu.ndim == 0:  # one level: the loop runs only while it is active
            return new
        active = running(s)
        return _Newton(*(xp.where(active, x, y) for x, y in zip(new, s)))

    return while_loop(xp, lambda s: xp.any(running(s)), step, state)


class _Sample(NamedTuple):
    """The exact level of a strided sample, whether it is usable (``ok``), its slope size and ``8`` standard errors
    of the sampled ``g``."""

    level: Any
    ok: Any
    slope: Any
    spread: Any


class _Bracket(NamedTuple):
    a: Any
    b: Any
    start: Any


def _sample_level(xp, n_items: int, items: tuple, P, elements, max_iter: int) -> _Sample:
    """The exact level ``mu_s`` of a strided sample of about ``N**(2/3)`` items, its budget scaled by its share of
    the elements; no host syncs (``ok`` is False when the sample is degenerate: budget outside its box, nothing
    useful, or Newton not converged)."""
    stride = max(n_items // max(int(n_items ** (2 / 3)), 1 << 13), 2)
    alpha, beta, w, n, lo, hi = (x if x.ndim == 0 else x[::stride] for x in items)
    _, inv_k, useful, ck, _ = _constants(xp, alpha, beta, w, n, False)
    ones = xp.ones_like(ck)
    n_tot = xp.sum(n * ones)
    P_s = P * (n_tot / elements)
    gmin, gmax = xp.sum(n * lo * ones), xp.sum(n * xp.where(useful, hi, lo) * ones)
    s_all = xp.sum(xp.where(useful, n * inv_k * ones, 0 * ones))
    inside = (P_s > gmin) & (P_s < gmax) & (s_all > 0)
    mu0 = (xp.sum(xp.where(useful, n * ck, 0 * ones)) + xp.sum(xp.where(useful, 0 * ones, n * lo * ones)) - P_s) / \
        positive_or_one(xp, s_all)
    eps = float(xp.finfo(P.dtype).eps)
    big, zero_i = _big(xp, P), xp.asarray(0, dtype=xp.int32, device=device(P))
    sample = lambda mu: tuple(xp.sum(x) for x in _g_and_slope(xp, mu)(ck, inv_k, n, lo, hi))  # noqa: E731
    start = _Newton(mu=mu0, a=-big, b=big, g_a=gmax, g_b=gmin, iterations=zero_i, done=~inside, secant_steps=zero_i)
    solved = _newton(xp, sample, P_s, 64 * eps * gmax, eps, big, start, max_iter)
    mu_s = solved.mu
    t = ck - mu_s * inv_k
    bits = xp.minimum(xp.maximum(t, lo), hi)
    slope = xp.sum(xp.where((t > lo) & (t < hi), n * inv_k * ones, 0 * ones))
    dev = n * (bits - P_s / n_tot)
    scale = xp.max(xp.abs(dev))  # (squares of sizes near float64's limit would overflow)
    spread = 8 * scale * xp.sqrt(xp.sum((dev / positive_or_one(xp, scale)) ** 2))  # 8 standard errors of the g
    return _Sample(mu_s, inside & solved.done & (slope > 0) & (xp.abs(mu_s) < big), slope, spread)


def _sample_bracket(xp, n_items: int, items: tuple, P, elements, max_iter: int) -> _Bracket | None:
    """A bracket ``[a, b]`` for the level around the sampled level (:func:`_sample_level`), 8 standard errors of the
    sampled ``g`` either side along the sample's slope; ``None`` if the sample is degenerate. Only a guess: the first
    pass checks it."""
    sample = _sample_level(xp, n_items, items, P, elements, max_iter)
    if not bool(sample.ok):
        return None
    return _Bracket(sample.level - sample.spread / sample.slope, sample.level + sample.spread / sample.slope,
                    sample.level)


def _classify(xp, a, b, ck, inv_k, n, lo, hi):
    """Items with a breakpoint inside ``[a, b]`` (kept: ck, 1/k, n, lo, hi), and the sums ``g_a = g(a)`` and
    ``slope_free`` (the slope size of the items free on all of ``[a, b]``)."""
    ta, tb = ck - a * inv_k, ck - b * inv_k
    free = (tb >= lo) & (ta <= hi)
    keep = xp.nonzero((ta > lo) & (tb < hi) & ~free)[0]  # few: one scan of the mask, then gathers
    kept = tuple(x if x.ndim == 0 else xp.take(x, keep, axis=0) for x in (ck, inv_k, n, lo, hi))
    return kept, {"g_a": _dot(xp, n, _clip(xp, ta, lo, hi)), "slope_free": _dot(xp, n, masked(xp, free, inv_k))}


def _solve_in_bracket(xp, bracket: _Bracket, first: _FirstPass, P, tol, eps, big, start: _Newton,
                      max_iter: int) -> _Newton:
    """The level from the first pass's classification against ``[a, b]``: on the bracket
    ``g(mu) = g(a) - (mu - a) S_free + sum_kept n (clip(t(mu)) - clip(t(a)))``, solved by Newton on the kept items.
    If the root is outside ``[a, b]`` (a misleading sample), the checked end narrows ``start`` for a solve over all
    items."""
    a, b = bracket.a, bracket.b
    one = xp.asarray(1, dtype=xp.int32, device=device(P))
    base = first.g_a - xp.sum(_g_and_slope(xp, a)(*first.kept)[0])

    def compact(mu):
        g, s = (xp.sum(x) for x in _g_and_slope(xp, mu)(*first.kept))
        return base + g - (mu - a) * first.slope_free, s + first.slope_free

    g_b = compact(b)[0]
    if bool(first.g_a < P):  # the root lies below a
        return start._replace(b=a, g_b=first.g_a, iterations=one)
    if bool(g_b > P):  # the root lies above b
        return start._replace(a=b, g_a=g_b, iterations=one)
    return _newton(xp, compact, P, tol, eps, big, start._replace(a=a, b=b, g_a=first.g_a, g_b=g_b, iterations=one),
                   max_iter)


def _constants(xp, alpha, beta, w, n, all_useful):
    """``k = ln beta``, ``1/k``, ``w > 0``, ``ck = ln(w alpha k / n) / k`` (``-inf`` where ``w = 0``) and ``n / k``.

    ``ln(w alpha k / n)`` is summed from the logs of its factors, so it is finite for every positive finite
    ``w, alpha, n`` (the product itself can overflow or underflow); logs of 0-d factors cost nothing."""
    k = xp.log(beta)
    inv_k = 1.0 / k
    log_factors = xp.log(alpha) + (xp.log(k) - xp.log(n))
    if all_useful:
        return k, inv_k, None, (log_factors + xp.log(w)) * inv_k, None
    useful = w > 0
    log_w = xp.log(xp.where(useful, w, xp.ones_like(w)))
    ck = xp.where(useful, (log_factors + log_w) * inv_k, -xp.inf)
    return k, inv_k, useful, ck, n * inv_k


class _Part(NamedTuple):
    """What a pass gives per chunk, and in all: arrays (one value per item; concatenated), named sums (summed), the
    largest of ``peak`` (``None``: none) and kept arrays (any length per chunk; concatenated)."""

    arrays: tuple = ()
    sums: dict = {}
    peak: Any = None
    kept: tuple = ()


class _Chunked:
    """Passes over the items, in cache-sized chunks on eager backends (numpy, torch, array_api_strict), whole on JAX.

    A chunk's temporaries stay in the CPU cache (L2/L3), so a pass of a dozen elementwise operations costs about one
    trip through memory; XLA fuses the same operations on JAX. Sums are float64 over chunks (a different summation
    order than one ``sum``, both accurate to rounding). The reducer combines sums and maxima over shards.
    """

    CHUNK = 1 << 17  # numpy: fewer, larger chunks (its per-call overhead dominates below this)
    CHUNK_THREADED = 1 << 15  # torch: below its intra-op parallel grain, so no thread hand-offs per operation

    def __init__(self, xp, n_items: int, arrays: tuple, reducer: Any):
        self.xp, self.n, self.arrays, self.reducer = xp, n_items, arrays, reducer
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

    def run(self, fn: Callable[..., _Part]) -> _Part:
        """``fn(*chunk)`` over all chunks, combined as :class:`_Part` says."""
        xp, arrays, sums, peak, kept = self.xp, None, None, None, []
        for sl in self.slices:
            part = fn(*self._parts(sl))
            if arrays is None:  # whole outputs, filled chunk by chunk (scalars stay scalars)
                arrays = part.arrays if len(self.slices) == 1 else tuple(
                    x if x.ndim == 0 else xp.empty((self.n,), dtype=x.dtype, device=device(x)) for x in part.arrays)
            if len(self.slices) > 1:
                for out, x in zip(arrays, part.arrays):
                    if x.ndim:
                        out[sl] = x
            s = {name: xp.sum(x) for name, x in part.sums.items()}
            sums = s if sums is None else {name: sums[name] + x for name, x in s.items()}
            if part.peak is not None:
                peak = xp.max(part.peak) if peak is None else xp.maximum(peak, xp.max(part.peak))
            kept.append(part.kept)
        kept = tuple(x if x.ndim == 0 or len(kept) == 1 else xp.concat([p[j] for p in kept])
                     for j, x in enumerate(kept[0]))
        return _Part(arrays=arrays, sums=dict(zip(sums, self.reducer.sum(tuple(sums.values())))),
                     peak=None if peak is None else self.reducer.max(peak), kept=kept)


class _Local:
    """The single-process reducer: sums and maxima are already global."""

    @staticmethod
    def sum(values: tuple) -> tuple:
        return values

    @staticmethod
    def max(value: Any) -> Any:
        return value


_LOCAL = _Local()
