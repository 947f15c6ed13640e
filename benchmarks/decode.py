"""Decode speed from the compressed cache: per-token time against the full cache, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/decode.py                      # contexts 1024,4096; 32 new tokens
    HF_HUB_OFFLINE=1 python benchmarks/decode.py --contexts 1024 --tokens 16

For each context length, the bundled SmolLM2-135M-Instruct prefills ``context`` tokens of ``pydoc_data.topics``
once (:func:`~rdalloc.backends.hf.compress.observe_prefill`); the cache is compressed by rdalloc's joint global plan
(hybrid weights, no Fisher head scale: the scale changes which tokens are kept, not how many bytes or how decoding
works) at each retention, and by the SnapKV-style eviction plan at the same bytes. Each cache then decodes
``--tokens`` greedy tokens with ``model.generate`` (the compressed ones under
:class:`~rdalloc.backends.hf.compress.JointAttention`); the time per new token is the best of ``--repeats`` runs,
each from a fresh copy of the cache. Also reported: the one-off compression time (plan excluded: packing the
prefix) against the prefill, and the bytes each cache holds.

How decoding works today (``CompressedCache``): every step dequantizes each layer's packed prefix and gathers each
head's kept tokens before attention, so the memory held is the packed bytes, and the time per step grows with
the prefix. A fused dequantize-attention kernel would remove that work; this benchmark measures the plain PyTorch
path. Ratios only: absolute milliseconds on this shared CPU say little (absolute times belong to a GPU run).
Writes ``benchmarks/results/decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from rdalloc.backends.hf import load_model
from rdalloc.backends.hf.compat import forward, generate
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, token_weights
from rdalloc.backends.hf.joint import allocate_joint, eviction_plan, measure_errors
from rdalloc.backends.hf.text import default_text, tokenize
from transformers import DynamicCache

from rdalloc.environment import environment
from rdalloc.quantizers import get_quantizer

OUT = Path(__file__).resolve().parent / "results"


def best_time(make_cache, run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        cache = make_cache()
        t = time.perf_counter()
        run(cache)
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def measure(model, ids: torch.Tensor, context: int, retentions, tokens: int, repeats: int) -> list[dict]:
    q = get_quantizer("kivi")
    prompt = ids[None, :context + 1]  # the cache holds ``context`` tokens; generate feeds the next one, then decodes

    def decode(cache, joint: bool):
        if joint:
            with JointAttention(model):
                return generate(model, cache, prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return generate(model, cache, prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    full = DynamicCache(config=model.config)
    t = time.perf_counter()
    forward(model, full, ids[None, :context])
    t_prefill = time.perf_counter() - t
    full_bytes = 2 * sum(layer.keys.numel() + layer.values.numel() for layer in full.layers)  # FP16 bytes
    t_full = best_time(lambda: copy.deepcopy(full), lambda c: decode(c, False), repeats) / tokens
    rows = [{"context": context, "cache": "full (DynamicCache)", "retention": 1.0, "bytes": full_bytes,
             "ms_per_token": 1e3 * t_full, "ratio": 1.0, "compress_s": None, "prefill_s": t_prefill}]
    pre = observe_prefill(model, ids[:context], window=32)
    w = token_weights(pre, method="hybrid")
    err = measure_errors(pre.keys, pre.values, q, [2, 4, 8])
    for r in retentions:
        kw = dict(retention=r, quantizer=q, sink=4, window=8)
        for name, plan in (("rdalloc joint global", allocate_joint(w, pre.keys, pre.values, errors=err, **kw)),
                           ("eviction (SnapKV-style)", eviction_plan(w, pre.shape, **kw))):
            t = time.perf_counter()
            packed = CompressedCache.compress(pre.keys, pre.values, plan, q)
            t_compress = time.perf_counter() - t
            t_tok = best_time(lambda: copy.deepcopy(packed), lambda c: decode(c, True), repeats) / tokens
            rows.append({"context": context, "cache": name, "retention": packed.retention,
                         "bytes": packed.compressed_nbytes, "ms_per_token": 1e3 * t_tok, "ratio": t_tok / t_full,
                         "compress_s": t_compress, "prefill_s": t_prefill})
            print(f"  C={context} {name:24s} r={r:g}: {1e3 * t_tok:7.1f} ms/token ({t_tok / t_full:4.2f}x full), "
                  f"compress {t_compress:.2f} s (prefill {t_prefill:.2f} s)", flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [f"Decode speed, {res['model']}, KIVI g32 plans (sink 4, window 8 at 16 bits); {res['tokens']} greedy "
             f"tokens per run, best of {res['repeats']}; torch {res['machine']['torch']} on "
             f"{res['machine']['cpus']} CPU cores ({res['machine']['threads']} threads), load average at start "
             f"{res['machine']['load_start']}, at end {res['machine']['load_end']}. Ratios are measured side by "
             f"side in this run; the milliseconds are this shared CPU's.", "",
             "| context | cache | retention | bytes held | ms / token | x full cache | compress / prefill |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        comp = "–" if r["compress_s"] is None else f"{r['compress_s'] / r['prefill_s']:.2f}"
        lines.append(f"| {r['context']} | {r['cache']} | {100 * r['retention']:.1f} % | {r['bytes']:,} | "
                     f"{r['ms_per_token']:.1f} | {r['ratio']:.2f} | {comp} |")
    lines += ["", f"Command: `{res['command']}` ({res['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--retentions", default="0.1,0.25,0.5")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model, tok, facts = load_model(progress=False)
    ids = tokenize(default_text(), tok)
    rows = []
    for context in (int(c) for c in a.contexts.split(",")):
        rows += measure(model, ids, context, [float(r) for r in a.retentions.split(",")], a.tokens, a.repeats)
    res = {"model": facts.name, "tokens": a.tokens, "repeats": a.repeats, "rows": rows,
           "seconds": time.perf_counter() - t0, "environment": environment(next(model.parameters()).dtype),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load_start": load_start,
                       "load_end": [round(x, 2) for x in os.getloadavg()]},
           "command": "HF_HUB_OFFLINE=1 python benchmarks/decode.py " + " ".join(
               f"--{k} {getattr(a, k)}" for k in ("contexts", "retentions", "tokens", "repeats"))}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "decode.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
