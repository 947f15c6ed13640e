"""Joint eviction and quantization after prefill, one global budget (RDKV setting), and scoring the result.

**Items** (one sequence, ``L`` layers, ``H`` kv heads, ``C`` context tokens, ``head_dim = D``; weights ``u, e, K``
from :func:`.compress.token_weights`, errors ``dv_t(b)``, ``dk_tc(b)`` measured by fake-quantizing the prefill K/V
at each menu width with the quantizer):

* a **token item** ``(l, h, t)`` carries the token's key *and* value vectors. Its bits come from ``menu`` (default
  ``{0, 2, 4, 8, 16}``); ``0`` evicts both, at distortion ``e_t``. The first ``sink`` and last ``window`` tokens are
  protected: allocator bound ``lo = 16`` (they are held at full precision outside the packed storage, keys too).
* a **key-channel item** ``(l, h, c)`` carries channel ``c`` of the keys of the head's kept, unprotected tokens, at
  bits in ``menu \\ {0}``; distortion ``sum_{t kept} K_tc dk_tc(b)^2``.

The two are coupled (a channel's size is the number of tokens its head keeps), so the joint problem is solved in two
stages, each an exact :func:`rdalloc.allocate` with **one budget over all layers, heads, tokens and channels**
(eviction as the zero-bit endpoint, the quantizer's metadata charged):

1. **eviction and rate**: token items with ``n = 2D`` (key and value at one width), distortion
   ``u_t |dv_t(b)|^2 + sum_c K_tc dk_tc(b)^2``, metadata the value groups of the token plus its share of the key groups
   (``Quantizer.item_metadata_bits``). This decides which tokens stay.
2. **split**: on the kept set, value items ``(l, h, t)`` (``n = D``, bits in ``menu \\ {0}``; evicted tokens fixed at 0,
   protected tokens at 16 with ``n = 2D``: their key too) and key-channel items (``n`` = kept unprotected tokens of the
   head, metadata = the quantizer's groups those tokens occupy, exact) share the same budget ``B``. If the kept set
   cannot be stored within ``B`` (key groups of scattered tokens carry more metadata than stage 1's shared estimate),
   stage 1 is re-solved with a smaller budget.

Stage 2's cost is exact: the bits it reports are the bits the compressed cache holds (plus the padding of each bit
stream to whole bytes, :func:`.compress.compressed_nbytes`). ``mode="per_head"`` reproduces RDKV's protocol: the same
two stages, but each ``(layer, kv_head)`` solved with its own budget ``B / (L H)``.

Baselines at the same budget: :func:`eviction_plan` (SnapKV-style: per head the same number of tokens, top ``e_t``,
kept at 16 bits) and :func:`uniform_token_plan` (every unprotected token at one width, the largest that fits).

Scoring (docs/design.md §5, "compress after prefill"): :func:`continuation_logits` teacher-forces the tokens after
the context through a compressed cache, :func:`continuation_scores` gives their NLL and the KL divergence to the
full cache (``experiments/joint_grid.py`` runs the whole comparison).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rdalloc import TabulatedModel, allocate
from rdalloc.cost import Usage
from rdalloc.models import FULL_BITS
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, fake_quantize_uniform, get_quantizer

from .compat import forward
from .compress import CompressedCache, JointAttention, TokenWeights, compressed_nbytes, protected_mask

__all__ = ["allocate_joint", "allocate_joint_shared",
           "eviction_plan", "uniform_token_plan", "measure_errors", "KVErrors", "DEFAULT_MENU",
           "continuation_logits", "continuation_scores"]

DEFAULT_MENU = (0, 2, 4, 8, 16)


@dataclass(frozen=True)
class KVErrors:
    """Squared quantization errors of the prefill K/V at each width: ``value[b]`` ``[L, H, C]`` (summed over
    channels), ``key[b]`` ``[L, H, C, D]`` (float64 numpy)."""

    value: dict
    key: dict


@torch.no_grad()
def measure_errors(keys: torch.Tensor, values: torch.Tensor, quantizer: Quantizer | str,
                   widths: Sequence[int]) -> KVErrors:
    q = get_quantizer(quantizer)
    dv, dk = {}, {}
    for b in widths:
        vh = fake_quantize_uniform(values, q, int(b), "value")
        kh = fake_quantize_uniform(keys, q, int(b), "key")
        dv[int(b)] = ((vh - values).double() ** 2).sum(-1).cpu().numpy()
        dk[int(b)] = ((kh - keys).double() ** 2).cpu().numpy()
    return KVErrors(dv, dk)


def _budget(L, H, C, D, retention, budget_bits) -> float:
    if (retention is None) == (budget_bits is None):
        raise ValueError("give exactly one of retention= (fraction of the FP16 cache) and budget_bits=")
    full = 16.0 * 2 * L * H * C * D
    if retention is not None:
        if not (isinstance(retention, (int, float)) and 0 < float(retention) <= 1):
            raise ValueError(f"retention must be a fraction in (0, 1], got {retention!r}")
        return float(retention) * full
    if not (isinstance(budget_bits, (int, float)) and budget_bits > 0 and math.isfinite(budget_bits)):
        raise ValueError(f"budget_bits must be a positive number, got {budget_bits!r}")
    return float(budget_bits)


def _check_protected(B, per, L, H, C, D, sink, window, mode):
    prot = int(protected_mask(C, sink, window).sum())
    need = 16.0 * 2 * D * prot * (1 if per else L * H)
    have = B
    if have < need:
        full = 16.0 * 2 * D * C * (1 if per else L * H)
        raise ValueError(f"the budget of {have:.0f} bits{' per head' if per else ''} (retention {have / full:.4f}) is "
                         f"below the {need:.0f} bits (retention {need / full:.4f}) that the {prot} protected tokens "
                         f"(sink={sink}, window={window}) need at full precision in mode {mode!r}: raise the budget "
                         f"or protect fewer tokens")


def _min_cost(sizes, meta, allowed, menu) -> float:
    m = np.asarray(menu, dtype=np.float64)
    cost = sizes[:, None] * m[None, :] + meta[:, None] * ((m > 0) & (m < FULL_BITS))[None, :]
    return float(np.where(allowed, cost, np.inf).min(axis=1).sum())


def _solve(dist, allowed, sizes, meta, menu, budget):
    model = TabulatedModel(tuple(menu), dist, allowed)
    return allocate(model, sizes, budget, menu=menu, metadata=meta)


def _joint_heads(sel, w: TokenWeights, err: KVErrors, q: Quantizer, menu, budget, prot, D, pinned=None):
    """Two-stage solve over the heads ``sel`` (bool ``[L, H]``) with one budget; returns value bits ``[n, C]``, key
    bits ``[n, D]`` for the selected heads (C order) and the two allocations (see :func:`_joint_items`)."""
    widths = [b for b in menu if 0 < b < FULL_BITS]
    u = w.token[sel]
    solved = _joint_items(u, w.eviction[sel], w.key[sel], {b: err.value[b][sel] for b in widths},
                          {b: err.key[b][sel] for b in widths}, q, menu, budget, np.broadcast_to(prot, u.shape), None,
                          D, None if pinned is None else np.broadcast_to(pinned, u.shape))
    return solved.value_bits, solved.key_bits, solved.stage1, solved.stage2


@dataclass(frozen=True)
class _Solved:
    """A two-stage solve over ``n`` heads: bits ``value_bits [n, C]``, ``key_bits [n, D]``; the spend and the
    distortion of every item at its bits (``*_payload``, ``*_metadata``, ``*_distortion``, value items ``[n, C]``,
    key-channel items ``[n, D]``, zero where a head keeps no packed token); the two allocations."""

    value_bits: np.ndarray
    key_bits: np.ndarray
    value_payload: np.ndarray
    value_metadata: np.ndarray
    value_distortion: np.ndarray
    key_payload: np.ndarray
    key_metadata: np.ndarray
    key_distortion: np.ndarray
    stage1: Any
    stage2: Any


def _joint_items(u, e, K, dv, dk, q: Quantizer, menu, budget, prot, absent, D, pinned=None) -> _Solved:
    """The two stages of the module docstring over ``n`` heads of ``C`` token slots: weights ``u, e`` ``[n, C]``,
    ``K`` ``[n, C, D]``, errors ``dv[b]`` ``[n, C]``, ``dk[b]`` ``[n, C, D]``, ``prot`` bool ``[n, C]`` (held at 16
    bits), ``absent`` bool ``[n, C]`` or ``None`` (slots that are no token of the head's sequence, e.g. the tail of a
    shorter sequence: fixed at 0 bits, never weighted, never charged), ``pinned`` bool ``[n, C]`` or ``None`` (slots
    that must stay but are allocated like the others: any width of the menu but 0, packed, their keys in the key
    channels). Token ``t`` of a head is slot ``t``, so the key groups of the quantizer (``t // group``) are the
    sequence's own."""
    menu = tuple(menu)
    n, C = u.shape
    mv = q.item_metadata_bits("value", "token", C, D)
    mk = q.item_metadata_bits("key", "token", C, D)
    kg = q.grouping("key", D).size
    mpg = q.metadata_bits_per_group
    m = np.asarray(menu)
    # stage 1: token items carrying K and V
    d1 = np.zeros((n, C, len(menu)))
    for j, b in enumerate(menu):
        if b == 0:
            d1[..., j] = e
        elif b < FULL_BITS:
            d1[..., j] = u * dv[b] + (K * dk[b]).sum(-1)
    ok1 = np.ones((n, C, len(menu)), dtype=bool)
    ok1[prot] = m == FULL_BITS
    if pinned is not None:
        ok1[pinned] = m > 0
    if absent is not None:
        ok1[absent] = m == 0
        d1[absent] = 0.0
    s1 = np.full((n, C), 2.0 * D)
    m1 = np.broadcast_to(mv + mk, (n, C)).astype(np.float64)
    B1 = budget
    menu_k = tuple(b for b in menu if b > 0)
    floor = float((s1 * 16.0)[prot].sum())  # stage 1 at this budget evicts every unprotected (unpinned) token
    if pinned is not None:
        floor += float((s1 * min(menu_k) + m1)[pinned].sum())
    for attempt in range(12):
        a1 = _solve(d1.reshape(n * C, -1), ok1.reshape(n * C, -1), s1.reshape(-1), m1.reshape(-1), menu, B1)
        kept = (np.asarray(a1.bits).reshape(n, C) > 0) & ~prot
        cnt = kept.sum(1)
        # stage 2 items: value tokens, then key channels of heads with kept unprotected tokens
        d2v = np.zeros((n, C, len(menu)))
        ok2v = np.zeros((n, C, len(menu)), dtype=bool)
        for j, b in enumerate(menu):
            if b == 0:
                d2v[..., j] = e
                ok2v[..., j] = ~kept
            elif b < FULL_BITS:
                d2v[..., j] = u * dv[b]
                ok2v[..., j] = kept
            else:
                ok2v[..., j] = kept
        ok2v[prot] = m == FULL_BITS
        if absent is not None:
            d2v[absent] = 0.0
        s2v = np.where(prot, 2.0 * D, float(D))
        m2v = np.broadcast_to(mv, (n, C)).astype(np.float64)
        heads = np.flatnonzero(cnt > 0)
        blocks = np.array([len(np.unique(np.flatnonzero(kept[i]) // kg)) for i in heads], dtype=np.float64)
        d2k = np.zeros((heads.size, D, len(menu_k)))
        for j, b in enumerate(menu_k):
            if b < FULL_BITS:
                d2k[..., j] = np.einsum("ntc,ntc->nc", K[heads] * kept[heads][..., None], dk[b][heads])
        s2k = np.repeat(cnt[heads].astype(np.float64), D)
        m2k = np.repeat(blocks * mpg, D)
        dist = np.concatenate([d2v.reshape(n * C, -1),
                               np.concatenate([np.zeros((heads.size * D, 1)),
                                               d2k.reshape(heads.size * D, len(menu_k))], 1)])
        ok = np.concatenate([ok2v.reshape(n * C, -1),
                             np.concatenate([np.zeros((heads.size * D, 1), bool),
                                             np.ones((heads.size * D, len(menu_k)), bool)], 1)])
        sizes = np.concatenate([s2v.reshape(-1), s2k])
        meta = np.concatenate([m2v.reshape(-1), m2k])
        need = _min_cost(sizes, meta, ok, menu)
        if need <= budget:
            break
        if B1 <= floor:
            raise ValueError(f"even with every unprotected token evicted, stage 2 needs {need:.0f} bits, more than "
                             f"the budget of {budget:.0f}")
        B1 = max(B1 - 1.5 * (need - budget) * 2 ** attempt, floor)
    else:
        raise ValueError(f"stage 2 stayed infeasible for a budget of {budget:.0f} bits after 12 attempts")
    a2 = _solve(dist, ok, sizes, meta, menu, budget)
    bits = np.asarray(a2.bits).astype(np.int64)
    column = np.searchsorted(np.sort(m), bits)
    chosen = dist[:, np.argsort(m)][np.arange(bits.size), column]
    payload = sizes * bits
    metadata = meta * ((bits > 0) & (bits < FULL_BITS))

    def split(x, fill):
        value = x[:n * C].reshape(n, C)
        key = np.full((n, D), fill, dtype=x.dtype)
        key[heads] = x[n * C:].reshape(heads.size, D)
        return value, key

    vbits, kbits = split(bits, FULL_BITS)
    (vp, kp), (vm, km), (vd, kd) = split(payload, 0.0), split(metadata, 0.0), split(chosen, 0.0)
    return _Solved(vbits, kbits, vp, vm, vd, kp, km, kd, a1, a2)


def _check_options(q, menu, sink, window, D) -> tuple:
    if q.grouping("key", D).axis != "token":
        raise ValueError(f"per-channel key bits need a quantizer that groups keys over tokens (e.g. 'kivi'); "
                         f"{q.name!r} groups them over channels")
    menu = tuple(int(b) for b in menu)
    if FULL_BITS not in menu or 0 not in menu:
        raise ValueError(f"menu must contain 0 (evict) and 16 (full precision), got {list(menu)}")
    for b in menu:
        if not q.supports(b):
            raise ValueError(f"menu width {b} is not supported by quantizer {q.name!r}")
    for name, v in (("sink", sink), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return menu


def _check_context(C, sink, window, row=None):
    if sink + window >= C:
        where = "" if row is None else f" (row {row})"
        raise ValueError(f"sink={sink} + window={window} protected tokens leave nothing to compress in a context of "
                         f"{C} tokens{where}")


def _plan(vbits, kbits, q, B, usage, dist, cert, meta) -> Plan:
    return Plan(key=kbits, value=vbits, key_axes=("layer", "kv_head", "channel"),
                value_axes=("layer", "kv_head", "token"), quantizer=q.name, budget_bits=B, usage=usage,
                predicted_distortion=dist, certificate=cert, meta=meta)


def allocate_joint(weights: TokenWeights, keys: torch.Tensor, values: torch.Tensor, *, retention: float | None = None,
                   budget_bits: float | None = None, menu: Sequence[int] = DEFAULT_MENU, quantizer: Any = "kivi",
                   mode: str = "global", sink: int = 4, window: int = 8, errors: KVErrors | None = None,
                   protect: str = "auto") -> Plan:
    """A token plan (value bits ``[L, H, C]``, key bits ``[L, H, D]``) for the prefill K/V ``[L, H, C, D]`` under one
    budget (``retention`` of the FP16 cache or ``budget_bits``, metadata and protected tokens included); see the module
    docstring. ``mode``: ``"global"`` (one budget) or ``"per_head"`` (RDKV: the same budget for every head).

    ``protect``: how the first ``sink`` and last ``window`` tokens are kept. ``"reserved"``: at 16 bits, keys and
    values, held beside the packed storage (a fixed reservation of ``2 * 16 * D`` bits per token and head).
    ``"allocated"``: they may not be evicted but are items of the allocation like the others, at their own distortion
    (``u_t |dv_t(b)|^2 + sum_c K_tc dk_tc(b)^2``) and any width of the menu but 0, 16 included; they are packed with
    the rest (the plan's ``meta["sink"]``/``meta["window"]`` are then 0, ``meta["pinned"]`` records the pair), so their
    keys take their channels' widths. ``"auto"``: both, and the plan of lower modelled distortion (the two solve the
    same objective over different feasible sets: reserved tokens cost ``2 * 16 * D`` bits each with exact keys, pinned
    ones whatever widths the allocation gives them; ``meta["protect_chosen"]`` says which won).

    Defaults (``protect="auto"``, ``sink=4``, ``window=8``) are the configuration measured best on two texts with
    paired intervals (``experiments/results/joint_default/``): "auto" picks "allocated" at low retention, where the
    reservation eats the budget, and "reserved" at high retention, where pinned sink keys would widen their
    channels' ranges. ``protect="reserved", window=32`` is the behaviour before that measurement."""
    if mode not in ("global", "per_head"):
        raise ValueError(f"mode must be 'global' or 'per_head', got {mode!r}")
    if protect not in ("reserved", "allocated", "auto"):
        raise ValueError(f"protect must be 'reserved', 'allocated' or 'auto', got {protect!r}")
    if protect == "auto":
        kw = dict(retention=retention, budget_bits=budget_bits, menu=menu, quantizer=quantizer, mode=mode, sink=sink,
                  window=window)
        if errors is None:
            q = get_quantizer(quantizer)
            errors = measure_errors(keys, values, q, [b for b in menu if 0 < int(b) < FULL_BITS])
        plans = {}
        try:
            plans["reserved"] = allocate_joint(weights, keys, values, errors=errors, protect="reserved", **kw)
        except ValueError:  # a budget below the reservation: the allocation alone
            pass
        plans["allocated"] = allocate_joint(weights, keys, values, errors=errors, protect="allocated", **kw)
        chosen = min(plans, key=lambda how: plans[how].predicted_distortion)
        plans[chosen].meta.update(protect="auto", protect_chosen=chosen)
        return plans[chosen]
    L, H, C, D = (int(s) for s in keys.shape)
    if weights.token.shape != (L, H, C):
        raise ValueError(f"the weights are for (layers, kv_heads, tokens) = {weights.token.shape}, but the keys are "
                         f"{(L, H, C)}")
    q = get_quantizer(quantizer)
    menu = _check_options(q, menu, sink, window, D)
    _check_context(C, sink, window)
    B = _budget(L, H, C, D, retention, budget_bits)
    per = mode == "per_head"
    Bh = B / (L * H) if per else B
    pinned = None
    if protect == "reserved":
        _check_protected(Bh, per, L, H, C, D, sink, window, mode)
        prot = protected_mask(C, sink, window)
    else:
        pinned = protected_mask(C, sink, window)
        prot = np.zeros(C, dtype=bool)
    err = errors if errors is not None else measure_errors(keys, values, q, [b for b in menu if 0 < b < FULL_BITS])
    vbits = np.zeros((L, H, C), dtype=np.int64)
    kbits = np.zeros((L, H, D), dtype=np.int64)
    t0 = time.perf_counter()
    if per:
        payload = metadata = dist = 0.0
        for l in range(L):
            for h in range(H):
                sel = np.zeros((L, H), dtype=bool)
                sel[l, h] = True
                vb, kb, _, a2 = _joint_heads(sel, weights, err, q, menu, Bh, prot, D, pinned)
                vbits[l, h], kbits[l, h] = vb[0], kb[0]
                payload += a2.usage.payload_bits
                metadata += a2.usage.metadata_bits
                dist += float(a2.distortion)
        usage = Usage(payload, metadata, 2.0 * L * H * C * D)
        cert = {"solver": "allocate (two stages, per head)", "budget_bits": B, "budget_used": usage.total_bits,
                "distortion": dist}
    else:
        sel = np.ones((L, H), dtype=bool)
        vb, kb, a1, a2 = _joint_heads(sel, weights, err, q, menu, B, prot, D, pinned)
        vbits[:], kbits[:] = vb.reshape(L, H, C), kb.reshape(L, H, D)
        usage = Usage(a2.usage.payload_bits, a2.usage.metadata_bits, 2.0 * L * H * C * D)
        cert = {"stage1": a1.certificate(), **a2.certificate()}
        dist = float(a2.distortion)
    cert["solve_seconds"] = time.perf_counter() - t0
    meta = {"sink": sink, "window": window, "menu": list(menu), "mode": mode, "weighting": weights.method,
            "quantizer_spec": q.spec(), "retention_target": B / (16.0 * 2 * L * H * C * D), "protect": protect,
            "note": "key bits apply to the packed (unprotected) tokens; sink and window tokens are held at 16 bits"}
    if pinned is not None:
        meta.update(sink=0, window=0, pinned={"sink": sink, "window": window},
                    note="every token is packed; the first `pinned.sink` and last `pinned.window` tokens were kept "
                         "(never evicted) at widths the allocation chose")
    return _plan(vbits, kbits, q, B, usage, dist, cert, meta)


def allocate_joint_shared(weights: Sequence[TokenWeights], keys: Sequence[torch.Tensor],
                          values: Sequence[torch.Tensor], *, retention: float | None = None,
                          budget_bits: float | None = None, menu: Sequence[int] = DEFAULT_MENU,
                          quantizer: Any = "kivi", sink: int = 4, window: int = 8,
                          protect: str = "auto") -> list[Plan]:
    """One token plan per sequence of a batch under **one budget shared by the batch**: the global two-stage problem
    of the module docstring over every sequence's layers, heads, tokens and channels at once (sequence ``r`` has
    ``keys[r]``/``values[r]`` ``[L, H, C_r, D]`` of its own tokens and ``weights[r]``). The budget is ``retention`` of
    the FP16 bytes of all the sequences' tokens, or ``budget_bits``. A sequence's quality then depends on what it is
    batched with: bits go where they buy the most over the whole batch.

    ``protect`` as in :func:`allocate_joint`, for the whole batch: ``"reserved"`` holds every sequence's first
    ``sink`` and last ``window`` tokens at 16 bits beside the packed storage; ``"allocated"`` pins them (never
    evicted, any width of the menu but 0, packed); ``"auto"`` (the default) solves both over the batch and keeps the
    one of lower total modelled distortion (one choice for the batch: ``meta["protect_chosen"]`` on every plan).

    Every plan records the shared budget (``budget_bits``, ``meta["budget"] = "shared"``) and its own spend and
    distortion; the spends sum to the stage-2 allocation's, within the shared budget."""
    if protect not in ("reserved", "allocated", "auto"):
        raise ValueError(f"protect must be 'reserved', 'allocated' or 'auto', got {protect!r}")
    R = len(keys)
    if not (R == len(values) == len(weights)) or R == 0:
        raise ValueError(f"weights, keys and values must be non-empty and one per sequence, got {len(weights)}, "
                         f"{R} and {len(values)}")
    shapes = [tuple(int(s) for s in k.shape) for k in keys]
    L, H, _, D = shapes[0]
    for r, (shape, v, w) in enumerate(zip(shapes, values, weights)):
        if len(shape) != 4 or shape[0::3] != (L, D) or shape[1] != H or tuple(v.shape) != shape:
            raise ValueError(f"sequence {r}: keys and values must be [layers, kv_heads, tokens, head_dim] with "
                             f"{(L, H, D)} as sequence 0, got {shape} and {tuple(v.shape)}")
        if w.token.shape != shape[:3]:
            raise ValueError(f"sequence {r}: the weights are for {w.token.shape}, the keys {shape[:3]}")
    q = get_quantizer(quantizer)
    menu = _check_options(q, menu, sink, window, D)
    Cs = [s[2] for s in shapes]
    for r, C in enumerate(Cs):
        _check_context(C, sink, window, r)
    Cmax, n = max(Cs), R * L * H
    B = _budget(L, H, sum(Cs), D, retention, budget_bits)
    need = 16.0 * 2 * D * L * H * sum(int(protected_mask(C, sink, window).sum()) for C in Cs)
    if protect == "reserved" and B < need:
        raise ValueError(f"the shared budget of {B:.0f} bits is below the {need:.0f} bits the protected tokens "
                         f"(sink={sink}, window={window}) of the {R} sequences need at full precision: raise the "
                         f"budget, protect fewer tokens or pass protect='allocated'")
    widths = [b for b in menu if 0 < b < FULL_BITS]

    def stack(arrays, tail=()):
        out = np.zeros((n, Cmax, *tail))
        for r, a in enumerate(arrays):
            out[r * L * H:(r + 1) * L * H, :Cs[r]] = np.asarray(a).reshape(L * H, Cs[r], *tail)
        return out

    errs = [measure_errors(k, v, q, widths) for k, v in zip(keys, values)]
    u, e = stack([w.token for w in weights]), stack([w.eviction for w in weights])
    K = stack([w.key for w in weights], (D,))
    dv = {b: stack([x.value[b] for x in errs]) for b in widths}
    dk = {b: stack([x.key[b] for x in errs], (D,)) for b in widths}
    guarded = stack([np.broadcast_to(protected_mask(C, sink, window), (L, H, C)) for C in Cs]).astype(bool)
    absent = stack([np.ones((L, H, C)) for C in Cs]) == 0
    nothing = np.zeros_like(guarded)
    t0 = time.perf_counter()
    solves = {}
    if protect in ("reserved", "auto") and B >= need:
        solves["reserved"] = _joint_items(u, e, K, dv, dk, q, menu, B, guarded, absent, D)
    if protect in ("allocated", "auto"):
        solves["allocated"] = _joint_items(u, e, K, dv, dk, q, menu, B, nothing, absent, D, guarded)

    chosen = min(solves, key=lambda how: float(solves[how].stage2.distortion))
    solved = solves[chosen]
    seconds = time.perf_counter() - t0
    cert = {"stage1": solved.stage1.certificate(), **solved.stage2.certificate(), "budget": "shared",
            "sequences": R, "solve_seconds": seconds}
    plans = []
    for r, C in enumerate(Cs):
        rows = slice(r * L * H, (r + 1) * L * H)
        payload = float(solved.value_payload[rows].sum() + solved.key_payload[rows].sum())
        metadata = float(solved.value_metadata[rows].sum() + solved.key_metadata[rows].sum())
        dist = float(solved.value_distortion[rows].sum() + solved.key_distortion[rows].sum())
        meta = {"sink": sink, "window": window, "menu": list(menu), "mode": "global", "budget": "shared",
                "sequence": r, "sequences": R, "weighting": weights[r].method, "quantizer_spec": q.spec(),
                "retention_target": B / (16.0 * 2 * L * H * sum(Cs) * D), "protect": protect,
                "note": "budget_bits is the budget shared by the batch; usage is this sequence's spend"}
        if protect == "auto":
            meta["protect_chosen"] = chosen
        if chosen == "allocated":
            meta.update(sink=0, window=0, pinned={"sink": sink, "window": window})
        plans.append(_plan(solved.value_bits[rows, :C].reshape(L, H, C), solved.key_bits[rows].reshape(L, H, D), q, B,
                           Usage(payload, metadata, 2.0 * L * H * C * D), dist, cert, meta))
    return plans


def eviction_plan(weights: TokenWeights, shape: Sequence[int], *, retention: float | None = None,
                  budget_bits: float | None = None, quantizer: Any = "kivi", sink: int = 4, window: int = 8) -> Plan:
    """Eviction only (SnapKV-style): every head keeps the same number of tokens at 16 bits (protected ones and the
    top eviction distortions ``e_t``), as many as the budget holds."""
    L, H, C, D = (int(s) for s in shape)
    B = _budget(L, H, C, D, retention, budget_bits)
    _check_protected(B, False, L, H, C, D, sink, window, "eviction")
    prot = protected_mask(C, sink, window)
    per_head = int(B // (16 * 2 * D)) // (L * H)
    extra = max(0, min(per_head - int(prot.sum()), C - int(prot.sum())))
    score = np.where(prot[None, None, :], -np.inf, weights.eviction)
    order = np.argsort(-score, axis=-1, kind="stable")[..., :extra]
    keep = np.zeros((L, H, C), dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    keep |= prot[None, None, :]
    q = get_quantizer(quantizer)
    return Plan(key=np.full((L, H, D), FULL_BITS), value=np.where(keep, FULL_BITS, 0),
                key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"), quantizer=q.name,
                budget_bits=B, meta={"sink": sink, "window": window, "mode": "eviction", "weighting": weights.method,
                                     "quantizer_spec": q.spec()})


def uniform_token_plan(shape: Sequence[int], *, retention: float | None = None, budget_bits: float | None = None,
                 quantizer: Any = "kivi", sink: int = 4, window: int = 8) -> Plan | None:
    """Quantization only: every unprotected token's key and value at one width, the largest the quantizer supports
    whose exact bytes fit the budget; ``None`` when even its narrowest width does not fit."""
    L, H, C, D = (int(s) for s in shape)
    B = _budget(L, H, C, D, retention, budget_bits)
    q = get_quantizer(quantizer)
    prot = protected_mask(C, sink, window)
    for b in range(q.max_bits, q.min_bits - 1, -1):
        plan = Plan(key=np.full((L, H, D), b), value=np.broadcast_to(np.where(prot, FULL_BITS, b), (L, H, C)),
                    key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"),
                    quantizer=q.name, budget_bits=B,
                    meta={"sink": sink, "window": window, "mode": "uniform", "bits": b, "quantizer_spec": q.spec()})
        if 8 * compressed_nbytes(plan, q, head_dim=D) <= B:
            return plan
    return None


# ---- scoring a compressed cache ----------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logits(model: Any, cache: CompressedCache, ids_cont: torch.Tensor) -> torch.Tensor:
    """``[M, V]`` float32 logits of ``ids_cont`` (``[M]``) teacher-forced through a compressed ``cache`` (which it
    extends), under :class:`.compress.JointAttention`."""
    with JointAttention(model):
        return forward(model, cache, ids_cont[None]).logits[0].float()


def continuation_scores(logits, full_logits, targets) -> tuple[float, float]:
    """``(nll, kl)`` of a teacher-forced continuation: ``logits`` ``[M, V]`` of the compressed run (the last row
    predicts past the window and is dropped), ``full_logits`` ``[M - 1, V]`` of the full cache, ``targets``
    ``[M - 1]``; mean NLL of the targets and mean KL(full || compressed), nats per token."""
    lp = torch.log_softmax(logits[:-1], -1)
    lf = torch.log_softmax(full_logits, -1)
    nll = float(-lp.gather(-1, targets[:, None]).mean())
    kl = float((lf.exp() * (lf - lp)).sum(-1).mean())
    return nll, kl
