"""The perplexity grid of the per-head experiment (RateQuant setting), on the bundled model by default.

    HF_HUB_OFFLINE=1 python -m experiments.ppl_grid           # the quick grid -> experiments/results/demo
    HF_HUB_OFFLINE=1 python -m experiments.ppl_grid --full    # the whole grid -> experiments/results/demo_full

Calibrates the model (:func:`rdalloc.backends.hf.calibrate.calibrate`), then measures perplexity and the mean
KL(FP16 || cache) per token over evaluation windows (disjoint text) with a quantized KV cache for every row, quantizer
and budget (average bits **with metadata charged**, docs/design.md §2). The FP16 log-probabilities are computed once
and kept in full (float32) for the KL of every row (:func:`~rdalloc.backends.hf.perplexity.reference_logprobs`). Each
row is a head plan from :mod:`rdalloc.backends.hf.head_plans`:

* ``uniform`` — every head at the same integer width ``b``; only where the budget is exactly ``b`` plus the
  quantizer's metadata per element.
* ``rdalloc`` — :func:`~rdalloc.backends.hf.head_plans.allocate_plan` with the calibrated loss model.
* ``rdalloc_other_importance`` — the same with the other importance estimator (the comparison).
* ``mismatch`` — the model fitted for the *other* quantizer (costs still the true quantizer's).
* ``beta4`` — one fixed ``beta = 4`` for every quantizer and role, ``alpha`` refitted, extrapolated over the whole
  menu, times the importance: what systems that assume ``beta = 4`` do.
* ``random`` — random allocation at the same budget, per seed; the table shows the mean perplexity over seeds.

Verdicts: per quantizer and budget, the calibrated ``rdalloc`` row is compared token by token with ``uniform``,
``mismatch``, ``beta4`` and ``random`` (its per-token values averaged over seeds): mean difference in KL and in NLL
with a 95 % block-bootstrap interval and a verdict (:func:`~rdalloc.backends.hf.paired.paired_comparison`).

Writes ``calibration.json``, ``results.json``, ``results.md`` (the tables it prints), ``ppl_vs_bits.png`` (PPL and KL
vs bits) and ``verdicts.png`` (the paired KL differences with their intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rdalloc.backends.hf import perplexity, reference_logprobs
from rdalloc.backends.hf.calibrate import CALIBRATION_FORMAT, IMPORTANCE_METHODS, Calibration, calibrate
from rdalloc.backends.hf.cli import add_dtype, check_model, check_path, probe_widths, quantizer_names
from rdalloc.backends.hf.head_plans import allocate_plan, plan_cache_factory, random_plan, uniform_bits, uniform_plan
from rdalloc.backends.hf.model import load_model, model_facts
from rdalloc.backends.hf.paired import paired_comparison
from rdalloc.backends.hf.text import text_windows
from rdalloc.backends.hf.windows import with_progress

from rdalloc.cli import check_positive, floats, has_format, one_line, prepare_output_dir, write_atomic
from rdalloc.environment import environment
from rdalloc.plan import Plan
from rdalloc.quantizers import get_quantizer

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("uniform", "rdalloc", "rdalloc_other_importance", "mismatch", "beta4", "random")
COMPARED = ("uniform", "mismatch", "beta4", "random")
"""The rows the calibrated ``rdalloc`` row is compared with, token by token."""
LEVEL = 0.95
"""Confidence level of the paired intervals."""
QUICK = {"calibration_windows": 2, "calibration_length": 256, "evaluation_windows": 6, "evaluation_length": 512,
         "budgets": (3.0, 3.5, 4.0), "seeds": (0,), "importance_budgets": (3.5,), "probe_bits": ()}
FULL = {"calibration_windows": 4, "calibration_length": 512, "evaluation_windows": 4, "evaluation_length": 512,
        "budgets": (2.0, 2.5, 3.0, 3.5, 4.0), "seeds": (0, 1, 2), "importance_budgets": (2.0, 2.5, 3.0, 3.5, 4.0),
        "probe_bits": (1, 2)}
RESULT_FORMAT = "rdalloc.experiment"
"""The ``"format"`` of ``results.json``."""
BROKEN = 10.0
"""Perplexity above ``BROKEN`` times FP16's counts as a wrecked model (left out of the estimator comparison)."""


@dataclass(frozen=True)
class ExperimentResult:
    """Rows of ``{"quantizer", "row", "budget", "average_bits", "payload_bits", "ppl", "nll", "kl", "seed", ...}``
    plus the FP16 reference, the paired comparisons (``{"quantizer", "budget", "against", "identical_plan", "kl":
    {...}, "nll": {...}}``, each metric a :class:`~rdalloc.backends.hf.paired.PairedComparison` as a dict) and facts
    about the run. Results saved before KL was measured load with no ``kl`` and no comparisons."""

    fp16: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    facts: Mapping[str, Any] = field(default_factory=dict)
    comparisons: Sequence[Mapping[str, Any]] = ()
    token_values: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    """Per-token float32 ``[windows, T - 1]`` NLL and KL of every row, keyed ``quantizer/budget/row[/seed]/metric``
    (FP16: ``fp16/nll``); kept in memory, not in the JSON form (``--save-tokens`` writes them as ``tokens.npz``)."""

    def to_dict(self) -> dict:
        return {"format": RESULT_FORMAT, "version": 1, "fp16": dict(self.fp16),
                "rows": [dict(r) for r in self.rows], "facts": dict(self.facts),
                "comparisons": [dict(c) for c in self.comparisons]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentResult:
        if not isinstance(d, Mapping) or d.get("format") != RESULT_FORMAT:
            raise ValueError("not an rdalloc experiment result")
        return cls(fp16=d["fp16"], rows=d["rows"], facts=d.get("facts") or {},
                   comparisons=d.get("comparisons") or ())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def table(self, metric: str = "ppl") -> dict:
        """``{quantizer: {row: {budget: mean metric}}}`` (``"ppl"`` or ``"kl"``; random rows averaged over
        seeds; rows without the metric left out)."""
        if metric not in ("ppl", "kl"):
            raise ValueError(f"metric must be 'ppl' or 'kl', got {metric!r}")
        out: dict = {}
        for r in self.rows:
            if r.get(metric) is None:
                continue
            cell = out.setdefault(r["quantizer"], {}).setdefault(r["row"], {}).setdefault(float(r["budget"]), [])
            cell.append(float(r[metric]))
        return {q: {row: {b: float(np.mean(v)) for b, v in cells.items()} for row, cells in rows.items()}
                for q, rows in out.items()}

    def importance_comparison(self, broken: float = BROKEN) -> dict:
        """Mean log-perplexity of rdalloc with each estimator over the (quantizer, budget) cells where both ran and
        at least one kept the model working (perplexity within ``broken`` times FP16's: between two wrecked models,
        e.g. 1e5 against 2e5, the ratio says nothing about the estimators)."""
        per: dict = {}
        for r in self.rows:
            if r["row"] in ("rdalloc", "rdalloc_other_importance"):
                per.setdefault((r["quantizer"], float(r["budget"])), {})[r["importance"]] = float(r["ppl"])
        limit = broken * float(self.fp16["ppl"])
        both = {k: v for k, v in per.items() if all(m in v for m in IMPORTANCE_METHODS)}
        cells = {k: v for k, v in both.items() if min(v.values()) <= limit}
        if not cells:
            return {}
        mean = {m: float(np.mean([math.log(v[m]) for v in cells.values()])) for m in IMPORTANCE_METHODS}
        winner = min(mean, key=mean.get)
        return {"cells": [{"quantizer": q, "budget": b, **v} for (q, b), v in sorted(cells.items())],
                "left_out": len(both) - len(cells), "broken_factor": float(broken),
                "mean_log_ppl": mean, "winner": winner,
                "ppl_ratio_other_over_winner": float(math.exp(max(mean.values()) - min(mean.values())))}


def run_experiment(model: Any, calibration: Calibration, windows: Any, *, quantizers: Sequence[str] = ("kivi",
                   "quarot"), budgets: Sequence[float] = FULL["budgets"], seeds: Sequence[int] = (0, 1, 2),
                   rows: Sequence[str] = ROWS, importance_budgets: Sequence[float] | None = None,
                   progress: bool = True, resamples: int = 2000, seed: int = 0) -> ExperimentResult:
    """Perplexity and KL to FP16 over ``windows`` (``[count, length]``) for every row, quantizer and budget, and
    the paired comparisons of ``rdalloc`` with the :data:`COMPARED` rows (see the module docstring). Identical plans
    are evaluated once. ``importance_budgets`` limits the estimator comparison row (default: every budget);
    ``resamples`` and ``seed``: of the bootstrap."""
    facts = calibration.facts
    calibration.check_model(model_facts(model))
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"rows must be among {ROWS}, got {bad}")
    names = [get_quantizer(q).name for q in quantizers]
    for q in names:
        calibration.model(q)  # raises if not calibrated
    if "mismatch" in rows and len(calibration.quantizers) < 2:
        raise ValueError("the mismatch row needs a calibration with at least two quantizers")
    tokens = int(windows.shape[1])
    importance_budgets = tuple(budgets) if importance_budgets is None else tuple(importance_budgets)
    other_method = [m for m in IMPORTANCE_METHODS
                    if m != calibration.default_importance and m in calibration.importance]

    jobs: list[tuple[dict, Plan]] = []
    infeasible: list[dict] = []

    def add(info, make, *args, **kwargs):
        try:
            jobs.append((info, make(*args, **kwargs)))
        except ValueError as e:  # a budget below the menu floor plus metadata
            if "infeasible" not in str(e):
                raise
            infeasible.append({**info, "reason": str(e)})

    for q in names:
        other_q = next((o for o in calibration.quantizers if o != q), None)
        for b in budgets:
            base = {"quantizer": q, "budget": float(b)}
            for row in rows:
                if row == "uniform":
                    ub = uniform_bits(facts, q, b, tokens)
                    if ub is not None:
                        add({**base, "row": row, "uniform_bits": ub}, uniform_plan, facts, q, ub, tokens=tokens)
                elif row == "rdalloc":
                    add({**base, "row": row, "importance": calibration.default_importance},
                        allocate_plan, calibration, q, b, tokens=tokens)
                elif row == "rdalloc_other_importance":
                    if other_method and any(abs(b - x) < 1e-9 for x in importance_budgets):
                        add({**base, "row": row, "importance": other_method[0]},
                            allocate_plan, calibration, q, b, tokens=tokens, importance=other_method[0],
                            distortion="fisher-mse")
                elif row == "mismatch":
                    add({**base, "row": row, "model_from": other_q},
                        allocate_plan, calibration, q, b, tokens=tokens, model_from=other_q)
                elif row == "beta4":
                    add({**base, "row": row}, allocate_plan, calibration, q, b, tokens=tokens, fixed_beta=4.0)
                elif row == "random":
                    for s in seeds:
                        add({**base, "row": row, "seed": int(s)},
                            random_plan, facts, q, b, tokens=tokens, seed=int(s), menu=calibration.menu(q))

    t0 = time.perf_counter()
    ref = reference_logprobs(model, windows, progress=False)
    fp16 = ref.result
    t_fp16 = time.perf_counter() - t0
    done: dict = {}
    out_rows = []
    per_token: dict = {}  # (quantizer, budget, row) -> list of (plan key, PerplexityResult)
    token_values = {"fp16/nll": fp16.token_nll}
    for info, plan in with_progress(jobs, desc="experiment (plans)", total=len(jobs), enabled=progress):
        key = (info["quantizer"], plan.key.tobytes(), plan.value.tobytes())
        if key not in done:
            t0 = time.perf_counter()
            r = perplexity(model, windows, plan_cache_factory(plan, model.config), reference=ref, progress=False)
            done[key] = (r, time.perf_counter() - t0)
        r, seconds = done[key]
        if info["row"] == "rdalloc" or info["row"] in COMPARED:
            per_token.setdefault((info["quantizer"], info["budget"], info["row"]), []).append((key, r))
        name = f"{info['quantizer']}/{info['budget']:g}/{info['row']}" + (f"/{info['seed']}" if "seed" in info else "")
        token_values[name + "/nll"], token_values[name + "/kl"] = r.token_nll, r.token_kl
        usage = plan.usage
        hist = {int(k): int(c) for k, c in zip(*np.unique(np.concatenate([plan.key.ravel(), plan.value.ravel()]),
                                                             return_counts=True))}
        out_rows.append({**info, "average_bits": usage.average_bits, "payload_bits": usage.average_payload_bits,
                         "ppl": r.ppl, "nll": r.nll, "kl": r.kl, "seconds": seconds, "histogram": hist,
                         "key_bits": plan.key.tolist(), "value_bits": plan.value.tolist(),
                         "predicted_distortion": plan.predicted_distortion})
    comparisons = paired_rows(per_token, resamples=resamples, seed=seed)
    return ExperimentResult(fp16={"ppl": fp16.ppl, "nll": fp16.nll, "kl": fp16.kl, "seconds": t_fp16},
                            rows=out_rows, comparisons=comparisons, token_values=token_values,
                            facts={"model": facts.to_dict(), "evaluation_windows": int(windows.shape[0]),
                                   "evaluation_length": tokens, "tokens_scored": fp16.tokens,
                                   "quantizers": names, "budgets": [float(b) for b in budgets],
                                   "seeds": [int(s) for s in seeds],
                                   "menu": sorted({b for q in names for b in calibration.menu(q)}),
                                   "probed_bits": {q: list(calibration.probed_bits(q)) for q in names},
                                   "default_importance": calibration.default_importance,
                                   "betas": {q: calibration.betas(q) for q in calibration.quantizers},
                                   "plans_evaluated": len(done), "infeasible": infeasible,
                                   "reference_bytes": ref.nbytes,
                                   "bootstrap": {"level": LEVEL, "resamples": int(resamples), "seed": int(seed)}})


def paired_rows(per_token: Mapping[tuple, Sequence[tuple]], *, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Paired comparisons of the ``rdalloc`` row with each :data:`COMPARED` row at the same quantizer and budget,
    on KL and on NLL. ``per_token`` maps ``(quantizer, budget, row)`` to ``[(plan key, PerplexityResult), ...]`` (one
    per seed for ``random``, whose per-token values are averaged over seeds: the expected random allocation)."""
    out = []
    for (q, b, row), ours in sorted(per_token.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if row != "rdalloc":
            continue
        (our_key, mine), = ours
        for against in COMPARED:
            theirs = per_token.get((q, b, against))
            if not theirs:
                continue
            cmp = {"quantizer": q, "budget": float(b), "against": against, "seeds": len(theirs),
                   "identical_plan": all(k == our_key for k, _ in theirs)}
            for metric in ("kl", "nll"):
                other = np.mean([getattr(r, "token_" + metric).astype(np.float64) for _, r in theirs], axis=0)
                cmp[metric] = paired_comparison(getattr(mine, "token_" + metric), other, level=LEVEL,
                                                resamples=resamples, seed=seed).to_dict()
            out.append(cmp)
    return out


_LABELS = {"uniform": "uniform", "rdalloc": "rdalloc (calibrated, {imp})",
           "rdalloc_other_importance": "rdalloc (calibrated, {other})",
           "mismatch": "rdalloc, {otherq} model (mismatch)",
           "beta4": "rdalloc, fixed beta=4", "random": "random allocation (mean of {n} seeds)"}


def _label(row: str, result: ExperimentResult, q: str) -> str:
    imp = result.facts.get("default_importance", "fisher")
    other = next((m for m in IMPORTANCE_METHODS if m != imp), "")
    otherq = next((o for o in result.facts.get("betas", {}) if o != q), "other")
    return _LABELS[row].format(imp=imp, other=other, otherq=otherq, n=len(result.facts.get("seeds", [])))


def _cells(rows: Mapping, budgets: Sequence[float], fmt: str) -> list[tuple[str, str]]:
    """One markdown line per row (in :data:`ROWS` order) of ``{row: {budget: value}}``, the lowest value in bold."""
    best = {b: min(v[b] for v in rows.values() if b in v) for b in budgets}
    lines = []
    for row in ROWS:
        if row in rows:
            txt = ["—" if b not in rows[row] else f"**{rows[row][b]:{fmt}}**" if rows[row][b] == best[b]
                   else f"{rows[row][b]:{fmt}}" for b in budgets]
            lines.append((row, " | ".join(txt)))
    return lines


def _interval(c: Mapping[str, Any], scale: float = 1.0, fmt: str = "+.4f") -> str:
    return f"{c['difference'] * scale:{fmt}} [{c['low'] * scale:{fmt}}, {c['high'] * scale:{fmt}}]"


def comparison_table(result: ExperimentResult) -> list[str]:
    """Markdown lines: the paired comparisons of calibrated rdalloc with the other rows (KL in millinats)."""
    if not result.comparisons:
        return []
    first = result.comparisons[0]["kl"]
    unit = ("whole windows" if first["unit"] == "window" else f"blocks of {first['block']} tokens within windows")
    lines = ["", f"### Verdicts: calibrated rdalloc vs each row, paired on the same {first['tokens']} tokens", "",
             f"Mean per-token difference rdalloc − row (negative: rdalloc better) with its {first['level']:.0%} "
             f"bootstrap interval ({first['resamples']} resamples of {unit}, seed {first['seed']}); KL(FP16 || cache) "
             f"in millinats, NLL in nats. *better*/*worse*: the interval excludes 0; *undecided*: it does not; "
             f"*same plan*: both rows allocated identical bits.", "",
             "| quantizer | budget | rdalloc vs | ΔKL (mnat) [95 % CI] | KL verdict | ΔNLL (nat) [95 % CI] | "
             "NLL verdict |", "|---|---|---|---|---|---|---|"]
    for c in result.comparisons:
        against = c["against"] + (f" (mean of {c['seeds']} seeds)" if c["against"] == "random" else "")
        if c["identical_plan"]:
            lines.append(f"| {c['quantizer']} | {c['budget']:g} | {against} | 0 | same plan | 0 | same plan |")
            continue
        lines.append(f"| {c['quantizer']} | {c['budget']:g} | {against} | {_interval(c['kl'], 1e3, '+.2f')} | "
                     f"**{c['kl']['verdict']}** | {_interval(c['nll'])} | **{c['nll']['verdict']}** |")
    counts: dict = {}
    for c in result.comparisons:
        if not c["identical_plan"]:
            counts[c["kl"]["verdict"]] = counts.get(c["kl"]["verdict"], 0) + 1
    lines += ["", "KL verdicts over the distinct-plan comparisons: "
              + ", ".join(f"{v} {counts.get(v, 0)}" for v in ("better", "worse", "undecided")) + "."]
    return lines


def markdown_table(result: ExperimentResult) -> str:
    """One table per quantizer: rows x budgets (PPL, then mean KL to FP16 per token), with the charged and
    payload-only bits of each column; then the paired comparisons (:func:`comparison_table`)."""
    table = result.table()
    kl_table = result.table("kl")
    lines = []
    f = result.facts
    lines.append(f"Model {f['model']['name']}, {f['evaluation_windows']} evaluation windows of "
                 f"{f['evaluation_length']} tokens ({f['tokens_scored']} scored); FP16 PPL "
                 f"**{result.fp16['ppl']:.3f}**. Budgets are average bits per element **with metadata charged**; "
                 f"payload-only bits in parentheses. Menu {f['menu'][0]}..{f['menu'][-1]}. KL: mean KL(FP16 || cache) "
                 f"per scored token, in millinats (0 for FP16).")
    for q, rows in table.items():
        budgets = sorted({b for cells in rows.values() for b in cells})
        payload = {}
        for r in result.rows:  # payload-only bits of the column: rdalloc's row, else any row that met the budget
            if r["quantizer"] == q and (r["row"] == "rdalloc" or float(r["budget"]) not in payload):
                payload[float(r["budget"])] = r["payload_bits"]
        beta = f.get("betas", {}).get(q, {})
        lines.append("")
        lines.append(f"### {q} (fitted beta: keys {beta.get('key', float('nan')):.2f}, values "
                     f"{beta.get('value', float('nan')):.2f})")
        lines.append("")
        lines.append("| row | " + " | ".join(f"{b:g} ({payload[b]:.2f})" if b in payload else f"{b:g}"
                                             for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        lines.append("| FP16 | " + " | ".join(f"{result.fp16['ppl']:.3f}" for _ in budgets) + " |")
        for row, txt in _cells(rows, budgets, ".3f"):
            lines.append(f"| {_label(row, result, q)} | " + txt + " |")
        if q in kl_table:
            kl_rows = {row: {b: v * 1e3 for b, v in cells.items()} for row, cells in kl_table[q].items()}
            lines += ["", "| KL (mnat) | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                      "|---|" + "---|" * len(budgets)]
            for row, txt in _cells(kl_rows, budgets, ".2f"):
                lines.append(f"| {_label(row, result, q)} | " + txt + " |")
    infeasible = result.facts.get("infeasible") or []
    if infeasible:
        cells = sorted({(x["quantizer"], float(x["budget"])) for x in infeasible})
        lines.append("")
        lines.append("Infeasible (below the menu floor of {} bits plus metadata): ".format(f["menu"][0])
                     + ", ".join(f"{q} @ {b:g}" for q, b in cells) + ".")
    comp = result.importance_comparison()
    if comp:
        lines.append("")
        lines.append(f"Importance estimators (rdalloc PPL, same plans otherwise): winner **{comp['winner']}**; "
                     f"the other's perplexity is x{comp['ppl_ratio_other_over_winner']:.4f} the winner's "
                     f"(geometric mean over {len(comp['cells'])} cells; {comp['left_out']} cells where both "
                     f"estimators left perplexity above {comp['broken_factor']:g}x FP16 left out).")
        for c in comp["cells"]:
            lines.append(f"- {c['quantizer']} @ {c['budget']:g} bits: "
                         + ", ".join(f"{m} {c[m]:.3f}" for m in IMPORTANCE_METHODS))
    lines += comparison_table(result)
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(result: ExperimentResult, path: str | Path) -> None:
    """PPL (top) and mean KL to FP16 (bottom, where measured) vs average bits (metadata charged), one column per
    quantizer, FP16's perplexity as a dashed line (PNG, Agg)."""
    plt = _pyplot()
    metrics = [("ppl", "perplexity")] + ([("kl", "KL(FP16 || cache) per token (nats)")] if result.table("kl") else [])
    table = result.table()
    fig, axes = plt.subplots(len(metrics), len(table), figsize=(6 * len(table), 4.5 * len(metrics)), squeeze=False)
    for i, (metric, ylabel) in enumerate(metrics):
        values = result.table(metric)
        for ax, q in zip(axes[i], table):
            rows = values.get(q, {})
            for row in ROWS:
                if row in rows:
                    b = sorted(rows[row])
                    ax.plot(b, [rows[row][x] for x in b], marker="o", label=_label(row, result, q))
            if metric == "ppl":
                ax.axhline(result.fp16["ppl"], color="k", ls="--", lw=1, label="FP16")
            ax.set_yscale("log")
            ax.set_xlabel("average bits per element (metadata charged)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{result.facts['model']['name']}: {q}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_verdicts(result: ExperimentResult, path: str | Path) -> None:
    """The paired KL differences (rdalloc − row) with their intervals, as a percentage of the other row's mean KL
    (negative: rdalloc better), one line per comparison with distinct plans (PNG, Agg)."""
    plt = _pyplot()
    kl = {(r["quantizer"], float(r["budget"]), r["row"]): [] for r in result.rows}
    for r in result.rows:
        if r.get("kl") is not None:
            kl[(r["quantizer"], float(r["budget"]), r["row"])].append(float(r["kl"]))
    shown = [c for c in result.comparisons if not c["identical_plan"] and kl.get((c["quantizer"], c["budget"],
                                                                                  c["against"]))]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shown) + 1.5))
    colors = {"better": "tab:green", "worse": "tab:red", "undecided": "tab:gray"}
    for y, c in enumerate(shown):
        scale = 100.0 / float(np.mean(kl[(c["quantizer"], c["budget"], c["against"])]))
        k = c["kl"]
        ax.errorbar(k["difference"] * scale, y, xerr=[[(k["difference"] - k["low"]) * scale],
                                                      [(k["high"] - k["difference"]) * scale]],
                    fmt="o", color=colors[k["verdict"]], capsize=3)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(shown)), [f"{c['quantizer']} @ {c['budget']:g}: vs {c['against']}" for c in shown],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KL difference rdalloc − row, % of the row's KL (95 % CI)")
    ax.set_title("green: rdalloc better, red: worse, gray: undecided", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(args, grid):
    """Model, facts, calibration and evaluation windows, and the text's description (inputs checked by :func:`run`)."""
    model, tokenizer, facts = load_model(args.model, dtype=args.dtype, progress=not args.no_progress)
    cal_windows, cal_length = grid["calibration_windows"], grid["calibration_length"]
    ev_windows, length = grid["evaluation_windows"], grid["evaluation_length"]
    if cal_length != length:  # short calibration, longer evaluation windows
        cal = text_windows(tokenizer, length=cal_length, calibration=cal_windows, evaluation=0, path=args.text)
        ev = text_windows(tokenizer, length=length, calibration=0, evaluation=ev_windows, path=args.text)
        # calibration windows come from the first half, evaluation windows from the second: still disjoint
        return model, facts, cal.calibration, ev.evaluation, {**ev.to_dict(), "calibration_length": cal_length,
                                                              "calibration_windows": cal_windows}
    tw = text_windows(tokenizer, length=length, calibration=cal_windows, evaluation=ev_windows, path=args.text)
    return model, facts, tw.calibration, tw.evaluation, tw.to_dict()


def run(args) -> None:
    grid = dict(FULL if args.full else QUICK)
    for name in ("calibration_windows", "evaluation_windows", "calibration_length", "evaluation_length"):
        if getattr(args, name) is not None:
            check_positive(getattr(args, name), "--" + name.replace("_", "-"))
            grid[name] = getattr(args, name)
    if args.budgets:
        budgets = floats(args.budgets, "--budgets")
        if np.any(budgets <= 0):
            raise ValueError(f"--budgets must be positive average bits, got {args.budgets!r}")
        grid["budgets"] = tuple(float(b) for b in budgets)
        grid["importance_budgets"] = grid["budgets"] if args.full else grid["budgets"][len(grid["budgets"]) // 2:][:1]
    quantizers = quantizer_names(args.quantizers)
    if "mismatch" in ROWS and len(set(quantizers)) < 2:
        raise ValueError(f"--quantizers {args.quantizers!r}: the mismatch row allocates with another quantizer's "
                         f"model, so the grid needs at least two quantizers (e.g. kivi,quarot)")
    probe_bits = grid["probe_bits"] if args.probe_bits is None else probe_widths(args.probe_bits, "--probe-bits")
    check_model(args.model)
    check_path(args.text, "--text")
    out = prepare_output_dir(RESULTS / ("demo_full" if args.full else "demo") if args.out is None else args.out,
                             "--out", {"calibration.json": has_format(CALIBRATION_FORMAT),
                                       "results.json": has_format(RESULT_FORMAT)})
    t0 = time.perf_counter()
    model, facts, cal, ev, text = load(args, grid)
    t_load = time.perf_counter() - t0
    c = calibrate(model, facts, cal, quantizers=quantizers, probe_bits=probe_bits, text=text,
                  progress=not args.no_progress)
    print(f"calibration: {c.timings['total']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items()
                                                                   if k != "total") + ")", flush=True)
    r = run_experiment(model, c, ev, quantizers=quantizers, budgets=grid["budgets"], seeds=grid["seeds"],
                       importance_budgets=grid["importance_budgets"], progress=not args.no_progress)
    wall = time.perf_counter() - t0
    facts_extra = {**r.facts, "grid": "full" if args.full else "quick", "text": text,
                   "calibration_seconds": c.timings, "load_seconds": t_load, "wall_seconds": wall,
                   "command": "python -m experiments.ppl_grid" + (" --full" if args.full else ""),
                   "environment": environment(args.dtype)}
    tokens = r.token_values
    r = ExperimentResult(fp16=r.fp16, rows=r.rows, facts=facts_extra, comparisons=r.comparisons)
    if args.save_tokens:
        write_atomic(out / "tokens.npz", lambda tmp: np.savez_compressed(tmp, **tokens))
    write_atomic(out / "results.json", r.save)
    write_atomic(out / "calibration.json", c.save)
    md = markdown_table(r) + (f"\nCalibration {c.timings['total']:.1f} s; whole run {wall:.1f} s wall on this "
                              f"machine ({'full' if args.full else 'quick'} grid).\n")
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(md))
    write_atomic(out / "ppl_vs_bits.png", lambda tmp: plot_results(r, tmp))
    write_atomic(out / "verdicts.png", lambda tmp: plot_verdicts(r, tmp))
    print(md)
    print(f"wrote {out}/calibration.json, results.json, results.md, ppl_vs_bits.png, verdicts.png ({wall:.1f} s)")


def parser() -> argparse.ArgumentParser:
    d = argparse.ArgumentParser(prog="python -m experiments.ppl_grid",
                                description="calibrate, allocate and measure perplexity vs bits on the bundled model")
    d.add_argument("--model", default=None, help="a local model directory or .gguf (default: bundled SmolLM2)")
    d.add_argument("--text", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    d.add_argument("--full", action="store_true", help="the whole grid (budgets 2..4 by 0.5, 3 random seeds)")
    d.add_argument("--budgets", default=None, help="comma-separated average bits (metadata charged)")
    d.add_argument("--probe-bits", default=None, help="widths whose single-head KL is measured (default: 1,2 with "
                   "--full, none in the quick grid; 1 joins the menu only when probed)")
    d.add_argument("--quantizers", default="kivi,quarot")
    d.add_argument("--calibration-windows", type=int, default=None)
    d.add_argument("--calibration-length", type=int, default=None)
    d.add_argument("--evaluation-windows", type=int, default=None)
    d.add_argument("--evaluation-length", type=int, default=None)
    d.add_argument("--out", default=None, help="output directory (default: experiments/results/demo, or demo_full "
                   "with --full)")
    add_dtype(d)
    d.add_argument("--save-tokens", action="store_true", help="also write the per-token NLL and KL of every row "
                   "(float32) to tokens.npz")
    d.add_argument("--no-progress", action="store_true")
    return d


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: a file that could not be read or written
        print(f"ppl_grid: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
