"""A jitted JAX decode loop over the fixed-capacity packed KV cache against a full-precision fixed-capacity cache.

    python benchmarks/jax_decode.py                          # contexts 1024,4096; 128 decode steps
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/jax_decode.py --contexts 1024,4096,8192 \
        --steps 24 --layers 30 --kv-heads 3 --q-heads 9 --head-dim 64 --reference   # the bundled model's dims

Synthetic model dims (default ``--layers 8 --kv-heads 4 --q-heads 16 --head-dim 64``, batch 1): random K/V, no
weights, so what is timed is the cache (append one token per layer, then decode attention) inside one jitted step
that runs a ``lax.scan`` over layers (traced layer index). For each context every cache is built with capacity
``context + steps`` and prefilled in one jitted call (one chunk per layer); then the jitted steps decode ``--steps``
tokens, one call per token (``block_until_ready`` each), the caches of one context taking turns step by step so that
every ratio compares steps timed under the same load (the machine is shared). The step compiles once for all lengths
(checked: its cache size stays 1). Reported per cache: compile time of the step, prefill time, median CPU time
(``process_time``) and wall time per token, bytes held by the storage arrays (and what the plan alone needs), the
heads computed per layer (:meth:`CacheSpec.compute_slots`), each against the full-precision cache doing the same
attention (float16 storage, float32 math). Caches (KIVI, float16 for 16-bit heads): ``packed mixed`` (head widths
drawn from 2..8 for keys and values, seeded), ``packed uniform 4``, ``evict only X %`` (X % of the heads kept at 16
bits, the rest evicted), ``joint 4-bit X %`` (heads kept at 4 bits, as many as make X % of the full bytes);
``--reference`` adds uniform 4 through ``attend_dequantized`` (the oracle). Writes
``benchmarks/results/{--name}.{json,md}`` (default ``jax_decode_fused``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from rdalloc.backends import jax_cache as jc

from rdalloc import Plan
from rdalloc.environment import environment
from rdalloc.quantizers import get_quantizer

OUT = Path(__file__).resolve().parent / "results"


# ---- the full-precision baseline: same shapes, same attention, float16 storage ------------------------------------
def full_create(L, H, B, T, D):
    return {"k": jnp.zeros((L, H, B, T, D), jnp.float16), "v": jnp.zeros((L, H, B, T, D), jnp.float16),
            "length": jnp.zeros((L,), jnp.int32)}


def full_append(c, layer, k, v):
    start = c["length"][layer]
    kk = jnp.swapaxes(k.astype(jnp.float16), 0, 1)[None]
    vv = jnp.swapaxes(v.astype(jnp.float16), 0, 1)[None]
    return {"k": lax.dynamic_update_slice(c["k"], kk, (layer, 0, 0, start, 0)),
            "v": lax.dynamic_update_slice(c["v"], vv, (layer, 0, 0, start, 0)),
            "length": c["length"].at[layer].add(k.shape[2])}


def full_attend(c, layer, q):
    k = jnp.swapaxes(lax.dynamic_index_in_dim(c["k"], layer, keepdims=False), 0, 1).astype(jnp.float32)
    v = jnp.swapaxes(lax.dynamic_index_in_dim(c["v"], layer, keepdims=False), 0, 1).astype(jnp.float32)
    B, Hq, _, D = q.shape
    H = k.shape[1]
    s = jnp.einsum("bhrd,bhtd->bhrt", q.reshape(B, H, Hq // H, D), k) / np.sqrt(D)
    s = jnp.where(jnp.arange(k.shape[2]) < c["length"][layer], s, -jnp.inf)
    return jnp.einsum("bhrt,bhtd->bhrd", jax.nn.softmax(s, axis=-1), v).reshape(q.shape)


# ---- one decode step: scan over layers, append then attend ---------------------------------------------------------
def make_step(append, attend, L):
    def step(cache, k_new, v_new, q):  # k_new, v_new: [L, B, H, 1, D]; q: [L, B, Hq, 1, D]
        def layer_fn(c, inputs):
            layer, k, v, qq = inputs
            c = append(c, layer, k, v)
            return c, attend(c, layer, qq)
        return lax.scan(layer_fn, cache, (jnp.arange(L, dtype=jnp.int32), k_new, v_new, q))
    return jax.jit(step, donate_argnums=0)


def make_prefill(append, L):
    def prefill(cache, k, v):  # [L, B, H, n, D]
        def layer_fn(c, inputs):
            layer, kk, vv = inputs
            return append(c, layer, kk, vv), None
        return lax.scan(layer_fn, cache, (jnp.arange(L, dtype=jnp.int32), k, v))[0]
    return jax.jit(prefill, donate_argnums=0)


def storage_bytes(cache) -> int:
    if isinstance(cache, jc.PackedKVCache):
        return cache.nbytes
    return int(cache["k"].nbytes + cache["v"].nbytes)


def prepare(name, cache, append, attend, a, context, rng) -> dict:
    """Prefill ``cache`` with ``context`` random tokens per layer and compile its decode step."""
    L, H, Hq, D, B = a.layers, a.kv_heads, a.q_heads, a.head_dim, 1
    k_pre = jnp.asarray(rng.normal(size=(L, B, H, context, D)).astype(np.float32))
    v_pre = jnp.asarray(rng.normal(size=(L, B, H, context, D)).astype(np.float32))
    new = [jnp.asarray(rng.normal(size=(L, B, H, 1, D)).astype(np.float32)) for _ in range(2 * a.steps)]
    q = jnp.asarray(rng.normal(size=(L, B, Hq, 1, D)).astype(np.float32))
    prefill, step = make_prefill(append, L), make_step(append, attend, L)
    t = time.perf_counter()
    prefill_c = prefill.lower(cache, k_pre, v_pre).compile()
    t_prefill_compile = time.perf_counter() - t
    t = time.perf_counter()
    cache = jax.block_until_ready(prefill_c(cache, k_pre, v_pre))
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    step.lower(cache, new[0], new[1], q).compile()
    t_compile = time.perf_counter() - t
    return {"name": name, "cache": cache, "step": step, "new": new, "q": q, "wall": [], "cpu": [],
            "row": {"context": context, "cache": name, "compile_s": t_compile, "prefill_compile_s": t_prefill_compile,
                    "prefill_s": t_prefill}}


def decode_round_robin(states: list, a) -> None:
    """One step of every cache in turn, ``a.steps`` times, so that every ratio compares steps timed under the same
    load (the machine is shared)."""
    for i in range(a.steps):
        for st in states:
            t, c = time.perf_counter(), time.process_time()
            st["cache"], st["out"] = jax.block_until_ready(st["step"](st["cache"], st["new"][2 * i],
                                                                      st["new"][2 * i + 1], st["q"]))
            st["wall"].append(time.perf_counter() - t)
            st["cpu"].append(time.process_time() - c)


def finish(st: dict, context: int, a) -> dict:
    cache, row = st["cache"], st["row"]
    assert np.all(np.isfinite(np.asarray(st["out"])))
    length = int(np.asarray(cache["length"] if isinstance(cache, dict) else cache.length)[0])
    assert length == context + a.steps, length
    row.update({"ms_per_token": 1e3 * statistics.median(st["cpu"][1:]),
                "wall_ms_per_token": 1e3 * statistics.median(st["wall"][1:]), "first_call_ms": 1e3 * st["wall"][0],
                "step_compilations": st["step"]._cache_size(), "bytes": storage_bytes(cache)})
    if isinstance(cache, jc.PackedKVCache):
        row["plan_bytes"] = cache.plan_nbytes
        row["overflow"] = bool(cache.overflow)
        row["slots"] = {f"{role} {kind}": cache.spec.compute_slots(role, full=kind == "16-bit")[0]
                        for role in ("key", "value") for kind in ("quantized", "16-bit")}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def markdown(res: dict) -> str:
    lines = [f"Command: `{res['command']}` (ratios measured side by side in one run, the caches' steps "
             f"interleaved; load average "
             f"{res['load_start']} at start, {res['load_end']} at end)", "",
             f"Synthetic dims: layers {res['dims']['layers']}, kv_heads {res['dims']['kv_heads']}, q_heads "
             f"{res['dims']['q_heads']}, head_dim {res['dims']['head_dim']}, batch 1; capacity = context + steps; "
             f"{res['steps']} decode steps, one jitted step per token (scan over layers).", "",
             "ms / token: median CPU time (process_time, all threads) of one jitted step; wall: median wall time. "
             "slots: heads computed per layer (quantized keys/values, 16-bit keys/values: the most any layer has).", "",
             "| context | cache | step compile (s) | compilations | prefill (s) | ms / token (CPU) | x full time "
             "| wall ms | bytes held (MiB) | x full bytes | plan bytes (MiB) | x full (plan) | slots |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        base = next(b for b in res["rows"] if b["context"] == r["context"] and b["cache"].startswith("full"))
        plan = f"{r['plan_bytes'] / 2**20:.2f}" if "plan_bytes" in r else "–"
        pfrac = f"{r['plan_bytes'] / base['bytes']:.3f}" if "plan_bytes" in r else "–"
        slots = "/".join(str(v) for v in r["slots"].values()) if "slots" in r else "–"
        lines.append(f"| {r['context']} | {r['cache']} | {r['compile_s']:.2f} | {r['step_compilations']} | "
                     f"{r['prefill_s']:.3f} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / base['ms_per_token']:.2f} "
                     f"| {r['wall_ms_per_token']:.2f} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base['bytes']:.3f} "
                     f"| {plan} | {pfrac} | {slots} |")
    lines += ["", f"Environment: `{json.dumps(res['environment'])}`", ""]
    return "\n".join(lines)


def head_plans(L: int, H: int, D: int, evict: list[int], joint: list[int]) -> dict:
    """The plans timed: mixed widths, uniform 4, eviction only (kept heads at 16 bits, the rest at 0, chosen at
    random so that ``X %`` of the heads stay: ``X %`` of the bytes) and joint (kept heads at 4 bits, as many as make
    ``X %`` of the full cache's bytes at full capacity, measured on an all-4-bit plan)."""
    wrng = np.random.default_rng(0)
    plans = {"packed mixed 2..8": Plan(key=wrng.choice([2, 3, 4, 5, 6, 8], (L, H)),
                                       value=wrng.choice([2, 3, 4, 5, 6, 8], (L, H)), quantizer="kivi"),
             "packed uniform 4": Plan(key=np.full((L, H), 4), value=np.full((L, H), 4), quantizer="kivi")}
    probe = jc.create_cache(plans["packed uniform 4"], batch=1, capacity=1024, head_dim=D, quantizer="kivi")
    f4 = probe.plan_nbytes / (2 * L * H * 1024 * D * 2)

    def keep(n: int, bits: int, seed: int) -> Plan:
        chosen = np.random.default_rng(seed).permutation(L * H)[:n]
        b = np.zeros(L * H, np.int64)
        b[chosen] = bits
        return Plan(key=b.reshape(L, H), value=b.reshape(L, H), quantizer="kivi")

    for x in evict:
        plans[f"evict only {x} %"] = keep(max(1, round(x / 100 * L * H)), 16, x)
    for x in joint:
        plans[f"joint 4-bit {x} %"] = keep(min(L * H, max(1, round(x / 100 / f4 * L * H))), 4, 100 + x)
    return plans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--evict", default="10,25,50", help="eviction-only plans keeping these %% of heads (bytes)")
    p.add_argument("--joint", default="10,25", help="4-bit plans with eviction holding these %% of the bytes")
    p.add_argument("--reference", action="store_true", help="also time uniform 4 through attend_dequantized")
    p.add_argument("--name", default="jax_decode_fused", help="results file stem")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    L, H, D = a.layers, a.kv_heads, a.head_dim
    q = get_quantizer("kivi")
    plans = head_plans(L, H, D, [int(x) for x in a.evict.split(",") if x], [int(x) for x in a.joint.split(",") if x])
    rows = []
    for context in (int(c) for c in a.contexts.split(",")):
        T = context + a.steps
        states = [prepare("full fp16", full_create(L, H, 1, T, D), full_append, full_attend, a, context,
                          np.random.default_rng(context))]
        for name, plan in plans.items():
            cache = jc.create_cache(plan, batch=1, capacity=T, head_dim=D, dtype=jnp.float16, quantizer=q)
            states.append(prepare(name, cache, jc.append, jc.attend, a, context, np.random.default_rng(context)))
            if a.reference and name == "packed uniform 4":
                cache = jc.create_cache(plan, batch=1, capacity=T, head_dim=D, dtype=jnp.float16, quantizer=q)
                states.append(prepare(name + " (dequantize, oracle)", cache, jc.append, jc.attend_dequantized, a,
                                      context, np.random.default_rng(context)))
        decode_round_robin(states, a)
        rows += [finish(st, context, a) for st in states]
        del states
    res = {"steps": a.steps, "dims": {"layers": L, "kv_heads": H, "q_heads": a.q_heads, "head_dim": D},
           "plans": {k: {"key": v.key.tolist(), "value": v.value.tolist()} for k, v in plans.items()},
           "rows": rows, "environment": environment(jnp.float32), "device": str(jax.devices()[0]),
           "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
           "command": (f"XLA_FLAGS='{os.environ['XLA_FLAGS']}' " if os.environ.get("XLA_FLAGS") else "")
           + "python benchmarks/jax_decode.py " + " ".join(
               f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("contexts", "steps", "layers", "kv_heads",
                                                                     "q_heads", "head_dim", "evict",
                                                                     "joint", "name"))
           + (" --reference" if a.reference else "")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{a.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
