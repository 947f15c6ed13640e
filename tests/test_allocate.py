"""Integer and menu allocation: brute force on tiny cases, exact cases, invariants (hypothesis) and bad input."""

import importlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rdalloc import ExponentialModel, TabulatedModel, allocate
from rdalloc.allocate import FEASIBLE, OPTIMAL, SATURATED
from rdalloc.cost import item_cost
from rdalloc.testing import assert_allocation, brute_force_optimum, menu_table
from rdalloc.testing.strategies import menu_problems

MENU = (0, 1, 2, 3, 4, 6, 8, 16)


def random_problem(rng, n_items, menu=MENU, eviction=True):
    alpha = rng.lognormal(0.0, 1.5, n_items)
    beta = rng.uniform(1.5, 6.0, n_items)
    ev = alpha * rng.uniform(0.2, 3.0, n_items) if eviction else None
    sizes = rng.integers(1, 40, n_items).astype(float)
    meta = rng.integers(0, 64, n_items).astype(float)
    weights = rng.uniform(0.0, 3.0, n_items)
    return ExponentialModel(alpha, beta, eviction=ev), sizes, meta, weights


@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.floats(0.0, 1.0), st.booleans())
@example(seed=1, n_items=4, frac=0.5, eviction=True)  # found by hypothesis: a core-only objective compared with U
def test_optimal_against_the_brute_force(seed, n_items, frac, eviction):
    rng = np.random.default_rng(seed)
    model, n, m, w = random_problem(rng, n_items, eviction=eviction)
    menu = MENU if eviction else MENU[1:]
    W, C = menu_table(model, menu, n, w, m)
    budget = max(frac * C.max(axis=1).sum(), C.min(axis=1).sum())
    r = allocate(model, n, budget, weights=w, menu=menu, metadata=m)
    opt = brute_force_optimum(W, C, budget)
    bits = np.asarray(r.bits)
    chosen = W[np.arange(n_items), [menu.index(b) for b in bits]].sum()
    assert r.usage.total_bits <= budget
    assert float(r.distortion) == pytest.approx(chosen, rel=1e-12, abs=1e-300)
    assert float(r.dual_bound) <= float(r.lower_bound) <= opt * (1 + 1e-12) + 1e-300
    assert int(r.status) in (OPTIMAL, SATURATED)
    assert float(r.distortion) == pytest.approx(opt, rel=1e-9, abs=1e-300)


def test_one_item_off_the_hull():
    # (200, 10), (400, 8), (800, 0): 4 bits lies above the hull chord; with 500 bits it is the optimum.
    model = TabulatedModel(bits=(2, 4, 8), distortion=np.array([[10.0, 8.0, 0.0]]))
    r = allocate(model, 100.0, 500.0)
    assert int(r.bits[0]) == 4 and float(r.distortion) == 8.0
    assert int(r.status) == OPTIMAL and r.gap == 0.0 and r.usage.total_bits == 400.0
    assert float(r.dual_bound) == pytest.approx(5.0)  # q(1/60) = 10 + 200/60 - 500/60
    hull = allocate(model, 100.0, 500.0, max_nodes=0)  # no exact phase: the hull/greedy answer, not proven
    assert int(hull.bits[0]) == 2 and int(hull.status) == FEASIBLE and hull.gap == pytest.approx(5.0)


def test_work_limit_keeps_the_greedy_answer_or_better():
    model, n, m, w = random_problem(np.random.default_rng(11), 200)
    W, C = menu_table(model, MENU, n, w, m)
    budget = 0.4 * C.max(axis=1).sum()
    greedy = allocate(model, n, budget, weights=w, menu=MENU, metadata=m, max_nodes=0)
    for limit in (1, 50, 1000):
        r = allocate(model, n, budget, weights=w, menu=MENU, metadata=m, max_nodes=limit)
        assert r.usage.total_bits <= budget
        assert float(r.distortion) <= float(greedy.distortion)
        assert float(r.lower_bound) <= float(r.distortion)
        if int(r.status) == FEASIBLE:
            assert float(r.lower_bound) == float(r.dual_bound)
    full = allocate(model, n, budget, weights=w, menu=MENU, metadata=m)
    assert int(full.status) == OPTIMAL and float(full.distortion) < float(greedy.distortion)


@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.data())
def test_equal_costs_and_unit_steps_are_optimal_for_every_budget(seed, n_items, data):
    # Gross/Fox: with equal item costs, unit steps and convex curves the greedy solution is the integer optimum.
    rng = np.random.default_rng(seed)
    model = ExponentialModel(rng.lognormal(0, 2, n_items), rng.uniform(1.5, 6, n_items), lo=1, hi=5)
    menu = (1, 2, 3, 4, 5)
    steps = data.draw(st.integers(n_items, 5 * n_items))
    r = allocate(model, 8.0, 8.0 * steps, menu=menu)
    D, _ = model.table(menu)
    C = np.broadcast_to(8.0 * np.array(menu, dtype=float), D.shape)
    assert float(r.distortion) == pytest.approx(brute_force_optimum(D, C, 8.0 * steps), rel=1e-12)
    assert r.usage.total_bits == 8.0 * steps  # the lattice allows it, so the budget is met exactly


def test_exponential_integer_optimum_is_near_the_continuous_one():
    from rdalloc import waterfill

    rng = np.random.default_rng(3)
    model = ExponentialModel(rng.lognormal(0, 2, 300), 4.0, lo=1, hi=8)
    cont = waterfill(model, 1.0, average_bits=3.0)
    disc = allocate(model, 1.0, average_bits=3.0, menu=range(1, 9))
    assert np.max(np.abs(np.asarray(disc.bits) - np.asarray(cont.bits))) <= 1.0
    assert float(disc.lower_bound) <= float(disc.distortion)
    assert float(cont.distortion) <= float(disc.distortion) * (1 + 1e-12)
    assert int(disc.status) == OPTIMAL


def test_eviction_endpoint_is_used_when_cheap_enough():
    # Item 0 is nearly worthless (eviction costs little distortion), item 1 is precious.
    model = ExponentialModel(np.array([1.0, 100.0]), 4.0, eviction=np.array([0.05, 1e6]))
    r = allocate(model, 64.0, average_bits=4.0, menu=(0, 2, 4, 8, 16))
    assert np.asarray(r.bits).tolist() == [0, 8]
    assert r.usage.total_bits == 64 * 8


def test_full_precision_is_chosen_when_metadata_makes_it_cheaper():
    # 15 bits + 200 bits of metadata costs more than 16 bits for 64 elements: 16 dominates 15.
    model = ExponentialModel(np.array([1.0]), 2.0, lo=1, hi=15)
    r = allocate(model, 64.0, budget=64 * 16, menu=(8, 15, 16), metadata=200.0)
    assert int(r.bits[0]) == 16 and float(r.distortion) == 0.0


def test_tabulated_non_convex_table_is_solved_exactly():
    # Item 0 has a non-convex point at 2 bits: the hull skips it, the exact phase takes it when it is best.
    d = np.array([[10.0, 9.9, 1.0, 0.5], [10.0, 5.0, 2.5, 1.25]])
    model = TabulatedModel(bits=(1, 2, 3, 4), distortion=d)
    for budget in range(2, 9):
        r = allocate(model, 1.0, float(budget))
        W, C = d, np.broadcast_to(np.array([1.0, 2, 3, 4]), d.shape)
        opt = brute_force_optimum(W, C, float(budget))
        assert float(r.dual_bound) <= opt + 1e-12
        assert float(r.distortion) == pytest.approx(opt, rel=1e-12) and int(r.status) in (OPTIMAL, SATURATED)
        assert r.usage.total_bits <= budget


def test_collinear_points_keep_unit_steps():
    d = np.array([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)  # linear distortion: every step equally efficient
    model = TabulatedModel(bits=(1, 2, 3, 4, 5), distortion=d)
    for budget in range(3, 16):
        r = allocate(model, 1.0, float(budget))
        assert r.usage.total_bits == budget
        assert int(r.status) == (SATURATED if budget == 15 else OPTIMAL)


def test_zero_weights_all_equal_items_and_one_item():
    model = ExponentialModel(np.ones(5), 4.0, eviction=np.full(5, 2.0))
    r = allocate(model, 16.0, average_bits=3.0, menu=(0, 1, 2, 3, 4, 8), weights=np.array([0, 1, 1, 1, 1.0]))
    bits = np.asarray(r.bits)
    assert bits[0] == 0 and r.usage.total_bits <= 5 * 16 * 3.0
    eq = allocate(model, 16.0, average_bits=3.0, menu=(1, 2, 3, 4))
    assert np.asarray(eq.bits).tolist() == [3] * 5 and int(eq.status) == OPTIMAL
    one = allocate(ExponentialModel(np.array([2.0])), 10.0, budget=55.0)
    assert int(one.bits[0]) == 5


def test_budget_exactly_at_the_minimum_and_the_maximum():
    model, n, m, w = random_problem(np.random.default_rng(5), 20)
    W, C = menu_table(model, MENU, n, w, m)
    lo_r = allocate(model, n, C.min(axis=1).sum(), weights=w, menu=MENU, metadata=m)
    assert r_bits_cost(lo_r, n, m) == C.min(axis=1).sum()
    top = C[np.arange(20), np.nanargmin(np.where(np.isfinite(W), W, np.nan), axis=1)].sum()
    hi_r = allocate(model, n, top, weights=w, menu=MENU, metadata=m)
    assert int(hi_r.status) == SATURATED and hi_r.gap == 0.0
    assert float(hi_r.distortion) == pytest.approx(np.min(W, axis=1).sum())


def r_bits_cost(r, n, m):
    return float(np.sum(item_cost(np.asarray(r.bits), n, m)))


# ---- invariants --------------------------------------------------------------------------------------------------

@given(menu_problems(max_items=5))
def test_drawn_problems_against_the_brute_force(problem):
    # Any model, menu, sizes, metadata, weights and budget edge: widths, budget, reported distortion and certificate.
    W, C = problem.table()
    assert_allocation(problem, problem.allocate(), brute_force_optimum(W, C, problem.budget))


problems = menu_problems(max_items=80)


def permuted(problem, perm):
    """The same problem with its items in the order ``perm``."""
    def take(x):
        return x[perm] if np.ndim(x) else x

    model = problem.model
    if isinstance(model, ExponentialModel):
        model = replace(model, alpha=take(model.alpha), beta=take(model.beta), eviction=None if model.eviction is None
                        else take(model.eviction))
    else:
        model = replace(model, distortion=take(model.distortion), allowed=None if model.allowed is None
                        else take(model.allowed))
    return replace(problem, model=model, sizes=take(problem.sizes), weights=take(problem.weights),
                   metadata=take(problem.metadata))


@given(problems)
def test_never_exceeds_the_budget_and_certifies_itself(problem):
    r = problem.allocate()
    W, C = problem.table()
    assert r.usage.total_bits <= problem.budget
    assert set(np.asarray(r.bits).tolist()) <= set(problem.menu)
    assert float(r.lower_bound) <= float(r.distortion) * (1 + 1e-12) + 1e-300
    # The gap is at most one hull segment's distortion drop.
    assert r.gap <= float(np.max(np.where(np.isfinite(W), W, 0))) + 1e-12
    assert_allocation(problem, r)  # widths allowed, cost from the widths, distortion of the widths, certificate


@given(problems, st.sampled_from([0.5, 2.0, 1024.0]))
def test_invariant_to_scaling_all_weights(problem, scale):
    a = problem.allocate()
    b = replace(problem, weights=problem.weights * scale).allocate()
    np.testing.assert_array_equal(np.asarray(a.bits), np.asarray(b.bits))


@given(problems, st.integers(0, 2**32 - 1))
def test_permutation_equivariance(problem, seed):
    a = problem.allocate()
    b = permuted(problem, np.random.default_rng(seed).permutation(problem.model.n_items)).allocate()
    assert float(b.distortion) == pytest.approx(float(a.distortion), rel=1e-9, abs=1e-300)
    assert float(b.lower_bound) == pytest.approx(float(a.lower_bound), rel=1e-9, abs=1e-300)


@given(problems, st.floats(0.01, 0.5))
def test_dual_bound_and_optimum_are_monotone_in_the_budget(problem, extra):
    a = problem.allocate()
    elements = float(np.sum(np.broadcast_to(problem.sizes, (problem.model.n_items,))))
    b = replace(problem, budget=problem.budget + extra * elements).allocate()
    assert float(b.dual_bound) <= float(a.dual_bound) * (1 + 1e-12) + 1e-300
    if int(a.status) in (OPTIMAL, SATURATED) and int(b.status) in (OPTIMAL, SATURATED):
        assert float(b.distortion) <= float(a.distortion) * (1 + 1e-9) + 1e-300


@given(problems, st.integers(0, 2**32 - 1))
def test_no_single_swap_does_better_when_optimal(problem, seed):
    r = problem.allocate()
    W, C = problem.table()
    if int(r.status) != OPTIMAL:
        return
    rng = np.random.default_rng(seed)
    idx = np.array([problem.menu.index(b) for b in np.asarray(r.bits)])
    for _ in range(50):
        cand = idx.copy()
        i, j = rng.integers(0, len(idx), 2)
        cand[i], cand[j] = rng.integers(0, len(problem.menu), 2)
        rows = np.arange(len(idx))
        if C[rows, cand].sum() <= problem.budget and np.all(np.isfinite(W[rows, cand])):
            assert W[rows, cand].sum() >= float(r.distortion) * (1 - 1e-12)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_infeasible_budget_names_the_range():
    model = ExponentialModel(np.ones(4), 4.0)
    with pytest.raises(ValueError, match=r"budget 10 bits \(average 0.625\) is infeasible .* needs 16 bits "
                                         r"\(average 1\).* needs 128"):
        allocate(model, 4.0, 10.0, menu=(1, 2, 8))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(menu=(0, 1, 2)), ValueError, r"item 0 has no feasible bit-width in menu \[0\]|no feasible"),
    (dict(menu=(3, 2)), ValueError, "menu must be strictly increasing"),
    (dict(menu=(1, 17)), ValueError, r"menu must hold integers in \[0, 16\]"),
    (dict(menu=(1.5, 2)), ValueError, r"menu must hold integers"),
    (dict(sizes=np.array([1.0, 0.0])), ValueError, "sizes must be > 0, got 0.0 at index 1"),
    (dict(metadata=-1.0), ValueError, "metadata must be >= 0"),
    (dict(weights=np.array([1.0, np.nan])), ValueError, "weights must not contain NaN"),
    (dict(lo=np.array([3.0, 1.0]), hi=np.array([2.0, 8.0])), ValueError, "lo must be <= hi, got lo=3.0 > hi=2.0"),
    (dict(max_nodes=-1), ValueError, "max_nodes must be >= 0, got -1"),
    (dict(max_nodes=10.0), TypeError, "max_nodes must be an int, got float"),
])
def test_bad_input(kwargs, exc, match):
    model = ExponentialModel(np.array([1.0, 2.0]), 4.0, lo=1, hi=2)
    kw = dict(sizes=1.0, menu=(1, 2))
    kw.update(kwargs)
    if kw["menu"] == (0, 1, 2):
        model = ExponentialModel(np.array([1.0, 2.0]), 4.0, lo=3, hi=4)
        kw["menu"] = (0, 1, 2)
    sizes = kw.pop("sizes")
    with pytest.raises(exc, match=match):
        allocate(model, sizes, average_bits=2.0, **kw)


def test_tabulated_menu_must_be_in_the_table():
    model = TabulatedModel(bits=(2, 4), distortion=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"bit-widths \[3\] that the table does not hold"):
        allocate(model, 1.0, average_bits=3.0, menu=(2, 3))


@pytest.mark.parametrize("kind", ["spread", "ties", "edges", "zeros", "negative"])
def test_the_bucketed_split_level_equals_the_full_sort(kind, monkeypatch):
    """The split search's exact finish on numpy sorts one bucket of leading float bits; it must give the same level
    as sorting every candidate (ties, subnormals, zeros and huge values; negative values fall back to the sort)."""
    import array_api_compat.numpy as xp

    A = importlib.import_module("rdalloc.allocate")
    bucket, answered = A._split_in_bucket, []
    monkeypatch.setattr(A, "_split_in_bucket", lambda *a: answered.append(bucket(*a)) or answered[-1])
    rng = np.random.default_rng(["spread", "ties", "edges", "zeros", "negative"].index(kind))
    for n in (3000, 20_000):
        e = {"spread": rng.lognormal(0.0, 3.0, n), "ties": np.round(rng.lognormal(0.0, 1.0, n), 1),
             "edges": rng.choice([5e-324, 1e-310, 1e-300, 1.0, 2.0, 1e300], n),
             "zeros": rng.uniform(0.0, 1.0, n) * (rng.random(n) > 0.3), "negative": rng.normal(0.0, 1.0, n)}[kind]
        e = np.where(rng.random(n) < 0.2, -np.inf, e)  # no segment there
        c = np.where(e > -np.inf, rng.choice([0.0, 1.0, 64.0, 96.0], n), 0.0)
        E, dC = np.stack([np.full(n, -np.inf), e]), np.stack([np.zeros(n), c])
        for share in (0.0, 0.01, 0.3, 0.9, 0.999):
            R = np.asarray(share * c.sum())
            bucketed = A._split_level(xp, E, dC, R, np.asarray(False), False)
            with monkeypatch.context() as m:
                m.setattr(A, "_RADIX", 1 << 62)  # never bucket: sort every candidate
                full = A._split_level(xp, E, dC, R, np.asarray(False), False)
            assert float(bucketed[0]) == float(full[0])
            assert float(bucketed[2]) == pytest.approx(float(full[2]), rel=1e-12, abs=1e-12)
            assert float(bucketed[2]) <= float(R) * (1 + 1e-12)
    found = [a is not None for a in answered]
    assert found and (not any(found) if kind == "negative" else all(found))  # the bucket answered (or fell back)
