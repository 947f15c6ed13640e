"""Grouped solves (one budget per group of items, one call): each group's answer is its own solve's."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdalloc import ExponentialModel, TabulatedModel, allocate, waterfill
from rdalloc.status import INFEASIBLE, OPTIMAL, SATURATED
from rdalloc.testing.strategies import continuous_problems, menu_problems, menus


def interleaved(labels):
    """The order that puts item ``order[j]`` of the concatenated groups at position ``j`` when position ``j`` holds
    group ``labels[j]``: groups interleaved, each keeping its items' order (as the per-group solves see them)."""
    order = np.empty(len(labels), dtype=np.int64)
    order[np.argsort(labels, kind="stable")] = np.arange(len(labels))
    return order


def shuffled_groups(order, sizes):
    """Group ids for groups of ``sizes`` items, concatenated then put in the order ``order``."""
    return np.repeat(np.arange(len(sizes)), sizes)[order]


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

def group_labels(problems):
    """Hypothesis: a group id per position, each problem's items at positions drawn at random."""
    return st.permutations(np.repeat(np.arange(len(problems)), [p.model.n_items for p in problems]).tolist())


@given(st.lists(continuous_problems(max_items=12), min_size=1, max_size=4).flatmap(
    lambda problems: st.tuples(st.just(problems), group_labels(problems))))
def test_grouped_waterfill_equals_the_per_group_solves(case):
    problems, labels = case
    order = interleaved(np.array(labels))
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


# ---- allocate ----------------------------------------------------------------------------------------------------

CERTIFICATE = ("budget", "payload_bits", "metadata_bits", "elements", "distortion", "lower_bound", "dual_bound",
               "multiplier", "nodes", "status")


def assert_same_allocation(grouped, solo, items, group, exact=True):
    """The group's slice of a grouped result is its own solve: the same bits, status and bounds (bit for bit on
    eager backends; to rounding on JAX, whose sums run over the masked whole)."""
    np.testing.assert_array_equal(np.asarray(grouped.bits)[items], np.asarray(solo.bits))
    mine = grouped.group(group)
    for name in CERTIFICATE:
        got, want = float(np.asarray(getattr(mine, name))), float(np.asarray(getattr(solo, name)))
        if exact:
            assert got == want, name
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


def concat_tabulated(problems, order):
    """One grouped problem from several tabulated :class:`MenuProblem` on one menu, items permuted by ``order``."""
    per_item = lambda x, p: np.broadcast_to(np.asarray(x, dtype=float), (p.model.n_items,))  # noqa: E731
    cat = lambda get: np.concatenate([get(p) for p in problems])[order]  # noqa: E731
    model = TabulatedModel(problems[0].menu, cat(lambda p: p.model.distortion), cat(lambda p: p.model.allowed_mask))
    arrays = {name: np.concatenate([per_item(getattr(p, name), p) for p in problems])[order]
              for name in ("sizes", "weights", "metadata")}
    groups = shuffled_groups(order, [p.model.n_items for p in problems])
    return model, arrays, groups, np.array([p.budget for p in problems])


@st.composite
def grouped_menu_problems(draw):
    menu = draw(menus())
    problems = draw(st.lists(menu_problems(max_items=10, kinds=("tabulated",), menu=menu), min_size=1, max_size=4))
    return problems, interleaved(np.array(draw(group_labels(problems))))


@given(grouped_menu_problems())
def test_grouped_allocate_equals_the_per_group_solves(case):
    problems, order = case
    model, a, groups, budgets = concat_tabulated(problems, order)
    got = allocate(model, a["sizes"], budgets, groups=groups, weights=a["weights"], menu=problems[0].menu,
                   metadata=a["metadata"])
    for g, (p, items) in enumerate(zip(problems, positions(order, problems))):
        assert_same_allocation(got, p.allocate(), items, g)


MENU = (0, 1, 2, 3, 4, 8, 16)


def random_menu_groups(seed, n_items=400, n_groups=5):
    """Exponential items with eviction off the curve, unequal sizes, metadata, some zero weights; budgets from the
    cheapest to beyond the richest."""
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 2.0, n_items)
    model = ExponentialModel(alpha, rng.uniform(1.5, 8.0, n_items), eviction=alpha * rng.uniform(0.0, 3.0, n_items))
    sizes = rng.integers(1, 100, n_items).astype(float)
    weights = rng.uniform(0.0, 3.0, n_items) * (rng.random(n_items) > 0.1)
    average = np.array([0.5, 3.0, 7.9, 20.0, 1.0])[:n_groups]
    return model, sizes, weights, rng.integers(0, n_groups, n_items), average


def per_group_allocate(model, sizes, weights, groups, average, to=np.asarray, **options):
    """Each group's own solve, on the backend of ``to``."""
    return [allocate(ExponentialModel(to(model.alpha[s]), to(model.beta[s]), eviction=to(model.eviction[s])),
                     to(sizes[s]), average_bits=float(average[g]), weights=to(weights[s]), menu=MENU, metadata=32.0,
                     **options) for g in range(len(average)) for s in [groups == g]]


def test_grouped_allocate_with_eviction_and_metadata():
    model, sizes, weights, groups, average = random_menu_groups(0)
    got = allocate(model, sizes, average_bits=average, groups=groups, weights=weights, menu=MENU, metadata=32.0)
    for g, solo in enumerate(per_group_allocate(model, sizes, weights, groups, average)):
        assert_same_allocation(got, solo, np.nonzero(groups == g)[0], g)
    assert int(got.nodes.sum()) > 0  # the exact phase ran on some groups
    certificate = got.certificate()
    assert len(certificate["status"]) == len(average) and got.gap.shape == (len(average),)


def test_grouped_allocate_on_torch():
    torch = pytest.importorskip("torch")
    model, sizes, weights, groups, average = random_menu_groups(1)
    t = lambda x: torch.asarray(x, dtype=torch.float64)  # noqa: E731
    got = allocate(ExponentialModel(t(model.alpha), t(model.beta), eviction=t(model.eviction)), t(sizes),
                   average_bits=t(average), groups=torch.asarray(groups), weights=t(weights), menu=MENU,
                   metadata=32.0)
    assert isinstance(got.bits, torch.Tensor)
    for g, solo in enumerate(per_group_allocate(model, sizes, weights, groups, average, to=t)):
        assert_same_allocation(got, solo, np.nonzero(groups == g)[0], g)


def test_grouped_allocate_at_scale():
    """Over 10^4 items per group (chunked tables, a sampled split level), equal sizes and rounded weights: many ties
    at the split."""
    model, sizes, weights, groups, average = random_menu_groups(4, n_items=40_000, n_groups=3)
    sizes, average = np.full_like(sizes, 64.0), np.array([1.5, 3.0, 6.0])
    weights = np.round(weights, 1)
    got = allocate(model, sizes, average_bits=average, groups=groups, weights=weights, menu=MENU, metadata=32.0)
    for g, solo in enumerate(per_group_allocate(model, sizes, weights, groups, average)):
        assert_same_allocation(got, solo, np.nonzero(groups == g)[0], g)


def test_grouped_allocate_on_array_api_strict():
    xs = pytest.importorskip("array_api_strict")
    model, sizes, weights, groups, average = random_menu_groups(5, n_items=200)
    t = lambda x: xs.asarray(x, dtype=xs.float64)  # noqa: E731
    got = allocate(ExponentialModel(t(model.alpha), t(model.beta), eviction=t(model.eviction)), t(sizes),
                   average_bits=t(average), groups=xs.asarray(groups), weights=t(weights), menu=MENU, metadata=32.0)
    for g, solo in enumerate(per_group_allocate(model, sizes, weights, groups, average, to=t)):
        assert_same_allocation(got, solo, np.nonzero(groups == g)[0], g)


def test_grouped_allocate_under_jax_jit():
    """JAX has no exact phase: each group gets its own hull/greedy answer and dual certificate."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    model, sizes, weights, groups, average = random_menu_groups(2)
    with jax.enable_x64(True):
        solve = jax.jit(lambda a, b, e, n, w, g, avg: allocate(ExponentialModel(a, b, eviction=e), n, average_bits=avg,
                                                               groups=g, weights=w, menu=MENU, metadata=32.0))
        arrays = (model.alpha, model.beta, model.eviction, sizes, weights, groups, average)
        got = solve(*(jnp.asarray(x) for x in arrays))
        for g, solo in enumerate(per_group_allocate(model, sizes, weights, groups, average, max_nodes=0)):
            assert_same_allocation(got, solo, np.nonzero(groups == g)[0], g, exact=False)
        # without eviction every item needs a bit: an infeasible group says so (bits -1), the others are solved
        strict = jax.jit(lambda a, b, n, g, avg: allocate(ExponentialModel(a, b), n, average_bits=avg, groups=g,
                                                          menu=(1, 2, 4)))
        got = strict(*(jnp.asarray(x) for x in (model.alpha, model.beta, sizes, groups, np.array([2, 0.5, 2, 2, 2]))))
        assert int(got.status[1]) == INFEASIBLE and (np.asarray(got.bits)[groups == 1] == -1).all()
        assert (np.asarray(got.bits)[groups != 1] >= 1).all()


def test_grouped_item_errors_name_the_item():
    allowed = np.ones((6, 3), dtype=bool)
    allowed[4] = [True, False, False]  # item 4 can only take 0 bits, which the menu leaves out
    model = TabulatedModel((0, 2, 4), np.ones((6, 3)), allowed=allowed)
    with pytest.raises(ValueError, match="item 4 has no feasible bit-width"):
        allocate(model, 8.0, [100.0, 100.0], groups=np.array([1, 0, 1, 0, 1, 0]), menu=(2, 4))


def test_grouped_allocate_raises_naming_the_infeasible_group():
    model, sizes, weights, groups, average = random_menu_groups(3)
    model = ExponentialModel(model.alpha, model.beta)  # no eviction: at least 1 bit and its metadata per item
    average = np.array([3.0, 0.5, 3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="budget of group 1 .* is infeasible"):
        allocate(model, sizes, average_bits=average, groups=groups, weights=weights, menu=(1, 2, 4))


def test_grouped_allocate_on_jax_decides_feasibility_as_numpy_does():
    """Feasible means the cheapest allocation's usage, summed as reported, is within the budget: no slack, on every
    backend (JAX grouped used a relative slack in its eager check and an absolute one under jit, so a budget 1 ulp
    below the least came back INFEASIBLE without the error eager calls owe)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(6)
    n_items, menu = 60, (1, 2, 4)
    model = ExponentialModel(rng.lognormal(0.0, 1.0, n_items), 4.0)  # no eviction: every item needs 1 bit
    sizes = rng.integers(1, 50, n_items).astype(float)
    groups = rng.integers(0, 3, n_items)
    least = np.array([sizes[groups == g].sum() + 32.0 * np.sum(groups == g) for g in range(3)])  # exact sums
    below = least.copy()
    below[1] = np.nextafter(least[1], 0.0)
    numpy_solve = lambda budget: allocate(model, sizes, budget, groups=groups, menu=menu, metadata=32.0)  # noqa: E731
    assert (np.asarray(numpy_solve(least).bits) == 1).all()
    with pytest.raises(ValueError, match="budget of group 1 .* is infeasible"):
        numpy_solve(below)
    with jax.enable_x64(True):
        a, n, g = (jnp.asarray(x) for x in (model.alpha, sizes, groups))
        solve = lambda budget: allocate(ExponentialModel(a, 4.0), n, budget, groups=g, menu=menu,  # noqa: E731
                                        metadata=32.0)
        at_least = jax.jit(solve)(jnp.asarray(least))
        assert INFEASIBLE not in np.asarray(at_least.status).tolist() and (np.asarray(at_least.bits) == 1).all()
        short = jax.jit(solve)(jnp.asarray(below))
        assert np.asarray(short.status).tolist()[1] == INFEASIBLE
        assert INFEASIBLE not in np.asarray(short.status)[[0, 2]].tolist()
        assert (np.asarray(short.bits)[groups == 1] == -1).all()
        assert (np.asarray(solve(jnp.asarray(least)).bits) == 1).all()  # eager JAX
        with pytest.raises(ValueError, match="budget of group 1 .* is infeasible"):
            solve(jnp.asarray(below))


@pytest.mark.parametrize("average", [1.0, 2.0, 4.0])
def test_grouped_allocate_on_the_benchmark_shapes(average):
    """RDKV's per-head protocol at small scale (benchmarks/grouped.py): one table ``eps`` for every token, broadcast
    (no copy), token weights heavy-tailed, the menu {0, 2, 4, 8, 16}; enough tokens per head that the split search
    narrows a bucket of candidates. Each head is its own solve, bit for bit, proven optimal within its budget."""
    menu, eps, dim = (0, 2, 4, 8, 16), np.array([1.0, 0.25, 0.011, 0.000057, 0.0]), 128
    heads, tokens = 3, 1500
    weights = np.random.default_rng(7).lognormal(0.0, 2.0, (heads, tokens))
    budgets = np.full(heads, average * dim * tokens)
    model = TabulatedModel(menu, np.broadcast_to(eps, (heads * tokens, len(menu))))
    got = allocate(model, dim, budgets, groups=np.repeat(np.arange(heads), tokens), weights=weights.ravel(), menu=menu)
    one_head = TabulatedModel(menu, np.broadcast_to(eps, (tokens, len(menu))))
    for h in range(heads):
        solo = allocate(one_head, dim, float(budgets[h]), weights=weights[h], menu=menu)
        assert_same_allocation(got, solo, np.arange(h * tokens, (h + 1) * tokens), h)
        assert int(solo.status) == OPTIMAL and float(solo.payload_bits) <= budgets[h]
