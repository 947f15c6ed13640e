"""Decoding with transformers caches: time per new token, bytes held and peak memory, at 1K/4K/8K context, batch 1/4.

    HF_HUB_OFFLINE=1 python benchmarks/hf_caches.py                    # 1K, 4K, 8K x batch 1, 4; 8 tokens, best of 3
    HF_HUB_OFFLINE=1 python benchmarks/hf_caches.py --configs 1024x1 --tokens 8 --repeats 2   # a quick look

The bundled SmolLM2-135M-Instruct (float32, torch on one thread) decodes greedily with ``model.generate`` after a
context of ``C`` tokens of ``pydoc_data.topics`` (``batch`` consecutive windows, no padding), with each cache:

* ``DynamicCache`` -- full precision, the reference of every ratio;
* transformers' ``QuantizedCache`` with the quanto backend at 4 and 2 bits (transformers' defaults: group 64,
  residual 128 tokens), when ``optimum-quanto`` is installed (not a dependency of rdalloc);
* rdalloc's ``PackedHeadCache`` (KIVI, g = 32, a key group of residual): the uniform 4-bit plan, and the calibrated
  plan of the demo's calibration (``experiments/results/demo/calibration.json``) whose bytes after the run are the
  largest not above quanto 4-bit's (bisection of ``experiments.quantized_cache_peer.match_budget``); each twice:
  decoded by the model's attention over the dequantized tokens, and under ``PackedAttention`` (read from the codes);
* rdalloc's joint compression after prefill (the cache ``compress_after_prefill`` builds: token plans, eviction and
  widths per (layer, head, token), decoded under ``JointAttention``) at retention 25 % and 10 %.

**Protocol.** Per configuration, one full-precision prefill of ``ids[:, :C]`` (one forward, its cost is not the
point) gives the K/V of every layer, the last 32 queries (what ``compress_after_prefill`` observes) and the first new
token ``t0`` (argmax of the prefill's logits, the same for every cache). Each cache is then built from those K/V the
way a prefill forward fills it (``cache.update(k, v, layer)`` per layer; the joint caches by the one-call path's own
steps: ``observe_row`` -> ``token_weights`` -> ``allocate_joint`` -> ``CompressedCache.compress_rows``) and
``generate`` decodes ``--tokens`` tokens from ``[ids, t0]``. In the first configuration the joint rows are checked
against ``with compress_after_prefill(model, retention=r): generate(ids)``: same plans, bytes and tokens. (A
quantizing cache given to ``generate`` from the start would see its own quantized keys inside the prefill; building
it from the full-precision prefill changes its codes slightly, not its time per token or its bytes.)

**Time per token** excludes the prefill and the cache's construction: a stopping criterion stamps every step
(``time.perf_counter`` for wall time, ``time.process_time`` for this process's CPU time); per run, the mean over the
steps after the first; per cache, the best of ``--repeats`` runs, the caches interleaved round robin (a burst of load
on a shared CPU hits every cache alike). CPU time with one torch thread is what to read on a shared machine: it does
not count the time other jobs hold the core.

**Memory.** Each configuration runs in a fresh subprocess. After its timed runs (every code path warm, the weights
paged in), each cache runs once more for ``--memory-tokens`` tokens: the heap is trimmed (``malloc_trim``) and the RSS
with the model and the prefill's K/V held is the baseline; ``held`` = RSS after building the cache minus the
baseline (the cache as this float32 process holds it); the peak is reset (``/proc/self/clear_refs``) after the first
step, and ``peak`` = the peak RSS over the later decode steps minus the baseline (the cache, its growth and every
transient of a step: activations, dequantized copies). **Bytes held** is docs/design.md §5's convention (2 bytes per
full-precision element, packed codes as stored, parameters 2 bytes; quanto's float32 scale and shift counted at 2
bytes, as the peer experiment counts them); for rdalloc caches it is their ``nbytes``, asserted equal to
``predicted_nbytes`` in the run. Writes ``benchmarks/results/hf_caches.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rdalloc.backends.hf import PackedAttention, PackedHeadCache, compress_after_prefill, load_model
from rdalloc.backends.hf.calibrate import Calibration
from rdalloc.backends.hf.compat import forward, generate
from rdalloc.backends.hf.compress import (
    CompressedCache,
    JointAttention,
    Prefill,
    PrefillObserver,
    observe_row,
    token_weights,
)
from rdalloc.backends.hf.head_plans import allocate_plan, head_costs, uniform_plan
from rdalloc.backends.hf.joint import allocate_joint
from rdalloc.backends.hf.text import default_text, tokenize
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from rdalloc import Plan
from rdalloc.environment import environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ beside benchmarks/
from experiments import quantized_cache_peer as _peer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "experiments" / "results" / "demo" / "calibration.json"
RETENTIONS = (0.25, 0.10)
REFERENCE = "DynamicCache (full precision)"


# ---- clocks and memory -----------------------------------------------------------------------------------------------
class StepClock(StoppingCriteria):
    """Stamps wall and process CPU time at every generation step and calls ``on_step`` after the first; never stops
    generation."""

    def __init__(self, on_first=None):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.on_first = on_first

    def __call__(self, input_ids, scores, **kwargs):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.wall) == 1 and self.on_first is not None:
            self.on_first()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def per_token(self) -> tuple[float, float]:
        """Mean wall and CPU seconds per step after the first."""
        n = len(self.wall) - 1
        if n < 1:
            raise ValueError("at least two steps are needed to time a step after the first")
        return (self.wall[-1] - self.wall[0]) / n, (self.cpu[-1] - self.cpu[0]) / n


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def rss_bytes() -> int:
    return 1024 * _status_kib("VmRSS")


def peak_rss_bytes() -> int:
    return 1024 * _status_kib("VmHWM")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


# ---- the prefill every cache starts from -----------------------------------------------------------------------------
class QueryRecorder(PrefillObserver):
    """The model's own attention that keeps, per layer, every row's last ``window`` queries (what
    ``compress_after_prefill`` observes; :func:`observe_row` only reads those) and the softmax scale."""

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = self.original_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
        self.layers[module.layer_idx] = (query[:, :, -self.window:].detach().clone(), scaling)
        return out


@dataclass
class Source:
    """A full-precision prefill: ``ids`` ``[B, C + 1]`` (the context and ``t0``), ``keys``/``values`` per layer
    ``[B, kv_heads, C, D]``, ``queries`` per layer ``[B, q_heads, window, D]``, ``scaling``, prefill seconds."""

    ids: torch.Tensor
    keys: list
    values: list
    queries: list
    scaling: float
    prefill_wall: float
    prefill_cpu: float

    @property
    def context(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0])


@torch.no_grad()
def prefill(model: Any, stream: torch.Tensor, context: int, batch: int, observe: int) -> Source:
    ids = stream[: context * batch].reshape(batch, context)
    cache = DynamicCache(config=model.config)
    w, c = time.perf_counter(), time.process_time()
    with QueryRecorder(model, observe) as rec:
        out = forward(model, cache, ids)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    L = len(cache.layers)
    if len(rec.layers) != L:
        raise RuntimeError(f"observed {len(rec.layers)} of {L} layers")
    t0 = out.logits[:, -1].argmax(-1, keepdim=True)
    return Source(torch.cat([ids, t0], dim=1), [cache.layers[i].keys for i in range(L)],
                  [cache.layers[i].values for i in range(L)], [rec.layers[i][0] for i in range(L)],
                  rec.layers[0][1], wall, cpu)


def joint_plans(src: Source, press: Any, retentions) -> dict[float, list[Plan]]:
    """``{retention: [plan per row]}``: the token plans ``compress_after_prefill`` (options of ``press``) makes for
    each row of the prefill, one weighting per row shared by the retentions."""
    plans: dict[float, list[Plan]] = {r: [] for r in retentions}
    L = len(src.keys)
    for b in range(src.batch):
        k = torch.stack([src.keys[i][b] for i in range(L)])
        v = torch.stack([src.values[i][b] for i in range(L)])
        obs = [observe_row(src.queries[i][b], src.keys[i][b], src.values[i][b], press.observe, src.scaling)
               for i in range(L)]
        q, p, o = (torch.stack([x[j] for x in obs]) for j in range(3))
        pre = Prefill(keys=k.float(), values=v.float(), queries=q, probs=p, outputs=o, scaling=obs[0][3],
                      window=press.observe)
        weights = token_weights(pre, method=press.method, pool=press.pool)
        del p, obs
        for r in retentions:
            plans[r].append(allocate_joint(weights, pre.keys, pre.values, retention=r, menu=press.menu,
                                           quantizer=press.quantizer, sink=press.sink, window=press.window))
    return plans


# ---- the caches ------------------------------------------------------------------------------------------------------
def fill(cache: Any, src: Source) -> Any:
    """``cache`` holding the prefill's K/V, filled as a prefill forward fills it (one ``update`` per layer)."""
    for i, (k, v) in enumerate(zip(src.keys, src.values)):
        cache.update(k, v, i)
    return cache


def dense_nbytes(cache: Any) -> int:
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)


def quanto_cache(config: Any, nbits: int) -> Any:
    from transformers import QuantizedCache

    return QuantizedCache("quanto", config, nbits=nbits)


def packed_nbytes(cache: Any, spec: dict) -> int:
    """A ``PackedHeadCache``'s bytes, asserted equal to its prediction and, at the run's length, to the bytes per
    sequence its plan was chosen for."""
    assert cache.nbytes == cache.predicted_nbytes, (cache.nbytes, cache.predicted_nbytes)
    if cache.get_seq_length() == spec["tokens_held"]:
        rows = cache.layers[0].batch
        assert cache.nbytes == rows * spec["bytes_per_row"], (cache.nbytes, rows, spec["bytes_per_row"])
    return cache.nbytes


def joint_nbytes(cache: Any) -> int:
    assert cache.compressed_nbytes == cache.predicted_nbytes, (cache.compressed_nbytes, cache.predicted_nbytes)
    return cache.nbytes  # the compressed prefixes and the decoded tokens at 2 bytes per element


@dataclass
class Variant:
    """A cache of the benchmark: ``spec`` (what to build) and the plans it needs."""

    name: str
    kind: str  # "dynamic", "quanto", "packed", "joint"
    spec: dict
    plans: list | None = None


def build(variant: Variant, model: Any, src: Source) -> tuple[Any, Any]:
    """``(cache, context manager to decode under)`` for ``variant`` from the prefill ``src``."""
    cfg = model.config
    if variant.kind == "dynamic":
        return fill(DynamicCache(config=cfg), src), None
    if variant.kind == "quanto":
        return fill(quanto_cache(cfg, variant.spec["nbits"]), src), None
    if variant.kind == "packed":
        cache = fill(PackedHeadCache(variant.plans[0], cfg), src)
        return cache, (PackedAttention(model) if variant.spec.get("fused") else None)
    if variant.kind == "joint":
        L = len(src.keys)
        rows = [(torch.stack([src.keys[i][b] for i in range(L)])[:, None],
                 torch.stack([src.values[i][b] for i in range(L)])[:, None], plan)
                for b, plan in enumerate(variant.plans)]
        cache = CompressedCache.compress_rows(rows, variant.spec["quantizer"], tokens=src.context)
        return cache, JointAttention(model)
    raise ValueError(f"unknown cache kind {variant.kind!r}")


def nbytes_of(variant: Variant, cache: Any) -> int:
    if variant.kind == "dynamic":
        return dense_nbytes(cache)
    if variant.kind == "quanto":
        return _peer.quanto_nbytes(cache)["bytes"]
    if variant.kind == "packed":
        return packed_nbytes(cache, variant.spec)
    return joint_nbytes(cache)


@torch.no_grad()
def decode(model: Any, variant: Variant, src: Source, tokens: int, on_first=None) -> dict:
    """Build ``variant``'s cache from ``src`` and generate ``tokens`` greedy tokens from ``[ids, t0]``."""
    cache, swap = build(variant, model, src)
    gc.collect()
    clock = StepClock(on_first)
    gen = {"attention_mask": torch.ones_like(src.ids), "max_new_tokens": tokens, "min_new_tokens": tokens,
           "do_sample": False, "stopping_criteria": StoppingCriteriaList([clock]),
           "pad_token_id": model.generation_config.eos_token_id}
    if swap is None:
        out = generate(model, cache, src.ids, **gen)
    else:
        with swap:
            out = generate(model, cache, src.ids, **gen)
    wall, cpu = clock.per_token()
    held_tokens = int(cache.get_seq_length())
    if held_tokens != src.context + tokens:
        raise RuntimeError(f"{variant.name}: the cache holds {held_tokens} tokens after generating {tokens}, "
                           f"expected {src.context + tokens}")
    return {"wall": wall, "cpu": cpu, "bytes": nbytes_of(variant, cache), "tokens": out[:, src.ids.shape[1]:]}


def variants(model: Any, facts: Any, src: Source, calibration: Any, tokens: int, quanto: bool,
             press: Any) -> tuple[list[Variant], dict]:
    """The caches of one configuration, their plans made, and facts about the matching (JSON)."""
    held = src.context + tokens
    out = [Variant(REFERENCE, "dynamic", {"kind": "dynamic"})]
    info: dict = {}
    if quanto:
        for nbits in (4, 2):
            out.append(Variant(f"QuantizedCache quanto {nbits}-bit (group 64, residual 128)", "quanto",
                               {"kind": "quanto", "nbits": nbits}))
    uniform = uniform_plan(facts, "kivi", 4, tokens=held)
    out.append(Variant("PackedHeadCache, uniform 4-bit KIVI", "packed",
                       {"kind": "packed", "bytes_per_row": _peer.held_bytes(uniform, model.config, held),
                        "tokens_held": held}, [uniform]))
    out.append(Variant("PackedHeadCache, uniform 4-bit KIVI, PackedAttention", "packed",
                       dict(out[-1].spec, fused=True), [uniform]))
    if quanto:  # the quanto 4-bit row's bytes per sequence after the run, by driving one on the prefill's first row
        one = Source(src.ids[:1], [k[:1] for k in src.keys], [v[:1] for v in src.values], [], src.scaling, 0, 0)
        qc = fill(quanto_cache(model.config, 4), one)
        g = torch.Generator().manual_seed(0)
        for _ in range(tokens):
            x = torch.randn(src.keys[0][:1, :, :1].shape, generator=g)
            for i in range(len(src.keys)):
                qc.update(x, x, i)
        target, label = _peer.quanto_nbytes(qc)["bytes"], "quanto 4-bit"
    else:
        target, label = out[-1].spec["bytes_per_row"], "uniform 4-bit"
    menu = calibration.menu("kivi")
    sizes, meta = head_costs(facts, "kivi", held)
    overhead = float(meta.sum() / sizes.sum())  # metadata bits per element, charged in the average
    m = _peer.match_budget(lambda bits: allocate_plan(calibration, "kivi", bits, tokens=held), model.config, held,
                           target, low=min(menu) + overhead, high=max(menu) + overhead, tolerance=4e-3)
    info["calibrated"] = {"average_bits_charged": m.average_bits, "bytes_per_row": m.nbytes, "target_per_row": target,
                          "matched_to": label, "budgets_tried": m.tried, "tokens_held": held}
    out.append(Variant(f"PackedHeadCache, calibrated KIVI plan at {label} bytes", "packed",
                       {"kind": "packed", "bytes_per_row": m.nbytes, "tokens_held": held}, [m.plan]))
    out.append(Variant(f"PackedHeadCache, calibrated KIVI plan at {label} bytes, PackedAttention", "packed",
                       dict(out[-1].spec, fused=True), [m.plan]))
    plans = joint_plans(src, press, RETENTIONS)
    for r in RETENTIONS:
        out.append(Variant(f"compress_after_prefill, retention {100 * r:g} %", "joint",
                           {"kind": "joint", "retention": r, "quantizer": press.quantizer.name}, plans[r]))
    return out, info


# ---- the one-call check ----------------------------------------------------------------------------------------------
@torch.no_grad()
def check_one_call(model: Any, src: Source, joint: list[Variant], tokens: int) -> list[str]:
    """Each joint row equals ``with compress_after_prefill(model, retention=r): generate(ids)``: plans, compressed
    bytes and tokens (its first new token is ``t0``, the prefill's own)."""
    notes = []
    for v in joint:
        ref = decode(model, v, src, tokens)
        cache, _ = build(v, model, src)
        with compress_after_prefill(model, retention=v.spec["retention"]) as press:
            out = model.generate(src.ids[:, :-1], attention_mask=torch.ones_like(src.ids[:, :-1]),
                                 max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                                 pad_token_id=model.generation_config.eos_token_id)
        for mine, theirs in zip(v.plans, press.plans):
            assert np.array_equal(mine.key, theirs.key) and np.array_equal(mine.value, theirs.value), v.name
        assert press.cache.compressed_nbytes == cache.compressed_nbytes, (press.cache.compressed_nbytes,
                                                                         cache.compressed_nbytes)
        new = out[:, src.ids.shape[1] - 1:]
        assert torch.equal(new[:, :1], src.ids[:, -1:]), "the one call's first token is not the prefill's argmax"
        assert torch.equal(new[:, 1:], ref["tokens"]), f"{v.name}: the one call generated other tokens"
        notes.append(f"{v.name}: same plans, {cache.compressed_nbytes:,d} compressed bytes and the same "
                     f"{tokens} tokens as `with compress_after_prefill(model, retention={v.spec['retention']:g}): "
                     f"generate` at {src.context} x {src.batch}.")
    return notes


# ---- memory ----------------------------------------------------------------------------------------------------------
def measure_memory(model: Any, variant: Variant, src: Source, tokens: int) -> dict:
    """RSS of ``variant`` in this (warm) process, above a baseline taken after trimming the heap: ``held`` after
    building the cache, ``build_peak`` while building, ``decode_peak`` over the decode steps after the first."""
    trim_heap()
    baseline = rss_bytes()
    reset_peak_rss()
    cache, swap = build(variant, model, src)
    trim_heap()
    built_peak, held = peak_rss_bytes(), rss_bytes()
    del cache, swap
    trim_heap()

    def start_decode_peak():  # after the first step: the decode steps alone
        trim_heap()
        reset_peak_rss()

    r = decode(model, variant, src, tokens, on_first=start_decode_peak)
    peak = peak_rss_bytes()
    return {"baseline": baseline, "held": held - baseline, "build_peak": built_peak - baseline,
            "decode_peak": peak - baseline, "bytes": r["bytes"], "tokens": tokens}


# ---- one configuration -----------------------------------------------------------------------------------------------
def measure(model: Any, facts: Any, stream: torch.Tensor, calibration: Any, context: int, batch: int, tokens: int,
            repeats: int, quanto: bool, memory_tokens: int, check: bool) -> tuple[list[dict], dict, list[str]]:
    press = compress_after_prefill(model, retention=RETENTIONS[0])  # the one call's options (not entered)
    src = prefill(model, stream, context, batch, press.observe)
    print(f"{context} x {batch}: prefill {src.prefill_cpu:.1f} s CPU", flush=True)
    t = time.process_time()
    vs, info = variants(model, facts, src, calibration, tokens, quanto, press)
    print(f"{context} x {batch}: plans {time.process_time() - t:.1f} s CPU", flush=True)
    notes = check_one_call(model, src, [v for v in vs if v.kind == "joint"], tokens) if check else []
    best: dict = {}
    for _ in range(repeats):  # round robin
        for v in vs:
            r = decode(model, v, src, tokens)
            b = best.setdefault(v.name, {**r, "runs": []})
            b["runs"].append({"wall": r["wall"], "cpu": r["cpu"]})
            b["wall"], b["cpu"] = min(b["wall"], r["wall"]), min(b["cpu"], r["cpu"])
            assert b["bytes"] == r["bytes"], (v.name, b["bytes"], r["bytes"])
    mem: dict = {}
    if memory_tokens:  # after the timed runs: every code path warm, weights paged in
        for v in vs:
            mem[v.name] = measure_memory(model, v, src, memory_tokens)
    ref = best[REFERENCE]
    rows = []
    for v in vs:
        r = best[v.name]
        m = mem.get(v.name, {})
        row = {"context": context, "batch": batch, "cache": v.name, "kind": v.kind,
               "ms_per_token_cpu": 1e3 * r["cpu"], "ms_per_token_wall": 1e3 * r["wall"],
               "x_dynamic_cpu": r["cpu"] / ref["cpu"], "x_dynamic_wall": r["wall"] / ref["wall"],
               "runs": r["runs"], "bytes": r["bytes"], "bytes_over_fp16": r["bytes"] / ref["bytes"],
               "same_tokens_as_dynamic": float((r["tokens"] == ref["tokens"]).float().mean()),
               "prefill_cpu_s": src.prefill_cpu, "prefill_wall_s": src.prefill_wall,
               **{f"rss_{k}": m[k] for k in ("baseline", "held", "build_peak", "decode_peak") if k in m},
               **({"memory_run": {"tokens": m["tokens"], "bytes": m["bytes"]}} if m else {})}
        rows.append(row)
        print(f"{context:>6} {batch:>2}  {v.name:<62} cpu {row['ms_per_token_cpu']:8.1f} ms "
              f"x{row['x_dynamic_cpu']:5.2f}  wall {row['ms_per_token_wall']:8.1f} ms "
              f"x{row['x_dynamic_wall']:5.2f}  {r['bytes']:>13,d} B "
              f"({100 * row['bytes_over_fp16']:5.1f} %)"
              + (f"  held {m['held'] / 2**20:7.1f} MiB peak {m['decode_peak'] / 2**20:7.1f} MiB" if m else ""),
              flush=True)
    return rows, info, notes


# ---- output ----------------------------------------------------------------------------------------------------------
def _mib(x) -> str:
    return "" if x is None else f"{x / 2**20:.1f}"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        f"Decoding with transformers caches: {res['model']} (float32), greedy `generate`, {res['tokens']} new tokens "
        f"after each context; torch {env['packages'].get('torch', '?')}, 1 thread, on a {os.cpu_count()}-core CPU "
        f"**shared with other jobs** (load average at start {res['load_start']}, at end {res['load_end']}). "
        f"Time per token: the decode steps after the first (prefill and cache construction excluded), process CPU "
        f"time and wall time, best of {res['repeats']} runs interleaved round robin; the ratios to DynamicCache are "
        f"measured side by side in this run (CPU time is the figure to read here: it does not count time other jobs "
        f"held the core). Bytes held: docs/design.md §5 (2 bytes per full-precision element); rdalloc caches' bytes "
        f"equal `predicted_nbytes` (asserted in the run). RSS (MiB; each configuration runs in a fresh process; per "
        f"cache, after its timed runs, one more run of {res['memory_tokens']} tokens above a baseline taken after "
        f"trimming the heap with the model and the prefill's K/V held): `held` after building the cache (float32: a "
        f"full-precision element is 4 bytes here), `peak` the peak RSS over the decode steps after the first (the "
        f"cache, its growth and every transient of a step).", "",
        "| context | batch | cache | CPU ms / token | x Dynamic (CPU) | wall ms / token | x Dynamic (wall) | "
        "bytes held | / FP16 | RSS held MiB | RSS peak decoding MiB | same tokens as Dynamic |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['context']} | {r['batch']} | {r['cache']} | {r['ms_per_token_cpu']:.1f} | "
                     f"{r['x_dynamic_cpu']:.2f} | {r['ms_per_token_wall']:.1f} | {r['x_dynamic_wall']:.2f} | "
                     f"{r['bytes']:,d} | {100 * r['bytes_over_fp16']:.1f} % | {_mib(r.get('rss_held'))} | "
                     f"{_mib(r.get('rss_decode_peak'))} | {100 * r['same_tokens_as_dynamic']:.0f} % |")
    lines += ["", "Calibrated plans (bytes per sequence after the run):", ""]
    for key, c in res["calibrated"].items():
        lines.append(f"* {key}: {c['average_bits_charged']:.3f} average bits charged, {c['bytes_per_row']:,d} bytes "
                     f"against {c['matched_to']}'s {c['target_per_row']:,d} ({c['tokens_held']} tokens held)")
    prefill = {f"{r['context']}x{r['batch']}": r["prefill_cpu_s"] for r in res["rows"]}
    lines += ["", "Prefill CPU seconds (once per configuration, full precision): "
              + ", ".join(f"{k} {v:.1f}" for k, v in prefill.items()) + ".", "", *res["notes"], "",
              f"Command: `{res['command']}` ({res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU of the "
              f"configurations' processes).", "", f"Environment: `{json.dumps(env)}`", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(r["cache"] for r in res["rows"]))
    colors = dict(zip(names, plt.cm.tab10.colors))
    for name in names:
        for batch, style in ((1, "-o"), (4, "--s")):
            rs = sorted((r for r in res["rows"] if r["cache"] == name and r["batch"] == batch),
                        key=lambda r: r["context"])
            if not rs:
                continue
            x = [r["context"] for r in rs]
            label = f"{name}, batch {batch}"
            axes[0].plot(x, [r["ms_per_token_cpu"] for r in rs], style, color=colors[name], label=label)
            axes[1].plot(x, [r["bytes"] / 2**20 for r in rs], style, color=colors[name], label=label)
    for ax, ylabel in zip(axes, ("CPU ms per new token (1 thread)", "bytes held after decoding (MiB, FP16 = 2 B)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("time per token (decode only)")
    axes[1].set_title("bytes held")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(f"{res['model']}, float32 CPU (shared machine): solid batch 1, dashed batch 4")
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_config(context: int, batch: int, tokens: int, repeats: int, memory_tokens: int, check: bool) -> None:
    """The child: one configuration in a fresh process; prints its result as one ``RESULT {json}`` line."""
    torch.set_num_threads(1)
    loaded = load_model(progress=False)
    stream = tokenize(default_text(), loaded.tokenizer)
    rows, info, notes = measure(loaded.model, loaded.facts, stream, Calibration.load(CALIBRATION), context, batch,
                                tokens, repeats, _peer.quanto_available(), memory_tokens, check)
    print("RESULT " + json.dumps({"rows": rows, "info": info, "notes": notes}), flush=True)


def spawn_config(context: int, batch: int, a: argparse.Namespace, check: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{context}x{batch}", "--tokens", str(a.tokens),
           "--repeats", str(a.repeats), "--memory-tokens", str(a.memory_tokens)] + (["--check"] if check else [])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:  # progress passes through
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            print(line, end="", flush=True)
    if p.wait() or result is None:
        raise RuntimeError(f"configuration {context}x{batch} failed (exit {p.returncode})")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1024x1,1024x4,4096x1,8192x1,4096x4,8192x4",
                   help="context x batch, comma-separated, run in this order")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per timed generate (at least 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per cache (best of)")
    p.add_argument("--memory-tokens", type=int, default=3,
                   help="new tokens of the memory run per cache (0: no memory measurement)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.tokens < 2:
        p.error(f"--tokens must be at least 2 (the steps after the first are timed), got {a.tokens}")
    if a.memory_tokens == 1 or a.memory_tokens < 0:
        p.error(f"--memory-tokens must be 0 (skip) or at least 2, got {a.memory_tokens}")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    configs = []
    for item in (a.child or a.configs).split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if m is None or int(m.group(1)) < 512 or int(m.group(2)) < 1:
            p.error(f"--configs takes CONTEXTxBATCH items (context >= 512, batch >= 1), got {item!r}")
        configs.append((int(m.group(1)), int(m.group(2))))
    if a.child:
        run_config(*configs[0], a.tokens, a.repeats, a.memory_tokens, a.check)
        return
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    cmd = (f"HF_HUB_OFFLINE=1 python benchmarks/hf_caches.py --configs {a.configs} --tokens {a.tokens} "
           f"--repeats {a.repeats} --memory-tokens {a.memory_tokens}")
    env = environment(torch.float32)
    env["torch_threads"] = 1
    a.out.mkdir(parents=True, exist_ok=True)
    rows, calibrated = [], {}
    notes = [] if _peer.quanto_available() else [
        "QuantizedCache (quanto) skipped: optimum-quanto is not installed (`.venv/bin/python -m pip install "
        "--no-deps optimum-quanto`); the calibrated plan matched to the uniform 4-bit plan's bytes instead."]
    for i, (context, batch) in enumerate(configs):
        r = spawn_config(context, batch, a, check=i == 0)
        rows += r["rows"]
        calibrated[f"{context}x{batch}"] = r["info"]["calibrated"]
        notes += r["notes"]
        done = [] if i + 1 == len(configs) else [f"Partial: {i + 1} of {len(configs)} configurations done."]
        res = {"model": "SmolLM2-135M-Instruct", "tokens": a.tokens, "repeats": a.repeats,
               "memory_tokens": a.memory_tokens, "rows": rows, "calibrated": calibrated, "notes": notes + done,
               "command": cmd, "seconds": time.perf_counter() - t0,
               "cpu_seconds": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
               + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, "load_start": load_start,
               "load_end": [round(x, 2) for x in os.getloadavg()], "machine": platform.machine(),
               "shared_machine": True, "environment": env}
        (a.out / "hf_caches.json").write_text(json.dumps(res, indent=1) + "\n")  # after each configuration
        (a.out / "hf_caches.md").write_text(markdown(res))
        plot(res, a.out / "hf_caches.png")


if __name__ == "__main__":
    main()
