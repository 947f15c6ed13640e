"""The solvers against outside oracles: cvxpy (exponential cone) for the continuous problem; for menus HiGHS (MILP)
and an exact dynamic program over integer budgets."""

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import eye, kron

from rdalloc import ExponentialModel, TabulatedModel, allocate, waterfill
from rdalloc.cost import item_cost
from rdalloc.allocate import OPTIMAL



def continuous_instance(seed, n_items):
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 1.0, n_items)
    beta = rng.uniform(2.0, 6.0, n_items)
    sizes = rng.integers(16, 128, n_items).astype(float)
    weights = rng.uniform(0.1, 2.0, n_items)
    lo, hi = rng.uniform(0.0, 2.0, n_items), rng.uniform(4.0, 8.0, n_items)
    return ExponentialModel(alpha, beta), sizes, weights, lo, hi


@pytest.mark.parametrize("seed, n_items", [(0, 10), (1, 200), (2, 2000)])
def test_waterfill_matches_cvxpy(seed, n_items):
    cp = pytest.importorskip("cvxpy")  # a test extra; installed by `make test`
    model, n, w, lo, hi = continuous_instance(seed, n_items)
    budget = 3.0 * n.sum()
    r = waterfill(model, n, budget, weights=w, lo=lo, hi=hi)
    b = cp.Variable(n_items)
    objective = cp.sum(cp.multiply(w * model.alpha, cp.exp(-cp.multiply(np.log(model.beta), b))))
    scale = n.mean()  # a well-scaled budget row lets the interior-point solver reach 1e-10
    prob = cp.Problem(cp.Minimize(objective), [(n / scale) @ b <= budget / scale, b >= lo, b <= hi])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)
    assert prob.status == cp.OPTIMAL
    assert float(r.distortion) == pytest.approx(prob.value, rel=1e-6)
    assert float(r.distortion) <= prob.value * (1 + 1e-9)  # cvxpy is accurate to ~1e-6; ours is exact
    np.testing.assert_allclose(np.asarray(r.bits), b.value, atol=1e-4)


def milp_optimum(W, C, budget):
    """One-hot MILP: x[i, k] in {0, 1}, one per item, sum C x <= B, minimize sum W x (HiGHS via scipy). HiGHS also
    stops at an absolute gap of 1e-6, so the objective is scaled to make its LP relaxation 1e6."""
    N, K = W.shape
    ok = np.isfinite(W).ravel()
    c = np.where(ok, W.ravel(), 0.0)
    rows = kron(eye(N), np.ones((1, K)))
    cons = [LinearConstraint(rows, 1, 1), LinearConstraint(C.ravel()[None, :], -np.inf, budget)]
    bounds = Bounds(0, np.where(ok, 1, 0))
    lp = milp(c, constraints=cons, bounds=bounds)
    assert lp.status == 0, lp.message
    scale = 1e6 / lp.fun if lp.fun > 0 else 1.0
    res = milp(c * scale, constraints=cons, integrality=np.ones(N * K), bounds=bounds, options={"mip_rel_gap": 1e-12})
    assert res.status == 0, res.message
    return float(c @ np.round(res.x))


def menu_instance(seed, n_items, equal):
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 1.5, n_items)
    beta = rng.uniform(2.0, 6.0, n_items)
    if equal:
        model = ExponentialModel(alpha, beta, lo=1, hi=8)
        return model, tuple(range(1, 9)), 32.0, 0.0, np.ones(n_items)
    model = ExponentialModel(alpha, beta, eviction=alpha * rng.uniform(0.3, 3.0, n_items))
    sizes = rng.integers(8, 128, n_items).astype(float)
    return model, (0, 1, 2, 3, 4, 6, 8, 16), sizes, 32.0, rng.uniform(0.0, 2.0, n_items)


@pytest.mark.parametrize("seed, n_items, equal, avg", [(0, 50, True, 3.0), (1, 200, True, 2.25), (2, 50, False, 2.5),
                                                       (3, 200, False, 3.0), (4, 200, False, 1.0)])
def test_allocate_matches_the_milp(seed, n_items, equal, avg):
    model, menu, n, m, w = menu_instance(seed, n_items, equal)
    r = allocate(model, n, average_bits=avg, weights=w, menu=menu, metadata=m if not equal else 0.0)
    D, ok = model.table(menu)
    W = np.where(ok, w[:, None] * np.where(ok, D, 0), np.inf)
    C = np.stack([item_cost(b, n * np.ones(n_items), m if not equal else 0.0) for b in menu], axis=1)
    opt = milp_optimum(W, C, float(r.budget))
    assert r.usage.total_bits <= float(r.budget)
    assert float(r.dual_bound) <= float(r.lower_bound) <= opt * (1 + 1e-9)
    assert int(r.status) == OPTIMAL
    assert float(r.distortion) == pytest.approx(opt, rel=1e-9)


def dp_optimum(W, C, budget):
    """Exact dynamic program for integer costs: ``f_i(c)`` = least distortion of items ``0..i`` within ``c`` bits."""
    B = int(np.floor(budget))
    f = np.zeros(B + 1)
    for Wi, Ci in zip(W, C.astype(np.int64)):
        g = np.full(B + 1, np.inf)
        for w_k, c_k in zip(Wi, Ci):
            if np.isfinite(w_k) and c_k <= B:
                g[c_k:] = np.minimum(g[c_k:], f[:B + 1 - c_k] + w_k)
        f = g
    return float(f[B])


MENUS = {"eviction": (0, 1, 2, 3, 4, 5, 6, 8, 16), "coarse": (0, 2, 4, 8, 16), "no eviction": (2, 3, 4, 5, 6, 7, 8)}


def oracle_instance(seed, n_items, menu, integral):
    """Exponential curves, eviction off the curve (0 to 3 times alpha), metadata, unequal sizes; a budget drawn
    between the cheapest and the richest allocation. Integral sizes, metadata and budget when ``integral``."""
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 1.5, n_items)
    ev = alpha * rng.uniform(0.0, 3.0, n_items) if 0 in menu else None
    model = ExponentialModel(alpha, rng.uniform(1.5, 6.0, n_items), eviction=ev)
    if integral:
        n, m = rng.integers(1, 12, n_items).astype(float), rng.integers(0, 24, n_items).astype(float)
    else:
        n, m = rng.uniform(1.0, 128.0, n_items), rng.uniform(0.0, 64.0, n_items)
    w = rng.uniform(0.0, 3.0, n_items)
    D, ok = model.table(menu)
    W = np.where(ok, w[:, None] * np.where(ok, D, 0.0), np.inf)
    C = np.stack([item_cost(b, n, m) for b in menu], axis=1)
    lo, hi = C.min(axis=1).sum(), C.max(axis=1).sum()
    budget = lo + rng.uniform(0.0, 1.0) * (hi - lo)
    return model, n, m, w, W, C, float(np.floor(budget)) if integral else budget


def check_against(r, opt, budget):
    assert r.usage.total_bits <= budget
    assert float(r.dual_bound) <= float(r.lower_bound) <= opt * (1 + 1e-9) + 1e-12
    if int(r.status) == OPTIMAL:
        assert float(r.distortion) == pytest.approx(opt, rel=1e-9, abs=1e-12)
    else:  # only past the work limit; the reported gap still bounds the true one
        assert float(r.distortion) - opt <= r.gap * (1 + 1e-9) + 1e-12
    assert int(r.status) == OPTIMAL  # the default work limit suffices at these sizes


@pytest.mark.parametrize("menu", sorted(MENUS))
@pytest.mark.parametrize("seed, n_items", [(0, 1), (1, 2), (2, 7), (3, 30), (4, 120), (5, 300)])
def test_allocate_matches_the_integer_dynamic_program(menu, seed, n_items):
    model, n, m, w, W, C, budget = oracle_instance(seed, n_items, MENUS[menu], integral=True)
    r = allocate(model, n, budget, weights=w, menu=MENUS[menu], metadata=m)
    check_against(r, dp_optimum(W, C, budget), budget)


@pytest.mark.parametrize("menu", sorted(MENUS))
@pytest.mark.parametrize("seed, n_items", [(10, 3), (11, 25), (12, 150), (13, 300)])
def test_allocate_matches_the_milp_real_sizes(menu, seed, n_items):
    model, n, m, w, W, C, budget = oracle_instance(seed, n_items, MENUS[menu], integral=False)
    r = allocate(model, n, budget, weights=w, menu=MENUS[menu], metadata=m)
    check_against(r, milp_optimum(W, C, budget), budget)


def test_the_oracles_agree_and_the_hull_alone_falls_short():
    # The two oracles on one instance, and the instance needs the exact phase: the hull/greedy answer is worse.
    model, n, m, w, W, C, budget = oracle_instance(3, 30, MENUS["coarse"], integral=True)
    opt = dp_optimum(W, C, budget)
    assert milp_optimum(W, C, budget) == pytest.approx(opt, rel=1e-9)
    hull = allocate(model, n, budget, weights=w, menu=MENUS["coarse"], metadata=m, max_nodes=0)
    assert float(hull.distortion) > opt * (1 + 1e-6)


def test_tabulated_off_hull_points_against_the_dynamic_program():
    # Random non-convex tables (every point may be off the hull), integer sizes.
    rng = np.random.default_rng(21)
    bits = (0, 2, 3, 4, 8, 16)
    for trial in range(6):
        N = int(rng.integers(2, 60))
        d = np.sort(rng.uniform(0.0, 10.0, (N, len(bits))), axis=1)[:, ::-1].copy()
        d[:, -1] = 0.0
        n = rng.integers(1, 9, N).astype(float)
        C = np.stack([item_cost(b, n, 4.0) for b in bits], axis=1)
        budget = float(np.floor(C.min(axis=1).sum() + rng.uniform(0, 1) * (C.max(axis=1).sum() - C.min(axis=1).sum())))
        r = allocate(TabulatedModel(bits=bits, distortion=d), n, budget, metadata=4.0)
        check_against(r, dp_optimum(d, C, budget), budget)
