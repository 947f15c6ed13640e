"""Benchmark: applying a mixed-precision plan vs uniform quantization, and the bytes a packed cache holds.

    python benchmarks/apply.py [--layers 4 --heads 8 --tokens 2048 --head-dim 128 --repeats 5] [--quick]

Part 1 (speed, torch CPU and JAX CPU, side by side in one run): the same KV tensors, the same quantizer; for each
operation the time of a mixed-precision plan divided by the time of uniform quantization at 3 bits:

* fake quantization: uniform = ``fake_quantize_uniform`` (the plain quantizer pass, no plan); mixed = a head plan
  (bits 2..8 and 16 per head) and an RDKV-style token plan (values per token with 0 = evicted and 16; keys per channel
  for KIVI, per token for QuaRot), applied by a warm ``PlanApplier``;
* packing (quantize + bit-pack + metadata) and unpacking: uniform = a uniform 3-bit plan; mixed = the same plans.

JAX runs jit-compiled (compile excluded, ``block_until_ready``); torch runs eagerly (one thread by default). Times
are CPU seconds of this process, medians of interleaved runs. Ratios only: absolute CPU times say little
(docs/design.md §5). Target: mixed <= 1.5x uniform.

Part 2 (memory): real SmolLM2-135M K/V (``tests/data/smollm2_kv.npz`` when present, else synthetic), head plans
allocated by ``rdalloc.allocate`` from measured distortion at 2, 2.5, 3 and 4 average bits **with metadata charged**,
packed for real; bytes held vs FP16 (retention), next to uniform quantization's bytes, and held == predicted.

Prints a table and writes ``benchmarks/results/apply.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from rdalloc.backends import jax as rdj  # noqa: E402
from rdalloc.backends import torch as rdt  # noqa: E402

from rdalloc import Plan, PlanApplier, predict_nbytes  # noqa: E402
from rdalloc.environment import environment  # noqa: E402
from rdalloc.quantizers import KIVI, QuaRot  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "smollm2_kv.npz"


def synthetic_kv(layers, heads, tokens, head_dim, seed=0):
    """Keys with a few outlier channels (as real keys have) and a per-head scale; Gaussian values."""
    rng = np.random.default_rng(seed)
    chan = np.ones(head_dim, np.float32)
    chan[rng.choice(head_dim, max(1, head_dim // 16), replace=False)] = 8.0
    head = rng.uniform(0.5, 2.0, (layers, 1, heads, 1, 1)).astype(np.float32)
    k = rng.standard_normal((layers, 1, heads, tokens, head_dim)).astype(np.float32) * chan * head
    v = rng.standard_normal((layers, 1, heads, tokens, head_dim)).astype(np.float32) * head
    return k, v


def plans_for(q, layers, heads, tokens, head_dim, seed=1):
    rng = np.random.default_rng(seed)
    uniform = Plan(key=np.full((layers, heads), 3), value=np.full((layers, heads), 3), quantizer=q.name)
    head = Plan(key=rng.choice([2, 3, 4, 5, 8, 16], (layers, heads), p=[.3, .3, .2, .1, .05, .05]),
                value=rng.choice([2, 3, 4, 5, 8, 16], (layers, heads), p=[.3, .3, .2, .1, .05, .05]),
                quantizer=q.name)
    vt = rng.choice([0, 2, 3, 4, 8, 16], (layers, heads, tokens), p=[.2, .3, .3, .1, .05, .05])
    if q.name == "kivi":
        token = Plan(key=rng.choice([2, 3, 4, 8], (layers, heads, head_dim)), value=vt, quantizer=q.name,
                     key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"))
    else:
        kt = np.where(vt == 0, 0, rng.choice([2, 3, 4, 16], (layers, heads, tokens), p=[.3, .4, .25, .05]))
        token = Plan(key=kt, value=vt, quantizer=q.name, key_axes=("layer", "kv_head", "token"),
                     value_axes=("layer", "kv_head", "token"))
    return uniform, head, token


def timeit(fns, repeats, sync):
    """Median CPU seconds (this process, all its threads) of each function, run interleaved (a, b, c, a, b, c, ...);
    one warm-up call each (caches, compilation). CPU time rather than wall time: on a shared machine wall time also
    measures the neighbours' load."""
    for fn in fns:
        sync(fn())
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            sync(fn())
            times[i].append(time.process_time() - t0)
    return [statistics.median(t) for t in times]


def speed(args):
    L, H, T, D = args.layers, args.heads, args.tokens, args.head_dim
    k, v = synthetic_kv(L, H, T, D)
    rows = []
    backends = {
        "torch": (rdt, lambda a: torch.as_tensor(a), lambda out: out),
        "jax": (rdj, lambda a: jnp.asarray(a), lambda out: jax.block_until_ready(out)),
    }
    for qname, q in (("kivi", KIVI(group_size=32)), ("quarot", QuaRot())):
        uniform, head, token = plans_for(q, L, H, T, D)
        for bname, (mod, conv, sync) in backends.items():
            ks, vs = [conv(k[i]) for i in range(L)], [conv(v[i]) for i in range(L)]
            aps = {name: PlanApplier(p, q) for name, p in (("uniform", uniform), ("head", head), ("token", token))}

            def fake_uniform():
                return [(mod.fake_quantize_uniform(a, q, 3, "key"), mod.fake_quantize_uniform(b, q, 3, "value"))
                        for a, b in zip(ks, vs)]

            t = {}
            fakes = [fake_uniform] + [lambda ap=aps[n]: ap.fake_quantize_cache(ks, vs) for n in ("head", "token")]
            t["fake/uniform"], t["fake/head"], t["fake/token"] = timeit(fakes, args.repeats, sync)
            packed = {}
            for name, ap in aps.items():
                packed[name] = ap.pack_cache(ks, vs)
                assert packed[name].nbytes == predict_nbytes(ap.plan, q, batch=1, tokens=T, head_dim=D)
            names = ("uniform", "head", "token")
            packs = [lambda ap=aps[n]: ap.pack_cache(ks, vs) for n in names]
            unpacks = [lambda ap=aps[n], p=packed[n]: ap.unpack(p) for n in names]
            for op, fns in (("pack", packs), ("unpack", unpacks)):
                for name, sec in zip(names, timeit(fns, args.repeats, sync)):
                    t[f"{op}/{name}"] = sec
            for op in ("fake", "pack", "unpack"):
                for name in ("head", "token"):
                    rows.append({"quantizer": qname, "backend": bname, "operation": op, "plan": name,
                                 "uniform_ms": 1e3 * t[f"{op}/uniform"], "mixed_ms": 1e3 * t[f"{op}/{name}"],
                                 "ratio": t[f"{op}/{name}"] / t[f"{op}/uniform"]})
            print(f"  timed {qname} on {bname}", file=sys.stderr)
    return rows


def memory(args):
    from rdalloc.allocate import allocate
    from rdalloc.models import TabulatedModel

    if FIXTURE.exists():
        data = np.load(FIXTURE)
        k, v = data["k"][:, None].astype(np.float32), data["v"][:, None].astype(np.float32)
        source = f"SmolLM2-135M K/V {tuple(data['k'].shape)} ({FIXTURE.relative_to(ROOT)})"
    else:
        k, v = synthetic_kv(8, 3, 256, 64)
        source = "synthetic K/V (fixture absent)"
    L, B, H, T, D = k.shape
    menu = [1, 2, 3, 4, 5, 6, 8, 16]
    rows = []
    kt, vt = torch.as_tensor(k), torch.as_tensor(v)
    fp16 = 2 * 2 * k.size
    for qname, q in (("kivi", KIVI(group_size=32)), ("quarot", QuaRot())):
        dist = np.concatenate([rdt.measure_distortion(kt, q, menu, role="key").numpy(),
                               rdt.measure_distortion(vt, q, menu, role="value").numpy()]).astype(np.float64)
        sizes = np.full(2 * L * H, B * T * D, dtype=np.float64)
        meta = np.concatenate([np.full(L * H, float(q.item_metadata_bits(r, "head", T, D, batch=B)))
                               for r in ("key", "value")])
        for avg in (2.0, 2.5, 3.0, 4.0):
            alloc = allocate(TabulatedModel(bits=menu, distortion=dist), sizes, average_bits=avg, metadata=meta)
            bits = np.asarray(alloc.bits)
            plan = Plan(key=bits[:L * H].reshape(L, H), value=bits[L * H:].reshape(L, H), quantizer=q.name)
            packed = rdt.pack(kt, vt, plan, q)
            predicted = predict_nbytes(plan, q, batch=B, tokens=T, head_dim=D)
            mse = float(np.sum(dist[np.arange(bits.size), [menu.index(int(b)) for b in bits]] * sizes)
                        / np.sum(sizes))
            row = {"quantizer": qname, "average_bits": avg, "bytes_held": packed.nbytes, "fp16_bytes": fp16,
                   "retention": packed.nbytes / fp16, "predicted_bytes": predicted,
                   "held_equals_predicted": packed.nbytes == predicted,
                   "payload_bits_per_element": packed.usage.average_payload_bits,
                   "bits_per_element": 8 * packed.nbytes / (2 * k.size), "mse": mse,
                   "bits_used": {int(b): int(n) for b, n in zip(*np.unique(bits, return_counts=True))}}
            # uniform quantization at the largest width that fits the same budget, for comparison
            uni = [b for b in menu[:-1] if b + float(meta[0]) / sizes[0] <= avg + 1e-9]
            if uni:
                ub = max(uni)
                up = Plan(key=np.full((L, H), ub), value=np.full((L, H), ub), quantizer=q.name)
                row["uniform_bits"] = ub
                row["uniform_retention"] = rdt.pack(kt, vt, up, q).nbytes / fp16
                row["uniform_mse"] = float(np.mean(dist[:, menu.index(ub)]))
            rows.append(row)
    return source, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier ratios on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "apply.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.heads, args.tokens, args.head_dim, args.repeats = 2, 2, 256, 64, 2
    torch.set_num_threads(args.torch_threads)
    print(f"speed: {args.layers} layers x [1, {args.heads}, {args.tokens}, {args.head_dim}] K and V, float32, "
          f"median CPU time of {args.repeats} interleaved runs; torch {torch.__version__} "
          f"({torch.get_num_threads()} thread(s)), "
          f"jax {jax.__version__} ({jax.default_backend()})", flush=True)
    speed_rows = speed(args)
    print(f"\n{'quantizer':9s} {'backend':7s} {'operation':9s} {'plan':6s} {'uniform ms':>11s} {'mixed ms':>9s} "
          f"{'mixed/uniform':>13s}")
    for r in speed_rows:
        print(f"{r['quantizer']:9s} {r['backend']:7s} {r['operation']:9s} {r['plan']:6s} {r['uniform_ms']:11.2f} "
              f"{r['mixed_ms']:9.2f} {r['ratio']:12.2f}x")
    source, mem_rows = memory(args)
    print(f"\nmemory: head plans allocated by rdalloc.allocate (menu 1..6, 8, 16) on {source}; bytes held include "
          f"payload, float16 scales/zeros and 2 bytes per full-precision element")
    print(f"{'quantizer':9s} {'avg bits':>8s} {'bytes held':>11s} {'FP16 bytes':>11s} {'retention':>9s} "
          f"{'= predicted':>11s} {'payload b/el':>12s} {'MSE mixed':>10s} {'uniform':>8s} {'MSE uniform':>11s}")
    for r in mem_rows:
        uni = (f"{r['uniform_bits']}b {100 * r['uniform_retention']:.1f}%", f"{r['uniform_mse']:.3e}") \
            if "uniform_bits" in r else ("-", "-")
        print(f"{r['quantizer']:9s} {r['average_bits']:8.1f} {r['bytes_held']:11d} {r['fp16_bytes']:11d} "
              f"{100 * r['retention']:8.2f}% {str(r['held_equals_predicted']):>11s} "
              f"{r['payload_bits_per_element']:12.3f} {r['mse']:10.3e} {uni[0]:>8s} {uni[1]:>11s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join(["benchmarks/apply.py", *sys.argv[1:]]),
              "shape": {"layers": args.layers, "batch": 1, "kv_heads": args.heads, "tokens": args.tokens,
                        "head_dim": args.head_dim}, "repeats": args.repeats,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "jax": jax.__version__},
              "environment": environment("float32"),
              "speed": speed_rows, "memory": {"source": source, "rows": mem_rows}}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
