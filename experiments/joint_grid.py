"""The compress-after-prefill grid (RDKV setting): continuation NLL and KL vs retention, on the bundled model.

    HF_HUB_OFFLINE=1 python -m experiments.joint_grid --windows 4 --length 1024
    # -> experiments/results/joint/joint_4x1024.{json,md,png}

Per evaluation window (docs/design.md §5, "compress after prefill"): prefill ``context`` tokens, score every token
(:func:`rdalloc.backends.hf.compress.token_weights`), allocate, compress once, teacher-force ``continuation`` tokens
and report their NLL and the KL divergence to the full cache, at equal bytes held (retention vs FP16). Rows:
rdalloc's one global budget (:func:`rdalloc.backends.hf.joint.allocate_joint`) for every weighting, RDKV's per-head
budgets, SnapKV-style eviction and uniform quantization. Writes ``<name>.json``, ``<name>.md`` and ``<name>.png``,
the name saying the windows and context length (``joint_4x1024``; ``_no_head_scale`` without the head scale), so that
runs at other settings never overwrite each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rdalloc.backends.hf.capture import fisher_importance
from rdalloc.backends.hf.cli import add_dtype, check_model, check_path
from rdalloc.backends.hf.compress import WEIGHTINGS, CompressedCache, observe_prefill, scale_heads, token_weights
from rdalloc.backends.hf.joint import (
    DEFAULT_MENU,
    allocate_joint,
    continuation_logits,
    continuation_scores,
    eviction_plan,
    measure_errors,
    uniform_token_plan,
)
from rdalloc.backends.hf.model import load_model
from rdalloc.backends.hf.text import text_windows

from rdalloc.cli import check_positive, floats, one_line, prepare_output_dir, write_atomic
from rdalloc.environment import environment
from rdalloc.models import FULL_BITS
from rdalloc.quantizers import get_quantizer

RESULTS = Path(__file__).resolve().parent / "results" / "joint"
RETENTIONS = (0.02, 0.05, 0.10, 0.25, 0.50)


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




def run_joint(model: Any = None, tokenizer: Any = None, *, retentions: Sequence[float] = RETENTIONS,
              context: int = 1024, continuation: int = 64, windows: int = 2, window: int = 32, sink: int = 4,
              protect_window: int = 8, protect: str = "auto",
              quantizer: str = "kivi", menu: Sequence[int] = DEFAULT_MENU, weightings: Sequence[str] = WEIGHTINGS,
              weighting: str = "rdkv", head_scale: str | None = "fisher", fisher_samples: int = 2,
              text_path: str | None = None, progress: bool = True) -> JointResult:
    """Compress-after-prefill experiment (module docstring). Rows: ``joint-global`` for every weighting in
    ``weightings``; ``joint-per-head`` (RDKV protocol), ``eviction`` (SnapKV-style top-k) with ``weighting``;
    ``uniform`` (quantization only). With ``head_scale="fisher"`` (the default) every weighting is put in the loss's
    units by :func:`.compress.scale_heads` with a Fisher importance calibrated once on a calibration window of the
    same length (disjoint text, ``fisher_samples`` label draws), and one more row, ``joint-global`` with the unscaled
    ``weighting``, shows what the scale buys. ``model``/``tokenizer`` default to the bundled SmolLM2. ``window``
    queries score the tokens; ``sink`` first and ``protect_window`` last tokens are never evicted, held as the joint
    rows' ``protect`` says (:func:`~rdalloc.backends.hf.joint.allocate_joint`; default ``"auto"``, with ``weighting``
    RDKV's: the defaults measured best, ``experiments/results/joint_default/``) and at 16 bits by the eviction and
    uniform rows (a budget that cannot hold them gives an n/a cell). Returns the result; :func:`write` saves it."""
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
                if method.startswith("joint"):
                    kw["protect"] = protect
                try:
                    plan = row_plan(method, w, wts, pre, err, menu, kw)
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
    settings = {"protect_window": protect_window, "protect": protect, "context": context,
                "continuation": continuation, "windows": windows, "window": window, "sink": sink,
                "quantizer": quantizer, "menu": list(menu), "weightings": list(weightings), "weighting": weighting,
                "head_scale": head_scale, "fisher_samples": fisher_samples, "fisher_seconds": t_fisher,
                "text": tw.source, "environment": environment(next(model.parameters()).dtype)}
    return JointResult(rows=rows, full_nll=float(np.mean(full_nlls)), settings=settings,
                       seconds=time.perf_counter() - t0)


def row_plan(method, w, wts, pre, err, menu, kw):
    """The plan of one row: ``method`` with the weights ``wts[w]`` at the budget and protection in ``kw``."""
    if method == "joint-global":
        return allocate_joint(wts[w], pre.keys, pre.values, menu=menu, mode="global", errors=err, **kw)
    if method == "joint-per-head":
        return allocate_joint(wts[w], pre.keys, pre.values, menu=menu, mode="per_head", errors=err, **kw)
    if method == "eviction":
        return eviction_plan(wts[w], pre.shape, **kw)
    return uniform_token_plan(pre.shape, **kw)


def is_result(d: Any) -> bool:
    """Whether a parsed JSON document is a :class:`JointResult` (what ``--out`` may overwrite)."""
    return isinstance(d, dict) and {"rows", "full_nll", "settings"} <= d.keys()


def result_name(windows: int, length: int, head_scale: str | None) -> str:
    """The file stem of a run: ``joint_<windows>x<length>``, plus ``_no_head_scale`` without the head scale."""
    return f"joint_{windows}x{length}" + ("" if head_scale else "_no_head_scale")


def write(res: JointResult, out: Path, name: str) -> None:
    """``<name>.json``, ``<name>.md`` (the table) and ``<name>.png`` (NLL and KL vs retention) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(res.to_dict(), indent=1)))
    write_atomic(out / f"{name}.md", lambda tmp: tmp.write_text(res.markdown() + "\n"))
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
    write_atomic(out / f"{name}.png", lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.joint_grid",
                                description="compress-after-prefill NLL/KL vs retention (joint eviction + "
                                            "quantization)")
    p.add_argument("--model", default=None, help="a local Hugging Face model directory or .gguf file (default: the "
                   "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows (default 2)")
    p.add_argument("--length", type=int, default=512, help="context tokens per window (default 512)")
    add_dtype(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--retentions", default="0.02,0.05,0.1,0.25,0.5", help="retentions vs FP16 bytes")
    p.add_argument("--head-scale", default="fisher", choices=("fisher", "none"),
                   help="put each head's weights in loss units with a calibrated Fisher importance (default)")
    p.add_argument("--continuation", type=int, default=64, help="teacher-forced tokens after the context")
    p.add_argument("--quantizer", default="kivi", help="the quantizer (default kivi)")
    p.add_argument("--out", default=str(RESULTS), help="output directory (default: experiments/results/joint)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    head_scale = None if args.head_scale == "none" else args.head_scale
    try:
        retentions = floats(args.retentions, "--retentions")
        if np.any((retentions <= 0) | (retentions > 1)):
            raise ValueError(f"--retentions must lie in (0, 1], got {args.retentions!r}")
        for flag in ("--windows", "--length", "--continuation"):
            check_positive(getattr(args, flag[2:]), flag)
        get_quantizer(args.quantizer)
        check_model(args.model)
        check_path(args.text, "--text")
        name = result_name(args.windows, args.length, head_scale)
        out = prepare_output_dir(args.out, "--out", {f"{name}.json": is_result})
        model, tokenizer, _ = load_model(args.model, dtype=args.dtype, progress=not args.no_progress)
        result = run_joint(model, tokenizer, retentions=tuple(float(r) for r in retentions), context=args.length,
                           windows=args.windows, quantizer=args.quantizer, text_path=args.text,
                           head_scale=head_scale, continuation=args.continuation, progress=not args.no_progress)
        write(result, out, name)
    except (ValueError, TypeError, OSError) as e:  # OSError: a file that could not be read or written
        print(f"joint_grid: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(result.markdown())
    print(f"results written to {args.out}/{name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
