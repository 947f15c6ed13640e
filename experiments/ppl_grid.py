"""The perplexity grid of the per-head experiment (RateQuant setting), on the bundled model by default.

    HF_HUB_OFFLINE=1 python -m experiments.ppl_grid           # the quick grid -> experiments/results/demo
    HF_HUB_OFFLINE=1 python -m experiments.ppl_grid --full    # the whole grid -> experiments/results/demo_full

Calibrates the model (:func:`rdalloc.backends.hf.calibrate.calibrate`), then measures perplexity over evaluation
windows (disjoint text) with a quantized KV cache for every row, quantizer and budget (average bits **with metadata
charged**, docs/design.md §2). Each row is a head plan from :mod:`rdalloc.backends.hf.head_plans`:

* ``uniform`` — every head at the same integer width ``b``; only where the budget is exactly ``b`` plus the
  quantizer's metadata per element.
* ``rdalloc`` — :func:`~rdalloc.backends.hf.head_plans.allocate_plan` with the calibrated loss model.
* ``rdalloc_other_importance`` — the same with the other importance estimator (the comparison).
* ``mismatch`` — the model fitted for the *other* quantizer (costs still the true quantizer's).
* ``beta4`` — one fixed ``beta = 4`` for every quantizer and role, ``alpha`` refitted, extrapolated over the whole
  menu, times the importance: what systems that assume ``beta = 4`` do.
* ``random`` — random allocation at the same budget, per seed; the table shows the mean perplexity over seeds.

Writes ``calibration.json``, ``results.json``, ``results.md`` (the table it prints) and ``ppl_vs_bits.png``.
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
from rdalloc.backends.hf.calibrate import CALIBRATION_FORMAT, IMPORTANCE_METHODS, Calibration, calibrate
from rdalloc.backends.hf.cli import add_dtype, check_model, check_path, probe_widths, quantizer_names
from rdalloc.backends.hf.head_plans import allocate_plan, evaluate_plan, random_plan, uniform_bits, uniform_plan
from rdalloc.backends.hf.model import load_model, model_facts
from rdalloc.backends.hf.text import text_windows
from rdalloc.backends.hf.windows import with_progress

from rdalloc.cli import check_positive, floats, has_format, one_line, prepare_output_dir, write_atomic
from rdalloc.environment import environment
from rdalloc.plan import Plan
from rdalloc.quantizers import get_quantizer

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("uniform", "rdalloc", "rdalloc_other_importance", "mismatch", "beta4", "random")
QUICK = {"calibration_windows": 2, "calibration_length": 256, "evaluation_windows": 2, "evaluation_length": 512,
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
    """Rows of ``{"quantizer", "row", "budget", "average_bits", "payload_bits", "ppl", "nll", "seed", ...}``
    plus the FP16 reference and facts about the run."""

    fp16: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": RESULT_FORMAT, "version": 1, "fp16": dict(self.fp16),
                "rows": [dict(r) for r in self.rows], "facts": dict(self.facts)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentResult:
        if not isinstance(d, Mapping) or d.get("format") != RESULT_FORMAT:
            raise ValueError("not an rdalloc experiment result")
        return cls(fp16=d["fp16"], rows=d["rows"], facts=d.get("facts") or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def table(self) -> dict:
        """``{quantizer: {row: {budget: mean ppl}}}`` (random rows averaged over seeds)."""
        out: dict = {}
        for r in self.rows:
            cell = out.setdefault(r["quantizer"], {}).setdefault(r["row"], {}).setdefault(float(r["budget"]), [])
            cell.append(float(r["ppl"]))
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
                   progress: bool = True) -> ExperimentResult:
    """Perplexity over ``windows`` (``[count, length]``) for every row, quantizer and budget (see the module
    docstring). Identical plans are evaluated once. ``importance_budgets`` limits the estimator comparison row
    (default: every budget)."""
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
                            allocate_plan, calibration, q, b, tokens=tokens, importance=other_method[0])
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
    fp16 = evaluate_plan(model, windows, None, progress=False)
    t_fp16 = time.perf_counter() - t0
    done: dict = {}
    out_rows = []
    for info, plan in with_progress(jobs, desc="experiment (plans)", total=len(jobs), enabled=progress):
        key = (info["quantizer"], plan.key.tobytes(), plan.value.tobytes())
        if key not in done:
            t0 = time.perf_counter()
            r = evaluate_plan(model, windows, plan, progress=False)
            done[key] = (r, time.perf_counter() - t0)
        r, seconds = done[key]
        usage = plan.usage
        hist = {int(k): int(c) for k, c in zip(*np.unique(np.concatenate([plan.key.ravel(), plan.value.ravel()]),
                                                             return_counts=True))}
        out_rows.append({**info, "average_bits": usage.average_bits, "payload_bits": usage.average_payload_bits,
                         "ppl": r.ppl, "nll": r.nll, "seconds": seconds, "histogram": hist,
                         "key_bits": plan.key.tolist(), "value_bits": plan.value.tolist(),
                         "predicted_distortion": plan.predicted_distortion})
    return ExperimentResult(fp16={"ppl": fp16.ppl, "nll": fp16.nll, "seconds": t_fp16},
                            rows=out_rows,
                            facts={"model": facts.to_dict(), "evaluation_windows": int(windows.shape[0]),
                                   "evaluation_length": tokens, "tokens_scored": fp16.tokens,
                                   "quantizers": names, "budgets": [float(b) for b in budgets],
                                   "seeds": [int(s) for s in seeds],
                                   "menu": sorted({b for q in names for b in calibration.menu(q)}),
                                   "probed_bits": {q: list(calibration.probed_bits(q)) for q in names},
                                   "default_importance": calibration.default_importance,
                                   "betas": {q: calibration.betas(q) for q in calibration.quantizers},
                                   "plans_evaluated": len(done), "infeasible": infeasible})


_LABELS = {"uniform": "uniform", "rdalloc": "rdalloc (calibrated, {imp})",
           "rdalloc_other_importance": "rdalloc (calibrated, {other})",
           "mismatch": "rdalloc, {otherq} model (mismatch)",
           "beta4": "rdalloc, fixed beta=4", "random": "random allocation (mean of {n} seeds)"}


def _label(row: str, result: ExperimentResult, q: str) -> str:
    imp = result.facts.get("default_importance", "fisher")
    other = next((m for m in IMPORTANCE_METHODS if m != imp), "")
    otherq = next((o for o in result.facts.get("betas", {}) if o != q), "other")
    return _LABELS[row].format(imp=imp, other=other, otherq=otherq, n=len(result.facts.get("seeds", [])))


def markdown_table(result: ExperimentResult) -> str:
    """One table per quantizer: rows x budgets (PPL), with the charged and payload-only bits of each column."""
    table = result.table()
    lines = []
    f = result.facts
    lines.append(f"Model {f['model']['name']}, {f['evaluation_windows']} evaluation windows of "
                 f"{f['evaluation_length']} tokens ({f['tokens_scored']} scored); FP16 PPL "
                 f"**{result.fp16['ppl']:.3f}**. Budgets are average bits per element **with metadata charged**; "
                 f"payload-only bits in parentheses. Menu {f['menu'][0]}..{f['menu'][-1]}.")
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
        for row in ROWS:
            if row not in rows:
                continue
            cells = rows[row]
            best = {b: min(v[b] for k, v in rows.items() if b in v) for b in budgets}
            txt = []
            for b in budgets:
                if b not in cells:
                    txt.append("—")
                else:
                    s = f"{cells[b]:.3f}"
                    txt.append(f"**{s}**" if cells[b] == best[b] else s)
            lines.append(f"| {_label(row, result, q)} | " + " | ".join(txt) + " |")
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
    return "\n".join(lines) + "\n"


def plot_results(result: ExperimentResult, path: str | Path) -> None:
    """PPL vs average bits (metadata charged), one panel per quantizer, FP16 as a dashed line (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.table()
    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.5), squeeze=False)
    for ax, (q, rows) in zip(axes[0], table.items()):
        for row in ROWS:
            if row not in rows:
                continue
            b = sorted(rows[row])
            ax.plot(b, [rows[row][x] for x in b], marker="o", label=_label(row, result, q))
        ax.axhline(result.fp16["ppl"], color="k", ls="--", lw=1, label="FP16")
        ax.set_yscale("log")
        ax.set_xlabel("average bits per element (metadata charged)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{result.facts['model']['name']}: {q}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
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
    r = ExperimentResult(fp16=r.fp16, rows=r.rows, facts=facts_extra)
    write_atomic(out / "results.json", r.save)
    write_atomic(out / "calibration.json", c.save)
    md = markdown_table(r) + (f"\nCalibration {c.timings['total']:.1f} s; whole run {wall:.1f} s wall on this "
                              f"machine ({'full' if args.full else 'quick'} grid).\n")
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(md))
    write_atomic(out / "ppl_vs_bits.png", lambda tmp: plot_results(r, tmp))
    print(md)
    print(f"wrote {out}/calibration.json, results.json, results.md, ppl_vs_bits.png ({wall:.1f} s)")


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
