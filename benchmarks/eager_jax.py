"""Eager JAX calls of ``allocate``: compiled once per shape and settings, against tracing the loops on every call.

    python benchmarks/eager_jax.py

An eager call (JAX arrays, no ``jax.jit`` around it) used to run the solver's ``lax.while_loop`` bodies as fresh
closures, traced and compiled again on every call. ``allocate`` now runs them in one cached ``jax.jit`` per shape and
settings. "per call" is the median of 5 calls with other budgets (and, for the cached path, after the first call);
both paths give the same bits. Prints a markdown table and writes benchmarks/results/eager_jax.{md,json}.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results"
MENU = (0, 2, 4, 8, 16)


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from rdalloc import ExponentialModel, allocate
    from rdalloc.environment import environment

    solver = importlib.import_module("rdalloc.allocate")

    def traced_each_call(model, n, avg):  # the path before: the checked problem, loops traced on every call
        p = solver.allocate_iv(model, n, None, avg, None, 1.0, MENU, 32.0, None, None, 0)
        return solver._allocate(model, p.sizes, p.weights, p.metadata, p.lo, p.hi, p.groups, p.budget, p.elements,
                                menu=MENU, max_fill=None, max_nodes=0)

    lines = ["| N | first call, cached (s) | per call, cached (ms) | per call, traced each time (ms) | ratio |",
             "|---:|---:|---:|---:|---:|"]
    rows = []
    for N in (5, 300, 10_000):
        rng = np.random.default_rng(N)
        alpha = jnp.asarray(rng.lognormal(0, 1, N))
        model = ExponentialModel(alpha, 4.0, eviction=2 * alpha)
        n = jnp.full(N, 64.0)
        t = time.perf_counter()
        allocate(model, n, average_bits=3.0, metadata=32.0, menu=MENU).bits.block_until_ready()
        first = time.perf_counter() - t
        times = {"cached": [], "traced": []}
        for avg in (2.5, 2.75, 3.25, 3.5, 3.75):
            t = time.perf_counter()
            a = allocate(model, n, average_bits=avg, metadata=32.0, menu=MENU)
            a.bits.block_until_ready()
            times["cached"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = traced_each_call(model, n, avg)
            b.bits.block_until_ready()
            times["traced"].append(time.perf_counter() - t)
            assert np.array_equal(np.asarray(a.bits), np.asarray(b.bits))
        cached, traced = (float(np.median(times[k])) for k in ("cached", "traced"))
        rows.append({"N": N, "first_s": first, "cached_s": cached, "traced_s": traced})
        lines.append(f"| {N} | {first:.2f} | {cached * 1e3:.1f} | {traced * 1e3:.0f} | {traced / cached:.0f}x |")
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    command = "python benchmarks/eager_jax.py"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eager_jax.md").write_text(f"Command: `{command}` (ratios measured side by side in one run)\n\n"
                                      + "\n".join(lines) + "\n")
    (OUT / "eager_jax.json").write_text(json.dumps({"command": command, "rows": rows,
                                                    "environment": environment()}, indent=1))


if __name__ == "__main__":
    main()
