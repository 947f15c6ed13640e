"""Integer and menu allocation with eviction, metadata and an optimality certificate.

Problem: minimize ``sum_i w_i D_i(b_i)`` subject to ``sum_i C_i(b_i) <= B`` with ``b_i`` in a menu of bit-widths
(e.g. ``{0, 1, 2, 3, 4, 5, 6, 8, 16}``) and ``C_i(b) = n_i b + m_i [0 < b < 16]`` (see :mod:`rdalloc.cost`).
``b = 0`` evicts the item at its own measured distortion; ``b = 16`` keeps it exactly with no metadata.

Algorithm (Shoham–Gersho, then a greedy fill). Every item is a set of ``K`` (cost, weighted distortion) points.

1. **Hull.** Per item, keep the lower convex hull of its points on the decreasing branch: sort by cost, drop points
   that are not strictly better than a cheaper one, then repeatedly drop every point that lies strictly above the chord
   of its two remaining neighbours (a point above a chord of the set is never a hull vertex, so all can go at once;
   at the fixed point the chain is convex). Collinear points are kept, so unit steps stay available. Consecutive
   hull points form *segments* with cost ``dC > 0`` and efficiency ``e = dW / dC``, non-increasing along each item.
2. **Threshold.** For a multiplier ``lambda`` every item takes exactly its segments with ``e > lambda`` (a prefix);
   ``T(lambda)`` is the cost. The split level ``lambda*`` is the smallest segment efficiency with ``T(lambda*) <= B``.
   It is found exactly on the set of efficiency *values*. On numpy and torch: sample-select — sort a strided sample
   of the candidates, evaluate the exact cost at two pivots around the estimated split, keep only the candidates
   between them (quickselect-like, ``O(NK)`` total work), and finish with an exact sort once few remain. On JAX:
   safeguarded interpolation (Illinois) on ``ln lambda`` with every trial snapped to an efficiency in the bracket and
   bisection when it shrinks slowly, in ``lax.while_loop`` with static shapes; it stops when no efficiency lies
   strictly inside the bracket. The segments tied at ``lambda*`` are then taken in item order while they fit.

   Step 1 is independent per item; eager backends run it over cache-sized chunks of items.
3. **Greedy fill.** While slack remains, take the most efficient next segment (ties: lowest item) that still fits.
   The solution never exceeds ``B``; its cost meets ``B`` exactly whenever the threshold solution does (for instance
   equal segment costs and integral budgets).

Certificate. The Lagrangian dual ``q(lambda) = sum_i min_b [w_i D_i(b) + lambda C_i(b)] - lambda B`` is a lower bound on
the optimum for every ``lambda >= 0`` and is maximal at ``lambda*`` (it equals the LP relaxation there). ``gap =
distortion - q(lambda*) >= 0`` bounds how far the returned allocation can be from the integer optimum; it is at most
one segment's distortion drop, and 0 (status ``OPTIMAL``) whenever the threshold solution spends the budget exactly
(Everett's theorem). With equal item costs, unit steps and convex curves the greedy solution is optimal for every
budget (Gross; Fox) even when the reported gap is positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from ._checks import check_budget, check_shape, check_values
from ._namespace import as_float64, float_dtype, index_dtype, is_jax, is_traced, namespace, to_numpy, while_loop
from .cost import Usage
from .models import FULL_BITS, ExponentialModel, TabulatedModel, _menu

__all__ = ["allocate", "Allocation", "default_menu"]

OPTIMAL, FEASIBLE, SATURATED, INFEASIBLE = 0, 1, 2, 3
_STATUS = {OPTIMAL: "optimal (dual gap 0)", FEASIBLE: "feasible, within the reported dual gap of the optimum",
           SATURATED: "budget at or above what every item's best point costs", INFEASIBLE: "budget below the minimum"}


@dataclass(frozen=True)
class Allocation:
    """Solution of :func:`allocate` and its certificate (fields are arrays of the input backend; 0-d for scalars).

    bits: chosen bit-width per item (int32). budget: ``B`` in total bits. payload_bits / metadata_bits / elements:
    ``sum n_i b_i``, ``sum m_i [0 < b_i < 16]`` and ``sum n_i``. distortion: ``sum_i w_i D_i(b_i)``.
    lower_bound: the Lagrangian dual bound ``q(lambda*)``; no allocation within the budget has lower distortion.
    multiplier: ``lambda*``, distortion per bit at the split. iterations: threshold-search passes. fill_steps:
    segments taken by the greedy fill. status: 0 optimal, 1 feasible within the gap, 2 saturated, 3 infeasible.
    """

    bits: Any
    budget: Any
    payload_bits: Any
    metadata_bits: Any
    elements: Any
    distortion: Any
    lower_bound: Any
    multiplier: Any
    iterations: Any
    fill_steps: Any
    status: Any

    @property
    def gap(self) -> float:
        return max(float(to_numpy(self.distortion)) - float(to_numpy(self.lower_bound)), 0.0)

    @property
    def relative_gap(self) -> float:
        d = abs(float(to_numpy(self.distortion)))
        return self.gap / d if d > 0 else 0.0

    @property
    def usage(self) -> Usage:
        return Usage(float(to_numpy(self.payload_bits)), float(to_numpy(self.metadata_bits)),
                     float(to_numpy(self.elements)))

    def certificate(self) -> dict:
        """Budget asked and used, dual bound, gap and solver facts as plain floats (what a :class:`Plan` stores)."""
        usage = self.usage
        status = int(to_numpy(self.status))
        return {"solver": "allocate", "budget_bits": float(to_numpy(self.budget)), "budget_used": usage.total_bits,
                "payload_bits": usage.payload_bits, "metadata_bits": usage.metadata_bits,
                "average_bits": usage.average_bits, "average_payload_bits": usage.average_payload_bits,
                "distortion": float(to_numpy(self.distortion)), "lower_bound": float(to_numpy(self.lower_bound)),
                "gap": self.gap, "relative_gap": self.relative_gap, "multiplier": float(to_numpy(self.multiplier)),
                "iterations": int(to_numpy(self.iterations)), "fill_steps": int(to_numpy(self.fill_steps)),
                "status": status, "status_message": _STATUS[status]}

    def to_dict(self) -> dict:
        return {**self.certificate(), "bits": to_numpy(self.bits).astype(int).tolist()}


_registered = False


def _register_pytree() -> None:
    global _registered
    if not _registered:
        import jax

        jax.tree_util.register_dataclass(Allocation, data_fields=[f.name for f in fields(Allocation)], meta_fields=[])
        _registered = True


def default_menu(model: ExponentialModel | TabulatedModel) -> tuple[int, ...]:
    """The integers in the model's quantized range ``[lo, hi]`` (exponential) or the table's bit-widths."""
    if isinstance(model, TabulatedModel):
        return model.bits
    return tuple(range(math.ceil(model.lo), math.floor(model.hi) + 1))


def allocate(model: ExponentialModel | TabulatedModel, sizes: Any, budget: Any = None, *, average_bits: Any = None,
             weights: Any = 1.0, menu: Sequence[int] | None = None, metadata: Any = 0.0, lo: Any = None,
             hi: Any = None, max_fill: int | None = None) -> Allocation:
    """Minimize ``sum_i w_i D_i(b_i)`` s.t. ``sum_i n_i b_i + m_i [0 < b_i < 16] <= B``, ``b_i`` in ``menu``.

    Args:
      model: an :class:`ExponentialModel` (``0`` needs its ``eviction``; ``16`` costs ``full``, default 0) or a
        :class:`TabulatedModel`.
      sizes: ``n_i > 0`` elements per item. budget: ``B`` in total bits, metadata charged; or ``average_bits``:
        ``B / sum_i n_i``.
      weights: importance ``w_i >= 0`` (a zero-weight item takes its cheapest point).
      menu: strictly increasing integers in ``[0, 16]``; default :func:`default_menu`.
      metadata: ``m_i >= 0`` bits an item carries when ``0 < b_i < 16``.
      lo, hi: optional per-item bounds; menu entries outside ``[lo_i, hi_i]`` are not allowed for item ``i``.
      max_fill: cap on greedy-fill steps (default: until nothing fits).

    Returns an :class:`Allocation`. Raises ``ValueError`` for invalid input or a budget below the cheapest allocation
    (the message gives the feasible range); under ``jax.jit`` an infeasible budget gives status 3 instead.
    """
    if not isinstance(model, (ExponentialModel, TabulatedModel)):
        raise TypeError(f"model must be an ExponentialModel or TabulatedModel, got {type(model).__name__}")
    menu = default_menu(model) if menu is None else _menu(menu)
    arrays = (model.alpha,) if isinstance(model, ExponentialModel) else (model.distortion,)
    xp = namespace(*arrays, sizes, weights, metadata, lo, hi)
    jax_mode = is_jax(xp)
    if jax_mode:
        _register_pytree()
    dev = _device(arrays[0])
    N = model.n_items
    for name, value in (("sizes", sizes), ("weights", weights), ("metadata", metadata)):
        check_shape(name, value, N)
    check_values("sizes", sizes, positive=True)
    check_values("weights", weights, nonnegative=True)
    check_values("metadata", metadata, nonnegative=True)
    fdt = float_dtype(xp)
    ones = xp.ones((N,), dtype=fdt, device=dev)
    n = as_float64(xp, sizes, device=dev, name="sizes") * ones
    w = as_float64(xp, weights, device=dev, name="weights") * ones
    m = as_float64(xp, metadata, device=dev, name="metadata") * ones
    elements = xp.sum(n)
    total = check_budget(budget, average_bits, elements if is_traced(elements) else float(elements))
    Bt = xp.asarray(total, dtype=fdt, device=dev)

    K = len(menu)
    bounds = []
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound is not None:
            check_shape(name, bound, N)
            check_values(name, bound)
        bounds.append(None if bound is None else as_float64(xp, bound, device=dev, name=name) * ones)
    if lo is not None and hi is not None and not is_traced(lo) and not is_traced(hi):
        bad = np.broadcast_to(to_numpy(lo), (N,)) > np.broadcast_to(to_numpy(hi), (N,))
        if bad.any():
            i = int(np.argmax(bad))
            lo_i, hi_i = (float(np.broadcast_to(to_numpy(x), (N,))[i]) for x in (lo, hi))
            raise ValueError(f"lo must be <= hi, got lo={lo_i!r} > hi={hi_i!r} at item {i}")

    # ---- 1. per item: the (K, N) table, its lower convex hull and the hull's segments ------------------------------
    # Items are independent here, so eager backends run this stage over cache-sized chunks of items.
    static = jax_mode or is_traced(n)
    parts = _model_arrays(xp, model, menu, dev, ones)
    per_item = (n, w, m, bounds[0], bounds[1], *parts)
    chunk = N if static or N <= _CHUNK else _CHUNK
    pieces = []
    for start in range(0, N, chunk):
        sl = slice(start, min(start + chunk, N))
        n_c, w_c, m_c, lo_c, hi_c, *parts_c = (None if a is None else a[sl] for a in per_item)
        pieces.append(_item_stage(xp, model, menu, parts_c, n_c, w_c, m_c, lo_c, hi_c, static, start))
    if len(pieces) == 1:
        order, C, W, first, nxt, E, dC = pieces[0]
    else:
        order, C, W, first, nxt, E, dC = (xp.concat([p[j] for p in pieces], axis=-1) for j in range(7))
    base = xp.sum(_at(xp, C, first))
    top = base + xp.sum(dC)
    if not is_traced(Bt) and float(Bt) < float(base) * (1 - 1e-15):
        el = float(elements)
        raise ValueError(f"budget {float(Bt):.10g} bits (average {float(Bt) / el:.6g}) is infeasible for menu "
                         f"{list(menu)}: the cheapest allocation needs {float(base):.10g} bits (average "
                         f"{float(base) / el:.6g}); every item at its best point needs {float(top):.10g} "
                         f"(average {float(top) / el:.6g})")

    # ---- 2. split level lambda*: every segment with E > lambda* is taken; ties in order while they fit ----------
    R = Bt - base
    saturated = R >= xp.sum(dC)
    infeasible = R < 0
    lam, iterations = _split_level(xp, E, dC, R, saturated | infeasible, static=jax_mode or is_traced(E))
    above = E > lam
    slack = R - xp.sum(xp.where(above, dC, xp.zeros_like(dC)))
    tie = (E == lam) & ~saturated
    cum = xp.reshape(xp.cumulative_sum(xp.reshape(xp.where(tie, dC, xp.zeros_like(dC)), (-1,))), (K, N))
    take_tie = tie & (cum <= slack)  # row-major order keeps each item's tied segments a prefix
    slack = slack - xp.sum(xp.where(take_tie, dC, xp.zeros_like(dC)))
    rows = xp.reshape(xp.arange(K, dtype=first.dtype, device=dev), (K, 1))
    last = lambda taken: xp.max(xp.where(taken, rows, xp.reshape(first, (1, N))), axis=0)  # noqa: E731
    cur_t = last(above)  # the Lagrangian minimizer at lambda*
    cur = last(above | take_tie)

    # ---- 3. greedy fill of the slack ------------------------------------------------------------------------------
    cur, slack, steps = _fill(xp, E, dC, nxt, cur, slack, N if max_fill is None else int(max_fill))

    # ---- solution and certificate ----------------------------------------------------------------------------------
    menu_arr = xp.asarray(list(menu), dtype=xp.int32, device=dev)
    bits = xp.take(menu_arr, xp.astype(_at(xp, order, cur), index_dtype(xp)))
    bits_f = xp.astype(bits, fdt)
    distortion = xp.sum(_at(xp, W, cur))
    lam_eff = xp.where(saturated, xp.zeros_like(lam), lam)
    lower = xp.sum(_at(xp, W, cur_t) + lam_eff * _at(xp, C, cur_t)) - lam_eff * Bt
    lower = xp.minimum(lower, distortion)  # equal in exact arithmetic when the threshold spends B; rounding aside
    quantized = (bits_f > 0) & (bits_f < FULL_BITS)
    payload = xp.sum(n * bits_f)
    meta = xp.sum(xp.where(quantized, m, xp.zeros_like(m)))
    gap = distortion - lower
    tol = 1e-12 * xp.maximum(xp.abs(distortion), xp.asarray(1e-300, dtype=fdt, device=dev))
    code = lambda v: xp.asarray(v, dtype=xp.int32, device=dev)  # noqa: E731
    status = xp.where(infeasible, code(INFEASIBLE),
                      xp.where(saturated, code(SATURATED), xp.where(gap <= tol, code(OPTIMAL), code(FEASIBLE))))
    if jax_mode:
        bits = xp.where(infeasible, xp.full_like(bits, -1), bits)
    return Allocation(bits=bits, budget=Bt, payload_bits=payload, metadata_bits=meta, elements=elements,
                      distortion=distortion, lower_bound=lower, multiplier=lam_eff, iterations=iterations,
                      fill_steps=steps, status=status)


def _at(xp, X, col):
    """``X[col[i], i]`` for a ``(K, N)`` table and one column index per item."""
    idx = xp.reshape(xp.astype(col, index_dtype(xp)), (1, -1))
    return xp.take_along_axis(X, idx, axis=0)[0, :]


_CHUNK = 1 << 13  # items per chunk in the per-item stage: a (K, chunk) float64 table stays in the CPU cache


def _model_arrays(xp, model, menu, dev, ones) -> tuple:
    """The model's per-item arrays, sliceable along the items: (alpha, beta, eviction, full) or the table columns."""
    if isinstance(model, TabulatedModel):
        missing = sorted(set(menu) - set(model.bits))
        if missing:
            raise ValueError(f"menu {list(menu)} asks for bit-widths {missing} that the table does not hold "
                             f"(it has {list(model.bits)})")
        cols = xp.asarray([model.bits.index(b) for b in menu], device=dev)
        table = xp.take(as_float64(xp, model.distortion, device=dev, name="distortion"), cols, axis=1)
        mask = xp.take(xp.asarray(model.allowed_mask, device=dev), cols, axis=1)
        return table, mask
    f = lambda v, name: as_float64(xp, v, device=dev, name=name) * ones  # noqa: E731
    eviction = f(model.eviction, "eviction") if model.can_evict else 0 * ones
    return f(model.alpha, "alpha"), f(model.beta, "beta"), eviction, f(model.full, "full")


def _item_stage(xp, model, menu, parts, n, w, m, lo, hi, static: bool, offset: int) -> tuple:
    """Table, sort, hull and segments for a block of items: ``(order, C, W, first, nxt, E, dC)``, tables ``(K, n)``.

    ``order[k, i]`` is the menu index of item ``i``'s ``k``-th point by cost.
    """
    zero = xp.zeros_like(n)
    yes, no = zero == 0, zero != 0
    D, allowed = [], []
    if isinstance(model, TabulatedModel):
        table, mask = parts
        for k in range(len(menu)):
            D.append(xp.where(mask[:, k], table[:, k], zero))
            allowed.append(mask[:, k])
    else:
        alpha, beta, eviction, full = parts
        log_beta = xp.log(beta)
        for b in menu:
            if b == 0:
                D.append(eviction), allowed.append(yes if model.can_evict else no)
            elif b == FULL_BITS:
                D.append(full), allowed.append(yes)
            elif model.lo <= b <= model.hi:
                D.append(alpha * xp.exp(-log_beta * float(b))), allowed.append(yes)
            else:
                D.append(zero), allowed.append(no)
    for k, b in enumerate(menu):
        if lo is not None:
            allowed[k] = allowed[k] & (lo <= b)
        if hi is not None:
            allowed[k] = allowed[k] & (hi >= b)
    W = xp.stack([xp.where(allowed[k], w * D[k], zero) for k in range(len(menu))], axis=0)
    C = xp.stack([n * b + (m if 0 < b < FULL_BITS else zero) for b in menu], axis=0)
    valid = xp.stack(allowed, axis=0)
    if not is_traced(valid):
        none = ~to_numpy(xp.any(valid, axis=0))
        if none.any():
            i = offset + int(np.argmax(none))
            raise ValueError(f"item {i} has no feasible bit-width in menu {list(menu)} (check the model's range "
                             f"[lo, hi], its eviction distortion for 0, and the lo/hi bounds)")
    order, C, W, valid = _sort_by_cost(xp, C, W, valid, static=static)
    if order is None:
        order = xp.broadcast_to(xp.reshape(xp.arange(len(menu), dtype=xp.int8, device=_device(C)), (-1, 1)), C.shape)
    valid = _hull(xp, C, W, valid)
    first, nxt, E, dC = _segments(xp, C, W, valid)
    return xp.astype(order, xp.int8), C, W, first, nxt, E, dC


def _sort_by_cost(xp, C, W, valid, static: bool):
    """Order each item's points by (cost, distortion); skipped (``order=None``) when the menu order already is."""
    if not static and bool(xp.all(C[1:, :] > C[:-1, :])):
        return None, C, W, valid
    inf = xp.asarray(xp.inf, dtype=C.dtype)
    gather = lambda X, o: xp.take_along_axis(X, o, axis=0)  # noqa: E731
    o1 = xp.argsort(xp.where(valid, W, inf), axis=0, stable=True)
    o2 = xp.argsort(gather(xp.where(valid, C, inf), o1), axis=0, stable=True)
    order = gather(o1, o2)
    return order, gather(C, order), gather(W, order), gather(valid, order)


def _scan(xp, C, W, valid, reverse: bool = False):
    """For each row ``k``, the cost, distortion and row index of the nearest valid point before (or after) it."""
    K = C.shape[0]
    c, w, j = xp.zeros_like(C[0, :]), xp.zeros_like(C[0, :]), xp.full(C[0, :].shape, -1 if not reverse else K,
                                                                       dtype=index_dtype(xp), device=_device(C))
    out = [None] * K
    for k in (reversed(range(K)) if reverse else range(K)):
        out[k] = (c, w, j)
        v = valid[k, :]
        c, w, j = xp.where(v, C[k, :], c), xp.where(v, W[k, :], w), xp.where(v, k, j)
    return out


def _hull(xp, C, W, valid):
    """The points on each item's decreasing lower convex hull (rows sorted by cost).

    Dominance first (a point must be strictly better than every cheaper valid point), then rounds that drop every
    point strictly above the chord of its valid neighbours, until none is.
    """
    K = C.shape[0]
    keep, best, seen = [], xp.zeros_like(C[0, :]), xp.zeros_like(valid[0, :])
    for k in range(K):
        ok = valid[k, :] & ~(seen & (best <= W[k, :]))
        best, seen = xp.where(ok, W[k, :], best), seen | ok
        keep.append(ok)
    valid = xp.stack(keep, axis=0)

    def body(state):
        valid, _ = state
        prev, nxt = _scan(xp, C, W, valid), _scan(xp, C, W, valid, reverse=True)
        drop = []
        for k in range(K):
            (pc, pw, pj), (nc, nw, nj) = prev[k], nxt[k]
            inner = valid[k, :] & (pj >= 0) & (nj < K)
            one = xp.ones_like(pc)
            e_in = (pw - W[k, :]) / xp.where(inner, C[k, :] - pc, one)
            e_out = (W[k, :] - nw) / xp.where(inner, nc - C[k, :], one)
            drop.append(inner & (e_in < e_out))
        drop = xp.stack(drop, axis=0)
        return valid & ~drop, xp.any(drop)

    valid, _ = while_loop(xp, lambda s: s[1], body, (valid, xp.any(valid)))
    return valid


def _segments(xp, C, W, valid):
    """Hull segments stored at their end row: efficiency ``E`` (``-inf`` where none) and cost ``dC`` (0 where none);
    the first hull row of each item, and ``nxt[k]``: the next hull row after row ``k`` (``K`` if none).

    ``E[k] = (W_prev - W_k) / (C_k - C_prev)``, the same expression the hull test used, so ``E`` is non-increasing
    along each item's hull exactly, not just up to rounding.
    """
    K = C.shape[0]
    prev, after = _scan(xp, C, W, valid), _scan(xp, C, W, valid, reverse=True)
    E, dC, nxt = [], [], []
    for k in range(K):
        pc, pw, pj = prev[k]
        seg = valid[k, :] & (pj >= 0)
        E.append(xp.where(seg, (pw - W[k, :]) / xp.where(seg, C[k, :] - pc, xp.ones_like(pc)),
                          xp.full_like(pc, -xp.inf)))
        dC.append(xp.where(seg, C[k, :] - pc, xp.zeros_like(pc)))
        nxt.append(after[k][2])
    first = xp.where(valid[0, :], xp.zeros_like(after[0][2]), after[0][2])
    return first, xp.stack(nxt, axis=0), xp.stack(E, axis=0), xp.stack(dC, axis=0)


def _split_level(xp, E, dC, R, skip, static: bool):
    """The smallest efficiency value ``v`` with ``sum dC [E > v] <= R`` (0 when ``skip``), and the pass count.

    Eager backends (numpy, torch, array_api_strict): sample-select. Each round sorts a strided sample of the
    candidates, reads off two pivots around the estimated split, evaluates the exact cost at both, and keeps only the
    candidates strictly between the bracketing values; at most 4096 left, an exact sort finishes.
    JAX: the same bracket driven by Illinois regula falsi on ``ln lambda`` with trials snapped to efficiency values
    and bisection safeguards, in ``lax.while_loop`` with static shapes.
    Invariant: ``T(lo) > R >= T(hi)``, ``T(lam) = sum dC [E > lam]``; done when no value lies in ``(lo, hi)``.
    """
    e = xp.reshape(E, (-1,))
    c = xp.reshape(dC, (-1,))
    if static:
        return _split_level_static(xp, e, c, R, skip)
    zero = xp.zeros_like(R)
    if bool(skip):
        return zero, xp.asarray(0, dtype=xp.int32)
    keep = e > -xp.inf
    e, c = e[keep], c[keep]
    hi, const = xp.asarray(xp.inf, dtype=e.dtype), zero  # const = sum of dC over E >= hi
    rounds = 0
    while e.shape[0] > 4096:
        rounds += 1
        size = e.shape[0]
        stride = size // 2048
        s_e, s_c = e[::stride], c[::stride]
        o = xp.argsort(s_e, descending=True, stable=True)
        s_e, s_c = xp.take(s_e, o), xp.take(s_c, o) * (xp.sum(c) / xp.sum(s_c))
        excl = xp.cumulative_sum(s_c) - s_c
        j = int(xp.sum(xp.astype(const + excl <= R, xp.int32))) - 1  # last sample index still within the budget
        for v in (s_e[max(j - 64, 0)], s_e[min(j + 64, s_e.shape[0] - 1)]):
            inside = e < hi
            t_v = const + xp.sum(xp.where(inside & (e > v), c, xp.zeros_like(c)))
            if bool(t_v <= R):
                const = const + xp.sum(xp.where(inside & (e >= v), c, xp.zeros_like(c)))
                hi = v
            keep = (e < hi) & ((e > v) | (t_v <= R))
            e, c = e[keep], c[keep]
        if e.shape[0] > size // 2:  # the sample misled us (heavy ties): finish exactly
            break
    rounds += 1
    if e.shape[0] == 0:
        return hi, xp.asarray(rounds, dtype=xp.int32)
    o = xp.argsort(e, descending=True, stable=True)
    e, c = xp.take(e, o), xp.take(c, o)
    ok = const + xp.cumulative_sum(c) - c <= R
    j = int(xp.sum(xp.astype(ok, xp.int32))) - 1
    lam = e[j] if j >= 0 else hi
    return lam, xp.asarray(rounds, dtype=xp.int32)


def _split_level_static(xp, e, c, R, skip):
    fdt = e.dtype
    finite = e > -xp.inf
    one = xp.asarray(1.0, dtype=fdt)
    hi = xp.max(xp.where(finite, e, xp.zeros_like(e)))
    pos_min = xp.min(xp.where(finite & (e > 0), e, xp.full_like(e, xp.inf)))
    lo = xp.where(xp.isfinite(pos_min), pos_min / 2, one)
    zero_i = xp.asarray(0, dtype=xp.int32)

    def trial(lo, hi, t_lo, t_hi, side, slow):
        x_lo, x_hi = xp.log(lo), xp.log(hi)
        f_lo = xp.where(side == 1, (t_lo - R) / 2, t_lo - R)  # Illinois: halve the stale end's value
        f_hi = xp.where(side == -1, (t_hi - R) / 2, t_hi - R)
        denom = f_lo - f_hi
        x = x_lo + f_lo * (x_hi - x_lo) / xp.where(denom > 0, denom, one)
        return xp.exp(xp.where(slow | ~(denom > 0), (x_lo + x_hi) / 2, x))

    def cond(s):
        return ~skip & xp.any((e > s[0]) & (e < s[1]))

    def body(s):
        lo, hi, t_lo, t_hi, const, side, w_prev, w_now, it = s
        inside = (e > lo) & (e < hi)
        lam = trial(lo, hi, t_lo, t_hi, side, w_now > w_prev / 2)
        below = xp.max(xp.where(inside & (e <= lam), e, xp.full_like(e, -xp.inf)))
        above = xp.min(xp.where(inside & (e > lam), e, xp.full_like(e, xp.inf)))
        v = xp.where(below > -xp.inf, below, above)  # snap the trial to an efficiency in the bracket
        t_v = const + xp.sum(xp.where(inside & (e > v), c, xp.zeros_like(c)))
        ok = t_v <= R
        side = xp.where(ok, xp.asarray(1, dtype=xp.int32), xp.asarray(-1, dtype=xp.int32))
        const = xp.where(ok, const + xp.sum(xp.where(inside & (e >= v), c, xp.zeros_like(c))), const)
        hi, t_hi = xp.where(ok, v, hi), xp.where(ok, t_v, t_hi)
        lo, t_lo = xp.where(ok, lo, v), xp.where(ok, t_lo, t_v)
        return lo, hi, t_lo, t_hi, const, side, w_now, xp.log(hi) - xp.log(lo), it + 1

    const0 = xp.sum(xp.where(e >= hi, c, xp.zeros_like(c)))
    width = xp.log(hi) - xp.log(lo)
    s = (lo, hi, xp.sum(c), xp.zeros_like(R), const0, zero_i, width * 4, width, zero_i)
    s = while_loop(xp, cond, body, s)
    return xp.where(skip, xp.zeros_like(R), s[1]), s[-1]


def _fill(xp, E, dC, nxt, cur, slack, max_steps: int):
    """Greedy fill: while some item's next hull segment fits in ``slack``, take the most efficient one (lowest item
    on ties). One pass over ``N`` numbers per step; the step count is at most ``slack / min dC``."""
    K, N = E.shape
    itype = index_dtype(xp)
    pad = lambda X, v: xp.concat([X, xp.full((1, N), v, dtype=X.dtype, device=_device(X))], axis=0)  # noqa: E731
    E_flat = xp.reshape(pad(E, -xp.inf), (-1,))
    dC_flat = xp.reshape(pad(dC, 0.0), (-1,))
    nxt_flat = xp.reshape(pad(nxt, K), (-1,))
    items = xp.arange(N, dtype=itype, device=_device(E))
    cur = xp.astype(cur, itype)
    col = xp.astype(_at(xp, xp.astype(nxt, itype), cur), itype)  # the row where each item's next segment ends
    e_next, c_next = xp.take(E_flat, col * N + items), xp.take(dC_flat, col * N + items)

    def fits(e_next, c_next, slack):
        return (e_next > -xp.inf) & (c_next <= slack)

    def cond(s):
        return s[-1] & (s[4] < max_steps)

    def body(s):
        cur, col, e_next, c_next, steps, slack, _ = s
        i = xp.reshape(xp.astype(xp.argmax(xp.where(fits(e_next, c_next, slack), e_next,
                                                    xp.full_like(e_next, -xp.inf))), itype), (1,))
        new_cur = xp.take(col, i)
        new_col = xp.astype(xp.take(nxt_flat, new_cur * N + i), itype)
        slack = slack - xp.take(c_next, i)[0]
        chosen = items == i
        cur = xp.where(chosen, new_cur, cur)
        col = xp.where(chosen, new_col, col)
        e_next = xp.where(chosen, xp.take(E_flat, new_col * N + i), e_next)
        c_next = xp.where(chosen, xp.take(dC_flat, new_col * N + i), c_next)
        return cur, col, e_next, c_next, steps + 1, slack, xp.any(fits(e_next, c_next, slack))

    s = (cur, col, e_next, c_next, xp.asarray(0, dtype=xp.int32), slack, xp.any(fits(e_next, c_next, slack)))
    s = while_loop(xp, cond, body, s)
    return s[0], s[5], s[4]


def _device(x: Any):
    from array_api_compat import device

    try:
        return device(x)
    except Exception:
        return None
