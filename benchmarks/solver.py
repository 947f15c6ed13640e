"""Solver scaling: rdalloc's continuous and menu solvers vs one elementwise pass, per backend, and vs cvxpy / HiGHS.

    python benchmarks/solver.py            # full table (N = 1e3 .. 1e7), about 10 minutes on 2 CPU cores
    python benchmarks/solver.py --quick    # N up to 1e5

Prints a markdown table and writes benchmarks/results/solver.json (with the machine described) and solver.png.
"passes" = solver time / time of one ``exp`` over the same arrays (N numbers for the continuous solve, the (N, K)
table for the menu solve), measured side by side in the same run, best of a few repetitions.

torch runs with ``--torch-threads`` intra-op threads (default 1, like numpy): on a small machine shared with other
jobs, OpenMP hand-offs between busy cores cost milliseconds per operation and swamp what is being measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from rdalloc import ExponentialModel, allocate, waterfill
from rdalloc.cost import item_cost
from rdalloc.environment import environment

MENU = (0, 1, 2, 3, 4, 5, 6, 8, 16)
OUT = Path(__file__).resolve().parent / "results"


def instance(n_items, seed=0):
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 1.5, n_items)
    beta = rng.uniform(2.0, 6.0, n_items)
    eviction = alpha * rng.uniform(0.3, 3.0, n_items)
    sizes = rng.integers(16, 128, n_items).astype(np.float64)
    weights = rng.uniform(0.1, 2.0, n_items)
    return alpha, beta, eviction, sizes, weights


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def backend(name):
    """(to_array, sync, exp) for a backend name."""
    if name == "numpy":
        return np.asarray, lambda x: x, np.exp
    if name == "torch":
        import torch

        return torch.asarray, lambda x: x, torch.exp
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    return jnp.asarray, lambda x: jax.block_until_ready(x), jax.jit(jnp.exp)


def jax_solvers():
    import jax

    cont = jax.jit(lambda a, b, n, w: waterfill(ExponentialModel(a, b), n, average_bits=3.0, weights=w))
    menu = jax.jit(lambda a, b, e, n, w: allocate(ExponentialModel(a, b, eviction=e), n, average_bits=3.0, weights=w,
                                                  menu=MENU, metadata=32.0))
    return cont, menu


def run_scaling(sizes, backends, menu_max):
    rows = []
    for name in backends:
        to, sync, exp = backend(name)
        solvers = jax_solvers() if name == "jax" else None
        for n_items in sizes:
            alpha, beta, ev, n, w = (to(x) for x in instance(n_items))
            ref = np.random.default_rng(1).uniform(-1.0, 1.0, n_items)  # exp of this neither overflows nor denormals
            ref_1, table = to(ref), to(np.tile(ref, (len(MENU), 1)))
            repeat = 3
            if name == "jax":
                cont = lambda: sync(solvers[0](alpha, beta, n, w).bits)  # noqa: E731
                menu = lambda: sync(solvers[1](alpha, beta, ev, n, w).bits)  # noqa: E731
                cont(), menu() if n_items <= menu_max else None  # compile outside the timing
            else:
                cont = lambda: waterfill(ExponentialModel(alpha, beta), n, average_bits=3.0, weights=w)  # noqa: E731
                menu = lambda: allocate(ExponentialModel(alpha, beta, eviction=ev), n, average_bits=3.0,  # noqa: E731
                                        weights=w, menu=MENU, metadata=32.0)
            t_exp = best_of(lambda: sync(exp(ref_1)), 5)
            t_exp_table = best_of(lambda: sync(exp(table)), 3)
            t_cont = best_of(cont, repeat)
            r = waterfill(ExponentialModel(alpha, beta), n, average_bits=3.0, weights=w) if name != "jax" else \
                solvers[0](alpha, beta, n, w)
            row = {"backend": name, "N": n_items, "exp_s": t_exp, "continuous_s": t_cont,
                   "continuous_passes": t_cont / t_exp, "continuous_iterations": int(r.iterations),
                   "kkt_residual": float(r.kkt_residual)}
            if n_items <= menu_max:
                t_menu = best_of(menu, repeat)
                a = menu() if name != "jax" else solvers[1](alpha, beta, ev, n, w)
                if name == "jax":
                    a = solvers[1](alpha, beta, ev, n, w)
                else:
                    a = allocate(ExponentialModel(alpha, beta, eviction=ev), n, average_bits=3.0, weights=w,
                                 menu=MENU, metadata=32.0)
                row.update(menu_s=t_menu, exp_table_s=t_exp_table, menu_passes=t_menu / t_exp_table,
                           menu_iterations=int(a.iterations), menu_fill_steps=int(a.fill_steps),
                           menu_relative_gap=a.relative_gap)
            rows.append(row)
            print(f"  {name:6s} N={n_items:>9,d}  continuous {t_cont * 1e3:9.2f} ms ({row['continuous_passes']:6.1f} "
                  f"passes)" + (f"  menu {row['menu_s'] * 1e3:9.2f} ms ({row['menu_passes']:6.1f} table passes)"
                                if "menu_s" in row else ""), flush=True)
    return rows


def run_oracles(sizes):
    import cvxpy as cp
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, eye, kron

    rows = []
    for n_items in sizes:
        alpha, beta, ev, n, w = instance(n_items, seed=1)
        model = ExponentialModel(alpha, beta)
        budget = 3.0 * n.sum()
        t_ours = best_of(lambda: waterfill(model, n, budget, weights=w), 5)
        ours = waterfill(model, n, budget, weights=w)
        b = cp.Variable(n_items)
        scale = n.mean()
        prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(w * alpha, cp.exp(-cp.multiply(np.log(beta), b))))),
                          [(n / scale) @ b <= budget / scale, b >= 1, b <= 8])
        for solver in (cp.CLARABEL, cp.SCS):  # CLARABEL is the accurate one; SCS if it gives up
            t = time.perf_counter()
            try:
                prob.solve(solver=solver)
            except cp.error.SolverError:
                continue
            finally:
                t_cvx = time.perf_counter() - t
            break
        rows.append({"problem": "continuous", "N": n_items, "rdalloc_s": t_ours, "oracle": f"cvxpy/{solver}",
                     "oracle_s": t_cvx, "speedup": t_cvx / t_ours,
                     "objective_rel_diff": (float(ours.distortion) - prob.value) / prob.value})
        print(f"  continuous N={n_items:>6,d}: rdalloc {t_ours * 1e3:8.2f} ms, cvxpy {t_cvx:8.2f} s, "
              f"{t_cvx / t_ours:9.0f}x, objective (ours - cvxpy)/cvxpy = {rows[-1]['objective_rel_diff']:.2e}",
              flush=True)
        em = ExponentialModel(alpha, beta, eviction=ev)
        t_ours = best_of(lambda: allocate(em, n, budget, weights=w, menu=MENU, metadata=32.0), 3)
        a = allocate(em, n, budget, weights=w, menu=MENU, metadata=32.0)
        D, ok = em.table(MENU)
        W = np.where(ok, w[:, None] * np.where(ok, D, 0.0), 0.0)
        C = np.stack([item_cost(bb, n, 32.0) for bb in MENU], axis=1)
        K = len(MENU)
        rows_a = kron(eye(n_items), np.ones((1, K)), format="csr")
        t = time.perf_counter()
        res = milp(W.ravel(), constraints=[LinearConstraint(rows_a, 1, 1),
                                           LinearConstraint(csr_matrix(C.ravel()[None, :]), -np.inf, budget)],
                   integrality=np.ones(n_items * K), bounds=Bounds(0, ok.ravel().astype(float)),
                   options={"time_limit": 120.0})
        t_milp = time.perf_counter() - t
        rows.append({"problem": "menu", "N": n_items, "rdalloc_s": t_ours, "oracle": "scipy.optimize.milp/HiGHS",
                     "oracle_s": t_milp, "speedup": t_milp / t_ours, "oracle_status": res.message,
                     "objective_rel_diff": (float(a.distortion) - res.fun) / res.fun, "rdalloc_gap": a.relative_gap})
        print(f"  menu       N={n_items:>6,d}: rdalloc {t_ours * 1e3:8.2f} ms, HiGHS  {t_milp:8.2f} s, "
              f"{t_milp / t_ours:9.0f}x, objective (ours - MILP)/MILP = {rows[-1]['objective_rel_diff']:.2e}, "
              f"certified gap {a.relative_gap:.1e}", flush=True)
    return rows


def markdown(scaling, oracles):
    lines = ["| backend | N | continuous ms | passes | menu ms | table passes | menu gap |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in scaling:
        menu = (f"{r['menu_s'] * 1e3:.1f} | {r['menu_passes']:.1f} | {r['menu_relative_gap']:.1e}"
                if "menu_s" in r else "– | – | –")
        lines.append(f"| {r['backend']} | {r['N']:,} | {r['continuous_s'] * 1e3:.2f} | {r['continuous_passes']:.1f} "
                     f"| {menu} |")
    lines += ["", "| problem | N | rdalloc ms | oracle | oracle s | speedup | objective (ours − oracle)/oracle |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for r in oracles:
        lines.append(f"| {r['problem']} | {r['N']:,} | {r['rdalloc_s'] * 1e3:.2f} | {r['oracle']} | "
                     f"{r['oracle_s']:.2f} | {r['speedup']:.0f}x | {r['objective_rel_diff']:.1e} |")
    return "\n".join(lines)


def plot(scaling, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r["backend"] for r in scaling}):
        rs = [r for r in scaling if r["backend"] == name]
        ax.loglog([r["N"] for r in rs], [r["continuous_s"] for r in rs], "o-", label=f"{name} continuous")
        rm = [r for r in rs if "menu_s" in r]
        ax.loglog([r["N"] for r in rm], [r["menu_s"] for r in rm], "s--", label=f"{name} menu")
    ref = [r for r in scaling if r["backend"] == "numpy"]
    ax.loglog([r["N"] for r in ref], [r["exp_s"] for r in ref], "k:", label="one exp pass (numpy)")
    ax.set_xlabel("items N")
    ax.set_ylabel("seconds")
    ax.set_title("rdalloc solver time vs N (CPU)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", default="numpy,torch,jax")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    if "torch" in args.backends:
        import torch

        torch.set_num_threads(args.torch_threads)
    load_start = __import__("os").getloadavg()
    sizes = [10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6, 10**7]
    print("scaling:")
    scaling = run_scaling(sizes, args.backends.split(","), menu_max=10**5 if args.quick else 10**6)
    print("oracles:")
    oracles = run_oracles([10**3] if args.quick else [10**3, 10**4])
    table = markdown(scaling, oracles)
    print()
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
               "cpus": __import__("os").cpu_count(), "numpy": np.__version__,
               "load_average_start": load_start, "load_average_end": __import__("os").getloadavg(),
               "torch_threads": args.torch_threads}
    (OUT / "solver.json").write_text(json.dumps({"machine": machine, "environment": environment(),
                                                 "command": "python benchmarks/solver.py", "scaling": scaling,
                                                 "oracles": oracles}, indent=1))
    (OUT / "solver.md").write_text(table + "\n")
    plot(scaling, OUT / "solver.png")


if __name__ == "__main__":
    main()
