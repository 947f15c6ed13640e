"""The solvers against outside oracles: cvxpy (exponential cone) for the continuous problem, HiGHS (MILP) for menus."""

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from rdalloc import ExponentialModel, allocate, item_cost, waterfill

cp = pytest.importorskip("cvxpy")  # a test extra; installed by `make test`


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
    """One-hot MILP: x[i, k] in {0, 1}, one per item, sum C x <= B, minimize sum W x (HiGHS via scipy)."""
    N, K = W.shape
    ok = np.isfinite(W).ravel()
    c = np.where(ok, W.ravel(), 0.0)
    rows = np.kron(np.eye(N), np.ones(K))
    cons = [LinearConstraint(rows, 1, 1), LinearConstraint(C.ravel()[None, :], -np.inf, budget)]
    res = milp(c, constraints=cons, integrality=np.ones(N * K), bounds=Bounds(0, np.where(ok, 1, 0)),
               options={"mip_rel_gap": 1e-12})
    assert res.status == 0, res.message
    return res.fun


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
    assert float(r.lower_bound) <= opt * (1 + 1e-9)
    if equal:  # equal costs and unit steps: exactly the optimum
        assert float(r.distortion) == pytest.approx(opt, rel=1e-9)
    else:  # otherwise within the reported gap
        assert float(r.distortion) - opt <= r.gap * (1 + 1e-9) + 1e-12
        assert r.relative_gap < 1e-2
