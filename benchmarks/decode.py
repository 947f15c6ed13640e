"""Decode speed from the compressed cache: per-token time against the full cache, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/decode.py                      # contexts 1024,4096; 8 new tokens
    HF_HUB_OFFLINE=1 python benchmarks/decode.py --contexts 8064 --paths compiled   # the 8K row, compiled kernel only
    HF_HUB_OFFLINE=1 python benchmarks/decode.py --batch 4 --threads 1 --paths compiled,fused   # batch 4

For each context length, the bundled SmolLM2-135M-Instruct prefills ``context`` tokens of ``pydoc_data.topics``
once (:func:`~rdalloc.backends.hf.compress.observe_prefill`); the cache is compressed by rdalloc's joint global plan
(hybrid weights, no Fisher head scale: the scale changes which tokens are kept, not how many bytes or how decoding
works) at each retention, and by the SnapKV-style eviction plan at the same bytes. Each compressed cache decodes
``--tokens`` greedy tokens with ``model.generate`` under
:class:`~rdalloc.backends.hf.compress.JointAttention` by up to three paths: ``compiled`` (the compiled CPU kernel
reading the packed codes, :mod:`~rdalloc.backends.hf.fused_kernel`, one call per layer and row), ``fused`` (the same
algebra in plain PyTorch ops, :mod:`~rdalloc.backends.hf.fused_decode`) and ``gather`` (each step dequantizes each
layer's packed prefix, gathers each head's kept tokens, pads and concatenates). The full cache is a
``DynamicCache``.

Timing (the machine is shared): every variant runs once per repeat and thread count, the variants interleaved in one
loop (``torch.set_num_threads(k)``, ``k`` in ``--threads``), each from a fresh copy of its cache; per new token the
wall time and the process CPU time (``time.process_time``), the best over ``--repeats``; ratios against the full
cache at the same thread count. Also: the bytes each cache holds (2 bytes per full-precision element,
docs/design.md §5), and the bytes a decode step reads from the cache storage at the real itemsize (the model runs
in float32): full cache: its K and V; fused and compiled: the packed codes, float16 parameters, full-precision
middle elements, sink, window and appended tokens; gather: the same packed bytes plus the dequantized full-length
prefix it builds and reads and the gathered, padded prefix it concatenates (written and read: counted twice). And
the CPU time of one step's attention alone (:func:`attention_cpu`), where the model's other work does not dilute
the ratio. Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rdalloc.backends.hf import fused_decode, fused_kernel, load_model
from rdalloc.backends.hf.compat import forward, generate
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, token_weights
from rdalloc.backends.hf.joint import allocate_joint, eviction_plan, measure_errors
from rdalloc.backends.hf.text import default_text, tokenize
from transformers import DynamicCache

from rdalloc.environment import environment
from rdalloc.quantizers import get_quantizer

OUT = Path(__file__).resolve().parent / "results"


def read_bytes(cache, path: str, itemsize: int) -> int:
    """Bytes of cache storage one decode step reads (module docstring), right after compression."""
    if path == "full":
        return itemsize * sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    total = 0
    for layer in cache.layers:
        for row in layer.rows:
            for t in (row.packed.keys, row.packed.values):
                total += sum(int(p.numel()) for p in t.payload) + 2 * sum(int(p.numel()) for p in t.params)
                total += itemsize * int(t.full.numel())
            total += itemsize * sum(int(t.numel()) for t in row.dense_kv)
            if path == "gather":
                _, H, C, D = row.packed.keys.layout.shape
                total += 2 * itemsize * H * C * D  # the dequantized full-length prefix, keys and values
                total += 2 * 2 * itemsize * H * row.length * D  # gathered + concatenated (written, read)
    return total


@torch.no_grad()
def attention_cpu(cache, path: str, queries: list, inner: int = 3) -> float:
    """Process CPU seconds of one decode step's attention over every layer, no model around it (best of ``inner``):
    ``full``: SDPA of the query over the cache's keys and values (GQA); ``compiled``/``fused``: the fused read
    (:func:`~rdalloc.backends.hf.fused_decode.fused_attention`, kernel on/off) after one appended token."""
    if path == "full":
        def step():
            for layer, q in zip(cache.layers, queries):
                torch.nn.functional.scaled_dot_product_attention(q, layer.keys, layer.values, enable_gqa=True)
    else:
        cache = copy.deepcopy(cache)
        g = torch.Generator().manual_seed(0)
        for layer in cache.layers:
            _, H, _, D = layer.rows[0].dense_kv[0].shape
            B = len(layer.rows)
            nk, nv = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
            layer.lazy_initialization(nk, nv)
            layer._append(nk, nv)

        def step():
            for layer, q in zip(cache.layers, queries):
                fused_decode.fused_attention(layer, q, kernel=path == "compiled")
    best = float("inf")
    for _ in range(inner):
        c = time.process_time()
        step()
        best = min(best, time.process_time() - c)
    return best


@torch.no_grad()
def measure(model, ids: torch.Tensor, context: int, retentions, tokens: int, repeats: int, threads, paths,
            eviction: bool, batch: int = 1) -> list[dict]:
    q = get_quantizer("kivi")
    # the cache holds ``context`` tokens; generate feeds the next one, then decodes. Batch > 1: copies of the prompt,
    # each its own compressed row (nothing shared between rows)
    prompt = ids[None, :context + 1].repeat(batch, 1)

    def decode(cache, path):
        if path == "full":
            return generate(model, cache, prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        fused_decode.KERNEL_DEFAULT = path == "compiled"
        with JointAttention(model, fused=path in ("fused", "compiled")):
            return generate(model, cache, prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    itemsize = next(model.parameters()).element_size()
    full = DynamicCache(config=model.config)
    t = time.perf_counter()
    forward(model, full, prompt[:, :context])
    t_prefill = time.perf_counter() - t
    variants = [{"cache": "full (DynamicCache)", "path": "full", "retention": 1.0, "obj": full,
                 "bytes": 2 * sum(layer.keys.numel() + layer.values.numel() for layer in full.layers),
                 "compress_s": None}]
    pre = observe_prefill(model, ids[:context], window=32)
    w = token_weights(pre, method="hybrid")
    err = measure_errors(pre.keys, pre.values, q, [2, 4, 8])
    for r in retentions:
        kw = dict(retention=r, quantizer=q, sink=4, window=8)
        plans = [("rdalloc joint global", allocate_joint(w, pre.keys, pre.values, errors=err, **kw))]
        if eviction:
            plans.append(("eviction (SnapKV-style)", eviction_plan(w, pre.shape, **kw)))
        for name, plan in plans:
            t = time.perf_counter()
            packed = (CompressedCache.compress(pre.keys, pre.values, plan, q) if batch == 1 else
                      CompressedCache.compress_rows([(pre.keys[:, None], pre.values[:, None], plan)] * batch, q))
            t_compress = time.perf_counter() - t
            for path in paths:
                variants.append({"cache": name, "path": path, "retention": packed.retention, "obj": packed,
                                 "bytes": packed.compressed_nbytes, "compress_s": t_compress})
    for v in variants:
        v["read_bytes"] = read_bytes(v["obj"], v["path"], itemsize)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qg = torch.Generator().manual_seed(1)
    queries = [torch.randn(batch, cfg.num_attention_heads, 1, head_dim, generator=qg) for _ in full.layers]
    attn: dict = {}
    outputs: dict = {}
    times: dict = {}
    for rep in range(repeats):
        for k in threads:
            torch.set_num_threads(k)
            for i, v in enumerate(variants):
                cache = copy.deepcopy(v["obj"])
                t, c = time.perf_counter(), time.process_time()
                out = decode(cache, v["path"])
                wall, cpu = (time.perf_counter() - t) / tokens, (time.process_time() - c) / tokens
                best = times.setdefault((i, k), [float("inf"), float("inf")])
                times[(i, k)] = [min(best[0], wall), min(best[1], cpu)]
                outputs.setdefault(i, out)
                if v["path"] != "gather":
                    a_cpu = attention_cpu(v["obj"], v["path"], queries)
                    attn[(i, k)] = min(attn.get((i, k), float("inf")), a_cpu)
                print(f"  C={context} B={batch} rep {rep} threads {k} {v['cache']:24s} {v['path']:6s} "
                      f"r={v['retention']:.3f}: {1e3 * wall:7.1f} ms wall {1e3 * cpu:7.1f} ms cpu", flush=True)
    rows = []
    for i, v in enumerate(variants):
        same = None if v["path"] == "full" else bool(torch.equal(outputs[i], next(
            outputs[j] for j, u in enumerate(variants) if u["obj"] is v["obj"])))
        for k in threads:
            wall, cpu = times[(i, k)]
            fw, fc = times[(0, k)]
            rows.append({"context": context, "batch": batch, "cache": v["cache"], "path": v["path"],
                         "retention": v["retention"], "bytes": v["bytes"], "read_bytes": v["read_bytes"], "threads": k,
                         "ms_wall": 1e3 * wall, "ms_cpu": 1e3 * cpu, "ratio_wall": wall / fw, "ratio_cpu": cpu / fc,
                         "attn_ms_cpu": 1e3 * attn[(i, k)] if (i, k) in attn else None,
                         "attn_ratio_cpu": attn[(i, k)] / attn[(0, k)] if (i, k) in attn else None,
                         "compress_s": v["compress_s"], "prefill_s": t_prefill, "same_tokens_as_first_path": same})
    return rows


def probe_torch_compile(model, ids, context: int, retention: float, layers: int) -> dict:
    """``torch.compile`` of the plain fused row attention (:func:`~rdalloc.backends.hf.fused_decode._row_attention`,
    one call per layer) on a joint-compressed cache: per ``dynamic`` setting, the CPU seconds of the first call on each
    of the first ``layers`` layers (each layer's segment structure differs), the graphs compiled, the largest
    difference from the eager call, and the error if one was raised; then the CPU time of a later call on layer 0
    against eager (the reason :mod:`~rdalloc.backends.hf.fused_kernel` is a C++ loop, not ``torch.compile``)."""
    import torch._dynamo
    from rdalloc.backends.hf.fused_decode import _row_attention, _Streams
    from torch._dynamo.utils import counters

    q = get_quantizer("kivi")
    pre = observe_prefill(model, ids[:context], window=32)
    w = token_weights(pre, method="hybrid")
    plan = allocate_joint(w, pre.keys, pre.values, errors=measure_errors(pre.keys, pre.values, q, [2, 4, 8]),
                          retention=retention, quantizer=q, sink=4, window=8)
    cache = CompressedCache.compress(pre.keys, pre.values, plan, q)
    g = torch.Generator().manual_seed(0)
    _, H, _, D = pre.keys.shape
    Hq = model.config.num_attention_heads
    for layer in cache.layers:
        nk, nv = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
        layer.lazy_initialization(nk, nv)
        layer._append(nk, nv)
    queries = [torch.randn(Hq, 1, D, generator=g) for _ in cache.layers]

    def step(layer, query):
        row = layer.rows[0]
        fl = row.fused
        streams = (_Streams(row.packed.keys, fl.keys, fl.quantizer, torch.float32),
                   _Streams(row.packed.values, fl.values, fl.quantizer, torch.float32))
        return _row_attention(layer, 0, row, query, D ** -0.5, torch.float32, streams)

    import tempfile

    import torch._inductor.config

    # a cold compile, as on a fresh machine: no on-disk caches from earlier runs
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rdalloc-inductor-")
    torch._inductor.config.fx_graph_cache = False
    out = {"context": context, "retention": retention, "runs": []}
    for dynamic in (True, False):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, dynamic=dynamic)
        run = {"dynamic": dynamic, "first_call_s": [], "max_diff": [], "graphs": [], "error": None}
        try:
            with torch.no_grad():
                for i in range(layers):
                    c = time.process_time()
                    got = compiled(cache.layers[i], queries[i])
                    run["first_call_s"].append(time.process_time() - c)
                    run["max_diff"].append(float((got - step(cache.layers[i], queries[i])).abs().max()))
                    run["graphs"].append(int(counters["stats"]["unique_graphs"]))
                c = time.process_time()
                compiled(cache.layers[0], queries[0])
                run["layer0_again_ms"] = 1e3 * (time.process_time() - c)
                c = time.process_time()
                step(cache.layers[0], queries[0])
                run["layer0_eager_ms"] = 1e3 * (time.process_time() - c)
        except Exception as e:  # an inductor failure is the finding, not a crash of the benchmark
            run["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out["runs"].append(run)
        print(run, flush=True)
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Decode speed, {res['model']} (float32), KIVI g32 plans (sink 4, window 8 at 16 bits); {res['tokens']} "
             f"greedy tokens per run, best of {res['repeats']} interleaved runs per thread count; torch {m['torch']} "
             f"on a shared machine ({m['cpus']} CPU cores shared with other jobs; load average at start "
             f"{m['load_start']}, at end {m['load_end']}). Ratios are against the full cache at the same thread "
             f"count, measured side by side in this run; wall time is noisy here, process CPU time less so. "
             f"`compiled`: the compiled kernel over the packed codes; `fused`: the same in plain PyTorch ops; "
             f"`gather`: dequantize, gather, pad, concatenate (the previous path). Bytes read: the cache storage one "
             f"step reads, at the real itemsize (benchmark docstring). Attention: the CPU time of one step's "
             f"attention over all layers alone (SDPA over the full cache's K, V; the fused read of the compressed "
             f"ones), best of 3 per run.", "",
             "| context | batch | cache | path | retention | bytes held | bytes read / step | threads | ms wall "
             "| x full | ms CPU | x full (CPU) | attention ms CPU | x full (attention) |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        att = "| |" if r.get("attn_ms_cpu") is None else f"| {r['attn_ms_cpu']:.1f} | {r['attn_ratio_cpu']:.2f} |"
        lines.append(f"| {r['context']} | {r.get('batch', 1)} | {r['cache']} | {r['path']} | "
                     f"{100 * r['retention']:.1f} % | "
                     f"{r['bytes']:,} | {r['read_bytes']:,} | {r['threads']} | {r['ms_wall']:.1f} | "
                     f"{r['ratio_wall']:.2f} | {r['ms_cpu']:.1f} | {r['ratio_cpu']:.2f} {att}")
    lines += ["", f"Command: `{res['command']}` ({res['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--retentions", default="0.1,0.25,0.5")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", default="1", help="batch sizes (copies of the prompt, one compressed row each)")
    p.add_argument("--paths", default="compiled,fused,gather",
                   help="compressed-cache paths to time: compiled, fused, gather")
    p.add_argument("--no-eviction", action="store_true", help="leave out the eviction-only plans")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--name", default="decode", help="results file stem")
    p.add_argument("--probe-torch-compile", type=int, default=0, metavar="LAYERS",
                   help="instead of timing decode: torch.compile the plain fused path on the first LAYERS layers of "
                        "a joint cache (first context, first retention) and write <name>.json")
    a = p.parse_args()
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    model, tok, facts = load_model(progress=False)
    ids = tokenize(default_text(), tok)
    if a.probe_torch_compile:
        torch.set_num_threads(1)
        res = probe_torch_compile(model, ids, int(a.contexts.split(",")[0]), float(a.retentions.split(",")[0]),
                                  a.probe_torch_compile)
        res.update(command="HF_HUB_OFFLINE=1 python benchmarks/decode.py " + " ".join(sys.argv[1:]),
                   environment=environment(next(model.parameters()).dtype), seconds=time.perf_counter() - t0)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{a.name}.json").write_text(json.dumps(res, indent=1) + "\n")
        return
    threads = [int(k) for k in a.threads.split(",")]
    paths = [s for s in a.paths.split(",") if s]
    bad = sorted(set(paths) - {"compiled", "fused", "gather"})
    if bad:
        p.error(f"--paths: unknown path(s) {bad}; choose from compiled, fused, gather")
    if "compiled" in paths and fused_kernel.load() is None:
        p.error(f"--paths compiled: the kernel is unavailable ({fused_kernel.kernel_error()})")
    rows = []
    for batch in (int(x) for x in a.batch.split(",")):
        for context in (int(c) for c in a.contexts.split(",")):
            rows += measure(model, ids, context, [float(r) for r in a.retentions.split(",")], a.tokens, a.repeats,
                            threads, paths, not a.no_eviction, batch)
    res = {"model": facts.name, "tokens": a.tokens, "repeats": a.repeats, "rows": rows,
           "seconds": time.perf_counter() - t0, "environment": environment(next(model.parameters()).dtype),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "shared": True, "load_start": load_start,
                       "load_end": [round(x, 2) for x in os.getloadavg()]},
           "command": "HF_HUB_OFFLINE=1 python benchmarks/decode.py " + " ".join(
               f"--{k} {getattr(a, k)}" for k in ("contexts", "retentions", "tokens", "repeats", "threads", "batch",
                                                   "paths", "name")) + (" --no-eviction" if a.no_eviction else "")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{a.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
