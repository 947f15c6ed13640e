"""Which distortion should a per-head allocation minimize? Fisher x MSE (today) against the Fisher-weighted error.

    HF_HUB_OFFLINE=1 python -m experiments.fisher_error      # -> experiments/results/fisher_error/

On the bundled model and two built-in texts (``pydoc_data.topics``, the default, and ``python-source``), per text:
calibrate once (Fisher importance and, in the same pass, every quantizer's Fisher-weighted error
``D_h(b) = sum_e F_e err_e(b)^2``; :func:`rdalloc.backends.hf.calibrate.calibrate`), then measure perplexity and the
mean KL(FP16 || cache) per token over evaluation windows (disjoint text) for each row, quantizer and budget (average
bits with metadata charged):

* ``fisher-error`` — :func:`~rdalloc.backends.hf.head_plans.allocate_plan` with ``distortion="fisher-error"``;
* ``fisher-mse`` — the same with today's distortion, Fisher weight x fitted MSE;
* ``uniform`` — every head at one width (only where the budget is exactly a width plus metadata);
* ``mismatch`` — the *other* quantizer's Fisher-weighted error model (costs still this quantizer's);
* ``beta4`` — one fixed ``beta = 4``, ``alpha`` refitted to the Fisher-weighted error measurements;
* ``random`` — a random allocation at the same budget and menu (seed 0).

The menu is 2..8 bits, except KIVI at 3.0 average bits, where 2..8 leaves no choice (every head at 2 bits is the only
plan within the budget: 2 bits of payload plus KIVI's 1 bit of metadata per element), so the menu there is 1..8 (the
1-bit point is the measured one of each distortion, never an extrapolated curve).

Verdicts: ``fisher-error`` against every other row, and ``fisher-mse`` (today's) against ``uniform`` and ``random``
(its ``mismatch`` and ``beta4`` verdicts are the demo's, ``experiments/ppl_grid.py``): the mean per-token
difference of KL and of NLL with a 95 % bootstrap interval (:func:`~rdalloc.backends.hf.paired.paired_comparison`).
The calibration cost is timed against one plain forward pass over a calibration window. The model runs in float32 by
default (twice as fast as float64 on a CPU; every row of a comparison runs in the same dtype on the same tokens).

With ``--kivi-group G`` (e.g. 64) KIVI cells get one more row, ``fisher-error-gG``: the same calibrated allocation
for KIVI with ``G``-element groups (a second calibration of that quantizer), whose metadata costs ``32 / G`` bits per
element instead of 1, so that at 3.0 average bits the allocation can mix 2- and 3-bit heads instead of trading
1-bit heads; it is compared with ``uniform`` (KIVI's own groups), ``uniform-gG`` (every head at one width with the
larger groups, where the budget allows one) and ``fisher-error``.

How far apart two rows' plans are is recorded per cell (``differences``: kv-head entries whose width differs and
the L1 distance of the bit vectors against ``fisher-error``), and ``allocation_sweep`` lists, for budgets from 2.5 to
6 average bits, how far ``beta4``'s and ``mismatch``'s plans lie from ``fisher-error``'s (plans only, no model run).

Everything expensive is cached under ``--cache`` (default ``<out>/cache``): each calibration (keyed by text windows,
dtype and quantizer specs) and each plan's per-token NLL and KL **per evaluation window** (keyed by the window's
token ids, dtype and the plan's quantizer spec and bits), so a run with more ``--evaluation-windows`` only scores the
new windows, and identical plans in two rows are scored once.

Writes ``results.json``, ``results.md`` (tables, verdicts, costs, command, environment) and ``verdicts.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "fisher_error"
TEXTS = ("pydoc_data.topics", "python-source")
QUANTIZERS = ("kivi", "quarot")
BUDGETS = (3.0, 3.5, 4.0)
MENU = tuple(range(2, 9))
LOW_MENU = tuple(range(1, 9))
KINDS = ("fisher-error", "fisher-mse")
ROWS = ("fisher-error", "fisher-mse", "uniform", "mismatch", "beta4", "random")
SWEEP = tuple(np.round(np.arange(2.5, 6.01, 0.25), 2))
LEVEL = 0.95
FORMAT = "rdalloc.fisher_error_experiment"


def menu_for(quantizer: str, budget: float) -> tuple[int, ...]:
    """1..8 where 2..8 leaves no choice (KIVI at 3.0 average bits), else 2..8."""
    return LOW_MENU if quantizer == "kivi" and abs(budget - 3.0) < 1e-9 else MENU


def plans_for(calibration, quantizer: str, budget: float, tokens: int, rows=ROWS) -> list[tuple[str, Any]]:
    """``[(row, plan)]`` of one cell for ``rows`` (rows without a plan at this budget are left out)."""
    from rdalloc.backends.hf.head_plans import allocate_plan, random_plan, uniform_bits, uniform_plan

    menu = menu_for(quantizer, budget)
    other = next(q for q in calibration.quantizers if q != quantizer)
    out = []
    for kind in KINDS:
        out.append((kind, allocate_plan(calibration, quantizer, budget, tokens=tokens, distortion=kind, menu=menu)))
    ub = uniform_bits(calibration.facts, quantizer, budget, tokens)
    if ub is not None:
        out.append(("uniform", uniform_plan(calibration.facts, quantizer, ub, tokens=tokens)))
    out.append(("mismatch", allocate_plan(calibration, quantizer, budget, tokens=tokens, distortion="fisher-error",
                                          model_from=other, menu=menu)))
    out.append(("beta4", allocate_plan(calibration, quantizer, budget, tokens=tokens, distortion="fisher-error",
                                       fixed_beta=4.0, menu=menu)))
    out.append(("random", random_plan(calibration.facts, quantizer, budget, tokens=tokens, seed=0, menu=menu)))
    return [(row, plan) for row, plan in out if row in rows]


def comparisons_for(rows: dict[str, Any]) -> list[tuple[str, str]]:
    """``(calibrated row, other row)`` pairs of one cell."""
    pairs = [("fisher-error", other) for other in ROWS[1:] if other in rows]
    pairs += [("fisher-mse", other) for other in ("uniform", "random") if other in rows]
    return pairs + [(g, other) for g in rows if g.startswith("fisher-error-g")
                    for other in ("uniform", "uniform-g" + g.removeprefix("fisher-error-g"), "fisher-error")
                    if other in rows]


def plan_difference(a, b) -> dict:
    """How far apart two head plans are: kv-head entries (keys and values) whose width differs, and the L1 distance
    of the two bit vectors (bits summed over entries; per entry: ``l1 / entries``)."""
    x = np.concatenate([np.ravel(a.key), np.ravel(a.value)]).astype(int)
    y = np.concatenate([np.ravel(b.key), np.ravel(b.value)]).astype(int)
    return {"entries": int(x.size), "differ": int((x != y).sum()), "l1": int(np.abs(x - y).sum())}


def modelled_kl(calibration, plan) -> float:
    """The second-order KL per token (nats) the calibration's measured Fisher-weighted error table predicts for
    ``plan``: ``sum_i D_i(b_i)`` over its kv-head entries (keys then values), the errors assumed additive. The same
    yardstick for every row of a quantizer, so differences between rows say how much the model expects them to
    differ."""
    measured, bits = calibration.loss_distortions(plan.meta["quantizer_spec"]["name"])
    widths = np.concatenate([np.ravel(plan.key), np.ravel(plan.value)]).astype(int)
    return float(measured[np.arange(widths.size), [bits.index(int(b)) for b in widths]].sum())


def allocation_sweep(calibration, tokens: int, budgets=SWEEP) -> dict:
    """Per quantizer and budget: ``beta4``'s and ``mismatch``'s plans against ``fisher-error``'s
    (:func:`plan_difference`); plans only."""
    from rdalloc.backends.hf.head_plans import allocate_plan

    out = {}
    for q in QUANTIZERS:
        other = next(o for o in calibration.quantizers if o != q)
        rows = []
        for b in budgets:
            menu = menu_for(q, float(b))
            try:
                mine = allocate_plan(calibration, q, float(b), tokens=tokens, distortion="fisher-error", menu=menu)
            except ValueError:  # below the smallest budget of the menu
                continue
            beta4 = allocate_plan(calibration, q, float(b), tokens=tokens, distortion="fisher-error", fixed_beta=4.0,
                                  menu=menu)
            mism = allocate_plan(calibration, q, float(b), tokens=tokens, distortion="fisher-error", model_from=other,
                                 menu=menu)
            rows.append({"budget": float(b), "menu": list(menu), "beta4": plan_difference(mine, beta4),
                         "mismatch": plan_difference(mine, mism), "modelled_kl": {
                             "fisher-error": modelled_kl(calibration, mine), "beta4": modelled_kl(calibration, beta4),
                             "mismatch": modelled_kl(calibration, mism)}})
        out[q] = rows
    return out


def time_forward(model, window) -> float:
    """CPU seconds of one plain forward pass over ``window`` (best of two)."""
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            t0 = time.process_time()
            model(window[None])
            best = min(best, time.process_time() - t0)
    return best


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cached_calibration(model, facts, windows, quantizers, text: dict, dtype: str, cache: Path, progress: bool):
    """:func:`~rdalloc.backends.hf.calibrate.calibrate` (Fisher estimator, ``fisher-error`` default), from
    ``cache`` when the same windows, dtype and quantizer specs were calibrated before."""
    from rdalloc.backends.hf.calibrate import Calibration, calibrate

    from rdalloc.quantizers import get_quantizer

    specs = [get_quantizer(dict(q) if isinstance(q, dict) else q).spec() for q in quantizers]
    path = cache / f"calibration-{_digest(windows.numpy().tobytes(), dtype, specs)}.json"
    if path.is_file():
        c = Calibration.load(path)
        return dataclasses.replace(c, text={**dict(c.text), "read_from_cache": True})
    c = calibrate(model, facts, windows, quantizers=quantizers, importance=("fisher",), distortion="fisher-error",
                  text=text, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    c.save(path)
    return c


class Scored:
    """Per-token NLL and KL of one plan over the evaluation windows (float32 ``[windows, T - 1]``, as
    :func:`~rdalloc.backends.hf.perplexity.perplexity` keeps them) and the means (from its float64 per-window means;
    every window has the same number of scored tokens)."""

    def __init__(self, nll: np.ndarray, kl: np.ndarray, nll_means: list[float], kl_means: list[float]):
        self.token_nll, self.token_kl = nll, kl
        self.nll, self.kl = float(np.mean(nll_means)), float(np.mean(kl_means))
        self.ppl = float(np.exp(self.nll))


def score_plans(model, windows, plans: dict, dtype: str, cache: Path, label: str) -> dict:
    """``{key: Scored}`` for ``plans`` (``{key: plan}``), window by window, each (plan, window) read from ``cache``
    when scored before (the reference log-probabilities of a window are computed only when one of its plans is
    missing)."""
    from rdalloc.backends.hf.head_plans import plan_cache_factory
    from rdalloc.backends.hf.perplexity import perplexity, reference_logprobs

    cache.mkdir(parents=True, exist_ok=True)
    parts: dict = {k: ([], [], [], []) for k in plans}
    for w in range(windows.shape[0]):
        row = windows[w:w + 1]
        wid = _digest(row.numpy().tobytes(), dtype)
        ref = None
        for k, plan in plans.items():
            path = cache / f"scored-{wid}-{_digest(k)}.npz"
            if not path.is_file():
                if ref is None:
                    ref = reference_logprobs(model, row, progress=False)
                t0 = time.process_time()
                r = perplexity(model, row, plan_cache_factory(plan, model.config), reference=ref, progress=False)
                np.savez(path, nll=r.token_nll, kl=r.token_kl, nll_mean=r.nll, kl_mean=r.kl)
                print(f"[{label}] window {w}: {k[0]} ppl {r.ppl:.3f}, KL {r.kl * 1e3:.2f} mnat "
                      f"({time.process_time() - t0:.0f} s CPU)", flush=True)
            with np.load(path) as z:
                for slot, name in enumerate(("nll", "kl", "nll_mean", "kl_mean")):
                    parts[k][slot].append(z[name] if slot < 2 else float(z[name]))
    return {k: Scored(np.concatenate(p[0]), np.concatenate(p[1]), p[2], p[3]) for k, p in parts.items()}


def run_text(model, tokenizer, facts, text: str, args, progress: bool) -> dict:
    from rdalloc.backends.hf.head_plans import allocate_plan, uniform_bits, uniform_plan
    from rdalloc.backends.hf.paired import paired_comparison
    from rdalloc.backends.hf.text import text_windows

    from rdalloc.quantizers import get_quantizer

    tw = text_windows(tokenizer, length=args.length, calibration=args.calibration_windows,
                      evaluation=args.evaluation_windows, path=text)
    cal, ev = tw.calibration, tw.evaluation
    cache = Path(args.cache)
    forward_s = time_forward(model, cal[0])
    c = cached_calibration(model, facts, cal, QUANTIZERS, tw.to_dict(), args.dtype, cache, progress)
    clock = c.cpu_timings or c.timings
    per_window = {k: v / cal.shape[0] / forward_s for k, v in clock.items()}
    cost = {"forward_cpu_seconds": forward_s, "calibration_cpu_seconds": dict(c.cpu_timings),
            "calibration_read_from_cache": bool(c.text.get("read_from_cache")),
            "calibration_seconds": dict(c.timings), "per_window_in_forwards": per_window}
    print(f"[{text}] calibration {clock['total']:.1f} s CPU; one forward {forward_s:.2f} s CPU; per window in "
          "forwards: " + ", ".join(f"{k} {v:.2f}" for k, v in per_window.items()), flush=True)
    grouped = None
    if args.kivi_group:
        kivi_g = get_quantizer("kivi", group_size=args.kivi_group)
        grouped = cached_calibration(model, facts, cal, [kivi_g], tw.to_dict(), args.dtype, cache, progress)

    tokens = int(ev.shape[1])
    cell_plans = []
    for q, b in args.cells:
        plans = plans_for(c, q, b, tokens, args.rows)
        if grouped is not None and q == "kivi":
            plans.append((f"fisher-error-g{args.kivi_group}",
                          allocate_plan(grouped, "kivi", b, tokens=tokens, distortion="fisher-error")))
            ub = uniform_bits(grouped.facts, grouped.quantizer("kivi"), b, tokens)
            if ub is not None:  # every head at one width with the larger groups, where the budget allows it
                plans.append((f"uniform-g{args.kivi_group}",
                              uniform_plan(grouped.facts, grouped.quantizer("kivi"), ub, tokens=tokens)))
        cell_plans.append((q, b, plans))

    def key_of(plan):
        spec = json.dumps(plan.meta.get("quantizer_spec"), sort_keys=True)  # the same bits under another quantizer
        return (spec, np.asarray(plan.key).tolist(), np.asarray(plan.value).tolist())

    unique = {}
    for _, _, plans in cell_plans:
        for _, plan in plans:
            unique.setdefault(json.dumps(key_of(plan)), plan)
    scored = score_plans(model, ev, {(p.meta.get("quantizer_spec", {}).get("name", "?"), k): p
                                     for k, p in unique.items()}, args.dtype, cache / "scored", text)
    scored = {k[1]: v for k, v in scored.items()}
    fp16 = reference_fp16(model, ev, args.dtype, cache / "scored")

    cells = []
    for q, b, plans in cell_plans:
        results, rows, by_row = {}, {}, {}
        for row, plan in plans:
            k = json.dumps(key_of(plan))
            r = scored[k]
            results[row] = (k, r)
            by_row[row] = plan
            bits = np.concatenate([plan.key.ravel(), plan.value.ravel()]).astype(int)
            rows[row] = {"ppl": r.ppl, "nll": r.nll, "kl": r.kl, "average_bits": plan.usage.average_bits,
                         "payload_bits": plan.usage.average_payload_bits,
                         "histogram": {int(k): int(n) for k, n in zip(*np.unique(bits, return_counts=True))},
                         "key_bits": plan.key.tolist(), "value_bits": plan.value.tolist(),
                         "distortion": plan.meta.get("distortion"), "menu": plan.meta.get("menu"),
                         "quantizer_spec": plan.meta.get("quantizer_spec"),
                         "modelled_kl": modelled_kl(grouped if row.endswith(f"-g{args.kivi_group}") else c, plan)}
        comps = []
        for mine, other in comparisons_for(rows):
            (k1, a), (k2, o) = results[mine], results[other]
            comp = {"row": mine, "against": other, "identical_plan": k1 == k2,
                    "difference": plan_difference(by_row[mine], by_row[other]),
                    "modelled_kl_difference": rows[mine]["modelled_kl"] - rows[other]["modelled_kl"]}
            for metric in ("kl", "nll"):
                comp[metric] = paired_comparison(getattr(a, "token_" + metric), getattr(o, "token_" + metric),
                                                 level=LEVEL, seed=0).to_dict()
            comps.append(comp)
        cells.append({"quantizer": q, "budget": b, "menu": list(menu_for(q, b)), "rows": rows,
                      "comparisons": comps})
    choices = {q: {r: {"tabulated": c.loss_choice(q, r).tabulated_items, "beta": float(c.loss_choice(q, r).fit.beta[0])}
                   for r in ("key", "value")} for q in QUANTIZERS}
    return {"text": text, "windows": tw.to_dict(), "fp16": fp16, "tokens_scored": int(ev.shape[0] * (tokens - 1)),
            "cost": cost, "betas": {"fisher-mse": {q: c.betas(q) for q in QUANTIZERS},
                                    "fisher-error": {q: {r: float(c.loss_fits[q][r].beta[0]) for r in ("key", "value")}
                                                     for q in QUANTIZERS}},
            "fisher_error_choice": choices, "plans_evaluated": len(unique), "cells": cells,
            "allocation_sweep": allocation_sweep(c, tokens)}


def reference_fp16(model, windows, dtype: str, cache: Path) -> dict:
    """Perplexity of the uncompressed model (the reference) on ``windows``, cached per window."""
    from rdalloc.backends.hf.perplexity import perplexity

    nll = []
    for w in range(windows.shape[0]):
        row = windows[w:w + 1]
        path = cache / f"fp16-{_digest(row.numpy().tobytes(), dtype)}.npy"
        if not path.is_file():
            np.save(path, np.asarray([perplexity(model, row, None, progress=False).nll]))
        nll.append(float(np.load(path)[0]))
    mean = float(np.mean(nll))
    return {"ppl": float(np.exp(mean)), "nll": mean}


# ---- report ------------------------------------------------------------------------------------------------------
def _fmt_interval(c: dict, scale: float, fmt: str) -> str:
    return f"{c['difference'] * scale:{fmt}} [{c['low'] * scale:{fmt}}, {c['high'] * scale:{fmt}}]"


def markdown(result: dict) -> str:
    f = result["facts"]
    lines = [f"# Fisher-weighted error vs Fisher x MSE: per-head allocation on {f['model']}", "",
             f"Command: `{f['command']}`. Model dtype {f['dtype']}; {f['evaluation_windows']} evaluation windows of "
             f"{f['length']} tokens per text, calibration on {f['calibration_windows']} disjoint windows of the same "
             f"text. Budgets: average bits per element **with metadata charged** (payload-only bits in the plan "
             f"rows of results.json). KL: mean KL(FP16 || cache) per scored token in millinats. Menu 2..8, except "
             f"KIVI at 3.0 (menu 1..8: with 2..8 every head must take 2 bits). Wall time of this invocation "
             f"{f['wall_seconds']:.0f} s (calibrations and per-window scores found in the cache are read, not "
             f"recomputed) on a machine **shared** with other jobs (load average {f['load_before']} before, "
             f"{f['load_after']} after), so times are indicative.", ""]
    for t in result["texts"]:
        lines += [f"## Text `{t['text']}` (FP16 PPL {t['fp16']['ppl']:.3f}, {t['tokens_scored']} tokens scored)", ""]
        be = t["betas"]
        lines.append("Pooled betas (keys/values): " + "; ".join(
            f"{q}: MSE {be['fisher-mse'][q]['key']:.2f}/{be['fisher-mse'][q]['value']:.2f}, Fisher-weighted error "
            f"{be['fisher-error'][q]['key']:.2f}/{be['fisher-error'][q]['value']:.2f}" for q in QUANTIZERS) + ". "
            + "Heads whose Fisher-weighted error curve misses a measurement by more than 1.3x (read from the table): "
            + "; ".join(f"{q} {r} {len(t['fisher_error_choice'][q][r]['tabulated'])}/{f['heads']}"
                        for q in QUANTIZERS for r in ("key", "value")) + ".")
        lines.append("")
        for q in QUANTIZERS:
            cells = [c for c in t["cells"] if c["quantizer"] == q]
            if not cells:
                continue
            head = "| row | " + " | ".join(f"{c['budget']:g}" for c in cells) + " |"
            lines += [f"### {q}: perplexity / KL (mnat)", "", head, "|---|" + "---|" * len(cells)]
            extra = sorted({r for c in cells for r in c["rows"] if r not in ROWS})
            for row in (*ROWS, *extra):
                if not any(row in c["rows"] for c in cells):
                    continue
                vals = []
                for c in cells:
                    r = c["rows"].get(row)
                    if r is None:
                        vals.append("—")
                        continue
                    best = min(x["kl"] for x in c["rows"].values())
                    cell = f"{r['ppl']:.3f} / {r['kl'] * 1e3:.1f}"
                    vals.append(f"**{cell}**" if r["kl"] == best else cell)
                lines.append(f"| {row} | " + " | ".join(vals) + " |")
            lines.append("")
        lines += [f"### Verdicts on `{t['text']}`", "",
                  "Paired per-token difference row − against (negative: the row is better), 95 % block-bootstrap "
                  "interval (blocks of 32 tokens within windows, 2000 resamples); verdict from the interval.", "",
                  "Plans differ: kv-head entries (of keys and values) whose width differs / L1 distance of the bit "
                  "vectors (bits).", "",
                  "Modelled ΔKL: what the calibration's measured Fisher-weighted error table predicts for the "
                  "difference (second order, errors additive over heads; for a row of another group size its own "
                  "calibration's table).", "",
                  "| quantizer | budget | row | against | plans differ | modelled ΔKL (mnat) | ΔKL (mnat) [95 % CI] "
                  "| KL | ΔNLL (nat) [95 % CI] | NLL |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in t["cells"]:
            for comp in c["comparisons"]:
                if comp["identical_plan"]:
                    lines.append(f"| {c['quantizer']} | {c['budget']:g} | {comp['row']} | {comp['against']} | "
                                 f"0 / 0 | 0 | 0 | same plan | 0 | same plan |")
                    continue
                dif = comp.get("difference") or {}
                lines.append(f"| {c['quantizer']} | {c['budget']:g} | {comp['row']} | {comp['against']} | "
                             f"{dif.get('differ', '?')} / {dif.get('l1', '?')} | "
                             f"{comp.get('modelled_kl_difference', float('nan')) * 1e3:+.2f} | "
                             f"{_fmt_interval(comp['kl'], 1e3, '+.2f')} | **{comp['kl']['verdict']}** | "
                             f"{_fmt_interval(comp['nll'], 1, '+.4f')} | **{comp['nll']['verdict']}** |")
        sweep = t.get("allocation_sweep") or {}
        if sweep:
            budgets = sorted({r["budget"] for rows in sweep.values() for r in rows})
            entries = next(r["beta4"]["entries"] for rows in sweep.values() for r in rows)
            lines += ["", f"### How far `beta4` and `mismatch` plans lie from `fisher-error`'s on `{t['text']}` "
                      "(plans only)", "", f"Entries whose width differs / L1 distance in bits, of {entries} kv-head "
                      "entries (keys and values) / modelled KL of the row minus `fisher-error`'s (mnat, from the "
                      "measured Fisher-weighted error table); — where the budget is below the menu's least.", "",
                      "| quantizer | row | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                      "|---|---|" + "---|" * len(budgets)]
            for q, rows in sweep.items():
                at = {r["budget"]: r for r in rows}
                for kind in ("beta4", "mismatch"):
                    lines.append(f"| {q} | {kind} | " + " | ".join(
                        f"{at[b][kind]['differ']} / {at[b][kind]['l1']} / "
                        f"{(at[b]['modelled_kl'][kind] - at[b]['modelled_kl']['fisher-error']) * 1e3:+.1f}"
                        if b in at else "—" for b in budgets) + " |")
        cost = t["cost"]
        pw = cost["per_window_in_forwards"]
        lines += ["", f"Calibration cost on `{t['text']}`, per calibration window, in plain forward passes "
                  f"({cost.get('forward_cpu_seconds', cost.get('forward_seconds', 0.0)):.2f} s CPU each; CPU time; "
                  + ("the calibration was read from the cache, so its steps were timed in the run that made it and "
                     "the forward pass in this one" if cost.get("calibration_read_from_cache") else
                     "both timed in this process") + "): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in pw.items())
                  + " (fisher_error_tables, both quantizers' Fisher-weighted errors at 1..8 bits, is part of "
                    "fisher).", ""]
    lines += ["## Summary", ""] + result["summary"] + ["", "Environment: `" + json.dumps(f["environment"]) + "`", ""]
    return "\n".join(lines)


def summarize(result: dict) -> list[str]:
    """Counts of KL/NLL verdicts per comparison kind, over texts and distinct-plan cells."""
    tally: dict = {}
    for t in result["texts"]:
        for c in t["cells"]:
            for comp in c["comparisons"]:
                against = comp["against"].split(" (")[0]
                key = (comp["row"], against)
                d = tally.setdefault(key, {"kl": {}, "nll": {}, "same": 0})
                if comp["identical_plan"]:
                    d["same"] += 1
                    continue
                for m in ("kl", "nll"):
                    v = comp[m]["verdict"]
                    d[m][v] = d[m].get(v, 0) + 1
    lines = ["| row | against | KL better / worse / undecided | NLL better / worse / undecided | same plan |",
             "|---|---|---|---|---|"]
    for (row, against), d in tally.items():
        kl, nll = (" / ".join(str(d[m].get(v, 0)) for v in ("better", "worse", "undecided")) for m in ("kl", "nll"))
        lines.append(f"| {row} | {against} | {kl} | {nll} | {d['same']} |")
    return lines


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = result["texts"]
    shown = [[(c, comp) for c in t["cells"] for comp in c["comparisons"]
              if not comp["identical_plan"] and comp["row"] == "fisher-error"] for t in texts]
    n = max(len(s) for s in shown)
    fig, axes = plt.subplots(1, len(texts), figsize=(7.5 * len(texts), 0.32 * n + 1.8), squeeze=False)
    colors = {"better": "tab:green", "worse": "tab:red", "undecided": "tab:gray"}
    for ax, t, items in zip(axes[0], texts, shown):
        for y, (c, comp) in enumerate(items):
            other = c["rows"][comp["against"]]["kl"]
            s = 100.0 / other
            k = comp["kl"]
            ax.errorbar(k["difference"] * s, y, xerr=[[(k["difference"] - k["low"]) * s],
                                                      [(k["high"] - k["difference"]) * s]],
                        fmt="o", color=colors[k["verdict"]], capsize=3)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(items)), [f"{c['quantizer']} @ {c['budget']:g}: vs {comp['against']}"
                                          for c, comp in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("KL difference fisher-error − row, % of the row's KL (95 % CI)")
        ax.set_title(f"{t['text']}  (green: fisher-error better, red: worse, gray: undecided)", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.fisher_error", description=__doc__.splitlines()[0])
    p.add_argument("--texts", default=",".join(TEXTS), help="comma-separated built-in texts or files")
    p.add_argument("--calibration-windows", type=int, default=2)
    p.add_argument("--evaluation-windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=("float64", "float32"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cells", default=",".join(f"{q}:{b:g}" for q in QUANTIZERS for b in BUDGETS),
                   help="comma-separated quantizer:budget cells (default: both quantizers at 3, 3.5 and 4)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {ROWS} (default: all)")
    p.add_argument("--kivi-group", type=int, default=0,
                   help="also allocate KIVI with this group size in the KIVI cells (a second calibration), e.g. 64")
    p.add_argument("--cache", default=None, help="cache directory (default: <out>/cache)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.cells = [(c.split(":")[0].strip(), float(c.split(":")[1])) for c in args.cells.split(",") if c.strip()]
    except (IndexError, ValueError):
        print(f"fisher_error: error: --cells must be quantizer:budget pairs, got {args.cells!r}", file=sys.stderr)
        return 2
    args.rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [q for q, _ in args.cells if q not in QUANTIZERS] + [r for r in args.rows if r not in ROWS]
    if args.kivi_group and args.kivi_group not in (2, 4, 8, 16, 32, 64):
        bad.append(f"--kivi-group {args.kivi_group} (must divide head_dim 64)")
    if bad or "fisher-error" not in args.rows:
        print(f"fisher_error: error: unknown cells or rows {bad} (quantizers {QUANTIZERS}, rows {ROWS}, "
              f"fisher-error among them)", file=sys.stderr)
        return 2
    import torch
    from rdalloc.backends.hf.model import load_model

    from rdalloc.cli import check_positive, write_atomic
    from rdalloc.environment import environment

    try:
        for name in ("calibration_windows", "evaluation_windows", "length", "threads"):
            check_positive(getattr(args, name), "--" + name.replace("_", "-"))
    except ValueError as e:
        print(f"fisher_error: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)  # CPU time is the cost measure on a shared machine: one thread, no spinning
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.cache = str(out / "cache") if args.cache is None else args.cache
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    model, tokenizer, facts = load_model(None, dtype=args.dtype, progress=not args.no_progress)
    texts = [run_text(model, tokenizer, facts, t.strip(), args, not args.no_progress)
             for t in args.texts.split(",") if t.strip()]
    command = "python -m experiments.fisher_error " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"format": FORMAT, "version": 1, "texts": texts,
              "facts": {"model": facts.name, "heads": facts.layers * facts.kv_heads, "dtype": args.dtype,
                        "length": args.length,
                        "calibration_windows": args.calibration_windows,
                        "evaluation_windows": args.evaluation_windows, "command": command.strip(),
                        "wall_seconds": time.perf_counter() - t0, "load_before": load_before,
                        "load_after": [round(x, 2) for x in os.getloadavg()],
                        "shared_machine": True, "environment": environment(args.dtype)}}
    result["summary"] = summarize(result)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    md = markdown(result)
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(md))
    write_atomic(out / "verdicts.png", lambda tmp: plot(result, tmp))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
