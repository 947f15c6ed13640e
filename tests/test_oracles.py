"""The solvers against outside oracles (:mod:`rdalloc.testing.references`): cvxpy (exponential cone) and bisection
for the continuous problem; for menus HiGHS (MILP) and an exact dynamic program over integer budgets."""

import numpy as np
import pytest

from rdalloc import ExponentialModel, TabulatedModel, allocate, waterfill
from rdalloc.allocate import OPTIMAL
from rdalloc.cost import item_cost
from rdalloc.testing import (
    assert_certificate,
    assert_within_budget,
    bisection_waterfill,
    cvxpy_waterfill,
    dynamic_program_optimum,
    menu_table,
    milp_optimum,
)


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
    pytest.importorskip("cvxpy", reason="cvxpy is a test extra: pip install 'rdalloc[test]'")
    model, n, w, lo, hi = continuous_instance(seed, n_items)
    budget = 3.0 * n.sum()
    r = waterfill(model, n, budget, weights=w, lo=lo, hi=hi)
    value, bits = cvxpy_waterfill(model, n, budget, weights=w, lo=lo, hi=hi)  # asserts cvxpy's status is optimal
    assert float(r.distortion) == pytest.approx(value, rel=1e-6)
    assert float(r.distortion) <= value * (1 + 1e-9)  # cvxpy is accurate to ~1e-6; ours is exact
    np.testing.assert_allclose(np.asarray(r.bits), bits, atol=1e-4)


@pytest.mark.parametrize("seed, n_items", [(0, 10), (1, 200), (2, 2000)])
def test_waterfill_matches_the_bisection(seed, n_items):
    model, n, w, lo, hi = continuous_instance(seed, n_items)
    r = waterfill(model, n, 3.0 * n.sum(), weights=w, lo=lo, hi=hi)
    np.testing.assert_allclose(np.asarray(r.bits), bisection_waterfill(model, n, 3.0 * n.sum(), weights=w, lo=lo,
                                                                       hi=hi), rtol=0, atol=1e-9)


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
    W, C = menu_table(model, menu, n, w, m if not equal else 0.0)
    opt = milp_optimum(W, C, float(r.budget))
    assert r.usage.total_bits <= float(r.budget)
    assert float(r.dual_bound) <= float(r.lower_bound) <= opt * (1 + 1e-9)
    assert int(r.status) == OPTIMAL
    assert float(r.distortion) == pytest.approx(opt, rel=1e-9)


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
    W, C = menu_table(model, menu, n, w, m)
    lo, hi = C.min(axis=1).sum(), C.max(axis=1).sum()
    budget = lo + rng.uniform(0.0, 1.0) * (hi - lo)
    return model, n, m, w, W, C, float(np.floor(budget)) if integral else budget


def check_against(r, opt, budget, sizes, metadata):
    assert r.usage.total_bits <= budget
    assert_within_budget(r.bits, sizes, budget, metadata)  # recomputed from the widths
    # dual <= lower bound <= opt (1 + 1e-9) + 1e-12; OPTIMAL: distortion == opt (rel 1e-9, abs 1e-12); else (past
    # the work limit) the reported gap bounds the true one
    assert_certificate(r, opt, rtol=1e-9, atol=1e-12)
    assert int(r.status) == OPTIMAL  # the default work limit suffices at these sizes


@pytest.mark.parametrize("menu", sorted(MENUS))
@pytest.mark.parametrize("seed, n_items", [(0, 1), (1, 2), (2, 7), (3, 30), (4, 120), (5, 300)])
def test_allocate_matches_the_integer_dynamic_program(menu, seed, n_items):
    model, n, m, w, W, C, budget = oracle_instance(seed, n_items, MENUS[menu], integral=True)
    r = allocate(model, n, budget, weights=w, menu=MENUS[menu], metadata=m)
    check_against(r, dynamic_program_optimum(W, C, budget), budget, n, m)


@pytest.mark.parametrize("menu", sorted(MENUS))
@pytest.mark.parametrize("seed, n_items", [(10, 3), (11, 25), (12, 150), (13, 300)])
def test_allocate_matches_the_milp_real_sizes(menu, seed, n_items):
    model, n, m, w, W, C, budget = oracle_instance(seed, n_items, MENUS[menu], integral=False)
    r = allocate(model, n, budget, weights=w, menu=MENUS[menu], metadata=m)
    check_against(r, milp_optimum(W, C, budget), budget, n, m)


def test_the_oracles_agree_and_the_hull_alone_falls_short():
    # The two oracles on one instance, and the instance needs the exact phase: the hull/greedy answer is worse.
    model, n, m, w, W, C, budget = oracle_instance(3, 30, MENUS["coarse"], integral=True)
    opt = dynamic_program_optimum(W, C, budget)
    assert milp_optimum(W, C, budget) == pytest.approx(opt, rel=1e-9)
    hull = allocate(model, n, budget, weights=w, menu=MENUS["coarse"], metadata=m, max_nodes=0)
    assert float(hull.distortion) > opt * (1 + 1e-6)


def test_tabulated_off_hull_points_against_the_dynamic_program():
    # Random non-convex tables (every point may be off the hull), integer sizes.
    rng = np.random.default_rng(21)
    bits = (0, 2, 3, 4, 8, 16)
    for _ in range(6):
        N = int(rng.integers(2, 60))
        d = np.sort(rng.uniform(0.0, 10.0, (N, len(bits))), axis=1)[:, ::-1].copy()
        d[:, -1] = 0.0
        n = rng.integers(1, 9, N).astype(float)
        C = np.stack([item_cost(b, n, 4.0) for b in bits], axis=1)
        budget = float(np.floor(C.min(axis=1).sum() + rng.uniform(0, 1) * (C.max(axis=1).sum() - C.min(axis=1).sum())))
        r = allocate(TabulatedModel(bits=bits, distortion=d), n, budget, metadata=4.0)
        check_against(r, dynamic_program_optimum(d, C, budget), budget, n, 4.0)
