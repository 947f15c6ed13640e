"""Plan files at scale: save and load time and file size, JSON against the compact binary ``.npz`` form.

    python benchmarks/plan_io.py              # head plan 32 x 8; token plans 32 x 8 x 4096 and 32 x 8 x 32768
    python benchmarks/plan_io.py --quick      # head plan and 32 x 8 x 4096 only (prints only)

A token plan here is what joint compression writes: value widths per (layer, kv_head, token), key widths per
(layer, kv_head, channel) with head_dim 64; one more row holds per-token keys too (twice the widths, the largest plan
rdalloc can write). Value widths are drawn i.i.d. from a retention-like mix: 0 (evicted) 50 %, 2 bits 20 %, 3 and 4
bits 10 % each, 8 and 16 bits 5 % each; key widths uniform over the nonzero ones (per token: 0 where the value is 0).
The head plan is a solved ``allocate`` over 32 x 8 key heads and 32 x 8 value heads (certificate, usage and meta
recorded). Each timing is the best of ``--repeat`` runs of :meth:`rdalloc.Plan.save` / :meth:`rdalloc.Plan.load` on
a local disk (page cache warm: what is measured is encoding, hashing and parsing, not the disk). For comparison, one
row per token plan times numpy's deflated archive (``np.savez_compressed``) of the same two arrays alone: the smaller
file rdalloc does not write, because compressing costs far more time than it saves space.

Writes benchmarks/results/plan_io.md and plan_io.json (with the command and ``rdalloc.environment()``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rdalloc import ExponentialModel, Plan, allocate
from rdalloc.cost import Usage
from rdalloc.environment import environment

OUT = Path(__file__).resolve().parent / "results"
TOKEN = ("layer", "kv_head", "token")
CHANNEL = ("layer", "kv_head", "channel")
WIDTHS, SHARES = (0, 2, 3, 4, 8, 16), (0.5, 0.2, 0.1, 0.1, 0.05, 0.05)


def head_plan(layers: int = 32, heads: int = 8) -> Plan:
    rng = np.random.default_rng(0)
    alpha = rng.lognormal(0.0, 1.5, 2 * layers * heads)
    model = ExponentialModel(alpha, 4.0, eviction=2 * alpha, quantizer="kivi")
    alloc = allocate(model, 64.0 * 4096, average_bits=3.0, metadata=2 * 4096.0, menu=(0, 2, 3, 4, 8, 16))
    return Plan.from_allocation(alloc, (layers, heads), model=model,
                                meta={"model": "synthetic", "head_dim": 64, "menu": [0, 2, 3, 4, 8, 16]})


def token_plan(layers: int, heads: int, tokens: int, *, token_keys: bool = False) -> Plan:
    rng = np.random.default_rng(0)
    value = rng.choice(WIDTHS, size=(layers, heads, tokens), p=SHARES).astype(np.int8)
    if token_keys:
        key, key_axes = np.where(value == 0, 0, rng.choice(WIDTHS[1:], size=value.shape)).astype(np.int8), TOKEN
    else:
        key, key_axes = rng.choice(WIDTHS[1:], size=(layers, heads, 64)).astype(np.int8), CHANNEL
    usage = Usage.of(np.concatenate([key.ravel(), value.ravel()]), 64.0, 2.0)
    return Plan(key=key, value=value, key_axes=key_axes, value_axes=TOKEN, quantizer="kivi",
                budget_bits=usage.total_bits,
                usage=usage, predicted_distortion=1.0, certificate={"gap": 0.0},
                meta={"model": "synthetic", "head_dim": 64, "menu": list(WIDTHS),
                      "quantizer_spec": {"name": "kivi", "group_size": 32}})


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(name: str, plan: Plan, folder: Path, repeat: int) -> list[dict]:
    rows = []
    for form in ("json", "npz"):
        path = folder / f"plan.{form}"
        save = best(lambda: plan.save(path), repeat)
        loaded = []
        load = best(lambda: loaded.append(Plan.load(path)), repeat)
        assert loaded[-1] == plan, f"{name} {form}: the loaded plan differs"
        rows.append({"plan": name, "form": form, "bytes": path.stat().st_size, "save_s": save, "load_s": load})
        print(f"  {name:>16} {form:>4}: {path.stat().st_size / 1e6:8.3f} MB  save {save * 1e3:9.1f} ms  "
              f"load {load * 1e3:9.1f} ms", flush=True)
    if plan.granularity == "token":
        path = folder / "deflated.npz"
        key, value = plan.key.astype(np.uint8), plan.value.astype(np.uint8)
        save = best(lambda: np.savez_compressed(path, key=key, value=value), repeat)

        def read():
            with np.load(path, allow_pickle=False) as z:
                z["key"], z["value"]

        rows.append({"plan": name, "form": "deflated arrays (comparison)", "bytes": path.stat().st_size,
                     "save_s": save, "load_s": best(read, repeat)})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    json_of = {r["plan"]: r for r in rows if r["form"] == "json"}
    lines = [f"Command: `{command}` (best of the repetitions; one process, local disk, page cache warm)", "",
             "| plan | form | file | save | load | size vs JSON | save, load vs JSON |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        j = json_of[r["plan"]]
        lines.append(f"| {r['plan']} | {r['form']} | {r['bytes'] / 1e6:.3f} MB | {r['save_s'] * 1e3:.1f} ms | "
                     f"{r['load_s'] * 1e3:.1f} ms | {r['bytes'] / j['bytes']:.3f} | "
                     f"{r['save_s'] / j['save_s']:.4f}, {r['load_s'] / j['load_s']:.4f} |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"numpy {np.__version__}, Python {sys.version.split()[0]}, load average at the end {load} on "
              f"{os.cpu_count()} CPUs (a shared machine: absolute times move with the load; the forms were timed side "
              f"by side). Value widths i.i.d. from {dict(zip(WIDTHS, SHARES))}; key widths per channel (head_dim 64), "
              f"or per token where the row says so (0 where the value is 0, else uniform over the nonzero widths). "
              f"Both forms are checked to load to the plan saved. The deflated row times `np.savez_compressed` of the "
              f"two uint8 arrays alone (no header, no digest): what compressing would cost."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the head plan and 32 x 8 x 4096 only; prints only")
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs (default 3)")
    args = parser.parse_args()
    plans = [("head 32x8", head_plan), ("token 32x8x4096", lambda: token_plan(32, 8, 4096))]
    if not args.quick:
        plans += [("token 32x8x32768", lambda: token_plan(32, 8, 32768)),
                  ("token 32x8x32768, per-token keys", lambda: token_plan(32, 8, 32768, token_keys=True))]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, make in plans:
            rows += measure(name, make(), Path(folder), args.repeat)
    command = " ".join(["python", "benchmarks/plan_io.py", *sys.argv[1:]])
    text = markdown(rows, command)
    print(text)
    if not args.quick:
        OUT.mkdir(exist_ok=True)
        (OUT / "plan_io.md").write_text(text)
        (OUT / "plan_io.json").write_text(json.dumps({"command": command, "environment": environment(),
                                                      "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
