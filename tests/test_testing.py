"""rdalloc.testing can fail: every check raises on a deliberately wrong answer, the references agree with each other
and with closed forms, and the strategies draw valid problems with budgets at the edges."""

import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import find, given

from rdalloc import ExponentialModel, TabulatedModel, waterfill
from rdalloc.status import FEASIBLE, OPTIMAL, SATURATED
from rdalloc.testing import (
    MenuProblem,
    assert_allocation,
    assert_certificate,
    assert_in_box,
    assert_in_menu,
    assert_kkt,
    assert_within_budget,
    bisection_waterfill,
    brute_force_optimum,
    cvxpy_waterfill,
    dynamic_program_optimum,
    menu_table,
    milp_optimum,
)
from rdalloc.testing.strategies import continuous_problems, menu_problems


def knapsack():
    """Two items, menu {0, 2, 4, 16}, eviction off the curve; 200 bits: the optimum is (4, 4) at 2 * 4**-4."""
    model = ExponentialModel(np.array([1.0, 1.0]), 4.0, eviction=np.array([5.0, 5.0]), lo=1, hi=8)
    return MenuProblem(model, (0, 2, 4, 16), sizes=16.0, budget=200.0, metadata=32.0)


# ---- each check raises on a wrong answer ---------------------------------------------------------------------------

def test_budget_check():
    assert_within_budget([4, 4], 16.0, 192.0, metadata=32.0)  # 2 * (64 + 32): exactly the budget
    assert_within_budget([0, 16], 16.0, 256.0, metadata=32.0)  # no metadata at 0 and 16 bits
    with pytest.raises(AssertionError, match=r"costs 193.0 bits, 1 over the budget 192.0"):
        assert_within_budget([4, 4], 16.0, 192.0, metadata=np.array([32.0, 33.0]))


def test_menu_check():
    p = knapsack()
    assert_in_menu([0, 16], p.menu, p.model)
    with pytest.raises(AssertionError, match=r"item 1 has 3 bits, not on the menu \[0, 2, 4, 16\]"):
        assert_in_menu([2, 3], p.menu)
    no_eviction = ExponentialModel(np.ones(2), 4.0, lo=1, hi=8)
    with pytest.raises(AssertionError, match=r"item 0 has 0 bits, which its model does not allow .*\[2, 4, 16\]"):
        assert_in_menu([0, 4], p.menu, no_eviction)
    table = TabulatedModel(bits=(2, 4), distortion=np.ones((2, 2)), allowed=np.array([[True, True], [True, False]]))
    with pytest.raises(AssertionError, match=r"item 1 has 4 bits, which its model does not allow \(allowed: \[2\]\)"):
        assert_in_menu([4, 4], (2, 4), table)


def test_box_check():
    assert_in_box([1.0, 8.0], 1.0, 8.0)
    for bits, what in (([0.5, 2.0], "below lo"), ([1.0, 8.5], "above hi"), ([1.0, np.nan], "not a number")):
        with pytest.raises(AssertionError, match=what):
            assert_in_box(bits, 1.0, 8.0)
    assert_in_box([0.9999999999], 1.0, 8.0, atol=1e-9)


def continuous():
    return ExponentialModel(np.array([16.0, 1.0, 3.0]), beta=4.0), np.array([1.0, 1.0, 2.0]), 12.0


def test_kkt_check():
    model, n, budget = continuous()
    r = waterfill(model, n, budget)
    bits = np.asarray(r.bits)
    assert_kkt(model, n, bits, budget)
    moved = bits + np.array([0.01, -0.01, 0.0])  # same budget, marginal values no longer equal
    with pytest.raises(AssertionError, match=r"KKT conditions fail by 0.0277 in log marginal value"):
        assert_kkt(model, n, moved, budget)
    with pytest.raises(AssertionError, match=r"complementary slackness fails: .* only 11.\d+ of 12.0 bits"):
        assert_kkt(model, n, bits - 0.25, budget)  # every marginal value equal, budget left unspent
    with pytest.raises(AssertionError, match=r"spends 12.25\d* bits, over the budget 12.0"):
        assert_kkt(model, n, bits + np.array([0.25, 0, 0]) * 1, budget, tol=1.0)
    with pytest.raises(AssertionError, match="above hi"):
        assert_kkt(model, n, np.array([9.0, 1.0, 1.0]), budget)
    saturated = np.full(3, 8.0)  # the budget buys every item hi: lambda = 0 is allowed
    assert_kkt(model, n, saturated, 1e6)


def test_certificate_check():
    p = knapsack()
    W, C = p.table()
    opt = brute_force_optimum(W, C, p.budget)
    r = p.allocate()
    assert_allocation(p, r, opt)
    assert opt == pytest.approx(2 * 4.0 ** -4) and int(r.status) == OPTIMAL
    worse = replace(r, bits=np.array([2, 4], dtype=np.int32), distortion=np.asarray(W[0, 1] + W[1, 2]),
                    payload_bits=np.asarray(96.0))
    with pytest.raises(AssertionError, match=r"status OPTIMAL with a gap of 0.05\d+, above the tolerance"):
        assert_certificate(worse)  # suboptimal but claiming optimal, found from its own bounds
    with pytest.raises(AssertionError, match=r"lower bound 0.0664\d* above the exact optimum 0.0078125: not a bound"):
        assert_certificate(replace(worse, lower_bound=worse.distortion), opt)  # a false certificate, gap 0
    loose = replace(r, distortion=np.asarray(1.5), lower_bound=np.asarray(1.2), status=np.asarray(FEASIBLE))
    with pytest.raises(AssertionError, match=r"is 0.5 above the exact optimum 1.0, more than the reported gap 0.3"):
        assert_certificate(loose, 1.0, rtol=0.25, atol=0.0)  # the bound within tolerance, the gap claim not
    with pytest.raises(AssertionError, match="lower bound 0.01 above the exact optimum 0.0078125: not a bound"):
        assert_certificate(replace(r, lower_bound=np.asarray(0.01), distortion=np.asarray(0.01),
                                   status=np.asarray(FEASIBLE)), opt)
    with pytest.raises(AssertionError, match="dual bound 0.5 above the lower bound"):
        assert_certificate(replace(r, dual_bound=np.asarray(0.5)))
    with pytest.raises(AssertionError, match="below the exact optimum"):
        assert_certificate(replace(r, distortion=np.asarray(0.0), lower_bound=np.asarray(0.0),
                                   dual_bound=np.asarray(0.0)), opt)
    with pytest.raises(AssertionError, match="SATURATED with distortion"):
        assert_certificate(replace(worse, status=np.asarray(SATURATED)), opt)  # the budget did not buy the best


def test_allocation_check():
    p = knapsack()
    r = p.allocate()
    with pytest.raises(AssertionError, match=r"reported distortion 1.0, but the widths give 0.0078125"):
        assert_allocation(p, replace(r, distortion=np.asarray(1.0)))
    with pytest.raises(AssertionError, match=r"over the budget 200.0"):
        assert_allocation(p, replace(r, bits=np.array([4, 16], dtype=np.int32)))
    with pytest.raises(AssertionError, match="not on the menu"):
        assert_allocation(p, replace(r, bits=np.array([4, 3], dtype=np.int32)))


# ---- the references -------------------------------------------------------------------------------------------------

@given(menu_problems(max_items=4, integral=True))
def test_brute_force_and_dynamic_program_agree(p):
    W, C = p.table()
    assert dynamic_program_optimum(W, C, p.budget) == pytest.approx(brute_force_optimum(W, C, p.budget), rel=1e-12,
                                                                    abs=1e-300)


@given(menu_problems(max_items=4))
def test_brute_force_and_milp_agree(p):
    W, C = p.table()
    assert milp_optimum(W, C, p.budget) == pytest.approx(brute_force_optimum(W, C, p.budget), rel=1e-9, abs=1e-12)


def test_references_on_a_known_optimum():
    W, C = knapsack().table()
    for reference in (brute_force_optimum, dynamic_program_optimum, milp_optimum):
        assert reference(W, C, 200.0) == pytest.approx(2 * 4.0 ** -4, rel=1e-12)
    assert brute_force_optimum(W, C, -1.0) == dynamic_program_optimum(W, C, -1.0) == math.inf


def test_reference_input_checks():
    W, C = knapsack().table()
    with pytest.raises(ValueError, match="integer costs"):
        dynamic_program_optimum(W, C + 0.5, 200.0)
    with pytest.raises(ValueError, match=r"4\*\*12 allocations"):
        brute_force_optimum(np.ones((12, 4)), np.ones((12, 4)), 10.0)
    with pytest.raises(ValueError, match="one shape"):
        milp_optimum(W, C[:, :2], 200.0)


def test_bisection_reference_meets_the_closed_form():
    # Two free items, shared beta: b1 - b2 = log_beta(alpha1 / alpha2), b1 + b2 = 8.
    bits = bisection_waterfill(ExponentialModel(np.array([16.0, 1.0]), beta=4.0), 1.0, 8.0)
    np.testing.assert_allclose(bits, [4.0 + math.log(16.0, 4.0) / 2, 4.0 - math.log(16.0, 4.0) / 2], atol=1e-12)
    model, n, budget = continuous()
    np.testing.assert_array_equal(bisection_waterfill(model, n, 1e6), 8.0)
    with pytest.raises(ValueError, match="infeasible"):
        bisection_waterfill(model, n, 3.0)


def test_cvxpy_reference_agrees_with_the_bisection():
    pytest.importorskip("cvxpy", reason="cvxpy is a test extra: pip install 'rdalloc[test]'")
    model, n, budget = continuous()
    value, bits = cvxpy_waterfill(model, n, budget, weights=np.array([1.0, 2.0, 0.5]), metadata=1.0)
    ref = bisection_waterfill(model, n, budget, weights=np.array([1.0, 2.0, 0.5]), metadata=1.0)
    np.testing.assert_allclose(bits, ref, atol=1e-4)
    assert value == pytest.approx(float(np.sum(np.array([1.0, 2.0, 0.5]) * model.alpha * 4.0 ** -ref)), rel=1e-6)


# ---- the strategies ------------------------------------------------------------------------------------------------

@given(menu_problems(max_items=6))
def test_menu_problems_are_valid(p):
    W, C = p.table()
    ok = np.isfinite(W)
    assert ok.any(axis=1).all()  # every item can take some width on the menu
    cheapest = np.where(ok, C, np.inf).min(axis=1).sum()
    assert p.budget >= cheapest and list(p.menu) == sorted(set(p.menu)) and 0 <= p.menu[0] and p.menu[-1] <= 16
    assert np.all(np.asarray(p.sizes) > 0) and np.all(np.asarray(p.metadata) >= 0) and np.all(p.weights >= 0)
    p.allocate(max_nodes=0)  # rdalloc accepts it


@given(menu_problems(max_items=6, integral=True))
def test_integral_menu_problems_have_integer_costs(p):
    _, C = menu_table(p.model, p.menu, p.sizes, p.weights, p.metadata)
    assert np.all(C == np.round(C)) and p.budget == math.floor(p.budget)


@given(continuous_problems(max_items=10))
def test_continuous_problems_are_valid(p):
    a = p.arrays
    assert np.all(0 <= a["lo"]) and np.all(a["lo"] <= a["hi"]) and np.all(a["hi"] <= 16)
    assert a["weights"].max() > 0 and p.budget >= a["metadata"].sum() + a["sizes"] @ a["lo"]
    p.waterfill()


def test_budgets_reach_the_edges():
    def costs(p):
        W, C = p.table()
        ok = np.isfinite(W)
        return np.where(ok, C, np.inf).min(axis=1).sum(), np.where(ok, C, -np.inf).max(axis=1).sum()

    assert find(menu_problems(), lambda p: p.budget == 0).budget == 0  # every item evictable, nothing kept
    find(menu_problems(), lambda p: 0 < costs(p)[0] == p.budget)
    find(menu_problems(), lambda p: costs(p)[0] < costs(p)[1] == p.budget)
    find(menu_problems(), lambda p: costs(p)[0] < p.budget < costs(p)[1])
    find(menu_problems(kinds=("tabulated",)), lambda p: 0 in p.menu and 16 in p.menu)


def test_import_rdalloc_does_not_import_hypothesis():
    code = "import sys, rdalloc, rdalloc.testing; print(sorted({'hypothesis', 'torch', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_strategies_without_hypothesis_name_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # what `import hypothesis` sees when it is not installed
    monkeypatch.delitem(sys.modules, "rdalloc.testing.strategies")
    with pytest.raises(ImportError, match=r"pip install 'rdalloc\[test\]'"):
        import rdalloc.testing.strategies  # noqa: F401


def test_the_continuous_references_follow_subnormal_weights():
    """The bisection reference and the KKT check work in logs, as waterfill does: a weight of 5e-324 is a live item
    (at hi when the budget is slack, at lo otherwise), not a zero weight whose product underflowed; so the
    continuous strategy draws subnormal and tiny weights beside normal ones."""
    model = ExponentialModel(np.array([0.01, 1.0]), beta=4.0, lo=1.0, hi=8.0)
    weights = np.array([5e-324, 1.0])  # 5e-324 * 0.01 rounds to 0 in a product
    for budget, want in ((64 * 16.0, [8.0, 8.0]), (64 * 6.0, [1.0, 5.0])):
        got = waterfill(model, 64.0, budget, weights=weights)
        ref = bisection_waterfill(model, 64.0, budget, weights=weights)
        np.testing.assert_allclose(ref, want, atol=1e-9)
        np.testing.assert_allclose(np.asarray(got.bits), ref, atol=1e-9)
        assert_kkt(model, 64.0, ref, budget, weights=weights)
    tiny = lambda w: np.any((np.asarray(w) > 0) & (np.asarray(w) < 1e-300))  # noqa: E731
    drawn = find(continuous_problems(tiny_weights=True), lambda p: tiny(p.arrays["weights"]))
    assert np.max(drawn.arrays["weights"]) >= 1e-3


def test_menu_problems_draw_subnormal_weights_beside_normal_ones():
    drawn = find(menu_problems(tiny_weights=True), lambda p: np.any((np.asarray(p.weights) > 0)
                                                                  & (np.asarray(p.weights) < 1e-300)))
    assert np.max(drawn.weights) >= 1e-3
    W, C = drawn.table()
    assert_allocation(drawn, drawn.allocate(), optimum=brute_force_optimum(W, C, drawn.budget))
