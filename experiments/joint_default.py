"""Choosing the joint-compression default on two texts with paired intervals (issue #20).

    HF_HUB_OFFLINE=1 python -m experiments.joint_default --windows 3 --length 1024
    # -> experiments/results/joint_default/joint_default.{json,md,png} (+ cells.json, the per-window cache)

Protocol (as ``experiments/joint_grid.py``, docs/design.md §5): per text (``pydoc_data.topics``, the default, and
``python-source``) a Fisher head importance calibrated on a calibration window of that text (disjoint from the
evaluation windows); per evaluation window of ``length`` context + ``continuation`` tokens, the prefill is observed
**once** (:func:`~rdalloc.backends.hf.compress.observe_prefill`, 32 observation queries) and its K/V errors measured
once; every row and retention reuses them. Each cell compresses once, teacher-forces the continuation and keeps the
**per-token** KL to the full cache, so that two rows are compared on the same tokens by
:func:`~rdalloc.backends.hf.paired.paired_comparison` (block bootstrap, 95 %; lower is better).

Rows (:data:`ROWS`): the candidate defaults (one global budget: the old default hybrid + Fisher head scale, the
calibrated weighting + head scale, both also with the protected tokens allocated instead of reserved), RDKV's weights
+ head scale, hybrid without head scale, the per-head budget (RDKV protocol) and eviction only. The chosen default is
the candidate that no row beats significantly in any (text, retention) cell; among several, the one of least
geometric-mean KL. Cells are cached in ``cells.json`` (keyed by text, window, row, retention, with the window's token
hash), so that a rerun with more windows computes only the new ones: start with 3 windows, add where undecided.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rdalloc.backends.hf.capture import fisher_importance
from rdalloc.backends.hf.compress import CompressedCache, observe_prefill, scale_heads, token_weights
from rdalloc.backends.hf.joint import (
    DEFAULT_MENU,
    allocate_joint,
    continuation_logits,
    eviction_plan,
    measure_errors,
)
from rdalloc.backends.hf.model import load_model
from rdalloc.backends.hf.paired import paired_comparison
from rdalloc.backends.hf.text import text_windows

from rdalloc.cli import floats, write_atomic
from rdalloc.environment import environment
from rdalloc.models import FULL_BITS
from rdalloc.quantizers import get_quantizer

RESULTS = Path(__file__).resolve().parent / "results" / "joint_default"
RETENTIONS = (0.02, 0.05, 0.10, 0.25, 0.50)
TEXTS = ("pydoc_data.topics", "python-source")
SINK, PROTECT_WINDOW, OBSERVE = 4, 8, 32

#: row name -> (method, weighting, protect, candidate default?)
ROWS = {
    "global hybrid+fisher (old default)": ("joint-global", "hybrid+fisher", "reserved", True),
    "global hybrid+fisher, allocated protection": ("joint-global", "hybrid+fisher", "allocated", True),
    "global calibrated+fisher, allocated protection": ("joint-global", "calibrated+fisher", "allocated", True),
    "global rdkv+fisher, allocated protection": ("joint-global", "rdkv+fisher", "allocated", True),
    "global rdkv+fisher, auto protection": ("joint-global", "rdkv+fisher", "auto", True),
    "global rdkv+fisher": ("joint-global", "rdkv+fisher", "reserved", True),
    "global hybrid, no head scale": ("joint-global", "hybrid", "reserved", True),
    "global rdkv, auto protection (no head scale)": ("joint-global", "rdkv", "auto", True),
    "global hybrid, auto protection (no head scale)": ("joint-global", "hybrid", "auto", True),
    "per-head hybrid+fisher": ("joint-per-head", "hybrid+fisher", "reserved", False),
    "eviction only (hybrid+fisher scores)": ("eviction", "hybrid+fisher", "reserved", False),
}


def _plan(row: str, wts: dict, pre, err, q, r: float):
    method, w, protect, _ = ROWS[row]
    kw = dict(retention=r, quantizer=q, sink=SINK, window=PROTECT_WINDOW)
    if method == "eviction":
        return eviction_plan(wts[w], pre.shape, **kw)
    mode = "global" if method == "joint-global" else "per_head"
    return allocate_joint(wts[w], pre.keys, pre.values, menu=DEFAULT_MENU, mode=mode, errors=err, protect=protect,
                          **kw)


def _per_token_kl(logits: torch.Tensor, full: torch.Tensor) -> np.ndarray:
    lp = torch.log_softmax(logits[:-1].double(), -1)
    lf = torch.log_softmax(full.double(), -1)
    return (lf.exp() * (lf - lp)).sum(-1).cpu().numpy()


def run_cells(model, tokenizer, *, texts, windows: int, context: int, continuation: int, retentions, rows,
              cells: dict, save, progress: bool = True, first_window: int = 0) -> dict:
    """Fill ``cells`` (``"text|window|row|retention"`` -> cell) for every missing combination; ``save(cells)`` after
    each (window, text). Windows are the outer loop (window 3 of both texts before window 4), so that a run cut
    short leaves whole windows of every text. ``rows`` are row names, or ``"name@r1,r2"`` to compute that row at
    those retentions only. Returns facts per text (Fisher seconds, windows' token hashes, the calibrated blends)."""
    q = get_quantizer("kivi")
    widths = [b for b in DEFAULT_MENU if 0 < b < FULL_BITS]
    wanted = []  # (row, retention)
    for spec in rows:
        name, _, rs = spec.partition("@")
        wanted += [(name, r) for r in (floats(rs, "--rows retentions") if rs else retentions)]
    facts, tws, hashes, fishers = {}, {}, {}, {}
    for text in texts:
        tws[text] = tw = text_windows(tokenizer, length=context + continuation, calibration=1, evaluation=windows,
                                      path=text)
        hashes[text] = [hashlib.sha256(tw.evaluation[wi].numpy().tobytes()).hexdigest()[:16]
                        for wi in range(windows)]
        facts[text] = {"windows": tw.to_dict(), "ids_sha256_16": hashes[text],
                       "blend": cells.get(f"{text}|blend", {})}
    for wi in range(first_window, windows):
        for text in texts:
            h = hashes[text][wi]
            todo = [(row, r) for row, r in wanted if cells.get(f"{text}|{wi}|{row}|{r:g}", {}).get("ids") != h]
            if not todo:
                continue
            tw = tws[text]
            if text not in fishers:
                t0 = time.perf_counter()
                fishers[text] = fisher_importance(model, tw.calibration[:1, :context], samples=2, progress=progress)
                facts[text]["fisher_seconds"] = time.perf_counter() - t0
            fisher = fishers[text]
            ids = tw.evaluation[wi]
            with torch.no_grad():
                full = model(ids[None]).logits[0, context:context + continuation - 1].float()
            targets = ids[context + 1:context + continuation]
            pre = observe_prefill(model, ids[:context], window=OBSERVE)
            err = measure_errors(pre.keys, pre.values, q, widths)
            need = {ROWS[row][1].split("+")[0] for row, _ in todo if row in ROWS}
            base = {w: token_weights(pre, method=w) for w in ("hybrid", "rdkv", "calibrated") if w in need}
            wts = dict(base)
            wts.update({f"{w}+fisher": scale_heads(x, fisher) for w, x in base.items()})
            if "calibrated" in base:
                blend = base["calibrated"].blend
                cells[f"{text}|blend"] = facts[text]["blend"] = {
                    **cells.get(f"{text}|blend", {}),
                    str(wi): {"per_layer_mean": blend.mean(1).round(3).tolist(),
                              "histogram": {f"{a:g}": int((blend == a).sum()) for a in np.unique(blend)}}}
            for row, r in sorted(todo, key=lambda x: x[1]):
                key = f"{text}|{wi}|{row}|{r:g}"
                t1, c1 = time.perf_counter(), time.process_time()
                try:
                    plan = _plan(row, wts, pre, err, q, r)
                except ValueError as exc:  # a budget that cannot hold the reserved tokens: an n/a cell
                    cells[key] = {"ids": h, "na": str(exc)[:200]}
                    continue
                cache = CompressedCache.compress(pre.keys, pre.values, plan, q)
                logits = continuation_logits(model, cache, ids[context:context + continuation])
                kl = _per_token_kl(logits, full)
                lp = torch.log_softmax(logits[:-1].double(), -1)
                nll = float(-lp.gather(-1, targets[:, None]).mean())
                cells[key] = {"ids": h, "kl": kl.tolist(), "nll": nll,
                              "bytes": int(cache.compressed_nbytes), "predicted_bytes": int(cache.predicted_nbytes),
                              "retention": float(cache.retention), "budget_bits": float(plan.budget_bits or 0),
                              "predicted_distortion": plan.predicted_distortion,
                              "protect_chosen": plan.meta.get("protect_chosen"),
                              "seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1}
                if progress:
                    print(f"{text} w{wi} r={r:g} {row:48s} ret={cache.retention:.4f} kl={kl.mean():.4f} "
                          f"({time.process_time() - c1:.1f} s CPU)", flush=True)
            save(cells)
    return facts


def _row_windows(cells: dict, text: str, row: str, r: float, windows: int) -> list[int]:
    """The windows ``0..k-1`` (the longest prefix of ``range(windows)``) for which the cell has a KL."""
    out = []
    for wi in range(windows):
        if "kl" not in cells.get(f"{text}|{wi}|{row}|{r:g}", {}):
            break
        out.append(wi)
    return out


def _best(table: dict, text: str, r: float, rows) -> tuple[float, int] | None:
    """The lowest mean KL of the cell among the rows with the most windows there, and that number of windows (a
    mean over fewer windows is over other tokens: not comparable)."""
    have = [table[f"{text}|{x}|{r:g}"] for x in rows if f"{text}|{x}|{r:g}" in table]
    if not have:
        return None
    n = max(t["windows"] for t in have)
    return min(t["kl"] for t in have if t["windows"] == n), n


def decide(cells: dict, *, texts, windows: int, retentions, rows, resamples: int = 2000,
           min_windows: int = 3) -> dict:
    """Means, paired comparisons of every candidate against every other row, and the chosen default.

    A row's cell uses its windows ``0..k-1`` (``min_windows <= k <= windows``); a pair is compared on the windows
    both rows have, so that every paired difference is over the same tokens. ``identical`` marks pairs whose
    per-token KL is equal (the same plan, e.g. auto protection choosing "reserved"): no number of windows decides
    those."""
    table, pairs = {}, {}
    for text in texts:
        for r in retentions:
            kls = {}
            for row in rows:
                cs = [cells[f"{text}|{wi}|{row}|{r:g}"] for wi in _row_windows(cells, text, row, r, windows)]
                if len(cs) >= min_windows:
                    kls[row] = np.array([c["kl"] for c in cs])
                    table[f"{text}|{row}|{r:g}"] = {
                        "kl": float(kls[row].mean()), "nll": float(np.mean([c["nll"] for c in cs])),
                        "windows": len(cs), "retention": float(np.mean([c["retention"] for c in cs])),
                        "bytes_equal_predicted": all(c.get("bytes") == c.get("predicted_bytes") for c in cs)
                        if row in ROWS else None,
                        "protect_chosen": sorted({str(c.get("protect_chosen")) for c in cs})}
            for a in rows:
                if a not in ROWS or not ROWS[a][3] or a not in kls:
                    continue
                for b in kls:
                    if b != a:  # on the windows both rows have (a prefix of each): the same tokens
                        n = min(len(kls[a]), len(kls[b]))
                        pairs[f"{text}|{a}|{b}|{r:g}"] = {
                            **paired_comparison(kls[a][:n], kls[b][:n], resamples=resamples).to_dict(),
                            "windows": n, "identical": bool(np.array_equal(kls[a][:n], kls[b][:n]))}
    summary = {}
    for a in rows:
        if a not in ROWS or not ROWS[a][3]:
            continue
        beaten = [k for k, p in pairs.items() if k.split("|")[1] == a and p["verdict"] == "worse"]
        undecided = [k for k, p in pairs.items() if k.split("|")[1] == a and p["verdict"] == "undecided"]
        ratios = []
        for text in texts:
            for r in retentions:
                best = _best(table, text, r, rows)
                if best is not None and table.get(f"{text}|{a}|{r:g}", {}).get("windows") == best[1]:
                    ratios.append(table[f"{text}|{a}|{r:g}"]["kl"] / best[0])
        summary[a] = {"beaten_in": beaten, "undecided_against": len(undecided),
                      "geomean_kl_over_best": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
                      "cells": len(ratios)}
    full = len(texts) * len(retentions)
    never = [a for a, s in summary.items() if not s["beaten_in"] and s["cells"] == full]
    pool = never or [a for a, s in summary.items() if s["cells"] == full]
    chosen = min(pool, key=lambda a: (len(summary[a]["beaten_in"]), summary[a]["geomean_kl_over_best"]))
    return {"table": table, "pairs": pairs, "summary": summary, "chosen": chosen, "never_beaten": never}


def markdown(res: dict, settings: dict) -> str:
    texts, rets, rows = settings["texts"], settings["retentions"], settings["rows"]
    out = [f"KL(full || compressed), nats/token, mean over {settings['windows']} windows x "
           f"{settings['continuation'] - 1} continuation tokens per text ({settings['context']}-token contexts, KIVI "
           f"g32, menu {{0,2,4,8,16}}, sink {SINK} + last {PROTECT_WINDOW} protected, {OBSERVE} observation queries, "
           f"{settings['dtype']}). Marks against the chosen default **{res['chosen']}**: `+` the row is significantly "
           f"worse than it (95 % paired block-bootstrap interval of the per-token KL difference above 0), `-` "
           f"significantly better, `~` undecided, `=` the same per-token KL (the same plan: no number of windows "
           f"decides it); `(k w)`: the row has only windows 0..k-1 there (its pair is compared on those); **bold**: "
           f"the lowest mean in the column among the rows with every window.", ""]
    for text in texts:
        out += [f"### {text}", "", "| row | " + " | ".join(f"{100 * r:g} %" for r in rets) + " |",
                "|---|" + "---:|" * len(rets)]
        for row in rows:
            cells = []
            for r in rets:
                t = res["table"].get(f"{text}|{row}|{r:g}")
                if t is None:
                    cells.append("n/a")
                    continue
                best = _best(res["table"], text, r, rows)
                s = f"{t['kl']:.4g}"
                s = f"**{s}**" if (t["kl"], t["windows"]) == best else s
                if row != res["chosen"]:
                    p = res["pairs"].get(f"{text}|{res['chosen']}|{row}|{r:g}")
                    if p:
                        s += " " + ("=" if p.get("identical") else
                                    {"better": "+", "worse": "-", "undecided": "~"}[p["verdict"]])
                if t.get("windows", settings["windows"]) < settings["windows"]:
                    s += f" ({t['windows']} w)"
                cells.append(s)
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["### Candidates", "", "| candidate | cells where some row is significantly better | undecided pairs | "
            "geometric mean of KL / best KL |", "|---|---|---:|---:|"]
    for a, s in res["summary"].items():
        by: dict = {}
        for k in s["beaten_in"]:
            text, _, b, r = k.split("|")
            by.setdefault(f"{text} {100 * float(r):g} %", []).append(b)
        where = "; ".join(f"{c} ({len(b)} rows{': ' + b[0] if len(b) == 1 else ''})" for c, b in sorted(by.items()))
        out.append(f"| {a} | {where or 'none'} | {s['undecided_against']} | {s['geomean_kl_over_best']:.3f} |")
    out += ["", f"Chosen default: **{res['chosen']}** (never significantly beaten: "
            f"{', '.join(res['never_beaten']) or 'no candidate'})."]
    return "\n".join(out)


def plot(res: dict, settings: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    texts, rets, rows = settings["texts"], settings["retentions"], settings["rows"]
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for row in rows:
            pts = [(100 * r, res["table"][f"{text}|{row}|{r:g}"]["kl"]) for r in rets
                   if f"{text}|{row}|{r:g}" in res["table"]]
            if pts:
                x, y = zip(*pts)
                style = "s--" if row.startswith("kvpress") else "o:" if row not in ROWS else "o-"
                ax.plot(x, y, style, lw=2.5 if row == res["chosen"] else 1, label=row)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([100 * r for r in rets])
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([f"{100 * r:g}" for r in rets])
        ax.set_xlabel("retention (% of FP16 bytes held)")
        ax.set_ylabel("KL to full cache (nats/token)")
        ax.set_title(text)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.joint_default", description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=64)
    p.add_argument("--retentions", default="0.02,0.05,0.1,0.25,0.5")
    p.add_argument("--texts", default=",".join(TEXTS))
    p.add_argument("--rows", default="", help="semicolon-separated subset of the rows (default: all)")
    p.add_argument("--min-windows", type=int, default=3, help="a row's cell needs at least this many windows")
    p.add_argument("--dtype", default="float32", choices=("float64", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cells", default="", help="comma-separated cell caches to read (default: <out>/cells.json); "
                   "new cells are written to the first (parallel runs per text, merged by a last run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table-only", action="store_true", help="compute no cell: the tables from the cells cached")
    a = p.parse_args(argv)
    for flag in ("windows", "length", "continuation", "threads", "min_windows"):
        if getattr(a, flag) < 1:
            print(f"joint_default: error: --{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}",
                  file=sys.stderr)
            return 2
    specs = [r.strip() for r in a.rows.split(";") if r.strip()] or list(ROWS)
    bad = [r for r in specs if r.partition("@")[0] not in ROWS]
    if bad:
        print(f"joint_default: error: unknown --rows {bad}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    retentions = tuple(float(r) for r in floats(a.retentions, "--retentions"))
    texts = tuple(t for t in a.texts.split(",") if t)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(x) for x in a.cells.split(",") if x] or [out / "cells.json"]
    cache_path = paths[0]
    cells = {}
    for path in paths:
        if path.exists():
            cells.update(json.loads(path.read_text()))

    def save(c):
        write_atomic(cache_path, lambda tmp: tmp.write_text(json.dumps(c)))

    t0 = time.perf_counter()
    model, tokenizer, _ = load_model(dtype=a.dtype, progress=not a.no_progress)
    facts = run_cells(model, tokenizer, texts=texts, windows=a.windows, context=a.length,
                      continuation=a.continuation, retentions=retentions, rows=[] if a.table_only else specs,
                      cells=cells, save=save, progress=not a.no_progress)
    rows = list(dict.fromkeys(r.partition("@")[0] for r in specs))
    # rows with cells but no definition here, shown beside (not candidates): kvpress's (joint_default_kvpress.py) and
    # earlier versions of a row kept for the record
    peers = sorted({k.split("|")[2] for k in cells if k.count("|") == 3 and k.split("|")[0] in texts} - set(ROWS))
    rows = rows + peers
    res = decide(cells, texts=texts, windows=a.windows, retentions=retentions, rows=rows,
                 min_windows=min(a.min_windows, a.windows))
    settings = {"command": "HF_HUB_OFFLINE=1 python -m experiments.joint_default " + " ".join(argv or sys.argv[1:]),
                "windows": a.windows, "context": a.length, "continuation": a.continuation,
                "retentions": list(retentions), "texts": list(texts), "rows": rows, "dtype": a.dtype,
                "threads": a.threads, "sink": SINK, "protect_window": PROTECT_WINDOW, "observe": OBSERVE,
                "quantizer": "kivi", "menu": list(DEFAULT_MENU), "facts": facts,
                "seconds_this_run": time.perf_counter() - t0,
                "machine": "2 CPU cores shared with other sessions (wall times are noisy)",
                "environment": environment(next(model.parameters()).dtype)}
    md = markdown(res, settings)
    write_atomic(out / "joint_default.json", lambda tmp: tmp.write_text(json.dumps({**res, "settings": settings},
                                                                                   indent=1)))
    write_atomic(out / "joint_default.md", lambda tmp: tmp.write_text(
        md + f"\n\nCommand: `{settings['command']}` ({settings['seconds_this_run']:.0f} s this run; "
             f"{settings['machine']}; environment in joint_default.json).\n"))
    plot(res, settings, out / "joint_default.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
