"""Outside peer for the packed head-plan cache: transformers' ``QuantizedCache`` (quanto backend) at equal bytes.

    HF_HUB_OFFLINE=1 python -m experiments.quantized_cache_peer                        # 4 windows, 256 + 32 tokens
    HF_HUB_OFFLINE=1 python -m experiments.quantized_cache_peer --windows 4 --context 512 --continuation 64

Protocol (a cache only matters in decoding: ``QuantizedCache`` hands attention the originals during a prefill
forward, so a single-forward perplexity would not see its quantization). Per evaluation window ``ids`` of
``context + continuation + 1`` tokens (``text_windows`` of the bundled SmolLM2-135M-Instruct, float32):

* prefill ``ids[:context]`` into the cache (one forward);
* teacher-force ``ids[context : context + continuation]`` **one token per forward** through the same cache, with
  ``position_ids = t`` (what ``generate`` sets); the logits of step ``t`` predict ``ids[t + 1]``;
* per scored token: NLL = -log p(ids[t + 1]) and KL(full || cache) = sum_v p_full(v) (log p_full(v) - log p(v)),
  where ``p_full`` comes from the same protocol with a ``DynamicCache`` (checked every run: its logits equal one full
  forward over ``ids[:context + continuation]`` to float rounding).

Rows: the full-precision ``DynamicCache``; ``QuantizedCache("quanto", nbits=2 | 4)`` with transformers' defaults
(``q_group_size=64``, ``residual_length=128``, ``axis_key=axis_value=0``: for head_dim 64, one group per token and
head, keys and values alike, re-quantized from its own dequantized values each time the residual fills); rdalloc's
``PackedHeadCache`` (residual: KIVI keys 32 tokens, values and QuaRot 0) with uniform KIVI plans at 2 and 4 bits,
and with rdalloc plans (``allocate_plan`` from the demo calibration, ``experiments/results/demo/calibration.json``)
for KIVI and QuaRot whose bytes held match each quanto row.

Bytes held: after the last continuation token (``context + continuation`` tokens cached), by docs/design.md §5: full
precision 2 bytes per element (both caches' residuals), packed codes as stored, parameters 2 bytes each. rdalloc's
parameters are float16; quanto stores its scale and shift in the model's dtype (float32 here), which this counts at 2
bytes each as a float16 model would hold them (the count favours quanto; the JSON also gives the itemsize-as-stored
count). Quanto's codes are counted from the packed uint8 buffer inside its ``PackedTensor`` (its ``numel`` reports
one element per code). Equal bytes: the rdalloc budget (average bits, metadata charged, over the window's tokens) is
the largest, found by bisection, whose cache holds at most the quanto row's bytes; a cache's predicted bytes for the
window come from driving a fresh ``PackedHeadCache`` with the window's token count (the token counts of
stored/residual do not depend on how tokens arrive), and every rdalloc row asserts ``nbytes == predicted_nbytes ==``
that prediction after its run. Paired intervals: ``paired_comparison`` (block bootstrap, 32-token blocks, 95 %) of
each row against the quanto row of its nbits, on the same tokens (negative: lower loss than quanto).

``optimum-quanto`` is not a dependency of rdalloc; install it beside the project's environment without its
dependencies (it brings none this needs)::

    .venv/bin/python -m pip install --no-deps optimum-quanto      # 0.2.7 measured

Without it the quanto rows are skipped with a printed note, and the rdalloc plans are matched to the uniform rows'
bytes instead. Writes ``experiments/results/quantized_cache_peer/results.{json,md}`` and ``kl_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from rdalloc.environment import environment

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "quantized_cache_peer"
CALIBRATION = ROOT / "experiments" / "results" / "demo" / "calibration.json"
LOGIT_TOLERANCE = 1e-3  # step-by-step vs one full forward, max |logit difference| (float32 logits of size ~10-30)


# ---- the protocol ----------------------------------------------------------------------------------------------------
def _check_window(ids: Any, context: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be integer token ids [batch, tokens], got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= ids.shape[1] - 2:
        raise ValueError(f"context must be an integer in [1, {ids.shape[1] - 2}] (ids has {ids.shape[1]} tokens: "
                         f"at least one token to feed and one to predict after it), got {context!r}")


@torch.no_grad()
def teacher_forced_logits(model: Any, cache: Any, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Logits ``[batch, n, vocab]`` (float32), ``n = ids.shape[1] - context - 1``: prefill ``ids[:, :context]`` into
    ``cache``, then feed ``ids[:, t]`` for ``t = context .. context + n - 1`` one forward each (``position_ids = t``);
    step ``t``'s logits predict ``ids[:, t + 1]``."""
    from rdalloc.backends.hf.compat import forward

    _check_window(ids, context)
    forward(model, cache, input_ids=ids[:, :context])
    steps = []
    for t in range(context, ids.shape[1] - 1):
        pos = torch.full((ids.shape[0], 1), t, dtype=torch.long, device=ids.device)
        out = forward(model, cache, input_ids=ids[:, t:t + 1], position_ids=pos)
        steps.append(out.logits[:, -1].float())
    return torch.stack(steps, dim=1)


@torch.no_grad()
def full_forward_logits(model: Any, ids: torch.Tensor, context: int) -> torch.Tensor:
    """The logits :func:`teacher_forced_logits` must reproduce, from one forward over ``ids[:, :-1]``."""
    _check_window(ids, context)
    return model(input_ids=ids[:, :-1], use_cache=False).logits[:, context:].float()


def token_losses(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, ...]:
    """``(nll, kl)`` per token ``[batch, n]`` (float64): ``-log p(target)`` and ``KL(reference || logits)``."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    lr = torch.log_softmax(reference.double(), dim=-1)
    nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
    kl = (lr.exp() * (lr - lp)).sum(-1).clamp_min(0.0)
    return nll.numpy(), kl.numpy()


# ---- bytes -----------------------------------------------------------------------------------------------------------
def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def quanto_nbytes(cache: Any) -> dict:
    """Bytes a ``QuantizedCache`` (quanto) holds: ``{"bytes": ..., "bytes_as_stored": ...}``. Codes from the packed
    uint8 buffer; scale and shift 2 bytes each in ``bytes`` (docs/design.md §5, as a float16 model stores them) and at
    their own itemsize in ``bytes_as_stored``; the full-precision residual 2 bytes per element in both."""
    codes = params = params_stored = residual = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for q in (layer._quantized_keys, layer._quantized_values):
            data = q._data
            inner = data._data if hasattr(data, "_data") else data  # PackedTensor: its numel counts codes, not bytes
            codes += inner.numel() * inner.element_size()
            for p in (q._scale, q._shift):
                params += 2 * p.numel()
                params_stored += p.numel() * p.element_size()
        residual += 2 * (layer.keys.numel() + layer.values.numel())
    return {"bytes": codes + params + residual, "bytes_as_stored": codes + params_stored + residual}


def dense_nbytes(cache: Any) -> int:
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)


def held_bytes(plan: Any, config: Any, tokens: int) -> int:
    """``predicted_nbytes`` of a ``PackedHeadCache`` for ``plan`` once it holds ``tokens`` tokens of one sequence
    (driven with random K/V, one update per layer; stored and residual counts depend on the token count only)."""
    from rdalloc.backends.hf import PackedHeadCache
    from rdalloc.backends.hf.model import model_facts

    cache = PackedHeadCache(plan, config)
    facts = model_facts(type("M", (), {"config": config})())
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, facts.kv_heads, int(tokens), facts.head_dim), generator=g)
    for layer in cache.layers:
        layer.update(x, x)
    assert cache.nbytes == cache.predicted_nbytes, (cache.nbytes, cache.predicted_nbytes)
    return cache.predicted_nbytes


@dataclass(frozen=True)
class BudgetMatch:
    """The plan of the largest budget tried whose cache holds at most ``target`` bytes."""

    plan: Any
    average_bits: float
    nbytes: int
    target: int
    tried: int

    @property
    def ratio(self) -> float:
        return self.nbytes / self.target


def match_budget(make_plan: Callable[[float], Any], config: Any, tokens: int, target: int, *, low: float,
                 high: float, tolerance: float = 1e-3) -> BudgetMatch:
    """Bisect the average-bit budget in ``[low, high]`` for the plan ``make_plan(budget)`` whose :func:`held_bytes`
    at ``tokens`` tokens is as close to ``target`` as possible without exceeding it (the best feasible budget tried
    is kept, so a plan family that is not monotone in its budget still never exceeds the target). ``ValueError``
    when even ``low`` holds more than ``target``."""
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1:
        raise ValueError(f"target must be a positive number of bytes, got {target!r}")
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"low < high must be finite budgets in bits, got low={low!r}, high={high!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number of bits, got {tolerance!r}")
    best: BudgetMatch | None = None
    tried = 0

    def attempt(bits: float) -> bool:
        nonlocal best, tried
        plan = make_plan(bits)
        n = held_bytes(plan, config, tokens)
        tried += 1
        if n <= target and (best is None or n > best.nbytes):
            best = BudgetMatch(plan, float(bits), int(n), int(target), tried)
        return n <= target

    if not attempt(low):
        raise ValueError(f"even the lowest budget, low={low} bits, holds more than the target {target} bytes at "
                         f"{tokens} tokens")
    if not attempt(high):
        lo, hi = float(low), float(high)
        while hi - lo > tolerance:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    return BudgetMatch(best.plan, best.average_bits, best.nbytes, best.target, tried)


# ---- rows ------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str  # "full", "quanto", "uniform", "rdalloc"
    nbits: int | None  # the quanto row it is compared with (its nbits)
    make: Callable[[], Any]
    nbytes: Callable[[Any], dict]
    info: dict = field(default_factory=dict)


def _packed_row(name: str, kind: str, nbits: int, plan: Any, config: Any, expected: int, info: dict) -> Row:
    from rdalloc.backends.hf import PackedHeadCache

    def nbytes(cache):
        assert cache.nbytes == cache.predicted_nbytes == expected, (cache.nbytes, cache.predicted_nbytes, expected)
        return {"bytes": cache.nbytes, "fp16_bytes": cache.fp16_nbytes}

    return Row(name, kind, nbits, lambda: PackedHeadCache(plan, config), nbytes,
               {**info, "key_bits_mean": float(np.mean(plan.key)), "value_bits_mean": float(np.mean(plan.value))})


def build_rows(model: Any, facts: Any, tokens: int, nbits: list[int], quanto: bool, group_size: int | None,
               residual: int | None) -> tuple[list[Row], list[str], dict[int, int]]:
    """The full, quanto and uniform rows, notes, and (without quanto) the uniform rows' bytes as the byte targets;
    ``tokens``: what each cache holds at the end of a window."""
    from rdalloc.backends.hf.head_plans import uniform_plan
    from transformers import QuantizedCache

    cfg = model.config
    notes: list[str] = []
    rows = [Row("full precision (DynamicCache)", "full", None, lambda: DynamicCache(config=cfg),
                lambda c: {"bytes": dense_nbytes(c)})]
    uniform: dict[int, Row] = {}
    targets: dict[int, int] = {}
    for b in nbits:
        plan = uniform_plan(facts, "kivi", b, tokens=tokens)
        n = held_bytes(plan, cfg, tokens)
        uniform[b] = _packed_row(f"rdalloc PackedHeadCache, uniform {b}-bit KIVI", "uniform", b, plan, cfg, n,
                                 {"average_bits_charged": float(plan.usage.average_bits)})
        if quanto:
            q = QuantizedCache("quanto", cfg, nbits=b, q_group_size=group_size, residual_length=residual)
            layer = q.layers[0]
            desc = f"group {layer.q_group_size}, residual {layer.residual_length}"
            rows.append(Row(f"QuantizedCache quanto {b}-bit ({desc})", "quanto", b,
                            lambda b=b: QuantizedCache("quanto", cfg, nbits=b, q_group_size=group_size,
                                                       residual_length=residual), quanto_nbytes,
                            {"q_group_size": layer.q_group_size, "residual_length": layer.residual_length}))
        else:
            targets[b] = n
    if not quanto:
        notes.append("QuantizedCache (quanto) skipped: optimum-quanto is not installed (`.venv/bin/python -m pip "
                     "install --no-deps optimum-quanto`); rdalloc plans matched to the uniform rows' bytes instead.")
    rows += [uniform[b] for b in nbits]
    return rows, notes, targets


def quanto_targets(model: Any, rows: list[Row], context: int, continuation: int) -> dict[int, int]:
    """Bytes each quanto row holds after a window (prefill ``context`` tokens, then ``continuation`` single steps of
    random tokens: the byte count depends on the token count and schedule only)."""
    out = {}
    for row in rows:
        if row.kind != "quanto":
            continue
        ids = torch.randint(0, model.config.vocab_size, (1, context + continuation + 1),
                            generator=torch.Generator().manual_seed(0))
        cache = row.make()
        teacher_forced_logits(model, cache, ids, context)
        out[row.nbits] = row.nbytes(cache)["bytes"]
    return out


def rdalloc_rows(facts: Any, calibration: Any, config: Any, tokens: int, targets: dict[int, int],
                 quantizers: list[str]) -> list[Row]:
    from rdalloc.backends.hf.head_plans import allocate_plan, head_costs

    rows = []
    for b, target in targets.items():
        for qname in quantizers:
            quant = calibration.quantizer(qname)
            sizes, meta = head_costs(facts, quant, tokens)
            overhead = float(meta.sum() / sizes.sum())
            menu = calibration.menu(quant.name)
            m = match_budget(lambda bits, q=qname: allocate_plan(calibration, q, bits, tokens=tokens), config,
                             tokens, target, low=min(menu) + overhead, high=max(menu) + overhead, tolerance=4e-3)
            rows.append(_packed_row(f"rdalloc PackedHeadCache, calibrated {quant.name} plan at quanto {b}-bit bytes",
                                    "rdalloc", b, m.plan, config, m.nbytes,
                                    {"average_bits_charged": m.average_bits, "target_bytes": m.target,
                                     "bytes_over_target": m.ratio, "budgets_tried": m.tried}))
    return rows


# ---- the run ---------------------------------------------------------------------------------------------------------
def evaluate(model: Any, rows: list[Row], windows: torch.Tensor, context: int, progress: bool = True) -> dict:
    """Per-token NLL and KL of every row on every window, the bytes each held, and the reference check."""
    from tqdm.auto import tqdm

    per = {r.name: {"nll": [], "kl": [], "bytes": []} for r in rows}
    check = 0.0
    bar = tqdm(total=len(windows) * len(rows), desc="windows x caches", disable=not progress)
    for w in windows:
        ids = w[None]
        targets = ids[:, context + 1:]
        reference = None
        for row in rows:
            cache = row.make()
            logits = teacher_forced_logits(model, cache, ids, context)
            if row.kind == "full":
                reference = logits
                check = max(check, float((logits - full_forward_logits(model, ids, context)).abs().max()))
            nll, kl = token_losses(logits, reference, targets)
            per[row.name]["nll"].append(nll[0])
            per[row.name]["kl"].append(kl[0])
            per[row.name]["bytes"].append(row.nbytes(cache))
            bar.update(1)
    bar.close()
    if not check <= LOGIT_TOLERANCE:
        raise AssertionError(f"the step-by-step DynamicCache logits differ from one full forward by {check:.3g} "
                             f"(> {LOGIT_TOLERANCE}): the protocol's positions are wrong")
    return {"per": per, "max_logit_difference_vs_full_forward": check}


def summarize(rows: list[Row], measured: dict) -> list[dict]:
    from rdalloc.backends.hf.paired import paired_comparison

    per = measured["per"]
    full = next(r for r in rows if r.kind == "full")
    fp16 = per[full.name]["bytes"][0]["bytes"]
    quanto = {r.nbits: r.name for r in rows if r.kind == "quanto"}
    out = []
    for row in rows:
        d = per[row.name]
        counts = {json.dumps(b, sort_keys=True) for b in d["bytes"]}
        assert len(counts) == 1, f"{row.name} held different bytes on windows of equal length: {counts}"
        nll, kl = np.stack(d["nll"]), np.stack(d["kl"])
        r = {"cache": row.name, "kind": row.kind, "nbits": row.nbits, **d["bytes"][0], "fp16_bytes": fp16,
             "bytes_over_fp16": d["bytes"][0]["bytes"] / fp16, "nll": float(nll.mean()),
             "ppl": float(np.exp(nll.mean())), "kl": float(kl.mean()), "tokens": int(nll.size), **row.info}
        peer = quanto.get(row.nbits)
        if peer is not None and peer != row.name:
            pn, pk = np.stack(per[peer]["nll"]), np.stack(per[peer]["kl"])
            r["vs"] = peer
            r["bytes_over_quanto"] = d["bytes"][0]["bytes"] / per[peer]["bytes"][0]["bytes"]
            r["nll_vs_quanto"] = paired_comparison(nll, pn).to_dict()
            r["kl_vs_quanto"] = paired_comparison(kl, pk).to_dict()
        out.append(r)
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"Decoding through each cache, {res['model']} (float32): {a['windows']} windows of `text_windows`, "
             f"{a['context']} context tokens prefilled, then {a['continuation']} tokens teacher-forced one step at a "
             f"time ({res['tokens']} scored tokens). Bytes held after the window ({a['context'] + a['continuation']} "
             f"tokens cached), docs/design.md §5 (quanto's float scale/shift at 2 bytes each). Paired differences vs "
             f"the quanto row of the same nbits: mean per token [95 % block-bootstrap interval], negative = lower "
             f"than quanto. Step-by-step DynamicCache vs one full forward: max |logit difference| "
             f"{res['max_logit_difference_vs_full_forward']:.2g}.", "",
             "| cache | bytes held | / FP16 | / quanto | avg bits charged | NLL | PPL | KL to full | "
             "NLL - quanto | KL - quanto |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def ci(c):
        return f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] {c['verdict']}"

    for r in res["rows"]:
        bits = f"{r['average_bits_charged']:.3f}" if "average_bits_charged" in r else ""
        lines.append(f"| {r['cache']} | {r['bytes']:,d} | {100 * r['bytes_over_fp16']:.1f} % | "
                     f"{r['bytes_over_quanto']:.4f} | " if "bytes_over_quanto" in r else
                     f"| {r['cache']} | {r['bytes']:,d} | {100 * r['bytes_over_fp16']:.1f} % | | ")
        lines[-1] += (f"{bits} | {r['nll']:.4f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
                      f"{ci(r['nll_vs_quanto']) if 'nll_vs_quanto' in r else ''} | "
                      f"{ci(r['kl_vs_quanto']) if 'kl_vs_quanto' in r else ''} |")
    quanto = [r for r in res["rows"] if r["kind"] == "quanto"]
    if quanto:
        lines += ["", "Quanto bytes with scale/shift at their stored itemsize (float32): " + ", ".join(
            f"{r['nbits']}-bit {r['bytes_as_stored']:,d}" for r in quanto) + "."]
    lines += ["", *res["notes"], "", f"Command: `{res['command']}` ({res['seconds']:.0f} s, load average at start "
              f"{res['load_start']}, at end {res['load_end']}).", "",
              f"Environment: `{json.dumps(res['environment'])}`", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    marks = {"quanto": ("s", "tab:red"), "uniform": ("o", "tab:gray"), "rdalloc": ("^", "tab:blue")}
    for r in res["rows"]:
        if r["kind"] == "full":
            continue
        m, c = marks[r["kind"]]
        if r["kind"] == "rdalloc" and "quarot" in r["cache"].lower():
            c = "tab:green"
        ax.scatter(100 * r["bytes_over_fp16"], r["kl"], marker=m, color=c, s=45)
        label = r["cache"].replace("rdalloc PackedHeadCache, ", "").replace("QuantizedCache ", "")
        ax.annotate(label, (100 * r["bytes_over_fp16"], r["kl"]), fontsize=6.5, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bytes held / full-precision bytes (%)")
    ax.set_ylabel("mean KL(full || cache) per continuation token")
    a = res["args"]
    ax.set_title(f"{res['model']}: {a['windows']} x ({a['context']} + {a['continuation']}) tokens, decoded step by "
                 f"step\nsquares: HF QuantizedCache (quanto); circles: uniform KIVI; triangles: rdalloc plans "
                 f"(blue KIVI, green QuaRot)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--continuation", type=int, default=32)
    p.add_argument("--nbits", default="2,4", help="quanto widths (2 and/or 4), comma-separated")
    p.add_argument("--quantizers", default="kivi,quarot", help="rdalloc plans' quantizers (from the calibration)")
    p.add_argument("--quanto-group-size", type=int, default=None, help="default: transformers' (64)")
    p.add_argument("--quanto-residual", type=int, default=None, help="default: transformers' (128)")
    p.add_argument("--calibration", type=Path, default=CALIBRATION)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    nbits = [int(x) for x in a.nbits.split(",")]
    if not set(nbits) <= {2, 4}:
        raise SystemExit(f"--nbits must list 2 and/or 4 (quanto's widths), got {a.nbits!r}")
    for name in ("windows", "context", "continuation"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {getattr(a, name)}")

    from rdalloc.backends.hf import load_model
    from rdalloc.backends.hf.calibrate import Calibration
    from rdalloc.backends.hf.text import text_windows

    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    loaded = load_model(progress=False)
    model, facts = loaded.model, loaded.facts
    calibration = Calibration.load(a.calibration)
    tokens = a.context + a.continuation
    windows = text_windows(loaded.tokenizer, length=tokens + 1, calibration=1, evaluation=a.windows).evaluation
    quanto = quanto_available()
    if not quanto:
        print("optimum-quanto is not installed: the QuantizedCache rows are skipped "
              "(`.venv/bin/python -m pip install --no-deps optimum-quanto`)")
    rows, notes, targets = build_rows(model, facts, tokens, nbits, quanto, a.quanto_group_size, a.quanto_residual)
    if quanto:
        targets = quanto_targets(model, rows, a.context, a.continuation)
    rows += rdalloc_rows(facts, calibration, model.config, tokens, targets, a.quantizers.split(","))
    measured = evaluate(model, rows, windows, a.context)
    summary = summarize(rows, measured)
    cmd = ("HF_HUB_OFFLINE=1 python -m experiments.quantized_cache_peer" +
           "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                   if k not in ("out", "calibration") and v is not None))
    env = environment(next(model.parameters()).dtype)
    if quanto:
        from importlib.metadata import version

        env["packages"]["optimum-quanto"] = version("optimum-quanto")
    res = {"model": facts.name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "tokens": summary[0]["tokens"], "rows": summary, "notes": notes,
           "max_logit_difference_vs_full_forward": measured["max_logit_difference_vs_full_forward"],
           "per_token": {n: {"nll": np.stack(d["nll"]).round(6).tolist(), "kl": np.stack(d["kl"]).round(8).tolist()}
                         for n, d in measured["per"].items()},
           "command": cmd, "seconds": time.perf_counter() - t0, "load_start": load_start,
           "load_end": [round(x, 2) for x in os.getloadavg()], "environment": env}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "results.md").write_text(markdown(res))
    plot(res, a.out / "kl_vs_bytes.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
