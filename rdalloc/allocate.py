"""Integer and menu allocation with eviction, metadata and an optimality certificate.

Problem: minimize ``sum_i w_i D_i(b_i)`` subject to ``sum_i C_i(b_i) <= B`` with ``b_i`` in a menu of bit-widths
(e.g. ``{0, 1, 2, 3, 4, 5, 6, 8, 16}``) and ``C_i(b) = n_i b + m_i [0 < b < 16]`` (see :mod:`rdalloc.cost`).
``b = 0`` evicts the item at its own measured distortion; ``b = 16`` keeps it exactly with no metadata.

Algorithm (Shoham–Gersho, a greedy fill, then an exact phase). Every item is a set of ``K`` (cost, weighted
distortion) points.

1. **Hull.** Per item, keep the lower convex hull of its points on the decreasing branch: sort by cost, drop points
   that are not strictly better than a cheaper one, then repeatedly drop every point that lies strictly above the chord
   of its two remaining neighbours (a point above a chord of the set is never a hull vertex, so all can go at once;
   at the fixed point the chain is convex). Collinear points are kept, so unit steps stay available. Consecutive
   hull points form *segments* with cost ``dC > 0`` and efficiency ``e = dW / dC``, non-increasing along each item.
   A round is one forward and one backward scan over the ``K`` rows; the last round's efficiencies are the segments'.
   Eager backends first check whole tables at once: where every point is allowed, strictly better than the cheaper
   one and the efficiencies do not rise, every point is on the hull and no scan is needed.
2. **Threshold.** For a multiplier ``lambda`` every item takes exactly its segments with ``e > lambda`` (a prefix);
   ``T(lambda)`` is the cost. The split level ``lambda*`` is the smallest segment efficiency with ``T(lambda*) <= B``.
   It is found exactly on the set of efficiency *values*. On numpy and torch: sample-select — sort a strided sample
   of about ``(NK)**(2/3)`` candidates, take two pivots 4 standard errors around the estimated split, and in one pass
   sum the cost above the upper one and keep the candidates between them (a few percent); the exact costs at both
   pivots follow, and an exact sort of the kept ones finishes (numpy: of the one bucket of leading float bits
   that holds the split, found from per-bucket costs). On JAX: the same sampled pivots give the first
   bracket, then safeguarded interpolation (Illinois) on ``ln lambda`` with every trial snapped to an efficiency in
   the bracket and bisection when it shrinks slowly, in ``lax.while_loop`` with static shapes; it stops when no
   efficiency lies strictly inside the bracket. The segments tied at ``lambda*`` are then taken in item order while
   they fit.

   Step 1 is independent per item; eager backends run it over cache-sized chunks of items, written straight into the
   ``(K, N)`` tables.
3. **Greedy fill.** While slack remains, take the most efficient next segment (ties: lowest item) that still fits.
   The solution never exceeds ``B``; its cost meets ``B`` exactly whenever the threshold solution does (for instance
   equal segment costs and integral budgets).
4. **Exact phase** (numpy, torch, array_api_strict; not on JAX). The fill moves along hulls only, so off-hull points
   are never chosen and the answer can be above the optimum. With ``t_i`` the Lagrangian row of item ``i`` and the
   reduced costs ``r_ik = W_ik + lambda* C_ik - (W_it + lambda* C_it) >= 0``, every allocation ``x`` within the budget
   has ``sum_i W_i(x_i) >= q(lambda*) + sum_i r_i(x_i)`` (``lambda* >= 0``, ``sum C <= B``). So against the incumbent
   ``U`` (the fill's answer), an item whose every other point has ``r_ik >= U - q - tol`` is fixed at ``t_i``
   (reduced-cost fixing, as in Pisinger's core algorithms). The *core* — the ``64``, then ``256``, ... items with the
   smallest reduced cost off ``t_i`` — is solved exactly with the other items at ``t_i``: a dynamic program over
   Pareto-optimal ``(cost, distortion)`` partial allocations, items nearest the split first, states cut when their
   distortion plus the LP relaxation (fractional hull fill) of the items to come reaches ``U - tol``; every state
   completed at ``t`` is an incumbent candidate. Stopping rule: proven when every item outside the core is fixed by
   the new ``U``; else a 4 times larger core, until ``max_nodes`` states (all rounds together) are spent — then the
   best allocation found (never worse than the fill's) is returned with status ``FEASIBLE`` and the dual gap. Only
   the ``(K, N)`` pass for ``min_{k != t_i} r_ik`` touches every item.

Certificate. The Lagrangian dual ``q(lambda*) = sum_i min_b [w_i D_i(b) + lambda* C_i(b)] - lambda* B`` (``dual_bound``)
is a lower bound on the optimum for every ``lambda >= 0`` and is maximal at ``lambda*`` (it equals the LP relaxation
there); it is at most one segment's distortion drop below the fill's answer, and equal to it when the threshold
solution spends the budget exactly (Everett's theorem). ``lower_bound`` is the best proven bound: when the exact
phase finishes, ``min(U, q + smallest reduced cost fixed, smallest bound cut)`` (= the distortion unless a cut bound
fell within ``tol``), else ``q(lambda*)``; ``gap = distortion - lower_bound``. Status ``OPTIMAL`` means proven up to
``tol = 1e-9 (|distortion| + lambda* B)`` (float summation aside). Under JAX (``jax.jit`` or not) there is no exact
phase: the fill's answer with the dual certificate, ``OPTIMAL`` only when the dual gap is 0 (to ``1e-12``
relative).

Groups (``groups=``: one budget per group of items, e.g. per (layer, kv-head) over its tokens). Every group is its
own problem: on eager backends each group goes through steps 1 to 4 in turn (its tables stay in the CPU cache, which
makes this faster than steps run over all groups at once), so its answer and certificate are exactly its own
solve's; on JAX one ``lax.map`` over the groups runs the static solve with the other groups masked out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._checks import allocate_iv, group_sizes
from ._namespace import (
    as_float64,
    cond,
    device,
    index_dtype,
    is_jax,
    is_traced,
    jax_compiled,
    masked,
    namespace,
    positive_or_one,
    register_pytree,
    to_numpy,
    while_loop,
)
from .cost import Usage
from .models import FULL_BITS, ExponentialModel, TabulatedModel
from .status import CHECK_FAILED, FEASIBLE, INFEASIBLE, MESSAGES, OPTIMAL, SATURATED

__all__ = ["allocate", "Allocation", "default_menu"]

_RTOL = 1e-9  # OPTIMAL from the exact phase: no allocation is below distortion - _RTOL (|distortion| + lambda* B)
_SPEND_RTOL = 1e-9  # the final check on eager backends: budget used <= B (1 + _SPEND_RTOL), else ValueError
_MAX_NODES = 1 << 20  # default work limit of the exact phase: dynamic-program states generated, all rounds together
_CORE0 = 64  # items in the first core; each further round takes 4 times as many


@dataclass(frozen=True)
class Allocation:
    """Solution of :func:`allocate` and its certificate (fields are arrays of the input backend; 0-d for scalars).

    bits: chosen bit-width per item (int32). budget: ``B`` in total bits. payload_bits / metadata_bits / elements:
    ``sum n_i b_i``, ``sum m_i [0 < b_i < 16]`` and ``sum n_i``. distortion: ``sum_i w_i D_i(b_i)``.
    lower_bound: the best proven bound; no allocation within the budget has lower distortion: the exact phase's bound
    when it finished, else ``dual_bound``. dual_bound: the Lagrangian dual bound ``q(lambda*)`` (the LP relaxation).
    multiplier: ``lambda*``, distortion per bit at the split. iterations: threshold-search passes. fill_steps:
    segments taken by the greedy fill. nodes: dynamic-program states generated by the exact phase (0 when it did not
    run). status: a code of :mod:`rdalloc.status` (``OPTIMAL``, ``FEASIBLE``, ``SATURATED``, ``INFEASIBLE``, or under
    ``jax.jit`` ``CHECK_FAILED`` for a spend above ``B (1 + 1e-9)``, which eager calls raise instead).
    A grouped solve holds one value per group in every field but ``bits``; :meth:`group` gives one group's solve
    (``usage`` is per group there), ``gap``, ``relative_gap`` and ``certificate`` give one value per group.
    """

    bits: Any
    budget: Any
    payload_bits: Any
    metadata_bits: Any
    elements: Any
    distortion: Any
    lower_bound: Any
    dual_bound: Any
    multiplier: Any
    iterations: Any
    fill_steps: Any
    nodes: Any
    status: Any

    @property
    def grouped(self) -> bool:
        """Whether this is a grouped solve (every field but ``bits`` one per group)."""
        return to_numpy(self.status).ndim == 1

    def group(self, g: int) -> Allocation:
        """Group ``g``'s solve of a grouped result: its fields, ``bits`` left ``None`` (the items' order is the
        caller's)."""
        return Allocation(bits=None, **{name: getattr(self, name)[g] for name in _PER_GROUP})

    @property
    def gap(self) -> Any:
        """``distortion - lower_bound`` (``>= 0``): a float, or a numpy array of one per group."""
        if self.grouped:
            return np.array([self.group(g).gap for g in range(to_numpy(self.status).shape[0])])
        return max(float(to_numpy(self.distortion)) - float(to_numpy(self.lower_bound)), 0.0)

    @property
    def relative_gap(self) -> Any:
        if self.grouped:
            return np.array([self.group(g).relative_gap for g in range(to_numpy(self.status).shape[0])])
        d = abs(float(to_numpy(self.distortion)))
        return self.gap / d if d > 0 else 0.0

    @property
    def usage(self) -> Usage:
        return Usage(float(to_numpy(self.payload_bits)), float(to_numpy(self.metadata_bits)),
                     float(to_numpy(self.elements)))

    def certificate(self) -> dict:
        """Budget asked and used, dual bound, gap and solver facts as plain floats (what a :class:`Plan` stores);
        grouped: a list of one value per group under each key."""
        if self.grouped:
            per_group = [self.group(g).certificate() for g in range(to_numpy(self.status).shape[0])]
            return {key: [c[key] for c in per_group] for key in per_group[0]}
        usage = self.usage
        status = int(to_numpy(self.status))
        return {"solver": "allocate", "budget_bits": float(to_numpy(self.budget)), "budget_used": usage.total_bits,
                "payload_bits": usage.payload_bits, "metadata_bits": usage.metadata_bits,
                "average_bits": usage.average_bits, "average_payload_bits": usage.average_payload_bits,
                "distortion": float(to_numpy(self.distortion)), "lower_bound": float(to_numpy(self.lower_bound)),
                "dual_bound": float(to_numpy(self.dual_bound)), "gap": self.gap, "relative_gap": self.relative_gap,
                "multiplier": float(to_numpy(self.multiplier)),
                "iterations": int(to_numpy(self.iterations)), "fill_steps": int(to_numpy(self.fill_steps)),
                "nodes": int(to_numpy(self.nodes)), "status": status, "status_message": MESSAGES[status]}

    def to_dict(self) -> dict:
        return {**self.certificate(), "bits": to_numpy(self.bits).astype(int).tolist()}


_PER_GROUP = tuple(f.name for f in fields(Allocation) if f.name != "bits")  # one value per group when grouped


def default_menu(model: ExponentialModel | TabulatedModel) -> tuple[int, ...]:
    """The integers in the model's quantized range ``[lo, hi]`` (exponential) or the table's bit-widths."""
    if isinstance(model, TabulatedModel):
        return model.bits
    return tuple(range(math.ceil(model.lo), math.floor(model.hi) + 1))


def allocate(model: ExponentialModel | TabulatedModel, sizes: Any, budget: Any = None, *, average_bits: Any = None,
             groups: Any = None, weights: Any = 1.0, menu: Sequence[int] | None = None, metadata: Any = 0.0,
             lo: Any = None, hi: Any = None, max_fill: int | None = None, max_nodes: int = _MAX_NODES) -> Allocation:
    """Minimize ``sum_i w_i D_i(b_i)`` s.t. ``sum_i n_i b_i + m_i [0 < b_i < 16] <= B``, ``b_i`` in ``menu``.

    Args:
      model: an :class:`ExponentialModel` (``0`` needs its ``eviction``; ``16`` costs ``full``, default 0) or a
        :class:`TabulatedModel`.
      sizes: ``n_i > 0`` elements per item. budget: ``B`` in total bits, metadata charged; or ``average_bits``:
        ``B / sum_i n_i``.
      groups: ``None``, or one integer group id in ``[0, G)`` per item, every group non-empty: then ``budget`` (or
        ``average_bits``, per element of the group) is a vector of ``G`` budgets and each group is solved on its own
        budget, in one call (as :func:`rdalloc.waterfill`'s ``groups``; ``G`` static under ``jax.jit``).
      weights: importance ``w_i >= 0`` (a zero-weight item takes its cheapest point).
      menu: strictly increasing integers in ``[0, 16]``; default :func:`default_menu`.
      metadata: ``m_i >= 0`` bits an item carries when ``0 < b_i < 16``.
      lo, hi: optional per-item bounds; menu entries outside ``[lo_i, hi_i]`` are not allowed for item ``i``.
      max_fill: cap on greedy-fill steps (default: until nothing fits).
      max_nodes: work limit of the exact phase, in dynamic-program states generated (default ``2**20``; ``0``: no
        exact phase, the hull/greedy answer). Reached: the best allocation found, status ``FEASIBLE``.

    Returns an :class:`Allocation`: on numpy/torch/array_api_strict the optimum of the menu problem (status
    ``OPTIMAL``, proven up to ``1e-9 (|distortion| + lambda* B)``) unless ``max_nodes`` ran out; under JAX the
    hull/greedy answer with its dual gap (an eager JAX call compiles once per shape and settings, then reuses it).
    Grouped: every field but ``bits`` one per group, each group's answer, bound
    and status its own solve's (:meth:`Allocation.group` gives one). Raises ``ValueError`` for invalid input or a
    budget below the cheapest allocation (the message gives the feasible range and names the group), and (the final
    check on eager backends) a solve whose spending exceeds ``B (1 + 1e-9)``, which only input outside float64's
    range can cause (``weights * distortion`` overflowing is refused up front); under
    ``jax.jit`` an infeasible budget gives status ``INFEASIBLE`` instead (and bits ``-1``; the same rule: the
    cheapest allocation's usage, summed as reported, above ``B``) and a failed final check ``CHECK_FAILED``.

    Three items of 64 elements on the menu ``{0, 2, 4}`` at 2 bits on average: evicting the least important one
    (distortion up by 0.4375) pays for 4 bits on the most important one (down by 0.9375).

    >>> import numpy as np
    >>> model = ExponentialModel(np.array([16.0, 4.0, 1.0]), beta=4.0, eviction=np.array([8.0, 2.0, 0.5]))
    >>> a = allocate(model, 64, average_bits=2.0, menu=(0, 2, 4))
    >>> a.bits.tolist(), float(a.distortion), int(a.status) == OPTIMAL
    ([4, 2, 0], 0.8125, True)
    """
    xp, menu, n, w, m, lo, hi, groups, elements, B = allocate_iv(model, sizes, budget, average_bits, groups, weights,
                                                                 menu, metadata, lo, hi, max_nodes)
    if not is_jax(xp):
        return _allocate(model, n, w, m, lo, hi, groups, B, elements, menu=menu, max_fill=max_fill,
                         max_nodes=max_nodes)
    register_pytree(Allocation)
    if is_traced(n) or is_traced(B):  # inside the user's jax.jit
        return _allocate(model, n, w, m, lo, hi, groups, B, elements, menu=menu, max_fill=max_fill, max_nodes=0)
    # an eager JAX call: compiled once per shape and settings (the loops would otherwise be traced on every call)
    a = jax_compiled(_allocate, model, n, w, m, lo, hi, groups, B, elements, menu=menu, max_fill=max_fill,
                     max_nodes=0)
    if bool(xp.any(a.status == INFEASIBLE)):  # the eager contract: raise, naming the feasible range
        _allocate(model, n, w, m, lo, hi, groups, B, elements, menu=menu, max_fill=max_fill, max_nodes=0)
    return a


def _allocate(model, n, w, m, lo, hi, groups, B, elements, *, menu: tuple, max_fill: int | None,
              max_nodes: int) -> Allocation:
    """:func:`allocate` on checked input."""
    xp = namespace(n)
    static = is_jax(xp) or is_traced(n)  # static shapes and no host syncs (JAX, traced or not)
    if groups is not None:
        return _allocate_grouped(xp, model, menu, (n, w, m, lo, hi), groups, B, elements, static, max_fill,
                                 max_nodes)
    # 1. per item: the (K, N) tables sorted by cost, each item's lower convex hull and its segments
    items = (n, w, m, lo, hi, *_model_arrays(xp, model, menu, device(n), xp.ones_like(n)))
    tables = _item_tables(xp, model, menu, items, static)
    return _solve(xp, tables, menu, n, m, B, elements, static, max_fill, max_nodes)


def _solve(xp, tables: tuple, menu, n, m, B, elements, static: bool, max_fill: int | None, max_nodes: int,
           group: str = "") -> Allocation:
    """Steps 2 to 4 of the module docstring and the certificate, from the items' tables (:func:`_item_tables`);
    ``group`` names the budget in an error."""
    order, C, W, first, nxt, E, dC, valid = tables
    base = xp.sum(_at(xp, C, first))  # the cheapest allocation
    extra = xp.sum(dC)  # what every item's best point costs more
    R = B - base
    if not is_traced(B):  # feasible means: the cheapest allocation's usage, summed as reported, is within B
        if float(B) < float(base) * (1 + 1e-12):  # (only a budget this close needs the reported summation)
            cheapest = _Solution.of(xp, first, order, W, menu, n, m)
            base = cheapest.payload + cheapest.metadata
        _raise_if_infeasible(B, base, base + extra, elements, menu, group)
        infeasible = xp.asarray(False, device=device(B))
    else:  # traced (JAX): the same rule, no host sync; the status says INFEASIBLE
        cheapest = _Solution.of(xp, first, order, W, menu, n, m)
        infeasible = B < cheapest.payload + cheapest.metadata
    R = xp.maximum(R, xp.zeros_like(R))  # (base, summed otherwise, may exceed B by rounding)
    # 2. split level lambda*: every segment with E > lambda* is taken, the tied ones in order while they fit
    saturated = R >= extra
    lam, iterations, spent = _split_level(xp, E, dC, R, saturated | infeasible, static=static)
    cur_t = _last(xp, E > lam, first)  # the Lagrangian minimizer at lambda*
    take_ties = _take_ties_static if static else _take_ties_eager
    cur, slack = take_ties(xp, E, dC, first, lam, R, spent, saturated, cur_t)
    # 3. greedy fill of the slack
    cur, slack, steps = _fill(xp, E, dC, nxt, cur, slack, n.shape[0] if max_fill is None else int(max_fill))
    # 4. exact phase (eager backends): reduced-cost fixing, then a dynamic program over the core
    lam_eff = xp.where(saturated, xp.zeros_like(lam), lam)
    at_t = (_at(xp, W, cur_t), _at(xp, C, cur_t))  # each item's Lagrangian point: distortion and cost
    dual = xp.sum(at_t[0] + lam_eff * at_t[1]) - lam_eff * B
    solution = _Solution.of(xp, cur, order, W, menu, n, m)
    proven, nodes = None, 0
    if not static and not bool(saturated) and max_nodes > 0:
        better, proven, nodes = _exact(xp, C, W, valid, cur_t, at_t, float(solution.distortion), float(lam),
                                       float(dual), float(B), max_nodes)
        if better is not None:  # an improvement: kept unless float summation puts it a hair over the budget
            found = _Solution.of(xp, better, order, W, menu, n, m)
            if float(found.payload + found.metadata) <= float(B):
                solution = found
            else:
                proven = None
    if not is_traced(B) and float(solution.payload + solution.metadata) > float(B) * (1 + _SPEND_RTOL):
        raise ValueError(f"allocate spent {float(solution.payload + solution.metadata)!r} bits against a budget of "
                         f"{float(B)!r}: the input is outside the range float64 solves reliably; rescale sizes")
    # the certificate
    dual = xp.minimum(dual, solution.distortion)  # q(lambda*) <= optimum <= distortion; rounding aside
    lower, status = _bound_and_status(xp, solution.distortion, dual, proven, saturated, infeasible)
    if is_traced(B):  # the final check, traced: a status instead of the ValueError
        over = ~infeasible & (solution.payload + solution.metadata > B * (1 + _SPEND_RTOL))
        status = xp.where(over, xp.asarray(int(CHECK_FAILED), dtype=status.dtype, device=device(B)), status)
    bits = xp.where(infeasible, xp.full_like(solution.bits, -1), solution.bits) if is_jax(xp) else solution.bits
    return Allocation(bits=bits, budget=B, payload_bits=solution.payload, metadata_bits=solution.metadata,
                      elements=elements, distortion=solution.distortion, lower_bound=lower, dual_bound=dual,
                      multiplier=lam_eff, iterations=iterations, fill_steps=steps,
                      nodes=xp.asarray(nodes, dtype=xp.int32, device=device(B)), status=status)


def _rows(xp, x, rows):
    """The items ``rows`` of ``x`` along its first axis: a slice of contiguous items, or an index array."""
    return x[rows] if isinstance(rows, slice) else xp.take(x, rows, axis=0)


def _own(xp, x, own):
    """One group's columns ``own`` of a block's arrays (a copy, so the block can be freed); all of them if None."""
    return x if own is None else xp.asarray(x[..., own], copy=True)


def _allocate_grouped(xp, model, menu, items: tuple, groups, B, elements, static: bool, max_fill: int | None,
                      max_nodes: int) -> Allocation:
    """:func:`allocate` with one budget per group (``items``: the checked ``(n, w, m, lo, hi)``).

    Eager backends: a loop over the groups, each one's items (a slice when the groups are contiguous) going through
    all of :func:`allocate` from the tables on, so every group's answer, bound and status are its own solve's, bit
    for bit; one group's tables stay in the CPU cache from hull to certificate (one pass of the whole table through
    memory, where solving all groups at once would make one per step). JAX: :func:`_allocate_grouped_static`."""
    if static:
        return _allocate_grouped_static(xp, model, menu, items, groups, B, elements, max_fill)
    data = _model_data(xp, model, device(items[0]))
    G = B.shape[0]
    contiguous = bool(xp.all(groups[1:] >= groups[:-1]))
    by_group = None if contiguous else xp.argsort(groups, stable=True)
    ends = np.cumsum(group_sizes(xp, groups, G))
    starts = np.concatenate([[0], ends[:-1]])
    solves = []
    for block in _blocks(starts, ends):  # small groups share the per-item stage, up to a chunk of items
        part = slice(int(starts[block[0]]), int(ends[block[-1]]))
        rows = part if contiguous else by_group[part]
        where = np.arange(part.start, part.stop) if contiguous else to_numpy(rows)
        mine = tuple(None if x is None else _rows(xp, x, rows) for x in items)
        mine += _per_item(xp, model, menu, tuple(_rows(xp, x, rows) if x is not None and x.ndim else x for x in data),
                          xp.ones_like(mine[0]))
        tables = _item_tables(xp, model, menu, mine, False, where)
        for g in block:
            own = None if len(block) == 1 else slice(int(starts[g]) - part.start, int(ends[g]) - part.start)
            solves.append(_solve(xp, tuple(_own(xp, X, own) for X in tables), menu, _own(xp, mine[0], own),
                                 _own(xp, mine[2], own), B[g], elements[g], False, max_fill, max_nodes,
                                 f"of group {g} "))
    bits = xp.concat([a.bits for a in solves])
    bits = bits if contiguous else xp.take(bits, xp.argsort(by_group))  # back to the items' order
    return Allocation(bits=bits, **{name: xp.stack([getattr(a, name) for a in solves]) for name in _PER_GROUP})


def _blocks(starts, ends) -> list:
    """Runs of consecutive groups whose items together fit in one chunk of the per-item stage (a larger group alone)."""
    blocks = [[0]]
    for g in range(1, len(starts)):
        if ends[g] - starts[blocks[-1][0]] <= _CHUNK:
            blocks[-1].append(g)
        else:
            blocks.append([g])
    return blocks


def _allocate_grouped_static(xp, model, menu, items: tuple, groups, B, elements, max_fill: int | None) -> Allocation:
    """:func:`_allocate_grouped` on JAX: the tables of all items, then one ``lax.map`` over the groups, each solving
    the whole table with the other groups' items masked out (no segments, no cost, no distortion): ``G`` times the
    work of one static solve, in one compiled loop. No exact phase, as ungrouped."""
    import jax

    n, m = items[0], items[2]
    items = (*items, *_model_arrays(xp, model, menu, device(n), xp.ones_like(n)))
    order, C, W, first, nxt, E, dC, valid = _item_tables(xp, model, menu, items, True)
    def tables_of(g):
        inside = groups == g
        zero = lambda X: xp.where(inside, X, xp.zeros_like(X))  # noqa: E731
        return (order, zero(C), zero(W), first, nxt, xp.where(inside, E, -xp.inf), zero(dC), valid), zero(n), zero(m)

    if not is_traced(B) and not is_traced(C):  # eager JAX (the error path): raise by the rule the solve's status uses
        for g in range(B.shape[0]):
            masked_tables, n_g, m_g = tables_of(g)
            cheapest = _Solution.of(xp, first, order, masked_tables[2], menu, n_g, m_g)
            base = cheapest.payload + cheapest.metadata
            _raise_if_infeasible(B[g], base, base + xp.sum(masked_tables[6]), elements[g], menu, f"of group {g} ")

    def solve(g):
        masked_tables, n_g, m_g = tables_of(g)
        return _solve(xp, masked_tables, menu, n_g, m_g, B[g], elements[g], True, max_fill, 0)

    solves = jax.lax.map(solve, xp.arange(B.shape[0], dtype=groups.dtype))
    bits = xp.take_along_axis(solves.bits, xp.reshape(groups, (1, -1)), axis=0)[0, :]  # each item's own group
    return Allocation(bits=bits, **{name: getattr(solves, name) for name in _PER_GROUP})


def _item_tables(xp, model, menu, items: tuple, static: bool, where: Any = None) -> tuple:
    """``(order, C, W, first, nxt, E, dC, valid)`` of :func:`_item_stage` for the items ``(n, w, m, lo, hi, *model
    arrays)`` (``where``: their indices among the caller's, for errors). Items are independent here, so eager
    backends run over cache-sized chunks of items, written straight into the ``(K, N)`` tables."""
    N = items[0].shape[0]
    where = np.arange(N) if where is None else where
    chunk = N if static or N <= _CHUNK else _CHUNK
    tables = None
    for start in range(0, N, chunk):
        sl = slice(start, min(start + chunk, N))
        n_c, w_c, m_c, lo_c, hi_c, *parts_c = (None if a is None else a[sl] for a in items)
        piece = _item_stage(xp, model, menu, parts_c, n_c, w_c, m_c, lo_c, hi_c, static, where[sl])
        if chunk == N:
            return piece
        if tables is None:  # eager: whole tables, filled chunk by chunk
            tables = tuple(xp.empty(x.shape[:-1] + (N,), dtype=x.dtype, device=device(x)) for x in piece)
        for out, x in zip(tables, piece):
            out[..., sl] = x
    return tables


def _raise_if_infeasible(B, base, top, elements, menu, group: str = "") -> None:
    """``ValueError`` giving the feasible range when the budget is below the cheapest allocation ``base``
    (``group``: which group's budget, in the message). No slack: a budget below it by rounding is below it (the
    message gives the exact value to pass)."""
    if float(B) < float(base):
        el = float(elements)
        raise ValueError(f"budget {group}{float(B):.10g} bits (average {float(B) / el:.6g}) is infeasible for menu "
                         f"{list(menu)}: the cheapest allocation needs {float(base):.10g} bits (average "
                         f"{float(base) / el:.6g}); every item at its best point needs {float(top):.10g} "
                         f"(average {float(top) / el:.6g}); the least budget accepted is {float(base)!r}")


def _take_ties_eager(xp, E, dC, first, lam, R, spent, saturated, cur_t):
    """Eager: the rows ``cur`` after taking the segments tied at ``lambda*`` (few) in row-major order while they fit,
    and the slack left."""
    K, N = E.shape
    slack, cur = R - spent, cur_t
    at = xp.nonzero(xp.reshape(E == lam, (-1,)))[0] if not bool(saturated) else xp.zeros((0,), dtype=xp.int64)
    if at.shape[0]:
        cum = xp.cumulative_sum(xp.take(xp.reshape(dC, (-1,)), at))
        p = int(xp.sum(xp.astype(cum <= slack, xp.int32)))  # the first p fit
        if p:
            slack, last_at = slack - cum[p - 1], int(at[p - 1])
            items = xp.arange(N, dtype=xp.int64, device=device(E))
            take_tie = xp.stack([(E[k, :] == lam) & (items <= last_at - k * N) for k in range(K)], axis=0)
            cur = _last(xp, (E > lam) | take_tie, first)
    return cur, slack


def _take_ties_static(xp, E, dC, first, lam, R, spent, saturated, cur_t):
    """:func:`_take_ties_eager` with static shapes (JAX): the tied segments' running cost over the whole table."""
    K, N = E.shape
    above = E > lam
    slack = R - xp.sum(xp.where(above, dC, xp.zeros_like(dC)))
    tie = (E == lam) & ~saturated
    cum = xp.reshape(xp.cumulative_sum(xp.reshape(xp.where(tie, dC, xp.zeros_like(dC)), (-1,))), (K, N))
    take_tie = tie & (cum <= slack)  # row-major order keeps each item's tied segments a prefix
    slack = slack - xp.sum(xp.where(take_tie, dC, xp.zeros_like(dC)))
    return _last(xp, above | take_tie, first), slack


class _Solution(NamedTuple):
    """An allocation given as each item's row ``cur``: its bit-widths (int32), distortion, payload and metadata."""

    bits: Any
    distortion: Any
    payload: Any
    metadata: Any

    @classmethod
    def of(cls, xp, cur, order, W, menu, n, m) -> _Solution:
        menu_bits = xp.asarray(list(menu), dtype=xp.int32, device=device(n))
        bits = xp.take(menu_bits, xp.astype(_at(xp, order, cur), index_dtype(xp)))
        bits_f = xp.astype(bits, n.dtype)
        quantized = (bits_f > 0) & (bits_f < FULL_BITS)
        return cls(bits, xp.sum(_at(xp, W, cur)), xp.sum(n * bits_f), xp.sum(xp.where(quantized, m, xp.zeros_like(m))))


def _bound_and_status(xp, distortion, dual, proven, saturated, infeasible):
    """The lower bound and status code: ``OPTIMAL`` with the exact phase's bound when it finished, else the dual bound
    and ``OPTIMAL`` only for a zero dual gap (to ``1e-12`` relative)."""
    code = lambda v: xp.asarray(int(v), dtype=xp.int32, device=device(distortion))  # noqa: E731
    if proven is not None:  # proven optimal by the exact phase (up to _RTOL)
        proven = xp.asarray(proven, dtype=distortion.dtype, device=device(distortion))
        return xp.minimum(xp.maximum(proven, dual), distortion), code(OPTIMAL)
    tol = 1e-12 * xp.maximum(xp.abs(distortion), xp.asarray(1e-300, dtype=distortion.dtype, device=device(distortion)))
    status = xp.where(infeasible, code(INFEASIBLE), xp.where(saturated, code(SATURATED),
                                                             xp.where(distortion - dual <= tol, code(OPTIMAL),
                                                                      code(FEASIBLE))))
    return dual, status


def _exact(xp, C, W, valid, cur_t, at_t: tuple, U: float, lam: float, dual: float, B: float, max_nodes: int):
    """Exact phase: reduced-cost fixing against the incumbent, then an exact dynamic program over the core items.

    With ``r_ik = W_ik + lam C_ik - min_k (W_ik + lam C_ik) >= 0`` (``min`` at the Lagrangian row ``t_i``) every
    allocation within the budget has ``sum_i W_i(x_i) >= L + sum_i r_i(x_i)``, ``L = q(lam)`` the dual bound. So an
    allocation below ``U - tol`` (``U`` the incumbent) uses no point with ``r_ik >= U - L - tol``: an item whose every
    other point has such a reduced cost stays at ``t_i``. The core — the items that may move, taken ``_CORE0``, then
    4 times as many, ... by increasing ``min_{k != t_i} r_ik`` — is solved exactly by :func:`_core_dp` with the other
    items at ``t_i``; its optimum is the new incumbent. Done (proven) when every item outside the core is fixed by the
    new ``U``. Returns ``(cur or None, proven lower bound or None, nodes)``: the improved rows (``None`` when the
    incumbent stands), and when proven the bound ``min(U, smallest bound the program cut, L + smallest reduced cost
    off t outside the core)``; ``None`` when ``max_nodes`` ran out first. ``at_t``: ``(W, C)`` at each item's row
    ``t_i``; ``U``: the incumbent's distortion.
    """
    K = C.shape[0]
    tol = _RTOL * (abs(U) + lam * B)
    if U - dual <= tol:
        return None, dual, 0
    W_t, C_t = at_t
    lag_t = W_t + lam * C_t
    inf = xp.asarray(xp.inf, dtype=C.dtype)
    rmin = xp.full_like(lag_t, xp.inf)
    t = xp.astype(cur_t, xp.int64)
    for k in range(K):  # the smallest reduced cost of moving each item off t_i (row by row: no (K, N) temporaries)
        r = W[k, :] + lam * C[k, :] - lag_t
        rmin = xp.minimum(rmin, xp.where(valid[k, :] & (t != k), r, inf))
    base_cost, base_w = float(xp.sum(C_t)), float(xp.sum(W_t))
    best, nodes, size = None, 0, _CORE0
    while True:
        thr = U - dual - tol
        cand = xp.nonzero(rmin < thr)[0]
        if cand.shape[0] > size:  # the `size` smallest (a sort of the candidates only)
            o = xp.argsort(xp.take(rmin, cand), stable=True)[:size]
            cand = xp.take(cand, o)
        core = np.sort(to_numpy(cand).astype(np.int64))
        if core.shape[0] == 0:
            return best, min(U, dual + _outside_min(xp, rmin, core)), nodes
        idx = xp.asarray(core, device=device(C))
        Cc, Wc, Vc = (to_numpy(xp.take(X, idx, axis=1)).T for X in (C, W, valid))
        tc = to_numpy(xp.take(cur_t, idx)).astype(np.int64)
        lag_c = to_numpy(xp.take(lag_t, idx))
        Rc = np.where(Vc, Wc + lam * Cc - lag_c[:, None], np.inf)
        rows_t = np.arange(core.shape[0])
        budget = B - (base_cost - float(np.sum(Cc[rows_t, tc])))
        fixed = base_w - float(np.sum(Wc[rows_t, tc]))  # the distortion of the items outside the core
        found, pruned, used, complete = _core_dp(Cc, Wc, Vc, Rc, tc, budget, fixed, U, dual, tol,
                                                 max_nodes - nodes)
        nodes += used
        if found is not None:
            U, rows = found
            best = xp.asarray(cur_t, copy=True)
            for j in np.nonzero(rows != tc)[0]:
                best[int(core[j])] = int(rows[j])
        if not complete:
            return best, None, nodes
        outside = _outside_min(xp, rmin, core)
        if outside >= U - dual - tol:  # nothing outside the core can improve on U: proven
            return best, min(U, pruned, dual + outside), nodes
        size *= 4


def _outside_min(xp, rmin, core) -> float:
    """The smallest ``rmin`` over the items not in ``core`` (sorted host indices)."""
    if core.shape[0] == 0:
        return float(xp.min(rmin))
    out = xp.ones(rmin.shape, dtype=xp.bool, device=device(rmin))
    idx = xp.asarray(core, device=device(rmin))
    if array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_torch_namespace(xp):
        out[idx] = False
    else:
        for i in core.tolist():
            out[i] = False
    return float(xp.min(xp.where(out, rmin, xp.full_like(rmin, xp.inf))))


def _core_dp(C, W, V, R, t, budget: float, fixed: float, U: float, L: float, tol: float, max_nodes: int):
    """Exact multiple-choice knapsack over the core (host numpy; ``(p, K)`` rows sorted by cost: cost, weighted
    distortion, allowed, reduced cost), the other items at their Lagrangian rows (distortion ``fixed``) and the core's
    ``budget``; ``U``, ``L`` are the incumbent's and the dual bound's total distortion.

    Items are added one at a time (by increasing smallest reduced cost off ``t``: nearest the split first) to a list
    of partial allocations (states: cost ``c``, distortion ``w``), keeping only states that are (a) Pareto-optimal in
    ``(c, w)`` (a dominated state's completions are no better) and (b) promising: ``fixed + w + LP(budget - c) < U -
    tol``, ``LP(x)`` the LP relaxation (convex hulls, fractional fill by efficiency) of the items still to come with
    ``x`` bits, ``+inf`` below their cheapest points. Only points with reduced cost ``< U - L - tol`` are tried (every
    allocation has distortion ``>= L + sum of its reduced costs``). A state completed with the items to come at
    ``t`` is a feasible allocation; the best one below ``U`` becomes the incumbent. Returns ``(found, pruned, nodes,
    complete)``: ``found`` ``(value, rows)`` or ``None``; the smallest bound cut by (b) or by the reduced cost; the
    states generated; whether every item was added within ``max_nodes`` (then no allocation that moves only the core
    is below ``min(U, pruned)``).
    """
    p, K = C.shape
    off = np.where(np.arange(K)[None, :] == t[:, None], np.inf, R).min(axis=1)
    order = np.argsort(off, kind="stable")
    C, W, V, R, t = C[order], W[order], V[order], R[order], t[order]
    rows_t = np.arange(p)
    tC, tW = C[rows_t, t], W[rows_t, t]
    after = lambda x: np.concatenate([np.cumsum(x[::-1])[::-1][1:], [0.0]])  # noqa: E731  sum over items j+1..p-1
    first, _, E, dC = _hull(namespace(C), C.T, W.T, V.T, static=False)
    first = first.astype(np.int64)
    c0, w0 = C[rows_t, first], W[rows_t, first]
    c0_after, w0_after, tC_after, tW_after = after(c0), fixed + after(w0), after(tC), fixed + after(tW)
    seg_k, seg_i = np.nonzero(E > -np.inf)  # hull segments, item i = position in the order
    seg_e = E[seg_k, seg_i]
    by_e = np.argsort(-seg_e, kind="stable")
    seg_i, seg_c, seg_w = seg_i[by_e], dC[seg_k, seg_i][by_e], (seg_e * dC[seg_k, seg_i])[by_e]
    c, w = np.zeros(1), np.zeros(1)
    parents, choices = [], []
    found, pruned, nodes = None, np.inf, 0
    for j in range(p):
        thr = U - L - tol
        ks = np.nonzero(R[j] < thr)[0]
        cut = R[j][(R[j] >= thr) & V[j]]
        if cut.shape[0]:
            pruned = min(pruned, L + float(cut.min()))
        S, kj = c.shape[0], ks.shape[0]
        nodes += S * kj
        if nodes > max_nodes:
            return found, pruned, nodes, False
        nc = (c[:, None] + C[j, ks][None, :]).ravel()
        nw = (w[:, None] + W[j, ks][None, :]).ravel()
        parent = np.repeat(np.arange(S), kj)
        choice = np.tile(ks, S)
        rest = seg_i > j  # the LP relaxation of the items to come: gain of a fractional fill by efficiency
        gc = np.concatenate([[0.0], np.cumsum(seg_c[rest])])
        gw = np.concatenate([[0.0], np.cumsum(seg_w[rest])])
        cap = budget - nc - c0_after[j]
        bound = np.where(cap >= 0, nw + w0_after[j] - np.interp(cap, gc, gw), np.inf)
        keep = bound < U - tol
        cut = bound[~keep & (cap >= 0)]
        if cut.shape[0]:
            pruned = min(pruned, float(cut.min()))
        o = np.lexsort((nw[keep], nc[keep]))  # by cost, then distortion
        nc, nw, bound, parent, choice = (x[keep][o] for x in (nc, nw, bound, parent, choice))
        pareto = np.ones(nc.shape[0], dtype=bool)
        pareto[1:] = nw[1:] < np.minimum.accumulate(nw)[:-1]
        nc, nw, bound, parent, choice = (x[pareto] for x in (nc, nw, bound, parent, choice))
        value, cost = nw + tW_after[j], nc + tC_after[j]  # completed with the items to come at t
        fits = cost <= budget
        if np.any(fits):
            i = int(np.argmin(np.where(fits, value, np.inf)))
            if value[i] < U:
                rows, s = t.copy(), i
                rows[j] = choice[s]
                s = parent[s]
                for level in range(j - 1, -1, -1):
                    rows[level] = choices[level][s]
                    s = parents[level][s]
                U = float(value[i])
                found = (U, np.empty_like(rows))
                found[1][order] = rows
                keep = bound < U - tol
                cut = bound[~keep]
                if cut.shape[0]:
                    pruned = min(pruned, float(cut.min()))
                nc, nw, parent, choice = nc[keep], nw[keep], parent[keep], choice[keep]
        parents.append(parent), choices.append(choice)
        c, w = nc, nw
        if c.shape[0] == 0:
            break
    return found, pruned, nodes, True


def _at(xp, X, col):
    """``X[col[i], i]`` for a ``(K, N)`` table and one column index per item."""
    K, N = X.shape
    if is_jax(xp) or is_traced(X):
        idx = xp.reshape(xp.astype(col, index_dtype(xp)), (1, -1))
        return xp.take_along_axis(X, idx, axis=0)[0, :]
    flat = xp.astype(col, xp.int64) * N + xp.arange(N, dtype=xp.int64, device=device(X))
    return xp.take(xp.reshape(X, (-1,)), flat)


def _last(xp, taken, first):
    """Per item, the last row of a ``(K, N)`` mask that is set, or ``first`` where none is (taken rows > first)."""
    K = taken.shape[0]
    if array_api_compat.is_numpy_namespace(xp):  # integer multiply: numpy's where on a random mask is slow
        rows = xp.reshape(xp.arange(K, dtype=xp.int8), (K, 1))
        return xp.maximum(first, xp.astype(xp.max(rows * xp.astype(taken, xp.int8), axis=0), first.dtype))
    rows = xp.reshape(xp.arange(K, dtype=first.dtype, device=device(first)), (K, 1))
    return xp.max(xp.where(taken, rows, xp.reshape(first, (1, -1))), axis=0)


_CHUNK = 1 << 13  # items per chunk in the per-item stage: a (K, chunk) float64 table stays in the CPU cache


def _model_arrays(xp, model, menu, dev, ones) -> tuple:
    """The model's per-item arrays, sliceable along the items: (alpha, beta, eviction, full) or the table columns."""
    return _per_item(xp, model, menu, _model_data(xp, model, dev), ones)


def _model_data(xp, model, dev) -> tuple:
    """The model's arrays on the solver's backend as given (0-d where shared; float64 arrays are not copied):
    (alpha, beta, eviction, full) or (distortion table, allowed mask)."""
    if isinstance(model, TabulatedModel):  # no mask (None) when every point is allowed
        return (as_float64(xp, model.distortion, device=dev, name="distortion"),
                None if model.allowed is None else xp.asarray(model.allowed_mask, device=dev))
    return tuple(as_float64(xp, v, device=dev, name=name) for v, name in (
        (model.alpha, "alpha"), (model.beta, "beta"), (model.eviction if model.can_evict else 0.0, "eviction"),
        (model.full, "full")))


def _per_item(xp, model, menu, data: tuple, ones) -> tuple:
    """:func:`_model_data` (or some items' rows of it) as one row per item (``ones``: one per item); a table keeps
    the menu's columns."""
    if isinstance(model, TabulatedModel):
        cols = [model.bits.index(b) for b in menu]
        if cols == list(range(len(model.bits))):  # the whole table, as it is
            return data
        cols = xp.asarray(cols, device=device(ones))
        return tuple(None if x is None else xp.take(x, cols, axis=1) for x in data)
    return tuple(x * ones for x in data)


def _item_stage(xp, model, menu, parts, n, w, m, lo, hi, static: bool, where) -> tuple:
    """Table, sort, hull and segments for a block of items: ``(order, C, W, first, nxt, E, dC, valid)``, tables
    ``(K, n)`` (``valid``: the allowed points, rows sorted like ``C``).

    ``order[k, i]`` is the menu index of item ``i``'s ``k``-th point by cost; ``where``: the items' indices, for
    errors.
    """
    zero = xp.zeros_like(n)
    yes, no = zero == 0, zero != 0
    D, allowed = [], []
    if isinstance(model, TabulatedModel):
        table, mask = parts
        for k in range(len(menu)):
            D.append(table[:, k] if mask is None else xp.where(mask[:, k], table[:, k], zero))
            allowed.append(yes if mask is None else mask[:, k])
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
    W = xp.stack([w * D[k] if allowed[k] is yes else xp.where(allowed[k], w * D[k], zero) for k in range(len(menu))],
                 axis=0)
    C = xp.stack([n * b + (m if 0 < b < FULL_BITS else zero) for b in menu], axis=0)
    valid = xp.stack(allowed, axis=0)
    if not is_traced(valid):
        finite = bool(xp.all(xp.abs(W) < xp.inf))  # (W is 0 at the points not allowed)
        overflow = None if finite else to_numpy(xp.any(valid & ~(xp.abs(W) < xp.inf), axis=0))
        if not finite and overflow.any():
            j = int(np.argmax(overflow))
            raise ValueError(f"weights * distortion overflows float64 at item {int(where[j])} (weight "
                             f"{float(to_numpy(w if w.ndim == 0 else w[j]))!r}); scale weights down")
        none = ~to_numpy(xp.any(valid, axis=0))
        if none.any():
            i = int(where[int(np.argmax(none))])
            raise ValueError(f"item {i} has no feasible bit-width in menu {list(menu)} (check the model's range "
                             f"[lo, hi], its eviction distortion for 0, and the lo/hi bounds)")
    order, C, W, valid = _sort_by_cost(xp, C, W, valid)
    first, nxt, E, dC = _hull(xp, C, W, valid, static)
    return order, C, W, first, nxt, E, dC, valid


def _sort_by_cost(xp, C, W, valid):
    """Order each item's points by (cost, distortion): ``(order, C, W, valid)``, ``order`` int8. The sort runs only
    when some item's menu order is not already by strictly increasing cost (under ``jax.jit``: ``lax.cond``)."""
    K = C.shape[0]

    def as_is(C, W, valid):
        order = xp.reshape(xp.arange(K, dtype=xp.int8, device=device(C)), (-1, 1)) * xp.ones_like(valid, dtype=xp.int8)
        return order, C, W, valid

    def by_cost(C, W, valid):
        inf = xp.asarray(xp.inf, dtype=C.dtype)
        gather = lambda X, o: xp.take_along_axis(X, o, axis=0)  # noqa: E731
        o1 = xp.argsort(xp.where(valid, W, inf), axis=0, stable=True)
        o2 = xp.argsort(gather(xp.where(valid, C, inf), o1), axis=0, stable=True)
        order = gather(o1, o2)
        return xp.astype(order, xp.int8), gather(C, order), gather(W, order), gather(valid, order)

    return cond(xp, xp.all(C[1:, :] > C[:-1, :]), as_is, by_cost, (C, W, valid))


class _Pruning(NamedTuple):
    """Hull rounds in ``lax.while_loop``: the ``(K, N)`` mask of the points kept, and whether the last round dropped
    any."""

    keep: Any
    dropped: Any


def _hull(xp, C, W, valid, static: bool):
    """Each item's decreasing lower convex hull (rows sorted by cost) and its segments: ``(first, nxt, E, dC)``.

    Dominance first (a point must be strictly better than every cheaper valid point), then rounds that drop every
    point strictly above the chord of its valid neighbours, until none is. A round scans the rows once forwards for
    ``E_k = (W_prev - W_k) / (C_k - C_prev)`` (the efficiency of the segment into ``k`` from the previous valid point;
    ``+inf`` for the first) and once backwards to drop ``k`` where ``E_k < E_next``. The last round's ``E_k`` are the
    segments, so ``E`` is non-increasing along each hull exactly, not just up to rounding. Outputs, stored at the
    segment's end row: ``E`` (``-inf`` where none), ``dC = C_k - C_prev`` (0 where none); ``first``, the first hull
    row; ``nxt[k]``, the next hull row after row ``k`` (``K`` if none); int8 indices.
    """
    K = C.shape[0]
    if not static:
        convex = _convex_hull(xp, C, W, valid)
        if convex is not None:
            return convex
    row = lambda X, k: X[k, :]  # noqa: E731
    keep, best, seen = [], xp.zeros_like(C[0, :]), xp.zeros_like(valid[0, :])
    for k in range(K):
        ok = valid[k, :] & ~(seen & (best <= W[k, :]))
        best, seen = xp.where(ok, W[k, :], best), seen | ok
        keep.append(ok)
    inf = xp.full_like(C[0, :], xp.inf)

    def one_round(valid):
        """``E_k``, ``C_k - C_prev`` and whether a valid point precedes, per row; and the rows to drop."""
        pc, pw, seen = -xp.ones_like(inf), inf, xp.zeros_like(valid[0])  # sentinel: E of the first point is +inf
        e_in, d, has = [], [], []
        for k in range(K):
            v, c, w = valid[k], row(C, k), row(W, k)
            d.append(c - pc)
            e_in.append((pw - w) / d[-1])  # invalid rows may divide by 0: never used
            has.append(seen)
            pc, pw, seen = xp.where(v, c, pc), xp.where(v, w, pw), seen | v
        e_out, drop, any_drop = -inf, [None] * K, xp.zeros_like(valid[0])
        for k in reversed(range(K)):
            drop[k] = valid[k] & (e_in[k] < e_out)
            any_drop = any_drop | drop[k]
            e_out = xp.where(valid[k], e_in[k], e_out)
        return e_in, d, has, drop, xp.any(any_drop)

    with np.errstate(divide="ignore", invalid="ignore"):
        if static:  # JAX: rounds in lax.while_loop on the stacked mask, then one more for the segments
            def prune(state: _Pruning) -> _Pruning:
                rows = [state.keep[k, :] for k in range(K)]
                *_, drop, dropped = one_round(rows)
                return _Pruning(xp.stack([r & ~x for r, x in zip(rows, drop)], axis=0), dropped)

            kept = xp.stack(keep, axis=0)
            kept = while_loop(xp, lambda s: s.dropped, prune, _Pruning(kept, xp.any(kept))).keep
            keep = [kept[k, :] for k in range(K)]
            e_in, d, has, _, _ = one_round(keep)
        else:
            while True:
                e_in, d, has, drop, more = one_round(keep)
                if not bool(more):
                    break
                keep = [r & ~x for r, x in zip(keep, drop)]
    seg = [v & h for v, h in zip(keep, has)]
    E = xp.stack([xp.where(s, e, -inf) for s, e in zip(seg, e_in)], axis=0)
    dC = xp.stack([xp.where(s, x, xp.zeros_like(x)) for s, x in zip(seg, d)], axis=0)
    j, nxt = xp.full(inf.shape, K, dtype=xp.int8, device=device(C)), [None] * K
    for k in reversed(range(K)):
        nxt[k] = j
        j = xp.where(keep[k], xp.asarray(k, dtype=xp.int8, device=device(C)), j)
    return j, xp.stack(nxt, axis=0), E, dC


def _convex_hull(xp, C, W, valid):
    """:func:`_hull`'s answer when every item's points all are its hull, else ``None`` (eager backends).

    When every point is allowed, ``W`` strictly decreases down the rows and the efficiencies ``E_k = (W_{k-1} - W_k)
    / (C_k - C_{k-1})`` do not increase, dominance drops nothing and the first round of chords drops nothing, so the
    hull is every row: ``first = 0``, ``nxt[k] = k + 1``, and ``E``, ``dC`` are those of the first round (the same
    float operations, so the same bits). Checked with whole-table operations instead of ``K`` row-by-row scans."""
    K, N = C.shape
    if K < 2:
        return None
    for part in (slice(0, min(N, 64)), slice(None)):  # the first items, then all: a table that fails, fails early
        Cp, Wp = C[:, part], W[:, part]
        if not bool(xp.all(valid[:, part])) or not bool(xp.all(Wp[1:, :] < Wp[:-1, :])):
            return None
        d = Cp[1:, :] - Cp[:-1, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            e = (Wp[:-1, :] - Wp[1:, :]) / d
        if K > 2 and not bool(xp.all(e[:-1, :] >= e[1:, :])):
            return None
    dev = device(C)
    E = xp.concat([xp.full((1, N), -xp.inf, dtype=C.dtype, device=dev), e], axis=0)
    dC = xp.concat([xp.zeros((1, N), dtype=C.dtype, device=dev), d], axis=0)
    rows = xp.reshape(xp.arange(1, K + 1, dtype=xp.int8, device=dev), (K, 1))
    nxt = rows * xp.ones((K, N), dtype=xp.int8, device=dev)
    return xp.zeros((N,), dtype=xp.int8, device=dev), nxt, E, dC


def _split_level(xp, E, dC, R, skip, static: bool):
    """The smallest efficiency value ``v`` with ``T(v) = sum dC [E > v] <= R`` (0 when ``skip``), the pass count,
    and ``T(v)`` (eager backends; ``None`` on JAX).

    Eager backends (numpy, torch, array_api_strict): sample-select. Each round sorts a strided sample of about
    ``size**(2/3)`` candidates, reads off two pivots 4 standard errors either side of the estimated split, and in one
    pass over the candidates sums the cost above the upper pivot and keeps those between the pivots (a few percent);
    the exact costs at both pivots follow from the kept ones. If the split is between them, only the kept remain;
    else (a misleading sample) the candidates beyond the pivot that held. At most ``_EXACT`` left, an exact sort
    finishes.
    JAX: the same bracket driven by Illinois regula falsi on ``ln lambda`` with trials snapped to efficiency values
    and bisection safeguards, in ``lax.while_loop`` with static shapes.
    Invariant: ``T(lo) > R >= T(hi)``, ``T(lam) = sum dC [E > lam]``; done when no value lies in ``(lo, hi)``.
    """
    if static:
        return _split_level_static(xp, xp.reshape(E, (-1,)), xp.reshape(dC, (-1,)), R, skip)
    # row 0 holds no segment end (no cheaper point precedes it): the other rows are one contiguous block
    return _split_level_eager(xp, xp.reshape(E[1:, :], (-1,)), xp.reshape(dC[1:, :], (-1,)), R, skip)


def _split_level_eager(xp, e, c, R, skip):
    """:func:`_split_level` by sample-select over the flat efficiencies ``e`` and costs ``c``."""
    zero = xp.zeros_like(R)
    if bool(skip):
        return zero, xp.asarray(0, dtype=xp.int32), zero
    inf = xp.asarray(xp.inf, dtype=e.dtype)
    lo, hi, const, tied = -inf, inf, zero, zero  # candidates lo < e < hi; const, tied: sums of dC over E >= hi, E == hi
    total = xp.sum(c)  # of dC over the candidates
    sel = lambda mask, x: _masked_sum(xp, mask, x)  # noqa: E731
    rounds = 0
    while e.shape[0] > _EXACT:
        rounds += 1
        size = e.shape[0]
        stride = max(size // max(int(size ** (2 / 3)), 2048), 1)  # a sample of about size**(2/3)
        s_e, s_c = e[::stride], c[::stride]
        inb = (s_e > lo) & (s_e < hi)
        s_e, s_c = s_e[inb], s_c[inb]
        if s_e.shape[0] < 64:
            break
        o = _descending(xp, s_e)
        s_e, s_c = xp.take(s_e, o), xp.take(s_c, o)
        s_c = s_c * (total / positive_or_one(xp, xp.sum(s_c)))
        j = int(xp.sum(xp.astype(const + xp.cumulative_sum(s_c) - s_c <= R, xp.int32))) - 1  # estimated split
        d = 4 * int(math.sqrt(s_e.shape[0])) + 4
        v_hi = s_e[j - d] if j - d >= 0 else hi
        v_lo = s_e[j + d] if j + d < s_e.shape[0] else lo
        above, ke, kc = _pivot_pass(xp, e, c, lo, hi, v_lo, v_hi)
        t_hi = const + above  # T(v_hi)
        t_lo = t_hi + sel(ke > v_lo, kc)  # T(v_lo)
        if bool(v_hi < hi) and bool(t_hi > R):  # the split is above v_hi (a misleading sample)
            lo, ke, kc = v_hi, e, c
        elif bool(t_lo <= R):  # the split is at or below v_lo
            tied = sel(ke == v_lo, kc)
            hi, const, ke, kc = v_lo, t_lo + tied, e, c
        else:
            if bool(v_hi < hi):
                tied = sel(ke == v_hi, kc)
                hi, const = v_hi, t_hi + tied
            lo = xp.maximum(lo, v_lo)
        keep = (ke > lo) & (ke < hi)
        e, c = ke[keep], kc[keep]
        total = xp.sum(c)
        if e.shape[0] > size // 2:  # the sample misled us (heavy ties): finish exactly
            break
    rounds += 1
    keep = (e > lo) & (e < hi)
    e, c = e[keep], c[keep]
    if e.shape[0] == 0:
        return hi, xp.asarray(rounds, dtype=xp.int32), const - tied
    if array_api_compat.is_numpy_namespace(xp) and e.shape[0] > _RADIX and bool(const <= R):
        found = _split_in_bucket(xp, e, c, const, R)
        if found is not None:
            return found[0], xp.asarray(rounds, dtype=xp.int32), found[1]
    o = _descending(xp, e)
    e, c = xp.take(e, o), xp.take(c, o)
    ok = const + xp.cumulative_sum(c) - c <= R
    j = int(xp.sum(xp.astype(ok, xp.int32))) - 1
    if j < 0:
        return hi, xp.asarray(rounds, dtype=xp.int32), const - tied
    return e[j], xp.asarray(rounds, dtype=xp.int32), const + xp.sum(masked(xp, e > e[j], c))


def _split_in_bucket(xp, e, c, const, R):
    """The exact finish of :func:`_split_level_eager` on numpy without sorting every candidate: ``(v, T(v))``, or
    ``None`` when summation rounding puts the split outside the chosen bucket (the caller then sorts all).

    The candidates ``e`` (finite, ``>= 0``) are put in buckets by the leading 16 bits of their float64 pattern (sign,
    exponent, 4 mantissa bits: 16 buckets per octave), a key that is monotone in the value for non-negative floats, so
    every value in a higher bucket is larger. With
    ``A_b = const + cost of the buckets above b``, non-increasing in ``b``, the split lies in the lowest bucket ``b*``
    with ``A_b* <= R``: every value below it has ``T > R`` and the largest value in it has ``T = A_b* <= R``. Only that
    bucket is sorted (``const <= R`` on entry, so ``b*`` exists)."""
    if sys.byteorder != "little" or e.dtype != np.float64:
        return None
    top = np.ascontiguousarray(e).view(np.uint16)[3::4]  # sign, exponent and 4 leading mantissa bits: the key
    t_lo, t_hi = int(top.min()), int(top.max())
    if t_hi >= 0x8000:  # a negative value or -0.0: the key is not monotone there
        return None
    ids = top - np.uint16(t_lo)
    cost = np.bincount(ids, weights=c)
    above = const + np.concatenate([np.cumsum(cost[:0:-1])[::-1], [0.0]])  # A_b
    b = cost.shape[0] - int(np.count_nonzero(above <= R))
    inside = ids == b
    e, c = e[inside], c[inside]
    const = above[b]
    o = _descending(xp, e)
    e, c = e[o], c[o]
    ok = const + np.cumsum(c) - c <= R
    j = int(np.count_nonzero(ok)) - 1
    if j < 0:
        return None
    return e[j], const + np.sum(c * (e > e[j]))


def _descending(xp, e):
    """The stable descending order of the finite ``e``: when no two values tie every sort gives it, so the fast
    unstable sort is tried first (numpy's is several times faster), the stable one only if it shows ties."""
    o = xp.argsort(-e, stable=False)
    s = xp.take(e, o)
    if e.shape[0] > 1 and bool(xp.any(s[1:] == s[:-1])):
        return xp.argsort(e, descending=True, stable=True)
    return o


def _pivot_pass(xp, e, c, lo, hi, v_lo, v_hi):
    """One pass over the candidates in ``(lo, hi)``: the sum of ``c`` over ``e > v_hi``, and the ``(e, c)`` with
    ``v_lo <= e <= v_hi`` (numpy: over cache-sized pieces). Entries with ``e = -inf`` have ``c = 0``."""
    bounded = bool(lo > -xp.inf) or bool(hi < xp.inf)

    def piece(e, c):
        inside = (e > lo) & (e < hi) if bounded else None
        gt = e > v_hi
        keep = (e >= v_lo) & (e <= v_hi)
        if bounded:
            gt, keep = gt & inside, keep & inside
        return xp.sum(masked(xp, gt, c)), e[keep], c[keep]

    if not array_api_compat.is_numpy_namespace(xp) or e.shape[0] <= _PIECE:
        return piece(e, c)
    parts = [piece(e[i:i + _PIECE], c[i:i + _PIECE]) for i in range(0, e.shape[0], _PIECE)]
    return sum(p[0] for p in parts), xp.concat([p[1] for p in parts]), xp.concat([p[2] for p in parts])


_EXACT = 1 << 16  # candidates sorted exactly at the end of the sample-select
_RADIX = 1 << 11  # numpy: more candidates than this are first narrowed to one bucket of leading key bits


def _masked_sum(xp, mask, x):
    """``sum(x[mask])`` for finite ``x``; numpy runs over cache-sized pieces (no table-sized temporaries)."""
    if not array_api_compat.is_numpy_namespace(xp) or x.ndim != 1 or x.shape[0] <= _PIECE:
        return xp.sum(masked(xp, mask, x))
    return sum(xp.sum(masked(xp, mask[i:i + _PIECE], x[i:i + _PIECE])) for i in range(0, x.shape[0], _PIECE))


_PIECE = 1 << 15


class _Illinois(NamedTuple):
    """The static-shape split search: the bracket ``lo < lambda* <= hi`` of efficiency values with ``T(lo) > R >=
    T(hi)``, ``const`` the cost of the segments with ``E >= hi``, which end moved last (``side``: 1 hi, -1 lo; its
    value is halved next), the bracket's log width before the last step and now (a slow shrink forces bisection),
    and the steps taken."""

    lo: Any
    hi: Any
    t_lo: Any
    t_hi: Any
    const: Any
    side: Any
    width_before: Any
    width: Any
    iterations: Any


def _split_level_static(xp, e, c, R, skip):
    """:func:`_split_level` with static shapes: the first bracket from sampled pivots, then Illinois steps on
    ``ln lambda`` snapped to efficiency values, in ``lax.while_loop``."""
    fdt = e.dtype
    finite = e > -xp.inf
    one = xp.asarray(1.0, dtype=fdt)
    hi = xp.max(xp.where(finite, e, xp.zeros_like(e)))
    pos_min = xp.min(xp.where(finite & (e > 0), e, xp.full_like(e, xp.inf)))
    lo = xp.where(xp.isfinite(pos_min), pos_min / 2, one)
    zero_i = xp.asarray(0, dtype=xp.int32)

    def trial(s: _Illinois):
        x_lo, x_hi = xp.log(s.lo), xp.log(s.hi)
        f_lo = xp.where(s.side == 1, (s.t_lo - R) / 2, s.t_lo - R)  # Illinois: halve the stale end's value
        f_hi = xp.where(s.side == -1, (s.t_hi - R) / 2, s.t_hi - R)
        denom = f_lo - f_hi
        x = x_lo + f_lo * (x_hi - x_lo) / xp.where(denom > 0, denom, one)
        slow = s.width > s.width_before / 2
        return xp.exp(xp.where(slow | ~(denom > 0), (x_lo + x_hi) / 2, x))

    def open_bracket(s: _Illinois):
        return ~skip & xp.any((e > s.lo) & (e < s.hi))

    def step(s: _Illinois) -> _Illinois:
        inside = (e > s.lo) & (e < s.hi)
        lam = trial(s)
        below = xp.max(xp.where(inside & (e <= lam), e, xp.full_like(e, -xp.inf)))
        above = xp.min(xp.where(inside & (e > lam), e, xp.full_like(e, xp.inf)))
        v = xp.where(below > -xp.inf, below, above)  # snap the trial to an efficiency in the bracket
        t_v = s.const + xp.sum(xp.where(inside & (e > v), c, xp.zeros_like(c)))
        ok = t_v <= R
        hi = xp.where(ok, v, s.hi)
        lo = xp.where(ok, s.lo, v)
        return _Illinois(lo=lo, hi=hi, t_lo=xp.where(ok, s.t_lo, t_v), t_hi=xp.where(ok, t_v, s.t_hi),
                         const=xp.where(ok, s.const + xp.sum(xp.where(inside & (e >= v), c, xp.zeros_like(c))),
                                        s.const),
                         side=xp.where(ok, xp.asarray(1, dtype=xp.int32), xp.asarray(-1, dtype=xp.int32)),
                         width_before=s.width, width=xp.log(hi) - xp.log(lo), iterations=s.iterations + 1)

    const0 = xp.sum(xp.where(e >= hi, c, xp.zeros_like(c)))
    total = xp.sum(c)
    # A first bracket from a strided sample (static size): pivots 4 standard errors either side of the estimated
    # split, checked exactly, replace the ends they improve on.
    s_e, s_c = e[::max(e.shape[0] // _SAMPLE_STATIC, 1)], c[::max(e.shape[0] // _SAMPLE_STATIC, 1)]
    o = xp.argsort(s_e, descending=True, stable=True)
    s_e, s_c = xp.take(s_e, o), xp.take(s_c, o)
    s_c = s_c * (total / xp.where(xp.sum(s_c) > 0, xp.sum(s_c), one))
    j = xp.sum(xp.astype(xp.cumulative_sum(s_c) - s_c <= R, xp.int32)) - 1
    nf = xp.sum(xp.astype(s_e > -xp.inf, xp.int32))
    d = xp.astype(4 * xp.sqrt(xp.astype(nf, fdt)), xp.int32) + 4
    pick = lambda i: xp.take(s_e, xp.reshape(xp.clip(i, 0, xp.maximum(nf - 1, 0)), (1,)))[0]  # noqa: E731
    v_hi, v_lo = pick(j - d), pick(j + d)
    t_vhi = xp.sum(xp.where(e > v_hi, c, xp.zeros_like(c)))
    use_hi = (t_vhi <= R) & (v_hi < hi) & (v_hi > lo)
    hi, t_hi = xp.where(use_hi, v_hi, hi), xp.where(use_hi, t_vhi, xp.zeros_like(R))
    const0 = xp.where(use_hi, xp.sum(xp.where(e >= v_hi, c, xp.zeros_like(c))), const0)
    t_vlo = xp.sum(xp.where(e > v_lo, c, xp.zeros_like(c)))
    use_lo = (t_vlo > R) & (v_lo > lo) & (v_lo < hi)
    lo, t_lo = xp.where(use_lo, v_lo, lo), xp.where(use_lo, t_vlo, total)
    width = xp.log(hi) - xp.log(lo)
    start = _Illinois(lo=lo, hi=hi, t_lo=t_lo, t_hi=t_hi, const=const0, side=zero_i, width_before=width * 4,
                      width=width, iterations=zero_i)
    s = while_loop(xp, open_bracket, step, start)
    return xp.where(skip, xp.zeros_like(R), s.hi), s.iterations, None


_SAMPLE_STATIC = 1 << 16


class _Fill(NamedTuple):
    """The greedy fill in ``lax.while_loop``: each item's row ``cur``, the row ``col`` its next segment ends at
    (``K``: none), that segment's efficiency and cost, the steps taken, the slack left, and whether a segment fits."""

    cur: Any
    col: Any
    e_next: Any
    c_next: Any
    steps: Any
    slack: Any
    more: Any


def _fill(xp, E, dC, nxt, cur, slack, max_steps: int):
    """Greedy fill: while some item's next hull segment fits in ``slack``, take the most efficient one (lowest item
    on ties). One pass over ``N`` numbers per step; the step count is at most ``slack / min dC``. Returns the rows
    ``cur``, the slack left and the steps taken."""
    itype = index_dtype(xp)
    cur = xp.astype(cur, itype)
    col = xp.astype(_at(xp, nxt, cur), itype)  # the row where each item's next segment ends (K: none)
    e_next, c_next = _segments(xp, E, dC, col, xp.arange(E.shape[1], dtype=itype, device=device(E)))
    start = _Fill(cur=cur, col=col, e_next=e_next, c_next=c_next, steps=xp.asarray(0, dtype=xp.int32), slack=slack,
                  more=None)
    fill = _fill_static if is_jax(xp) or is_traced(E) else _fill_eager
    return fill(xp, E, dC, nxt, start, max_steps)


def _segments(xp, E, dC, col, i):
    """``E`` and ``dC`` of the segments ending at rows ``col`` of items ``i`` (``-inf`` and 0 where ``col = K``)."""
    K, N = E.shape
    flat = xp.minimum(col, xp.full_like(col, K - 1)) * N + i
    has = col < K
    return (xp.where(has, xp.take(xp.reshape(E, (-1,)), flat),
                     xp.full(flat.shape, -xp.inf, dtype=E.dtype, device=device(E))),
            xp.where(has, xp.take(xp.reshape(dC, (-1,)), flat),
                     xp.zeros(flat.shape, dtype=dC.dtype, device=device(E))))


def _fill_eager(xp, E, dC, nxt, s: _Fill, max_steps: int):
    """:func:`_fill` with one masked argmax per step and the chosen item updated in place."""
    K, N = E.shape
    E_flat, dC_flat, nxt_flat = (xp.reshape(X, (-1,)) for X in (E, dC, nxt))
    cur, col, e_next, c_next, slack = s.cur, s.col, s.e_next, s.c_next, s.slack
    steps, ninf = 0, xp.asarray(-xp.inf, dtype=E.dtype, device=device(E))
    while steps < max_steps:
        fitting = xp.where((e_next > -xp.inf) & (c_next <= slack), e_next, ninf)
        i = int(xp.argmax(fitting))
        if not bool(fitting[i] > -xp.inf):
            break
        new_cur = int(col[i])
        new_col = int(nxt_flat[new_cur * N + i])
        slack = slack - c_next[i]
        cur[i], col[i] = new_cur, new_col
        e_new, c_new = (E_flat[new_col * N + i], dC_flat[new_col * N + i]) if new_col < K else (ninf, 0.0)
        e_next[i], c_next[i] = e_new, c_new
        steps += 1
    return cur, slack, xp.asarray(steps, dtype=xp.int32)


def _fill_static(xp, E, dC, nxt, s: _Fill, max_steps: int):
    """:func:`_fill` with static shapes in ``lax.while_loop``: each step is a masked argmax and a masked update."""
    N = E.shape[1]
    nxt_flat = xp.reshape(nxt, (-1,))
    itype = s.cur.dtype
    items = xp.arange(N, dtype=itype, device=device(E))

    def fits(s: _Fill):
        return (s.e_next > -xp.inf) & (s.c_next <= s.slack)

    def step(s: _Fill) -> _Fill:
        i = xp.reshape(xp.astype(xp.argmax(xp.where(fits(s), s.e_next, xp.full_like(s.e_next, -xp.inf))), itype),
                       (1,))
        new_cur = xp.take(s.col, i)
        new_col = xp.astype(xp.take(nxt_flat, new_cur * N + i), itype)
        e_new, c_new = _segments(xp, E, dC, new_col, i)
        chosen = items == i
        s = s._replace(cur=xp.where(chosen, new_cur, s.cur), col=xp.where(chosen, new_col, s.col),
                       e_next=xp.where(chosen, e_new, s.e_next), c_next=xp.where(chosen, c_new, s.c_next),
                       steps=s.steps + 1, slack=s.slack - xp.take(s.c_next, i)[0])
        return s._replace(more=xp.any(fits(s)))

    s = while_loop(xp, lambda s: s.more & (s.steps < max_steps), step, s._replace(more=xp.any(fits(s))))
    return s.cur, s.slack, s.steps
