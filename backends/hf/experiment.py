"""End to end on a real model: per-head plans from a calibration, a quantized-KV cache, perplexity vs bits.

Plans. For a quantizer and an average-bit budget **with metadata charged** (docs/design.md §2), each row of the
experiment is a head plan (one width per (layer, kv_head) for K and one for V) over the calibration's menu
(:meth:`.calibrate.Calibration.menu`: the fitted widths ``2..8``, plus ``1`` when the calibration probed it):

* ``uniform`` — every head at the same integer width ``b``; only where the budget is exactly ``b`` plus the
  quantizer's metadata per element (KIVI with groups of 32: 1 bit; QuaRot per token over ``head_dim = 64``: 0.5).
* ``rdalloc`` — :func:`rdalloc.allocate` with the quantizer's calibrated loss model
  (:meth:`.calibrate.Calibration.loss_model`: importance x fitted curve, measured single-head KL at probed widths).
* ``rdalloc_attention`` / ``rdalloc_fisher`` — the same with the other importance estimator (the comparison).
* ``mismatch`` — the model fitted for the *other* quantizer (costs still the true quantizer's).
* ``beta4`` — one fixed ``beta = 4`` for every quantizer and role, ``alpha`` refitted, extrapolated over the whole
  menu (:func:`.calibrate.fixed_beta_model`), times the importance: what systems that assume ``beta = 4`` do.
* ``random`` — random allocation at the same budget: :func:`rdalloc.allocate` on a flat model (all items alike,
  ``beta = 4``) with log-normal random weights (``sigma = 1.5``: about one bit of spread), per seed; the table
  shows the mean perplexity over seeds.

Why 1 bit only with probes: on SmolLM2-135M the measured 1->2-bit MSE step is 11-13x, far steeper than the
~4.4x/bit of the other widths, and the Fisher weights, a local (second-order) estimate, cannot see how badly 1-bit
keys derail the softmax: over ``1..8`` without probes rdalloc put 37 of 180 heads at 1 bit at KIVI 3.0 average bits
and scored PPL 26.5 against uniform 2-bit 16.6 (``benchmarks/results/demo_menu1to8``). The single-head KL probes
measure that damage instead of extrapolating it.

Costs. Item ``i`` of a head plan holds ``n = tokens * head_dim`` elements of one window of ``tokens`` tokens (the
evaluation length) and carries the quantizer's metadata ``m = quantizer.item_metadata_bits(role, "head", tokens,
head_dim)``; the plan records both the charged and the payload-only average bits.

Evaluation. :func:`plan_transform` turns a plan into a ``TransformCache`` transform (the torch ``PlanApplier``
fake-quantizes every stored position on each update), and :func:`evaluate_plan` measures perplexity over the
evaluation windows with it (docs/design.md §5, simulated quantized-KV protocol).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rdalloc.allocate import allocate
from rdalloc.cost import Usage
from rdalloc.models import ExponentialModel
from rdalloc.plan import Plan
from rdalloc.quantizers import get_quantizer

from .calibrate import IMPORTANCE_METHODS, Calibration, fixed_beta_model
from .model import ModelFacts

__all__ = ["MENU", "ROWS", "head_costs", "allocate_plan", "uniform_plan", "uniform_bits", "random_plan",
           "check_plan", "plan_transform", "plan_cache_factory", "evaluate_plan", "ExperimentResult",
           "run_experiment", "markdown_table", "plot_results", "QUICK", "FULL"]

MENU = tuple(range(2, 9))
"""The menu of a calibration without probes (see the module docstring, "Why 1 bit only with probes")."""
ROWS = ("uniform", "rdalloc", "rdalloc_other_importance", "mismatch", "beta4", "random")
QUICK = {"calibration_windows": 2, "calibration_length": 256, "evaluation_windows": 2, "evaluation_length": 512,
         "budgets": (3.0, 3.5, 4.0), "seeds": (0,), "importance_budgets": (3.5,), "probe_bits": ()}
FULL = {"calibration_windows": 4, "calibration_length": 512, "evaluation_windows": 4, "evaluation_length": 512,
        "budgets": (2.0, 2.5, 3.0, 3.5, 4.0), "seeds": (0, 1, 2), "importance_budgets": (2.0, 2.5, 3.0, 3.5, 4.0),
        "probe_bits": (1, 2)}
RANDOM_SIGMA = 1.5
BROKEN = 10.0
"""Perplexity above ``BROKEN`` times FP16's counts as a wrecked model (left out of the estimator comparison)."""


# ---- costs and plans ---------------------------------------------------------------------------------------------
def head_costs(facts: ModelFacts, quantizer: str, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, metadata)`` per item of a head plan (keys then values): ``tokens * head_dim`` elements each and the
    quantizer's metadata bits when quantized."""
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer (the evaluation window length), got {tokens!r}")
    q = get_quantizer(quantizer)
    n = facts.layers * facts.kv_heads
    sizes = np.full(2 * n, float(tokens * facts.head_dim))
    meta = np.concatenate([np.full(n, float(q.item_metadata_bits(role, "head", int(tokens), facts.head_dim)))
                           for role in ("key", "value")])
    return sizes, meta


def _plan(allocation, facts: ModelFacts, quantizer: str, meta: Mapping[str, Any], menu: Sequence[int]) -> Plan:
    q = get_quantizer(quantizer)
    return Plan.from_allocation(allocation, (facts.layers, facts.kv_heads), quantizer=q.name,
                                meta={"model": facts.name, "head_dim": facts.head_dim, "quantizer_spec": q.spec(),
                                      "menu": [int(b) for b in menu], **dict(meta)})


def allocate_plan(calibration: Calibration, quantizer: str, average_bits: float, *, tokens: int,
                  importance: str | None = None, model_from: str | None = None, fixed_beta: float | None = None,
                  menu: Sequence[int] | None = None) -> Plan:
    """The rdalloc head plan for ``quantizer`` at ``average_bits`` (metadata charged), over ``menu`` (default:
    :meth:`.calibrate.Calibration.menu` of ``quantizer``).

    Allocates the calibration's loss model (:meth:`.calibrate.Calibration.loss_model`, unit weights). ``model_from``
    uses another quantizer's model (the mismatch experiment; the plan is still for ``quantizer``, whose costs it is
    charged). ``fixed_beta`` replaces the fitted curve by :func:`.calibrate.fixed_beta_model` extrapolated over the
    menu, times the importance (no probes). ``importance`` names the estimator (default: the calibration's).
    """
    q = get_quantizer(quantizer).name
    source = q if model_from is None else get_quantizer(model_from).name
    method = calibration.default_importance if importance is None else importance
    menu = calibration.menu(q) if menu is None else tuple(int(b) for b in menu)
    sizes, meta = head_costs(calibration.facts, q, tokens)
    if fixed_beta is None:
        model = calibration.loss_model(source, method)
        weights = np.ones(model.n_items)
    else:
        model = fixed_beta_model(calibration, source, fixed_beta, lo=min(menu))
        weights = calibration.weights(method)
    r = allocate(model, sizes, average_bits=float(average_bits), weights=weights, menu=menu, metadata=meta)
    return _plan(r, calibration.facts, q, {"method": "rdalloc", "importance": method, "model_from": source,
                                           "fixed_beta": fixed_beta, "tokens": int(tokens),
                                           "probed_bits": list(calibration.probed_bits(source)),
                                           "average_bits_asked": float(average_bits)}, menu)


def uniform_bits(facts: ModelFacts, quantizer: str, average_bits: float, tokens: int) -> int | None:
    """The integer width whose charged average equals ``average_bits`` exactly, or ``None``."""
    sizes, meta = head_costs(facts, quantizer, tokens)
    overhead = float(meta.sum() / sizes.sum())
    b = average_bits - overhead
    if abs(b - round(b)) > 1e-9 or not 1 <= round(b) <= 8:
        return None
    return int(round(b))


def uniform_plan(facts: ModelFacts, quantizer: str, bits: int, *, tokens: int) -> Plan:
    """Every key and value head at ``bits`` (16: the full-precision plan)."""
    q = get_quantizer(quantizer)
    q.check_bits(np.asarray([bits]), "bits")
    shape = (facts.layers, facts.kv_heads)
    sizes, meta = head_costs(facts, q.name, tokens)
    b = np.full(sizes.shape, float(bits))
    usage = Usage.of(b, sizes, meta)
    return Plan(key=np.full(shape, bits), value=np.full(shape, bits), quantizer=q.name,
                budget_bits=usage.total_bits, usage=usage,
                meta={"model": facts.name, "head_dim": facts.head_dim, "quantizer_spec": q.spec(),
                      "method": "uniform", "tokens": int(tokens)})


def random_plan(facts: ModelFacts, quantizer: str, average_bits: float, *, tokens: int, seed: int,
                sigma: float = RANDOM_SIGMA, menu: Sequence[int] = MENU) -> Plan:
    """A random allocation at the budget: the flat model (every item alike) with log-normal random weights."""
    q = get_quantizer(quantizer).name
    sizes, meta = head_costs(facts, q, tokens)
    rng = np.random.default_rng(int(seed))
    weights = np.exp(sigma * rng.standard_normal(sizes.size))
    flat = ExponentialModel(alpha=np.ones(sizes.size), beta=4.0, lo=float(min(menu)), hi=float(max(menu)),
                            quantizer=q)
    r = allocate(flat, sizes, average_bits=float(average_bits), weights=weights, menu=menu, metadata=meta)
    return _plan(r, facts, q, {"method": "random", "seed": int(seed), "sigma": float(sigma), "tokens": int(tokens),
                               "average_bits_asked": float(average_bits)}, menu)


def check_plan(plan: Plan, facts: ModelFacts, quantizer: str | None = None) -> str:
    """``ValueError`` if ``plan`` is not a head plan for this model's cache or for ``quantizer`` (default: the one
    the plan records); returns the quantizer's name."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an rdalloc.Plan, got {type(plan).__name__}")
    if plan.granularity != "head":
        raise ValueError(f"expected a head plan (one width per layer and kv-head), got a {plan.granularity!r} plan")
    name = get_quantizer(quantizer if quantizer is not None else plan.quantizer or "").name \
        if (quantizer or plan.quantizer) else None
    if name is None:
        raise ValueError("the plan does not record its quantizer: name one")
    plan.check(layers=facts.layers, kv_heads=facts.kv_heads, quantizer=name)
    hd = plan.meta.get("head_dim") if isinstance(plan.meta, Mapping) else None
    if hd is not None and int(hd) != facts.head_dim:
        raise ValueError(f"the plan was made for head_dim={hd}, but the cache has head_dim={facts.head_dim}")
    get_quantizer(name).check_bits(np.concatenate([np.ravel(plan.key), np.ravel(plan.value)]), "plan bits")
    return name


# ---- the cache -------------------------------------------------------------------------------------------------
def plan_transform(plan: Plan, quantizer: Any = None):
    """A ``TransformCache`` transform fake-quantizing each layer's whole stored K/V with ``plan`` (torch
    :class:`~rdalloc.backends.torch.PlanApplier`, built once; a 16-bit plan returns the inputs bit for bit)."""
    from rdalloc.apply import PlanApplier

    applier = PlanApplier(plan, quantizer)

    def transform(layer_idx, key, value):
        out = applier.fake_quantize(key, value, layer=layer_idx)
        return out.keys, out.values

    transform.applier = applier
    return transform


def plan_cache_factory(plan: Plan, config: Any, quantizer: Any = None):
    """A zero-argument factory of fresh quantized-KV caches for :func:`~.perplexity.perplexity`."""
    from .cache import cache_factory

    return cache_factory(plan_transform(plan, quantizer), config)


def evaluate_plan(model: Any, windows: Any, plan: Plan | None, *, quantizer: Any = None, progress: bool = True,
                  desc: str = "perplexity"):
    """:class:`~.perplexity.PerplexityResult` of ``model`` over ``windows`` with ``plan`` (``None``: full cache)."""
    from .perplexity import perplexity

    factory = None if plan is None else plan_cache_factory(plan, model.config, quantizer)
    return perplexity(model, windows, factory, progress=progress, desc=desc)


# ---- the experiment --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExperimentResult:
    """Rows of ``{"quantizer", "row", "budget", "average_bits", "payload_bits", "ppl", "nll", "seed", ...}``
    plus the FP16 reference and facts about the run."""

    fp16: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "rdalloc.experiment", "version": 1, "fp16": dict(self.fp16),
                "rows": [dict(r) for r in self.rows], "facts": dict(self.facts)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentResult":
        if not isinstance(d, Mapping) or d.get("format") != "rdalloc.experiment":
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
    from .model import model_facts

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

    def add(info, make):
        try:
            jobs.append((info, make()))
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
                        add({**base, "row": row, "uniform_bits": ub},
                            lambda: uniform_plan(facts, q, ub, tokens=tokens))
                elif row == "rdalloc":
                    add({**base, "row": row, "importance": calibration.default_importance},
                        lambda: allocate_plan(calibration, q, b, tokens=tokens))
                elif row == "rdalloc_other_importance":
                    if other_method and any(abs(b - x) < 1e-9 for x in importance_budgets):
                        add({**base, "row": row, "importance": other_method[0]},
                            lambda: allocate_plan(calibration, q, b, tokens=tokens, importance=other_method[0]))
                elif row == "mismatch":
                    add({**base, "row": row, "model_from": other_q},
                        lambda: allocate_plan(calibration, q, b, tokens=tokens, model_from=other_q))
                elif row == "beta4":
                    add({**base, "row": row}, lambda: allocate_plan(calibration, q, b, tokens=tokens, fixed_beta=4.0))
                elif row == "random":
                    for s in seeds:
                        add({**base, "row": row, "seed": int(s)},
                            lambda: random_plan(facts, q, b, tokens=tokens, seed=int(s), menu=calibration.menu(q)))

    t0 = time.perf_counter()
    fp16 = evaluate_plan(model, windows, None, progress=False)
    t_fp16 = time.perf_counter() - t0
    done: dict = {}
    out_rows = []
    iterator = jobs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="experiment (plans)", leave=False)
    for info, plan in iterator:
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
