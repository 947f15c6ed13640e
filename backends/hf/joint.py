"""Joint eviction and quantization after prefill, one global budget (RDKV setting), and its experiment.

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
kept at 16 bits) and :func:`uniform_plan` (every unprotected token at one width, the largest that fits).

The experiment :func:`run_joint` (docs/design.md §5, "compress after prefill"): prefill ``context`` tokens,
score, allocate, compress once, teacher-force ``continuation`` tokens, report their NLL and the KL divergence to
the full cache.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rdalloc import TabulatedModel, allocate
from rdalloc.cost import Usage
from rdalloc.environment import environment
from rdalloc.models import FULL_BITS
from rdalloc.plan import Plan
from rdalloc.quantizers import Quantizer, fake_quantize_uniform, get_quantizer

from .compat import forward
from .compress import (WEIGHTINGS, CompressedCache, TokenWeights, compressed_nbytes, joint_attention,
                       observe_prefill, protected_mask, scale_heads, token_weights)

__all__ = ["allocate_joint", "eviction_plan", "uniform_plan", "measure_errors", "KVErrors", "run_joint",
           "JointResult", "DEFAULT_MENU", "RETENTIONS", "continuation_logits",
           "continuation_scores"]

DEFAULT_MENU = (0, 2, 4, 8, 16)
RETENTIONS = (0.02, 0.05, 0.10, 0.25, 0.50)


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
        dv[int(b)] = ((vh - values).double() ** 2).sum(-1).numpy()
        dk[int(b)] = ((kh - keys).double() ** 2).numpy()
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


def _joint_heads(sel, w: TokenWeights, err: KVErrors, q: Quantizer, menu, budget, prot, D):
    """Two-stage solve over the heads ``sel`` (bool ``[L, H]``) with one budget; returns value bits ``[n, C]``, key
    bits ``[n, D]`` for the selected heads (C order) and the stage-2 allocation."""
    menu = tuple(menu)
    widths = [b for b in menu if 0 < b < FULL_BITS]
    u, e, K = w.token[sel], w.eviction[sel], w.key[sel]  # [n, C], [n, C], [n, C, D]
    n, C = u.shape
    dv = {b: err.value[b][sel] for b in widths}
    dk = {b: err.key[b][sel] for b in widths}
    mv = q.item_metadata_bits("value", "token", C, D)
    mk = q.item_metadata_bits("key", "token", C, D)
    kg = q.grouping("key", D).size
    mpg = q.metadata_bits_per_group
    # stage 1: token items carrying K and V
    d1 = np.zeros((n, C, len(menu)))
    for j, b in enumerate(menu):
        if b == 0:
            d1[..., j] = e
        elif b < FULL_BITS:
            d1[..., j] = u * dv[b] + (K * dk[b]).sum(-1)
    ok1 = np.ones((n, C, len(menu)), dtype=bool)
    ok1[:, prot, :] = np.asarray(menu) == FULL_BITS
    s1 = np.full((n, C), 2.0 * D)
    m1 = np.broadcast_to(mv + mk, (n, C)).astype(np.float64)
    B1 = budget
    menu_k = tuple(b for b in menu if b > 0)
    floor = float((s1 * 16.0)[:, prot].sum())  # stage 1 at this budget evicts every unprotected token
    for attempt in range(12):
        a1 = _solve(d1.reshape(n * C, -1), ok1.reshape(n * C, -1), s1.reshape(-1), m1.reshape(-1), menu, B1)
        kept = (np.asarray(a1.bits).reshape(n, C) > 0) & ~prot[None, :]
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
        ok2v[:, prot, :] = np.asarray(menu) == FULL_BITS
        s2v = np.where(prot[None, :], 2.0 * D, float(D)) * np.ones((n, 1))
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
                               np.concatenate([np.zeros((heads.size * D, 1)), d2k.reshape(heads.size * D, len(menu_k))], 1)])
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
    bits = np.asarray(a2.bits)
    vbits = bits[:n * C].reshape(n, C)
    kbits = np.full((n, D), FULL_BITS, dtype=np.int64)
    kbits[heads] = bits[n * C:].reshape(heads.size, D)
    return vbits, kbits, a1, a2


def allocate_joint(weights: TokenWeights, keys: torch.Tensor, values: torch.Tensor, *, retention: float | None = None,
                   budget_bits: float | None = None, menu: Sequence[int] = DEFAULT_MENU, quantizer: Any = "kivi",
                   mode: str = "global", sink: int = 4, window: int = 32, errors: KVErrors | None = None) -> Plan:
    """A token plan (value bits ``[L, H, C]``, key bits ``[L, H, D]``) for the prefill K/V ``[L, H, C, D]`` under one
    budget (``retention`` of the FP16 cache or ``budget_bits``, metadata and protected tokens included); see the module
    docstring. ``mode``: ``"global"`` (one budget) or ``"per_head"`` (RDKV: the same budget for every head)."""
    if mode not in ("global", "per_head"):
        raise ValueError(f"mode must be 'global' or 'per_head', got {mode!r}")
    L, H, C, D = (int(s) for s in keys.shape)
    if weights.token.shape != (L, H, C):
        raise ValueError(f"the weights are for (layers, kv_heads, tokens) = {weights.token.shape}, but the keys are "
                         f"{(L, H, C)}")
    q = get_quantizer(quantizer)
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
    if sink + window >= C:
        raise ValueError(f"sink={sink} + window={window} protected tokens leave nothing to compress in a context of "
                         f"{C} tokens")
    B = _budget(L, H, C, D, retention, budget_bits)
    per = mode == "per_head"
    Bh = B / (L * H) if per else B
    _check_protected(Bh, per, L, H, C, D, sink, window, mode)
    prot = protected_mask(C, sink, window)
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
                vb, kb, _, a2 = _joint_heads(sel, weights, err, q, menu, Bh, prot, D)
                vbits[l, h], kbits[l, h] = vb[0], kb[0]
                payload += a2.usage.payload_bits
                metadata += a2.usage.metadata_bits
                dist += float(a2.distortion)
        usage = Usage(payload, metadata, 2.0 * L * H * C * D)
        cert = {"solver": "allocate (two stages, per head)", "budget_bits": B, "budget_used": usage.total_bits,
                "distortion": dist}
    else:
        sel = np.ones((L, H), dtype=bool)
        vb, kb, a1, a2 = _joint_heads(sel, weights, err, q, menu, B, prot, D)
        vbits[:], kbits[:] = vb.reshape(L, H, C), kb.reshape(L, H, D)
        usage = Usage(a2.usage.payload_bits, a2.usage.metadata_bits, 2.0 * L * H * C * D)
        cert = {"stage1": a1.certificate(), **a2.certificate()}
        dist = float(a2.distortion)
    cert["solve_seconds"] = time.perf_counter() - t0
    meta = {"sink": sink, "window": window, "menu": list(menu), "mode": mode, "weighting": weights.method,
            "quantizer_spec": q.spec(), "retention_target": B / (16.0 * 2 * L * H * C * D),
            "note": "key bits apply to the packed (unprotected) tokens; sink and window tokens are held at 16 bits"}
    return Plan(key=kbits, value=vbits, key_axes=("layer", "kv_head", "channel"),
                value_axes=("layer", "kv_head", "token"), quantizer=q.name, budget_bits=B, usage=usage,
                predicted_distortion=dist, certificate=cert, meta=meta)


def eviction_plan(weights: TokenWeights, shape: Sequence[int], *, retention: float | None = None,
                  budget_bits: float | None = None, quantizer: Any = "kivi", sink: int = 4, window: int = 32) -> Plan:
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


def uniform_plan(shape: Sequence[int], *, retention: float | None = None, budget_bits: float | None = None,
                 quantizer: Any = "kivi", sink: int = 4, window: int = 32) -> Plan | None:
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


# ---- experiment -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointResult:
    """Rows ``{method, weighting, retention_target, retention, bytes, predicted_bytes, nll, kl}`` averaged over windows,
    the full-cache NLL, and the settings; ``to_dict``/``markdown``."""

    rows: list
    full_nll: float
    settings: dict
    seconds: float

    def to_dict(self) -> dict:
        return {"rows": self.rows, "full_nll": self.full_nll, "settings": self.settings, "seconds": self.seconds}

    def markdown(self) -> str:
        rets = sorted({r["retention_target"] for r in self.rows})
        methods = list(dict.fromkeys((r["method"], r["weighting"]) for r in self.rows))
        head = "| method | weighting | " + " | ".join(f"{100 * t:g}% NLL / KL" for t in rets) + " |"
        st = self.settings
        scale = ("weightings marked +fisher are scaled per head by a Fisher importance calibrated on a disjoint "
                 "window (scale_heads)" if st.get("head_scale") else "no head scale")
        lines = [f"Full cache NLL: {self.full_nll:.4f} nats/token. Cells: NLL / KL (nats/token); retention = bytes "
                 f"held / FP16 bytes (payload + metadata + full-precision parts). {st.get('windows')} windows of "
                 f"{st.get('context')} context + {st.get('continuation')} continuation tokens, {st.get('quantizer')}; "
                 f"{scale}.", "", head,
                 "|---|---|" + "---|" * len(rets)]
        for m, w in methods:
            cells = []
            for t in rets:
                r = [x for x in self.rows if (x["method"], x["weighting"], x["retention_target"]) == (m, w, t)]
                cells.append("n/a" if not r or r[0]["nll"] is None else
                             f"{r[0]['nll']:.4f} / {r[0]['kl']:.4f} ({100 * r[0]['retention']:.2f}%)")
            lines.append(f"| {m} | {w} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


@torch.no_grad()
def continuation_logits(model: Any, cache: CompressedCache, ids_cont: torch.Tensor) -> torch.Tensor:
    """``[M, V]`` float32 logits of ``ids_cont`` (``[M]``) teacher-forced through a compressed ``cache`` (which it
    extends), under :func:`.compress.joint_attention`."""
    with joint_attention(model):
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


def run_joint(model: Any = None, tokenizer: Any = None, *, retentions: Sequence[float] = RETENTIONS,
              context: int = 1024, continuation: int = 64, windows: int = 2, window: int = 32, sink: int = 4,
              protect_window: int = 8,
              quantizer: str = "kivi", menu: Sequence[int] = DEFAULT_MENU, weightings: Sequence[str] = WEIGHTINGS,
              weighting: str = "hybrid", head_scale: str | None = "fisher", fisher_samples: int = 2,
              text_path: str | None = None, out_dir: str | Path | None = "benchmarks/results/joint",
              progress: bool = True) -> JointResult:
    """Compress-after-prefill experiment (module docstring). Rows: ``joint-global`` for every weighting in
    ``weightings``; ``joint-per-head`` (RDKV protocol), ``eviction`` (SnapKV-style top-k) with ``weighting``;
    ``uniform`` (quantization only). With ``head_scale="fisher"`` (the default) every weighting is put in the loss's
    units by :func:`.compress.scale_heads` with a Fisher importance calibrated once on a calibration window of the
    same length (disjoint text, ``fisher_samples`` label draws), and one more row, ``joint-global`` with the unscaled
    ``weighting``, shows what the scale buys. Writes ``joint.json``, ``joint.md`` and ``joint.png`` to ``out_dir``
    (``None``: write nothing). ``model``/``tokenizer`` default to the bundled SmolLM2. ``window`` queries score the
    tokens; ``sink`` first and ``protect_window`` last tokens are kept at 16 bits (a budget that cannot hold them
    gives an n/a cell)."""
    from .model import load_model
    from .text import text_windows

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer, _ = load_model(progress=progress)
    if weighting not in WEIGHTINGS or any(w not in WEIGHTINGS for w in weightings):
        raise ValueError(f"weightings must be among {WEIGHTINGS}, got {weighting!r} and {list(weightings)}")
    if head_scale not in (None, "fisher"):
        raise ValueError(f"head_scale must be 'fisher' or None, got {head_scale!r}")
    tw = text_windows(tokenizer, length=context + continuation, calibration=1, evaluation=windows,
                      path=text_path)
    fisher, t_fisher = None, 0.0
    if head_scale == "fisher":
        from .capture import fisher_importance

        t1 = time.perf_counter()
        fisher = fisher_importance(model, tw.calibration[:1, :context], samples=fisher_samples, progress=progress)
        t_fisher = time.perf_counter() - t1
    acc: dict = {}
    full_nlls = []
    for wi in range(windows):
        ids = tw.evaluation[wi]
        full = model(ids[None]).logits[0, context:context + continuation - 1].float()
        targets = ids[context + 1:context + continuation]
        full_nlls.append(float(-torch.log_softmax(full, -1).gather(-1, targets[:, None]).mean()))
        pre = observe_prefill(model, ids[:context], window=window)
        L, H, C, D = pre.shape
        q = get_quantizer(quantizer)
        err = measure_errors(pre.keys, pre.values, q, [b for b in menu if 0 < b < FULL_BITS])
        wts = {w: token_weights(pre, method=w) for w in set(weightings) | {weighting}}
        label = {w: w if fisher is None else f"{w}+fisher" for w in wts}  # the rows' weighting, by method
        if fisher is not None:
            wts.update({label[w]: scale_heads(wts[w], fisher) for w in list(wts)})
        main = label[weighting]
        for r in retentions:
            jobs = ([("joint-global", label[w]) for w in weightings]
                    + ([("joint-global", weighting)] if fisher is not None else [])
                    + [("joint-per-head", main), ("eviction", main), ("uniform", "-")])
            for method, w in jobs:
                kw = dict(retention=r, quantizer=q, sink=sink, window=protect_window)
                try:
                    plan = _plan(method, w, wts, pre, err, menu, kw)
                except ValueError as exc:  # e.g. the budget cannot hold the protected tokens: an n/a cell
                    if progress:
                        print(f"r={r:g} {method}: {exc}", flush=True)
                    plan = None
                key = (method, w, r)
                if plan is None:
                    acc.setdefault(key, [])
                    continue
                cache = CompressedCache.compress(pre.keys, pre.values, plan, q)
                logits = continuation_logits(model, cache, ids[context:context + continuation])
                nll, kl = continuation_scores(logits, full, targets)
                acc.setdefault(key, []).append({"nll": nll, "kl": kl, "bytes": cache.compressed_nbytes,
                                                "predicted_bytes": cache.predicted_nbytes,
                                                "retention": cache.retention})
                if progress:
                    print(f"window {wi} r={r:g} {method:15s} {w:5s} ret={cache.retention:.4f} nll={nll:.4f} "
                          f"kl={kl:.4f}", flush=True)
    rows = []
    for (method, w, r), vals in acc.items():
        if not vals:
            rows.append({"method": method, "weighting": w, "retention_target": r, "retention": None, "bytes": None,
                         "predicted_bytes": None, "nll": None, "kl": None})
            continue
        rows.append({"method": method, "weighting": w, "retention_target": r,
                     **{k: float(np.mean([v[k] for v in vals])) for k in ("retention", "nll", "kl")},
                     "bytes": int(sum(v["bytes"] for v in vals)),
                     "predicted_bytes": int(sum(v["predicted_bytes"] for v in vals))})
    settings = {"protect_window": protect_window, "context": context, "continuation": continuation, "windows": windows, "window": window, "sink": sink,
                "quantizer": quantizer, "menu": list(menu), "weightings": list(weightings), "weighting": weighting,
                "head_scale": head_scale, "fisher_samples": fisher_samples, "fisher_seconds": t_fisher,
                "text": tw.source, "environment": environment(next(model.parameters()).dtype)}
    res = JointResult(rows=rows, full_nll=float(np.mean(full_nlls)), settings=settings,
                      seconds=time.perf_counter() - t0)
    if out_dir is not None:
        _write(res, Path(out_dir))
    return res


def _plan(method, w, wts, pre, err, menu, kw):
    if method == "joint-global":
        return allocate_joint(wts[w], pre.keys, pre.values, menu=menu, mode="global", errors=err, **kw)
    if method == "joint-per-head":
        return allocate_joint(wts[w], pre.keys, pre.values, menu=menu, mode="per_head", errors=err, **kw)
    if method == "eviction":
        return eviction_plan(wts[w], pre.shape, **kw)
    return uniform_plan(pre.shape, **kw)


def _write(res: JointResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint.json").write_text(json.dumps(res.to_dict(), indent=1))
    (out / "joint.md").write_text(res.markdown() + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m, w in dict.fromkeys((r["method"], r["weighting"]) for r in res.rows):
        pts = sorted((r["retention"], r["nll"], r["kl"]) for r in res.rows
                     if (r["method"], r["weighting"]) == (m, w) and r["nll"] is not None)
        if pts:
            x, y, k = zip(*pts)
            ax[0].plot(np.array(x) * 100, y, "o-", label=f"{m} ({w})")
            ax[1].plot(np.array(x) * 100, k, "o-", label=f"{m} ({w})")
    ax[0].axhline(res.full_nll, color="k", ls="--", label="full cache")
    for a, t in zip(ax, ("continuation NLL (nats/token)", "KL to full cache (nats/token)")):
        a.set_xscale("log")
        a.set_xticks([2, 5, 10, 25, 50])
        a.set_xticks([], minor=True)
        a.set_xticklabels(["2", "5", "10", "25", "50"])
        a.set_xlabel("retention (% of FP16 bytes held)")
        a.set_title(t)
    ax[1].set_yscale("log")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "joint.png", dpi=120)
    plt.close(fig)
