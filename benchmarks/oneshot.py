"""One call against five: what ``compress_after_prefill`` costs around ``model.generate``, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/oneshot.py                          # context 256, batches 1 and 4
    HF_HUB_OFFLINE=1 python benchmarks/oneshot.py --context 256 --batches 1 --tokens 8

The bundled SmolLM2-135M-Instruct generates ``--tokens`` greedy tokens after ``--context`` tokens of
``pydoc_data.topics`` (a batch of ``b`` sequences: row ``i`` is a different stretch of text, ``16 i`` tokens
shorter, left-padded), three ways: the plain model (full cache); ``with compress_after_prefill(model,
retention=r): model.generate(...)`` (prefill observed, weighted, allocated and compressed in place, then decoded);
and, for one sequence, the five steps by hand (``observe_prefill`` -> ``token_weights`` -> ``allocate_joint`` ->
``CompressedCache.compress`` -> ``generate`` under ``JointAttention``, fed the prefill's own next token).
Reported: wall seconds of each whole call, the ratio to the plain model, the bytes the compressed cache holds against
its FP16 bytes, and whether the one call generated the five steps' tokens. Ratios only: absolute seconds on this
shared CPU say little.
Writes ``benchmarks/results/oneshot.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from rdalloc.backends.hf import compress_after_prefill, load_model
from rdalloc.backends.hf.compat import generate
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, token_weights
from rdalloc.backends.hf.joint import allocate_joint
from rdalloc.backends.hf.text import default_text, tokenize

from rdalloc.environment import environment

OUT = Path(__file__).resolve().parent / "results"


def left_padded(ids: torch.Tensor, context: int, batch: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.full((batch, context), pad, dtype=torch.long)
    mask = torch.zeros(batch, context, dtype=torch.long)
    for i in range(batch):
        n = context - 16 * i
        rows[i, context - n:] = ids[i * context:i * context + n]
        mask[i, context - n:] = 1
    return rows, mask


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def measure(model, ids, context: int, batch: int, retention: float, tokens: int, sink: int, window: int,
            repeats: int) -> list:
    prompt, mask = left_padded(ids, context, batch, model.generation_config.pad_token_id or 0)
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    plain = model.generate(prompt, attention_mask=mask, **gen)
    first = plain[:, context:context + 1]  # the prefill's own next token: the full-precision logits choose it

    def run_plain():
        return model.generate(prompt, attention_mask=mask, **gen), None

    def run_one():
        with compress_after_prefill(model, retention=retention, sink=sink, window=window) as press:
            return model.generate(prompt, attention_mask=mask, **gen), press.cache

    def run_five():
        pre = observe_prefill(model, prompt[0], window=32)
        plan = allocate_joint(token_weights(pre), pre.keys, pre.values, retention=retention, sink=sink, window=window)
        cache = CompressedCache.compress(pre.keys, pre.values, plan)
        with JointAttention(model):
            rest = {**gen, "max_new_tokens": tokens - 1, "min_new_tokens": tokens - 1}
            return generate(model, cache, torch.cat([prompt, first], 1), **rest), cache

    paths = {"plain model.generate (full cache)": run_plain, "with compress_after_prefill: generate": run_one}
    if batch == 1:
        paths["five steps by hand"] = run_five
    best, outs = {}, {}
    for rep in range(repeats):  # alternate the order, keep each path's best time
        for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
            (outs[name]), t = timed(paths[name])
            best[name] = min(best.get(name, float("inf")), t)
    t_plain = best["plain model.generate (full cache)"]
    rows = []
    for name in paths:
        out, cache = outs[name]
        same = None
        if name.startswith("with") and "five steps by hand" in outs:
            same = bool(torch.equal(out, outs["five steps by hand"][0]))
        rows.append({"batch": batch, "path": name, "seconds": best[name], "ratio": best[name] / t_plain,
                     "bytes": None if cache is None else cache.compressed_nbytes,
                     "retention": 1.0 if cache is None else cache.retention,
                     "bytes_equal_prediction": None if cache is None else
                     cache.compressed_nbytes == cache.predicted_nbytes, "same_tokens_as_five_steps": same})
        print(f"  batch {batch} {name:40s} {best[name]:7.2f} s ({best[name] / t_plain:.2f}x plain)", flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [f"One call against five steps, {res['model']}, context {res['context']} (row i: 16 i tokens shorter, "
             f"left-padded), retention {res['retention']}, {res['tokens']} greedy tokens, KIVI, sink "
             f"{res['sink']}, window {res['window']}; torch {res['machine']['torch']} on {res['machine']['cpus']} CPU "
             f"cores ({res['machine']['threads']} threads), load average at start {res['machine']['load_start']}, "
             f"at end {res['machine']['load_end']}.", "",
             "| batch | path | seconds | x plain | bytes held | retention | bytes = prediction | tokens = five steps |",
             "|---:|---|---:|---:|---:|---:|---|---|"]
    def cell(x):
        return "–" if x is None else str(x)

    for r in res["rows"]:
        held = "–" if r["bytes"] is None else f"{r['bytes']:,}"
        lines.append(f"| {r['batch']} | {r['path']} | {r['seconds']:.2f} | {r['ratio']:.2f} | {held} | "
                     f"{100 * r['retention']:.1f} % | {cell(r['bytes_equal_prediction'])} | "
                     f"{cell(r['same_tokens_as_five_steps'])} |")
    lines += ["", f"Command: `{res['command']}` ({res['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model, tok, facts = load_model(progress=False)
    ids = tokenize(default_text(), tok)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        rows += measure(model, ids, a.context, b, a.retention, a.tokens, a.sink, a.window, a.repeats)
    res = {"model": facts.name, "context": a.context, "retention": a.retention, "tokens": a.tokens, "sink": a.sink,
           "window": a.window, "repeats": a.repeats, "rows": rows, "seconds": time.perf_counter() - t0,
           "environment": environment(next(model.parameters()).dtype),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load_start": load_start,
                       "load_end": [round(x, 2) for x in os.getloadavg()]},
           "command": "HF_HUB_OFFLINE=1 python benchmarks/oneshot.py " + " ".join(
               f"--{k} {getattr(a, k)}"
               for k in ("context", "batches", "retention", "tokens", "sink", "window", "repeats"))}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "oneshot.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
