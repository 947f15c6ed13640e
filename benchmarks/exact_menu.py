"""The menu solver's exact phase: how often it proves optimality, and what it costs next to the hull solve.

    python benchmarks/exact_menu.py            # N = 10 .. 1e4 random instances, then N = 1e6 side by side
    python benchmarks/exact_menu.py --quick    # fewer instances, no N = 1e6

Random instances like the oracle tests': exponential curves, eviction off the curve, metadata, unequal integer sizes,
menus {0..6, 8, 16}, {0, 2, 4, 8, 16} and {2..8} in turn, a budget drawn between the cheapest and the richest
allocation. "hull" is ``allocate(..., max_nodes=0)`` (threshold and greedy fill only: the solver before the exact
phase), "exact" the default; both timed in the same run, best of 3 at N = 1e6. Prints a markdown table and
writes it, with the environment, to benchmarks/results/exact_menu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rdalloc import ExponentialModel, allocate
from rdalloc.allocate import OPTIMAL
from rdalloc.cost import item_cost
from rdalloc.environment import environment

OUT = Path(__file__).resolve().parent / "results"

MENUS = [(0, 1, 2, 3, 4, 5, 6, 8, 16), (0, 2, 4, 8, 16), (2, 3, 4, 5, 6, 7, 8)]


def instance(seed: int, n_items: int):
    rng = np.random.default_rng(seed)
    menu = MENUS[seed % 3]
    alpha = rng.lognormal(0.0, 1.5, n_items)
    ev = alpha * rng.uniform(0.0, 3.0, n_items) if 0 in menu else None
    model = ExponentialModel(alpha, rng.uniform(1.5, 6.0, n_items), eviction=ev)
    n, m = rng.integers(1, 128, n_items).astype(float), rng.integers(0, 64, n_items).astype(float)
    w = rng.uniform(0.0, 3.0, n_items)
    costs = [item_cost(b, n, m) for b in menu]
    lo, hi = float(np.sum(np.minimum.reduce(costs))), float(np.sum(np.maximum.reduce(costs)))
    budget = float(np.floor(lo + rng.uniform(0.0, 1.0) * (hi - lo)))
    return model, dict(sizes=n, budget=budget, weights=w, menu=menu, metadata=m)


def timed(model, kw, repeat=1, **extra):
    best, r = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        r = allocate(model, **kw, **extra)
        best = min(best, time.perf_counter() - t)
    return best, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    counts = {10: 60, 100: 60, 1000: 30, 10_000: 12} if not args.quick else {10: 15, 100: 15, 1000: 6, 10_000: 3}
    say("| N | instances | proven optimal | improved on hull | median hull s | median exact s | median extra |"
        " max nodes |")
    say("|---|---|---|---|---|---|---|---|")
    for N, count in counts.items():
        proven = improved = 0
        t_hull, t_exact, nodes = [], [], []
        for seed in range(count):
            model, kw = instance(1000 * N + seed, N)
            th, rh = timed(model, kw, max_nodes=0)
            te, re = timed(model, kw)
            proven += int(re.status) == OPTIMAL
            improved += float(re.distortion) < float(rh.distortion) * (1 - 1e-12)
            t_hull.append(th), t_exact.append(te), nodes.append(int(re.nodes))
        extra = np.median(np.array(t_exact) / np.array(t_hull))
        say(f"| {N} | {count} | {proven} ({proven / count:.0%}) | {improved} | {np.median(t_hull):.4f} | "
            f"{np.median(t_exact):.4f} | {extra:.2f}x | {max(nodes)} |")
    if not args.quick:
        n_million(say)
    OUT.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/exact_menu.py" + (" --quick" if args.quick else "")
    (OUT / "exact_menu.md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    (OUT / "exact_menu.json").write_text(json.dumps({"command": command, "table": lines,
                                                     "environment": environment()}, indent=1))
    print(f"wrote {OUT / 'exact_menu.md'} and exact_menu.json")


def n_million(say) -> None:
    say("\nN = 1e6, menu (0, 1, 2, 3, 4, 6, 8, 16), sizes 1..99, metadata 32, average 2.7 bits (best of 3):")
    rng = np.random.default_rng(7)
    N = 1_000_000
    alpha, beta = rng.lognormal(0, 2, N), rng.uniform(1.5, 6.0, N)
    model = ExponentialModel(alpha, beta, eviction=alpha * rng.uniform(0.2, 3.0, N))
    kw = dict(sizes=rng.integers(1, 100, N).astype(float), average_bits=2.7, weights=rng.uniform(0, 2, N),
              menu=(0, 1, 2, 3, 4, 6, 8, 16), metadata=32.0)
    for name, extra in (("hull (max_nodes=0)", dict(max_nodes=0)), ("exact (default)", {})):
        t, r = timed(model, kw, repeat=3, **extra)
        c = r.certificate()
        say(f"  {name:20s} {t:.3f} s  status {c['status']}  distortion {c['distortion']:.10g}  "
            f"gap {c['gap']:.3g} (relative {c['relative_gap']:.2g})  nodes {c['nodes']}")


if __name__ == "__main__":
    main()
