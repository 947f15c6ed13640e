"""Grouped solves (one budget per group of items, one call): each group's answer is its own solve's."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from rdalloc import ExponentialModel, waterfill
from rdalloc.status import INFEASIBLE, OPTIMAL, SATURATED
from rdalloc.testing.strategies import continuous_problems


def shuffled_groups(draw_order, sizes):
    """Group ids for groups of ``sizes`` items, concatenated then put in the order ``draw_order`` (a permutation)."""
    ids = np.repeat(np.arange(len(sizes)), sizes)
    return ids[draw_order]


def concat_continuous(problems, order):
    """One grouped problem from several :class:`ContinuousProblem`: items concatenated, then permuted by ``order``."""
    arrays = [p.arrays for p in problems]
    per_item = lambda x, p: np.broadcast_to(np.asarray(x, dtype=float), (p.model.n_items,))  # noqa: E731
    alpha = np.concatenate([p.model.alpha for p in problems])[order]
    beta = np.concatenate([per_item(p.model.beta, p) for p in problems])[order]
    cat = {name: np.concatenate([a[name] for a in arrays])[order] for name in arrays[0]}
    groups = shuffled_groups(order, [p.model.n_items for p in problems])
    return ExponentialModel(alpha, beta, lo=1.0, hi=8.0), cat, groups, np.array([p.budget for p in problems])


def positions(order, problems):
    """Where each problem's items (in their own order) sit in the grouped problem permuted by ``order``."""
    where, start = np.argsort(order), 0
    for p in problems:
        yield where[start:start + p.model.n_items]
        start += p.model.n_items


def assert_same_waterfill(grouped, solo, items, group, atol=1e-12):
    """The group's slice of a grouped result equals its own solve (bits to ``atol``, same status: a budget equal to
    the richest allocation up to rounding may read OPTIMAL in one sum order and SATURATED in the other)."""
    statuses = {int(grouped.status[group]), int(solo.status)}
    if len(statuses) > 1:
        top = float(solo.budget_used) if int(solo.status) == SATURATED else float(grouped.budget_used[group])
        assert statuses == {OPTIMAL, SATURATED} and abs(float(solo.budget) - top) <= 1e-12 * max(top, 1.0)
    np.testing.assert_allclose(np.asarray(grouped.bits)[items], np.asarray(solo.bits), rtol=0, atol=atol)
    for field in ("budget", "budget_used", "distortion"):
        np.testing.assert_allclose(float(getattr(grouped, field)[group]), float(getattr(solo, field)), rtol=1e-12,
                                   atol=1e-12)
    assert float(grouped.kkt_residual[group]) <= 1e-9 and float(grouped.budget_residual[group]) <= 1e-12


# ---- waterfill ---------------------------------------------------------------------------------------------------

@given(st.lists(continuous_problems(max_items=12), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_grouped_waterfill_equals_the_per_group_solves(problems, rnd):
    n_items = sum(p.model.n_items for p in problems)
    order = np.array(rnd.sample(range(n_items), n_items))
    model, a, groups, budgets = concat_continuous(problems, order)
    got = waterfill(model, a["sizes"], budgets, groups=groups, weights=a["weights"], lo=a["lo"], hi=a["hi"],
                    metadata=a["metadata"])
    for g, (p, items) in enumerate(zip(problems, positions(order, problems))):
        assert_same_waterfill(got, p.waterfill(), items, g)


def random_groups(seed, n_items=300, n_groups=6):
    rng = np.random.default_rng(seed)
    model = ExponentialModel(rng.lognormal(0.0, 2.0, n_items), rng.uniform(1.5, 8.0, n_items))
    sizes = rng.integers(1, 200, n_items).astype(float)
    weights = rng.uniform(0.0, 3.0, n_items) * (rng.random(n_items) > 0.1)
    groups = rng.integers(0, n_groups, n_items)
    average = np.array([1.0, 2.5, 4.0, 8.0, 9.0, 6.5])[:n_groups]  # at lo, inside, at hi (saturated), beyond
    return model, sizes, weights, groups, average


def per_group_waterfill(model, sizes, weights, groups, average, **options):
    return [waterfill(ExponentialModel(model.alpha[s], model.beta[s]), sizes[s], average_bits=average[g],
                      weights=weights[s], **options) for g in range(len(average)) for s in [groups == g]]


def test_grouped_waterfill_average_bits_and_statuses():
    model, sizes, weights, groups, average = random_groups(0)
    got = waterfill(model, sizes, average_bits=average, groups=groups, weights=weights)
    solos = per_group_waterfill(model, sizes, weights, groups, average)
    for g, solo in enumerate(solos):
        assert_same_waterfill(got, solo, np.nonzero(groups == g)[0], g)
    assert {int(s) for s in got.status} == {OPTIMAL, SATURATED}
    d = got.to_dict()
    assert len(d["status"]) == len(average) and len(d["status_message"]) == len(average)
    assert np.asarray(got.water_level).shape == (len(average),)


def test_grouped_waterfill_on_torch():
    torch = pytest.importorskip("torch")
    model, sizes, weights, groups, average = random_groups(1)
    t = lambda x: torch.asarray(x, dtype=torch.float64)  # noqa: E731
    got = waterfill(ExponentialModel(t(model.alpha), t(model.beta)), t(sizes), average_bits=t(average),
                    groups=torch.asarray(groups), weights=t(weights))
    assert isinstance(got.bits, torch.Tensor) and got.status.shape == (len(average),)
    for g, solo in enumerate(per_group_waterfill(model, sizes, weights, groups, average)):
        assert_same_waterfill(got, solo, np.nonzero(groups == g)[0], g)


def test_grouped_waterfill_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    model, sizes, weights, groups, average = random_groups(2)
    with jax.enable_x64(True):
        solve = jax.jit(lambda a, b, n, w, g, avg: waterfill(ExponentialModel(a, b), n, average_bits=avg, groups=g,
                                                             weights=w))
        got = solve(*(jnp.asarray(x) for x in (model.alpha, model.beta, sizes, weights, groups, average)))
        for g, solo in enumerate(per_group_waterfill(model, sizes, weights, groups, average)):
            assert_same_waterfill(got, solo, np.nonzero(groups == g)[0], g, atol=1e-11)
        # an infeasible group says so in its status (NaN bits), the others are solved
        low = average.copy()
        low[1] = 0.5
        got = solve(*(jnp.asarray(x) for x in (model.alpha, model.beta, sizes, weights, groups, low)))
        assert int(got.status[1]) == INFEASIBLE and np.isnan(np.asarray(got.bits)[groups == 1]).all()
        assert int(got.status[0]) == OPTIMAL and not np.isnan(np.asarray(got.bits)[groups != 1]).any()


def test_grouped_waterfill_raises_naming_the_infeasible_group():
    model, sizes, weights, groups, average = random_groups(3)
    average[2] = 0.5  # below the box's lo = 1
    with pytest.raises(ValueError, match="of group 2 is infeasible"):
        waterfill(model, sizes, average_bits=average, groups=groups, weights=weights)


@pytest.mark.parametrize("groups, budget, error, match", [
    ([0, 1, 1], [10.0], ValueError, r"groups must hold ids in \[0, 1\).*1 at index 1"),
    ([0, -1, 1], [10.0, 10.0], ValueError, r"-1 at index 1"),
    ([0, 0, 2], [10.0, 10.0, 10.0], ValueError, "group 1 has no items"),
    ([0.0, 1.0, 1.0], [10.0, 10.0], TypeError, "groups must hold integer group ids"),
    ([0, 1], [10.0, 10.0], ValueError, r"groups must have shape \(3,\)"),
    ([0, 1, 1], 10.0, ValueError, "budget must be a vector of one value per group"),
    ([0, 1, 1], [10.0, np.nan], ValueError, "budget must not contain NaN"),
    ([0, 1, 1], [10.0, -1.0], ValueError, "budget must be >= 0"),
])
def test_grouped_input_errors_name_the_argument(groups, budget, error, match):
    with pytest.raises(error, match=match):
        waterfill(ExponentialModel(np.ones(3)), 4.0, budget, groups=np.asarray(groups))


def test_groups_and_a_reducer_do_not_mix():
    with pytest.raises(ValueError, match="groups cannot be combined with a reducer"):
        waterfill(ExponentialModel(np.ones(3)), 4.0, [40.0], groups=np.zeros(3, dtype=int), reducer=object())
