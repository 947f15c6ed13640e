"""Extreme but valid, and invalid, inputs to the public entry points (issue #18): each call returns an answer that
passes :mod:`rdalloc.testing`'s invariant checks, or raises ``ValueError``/``TypeError`` whose message names one of
the call's arguments. Never another exception type, never a silent NaN."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rdalloc
from rdalloc import ExponentialModel, Plan, PlanApplier
from rdalloc.quantizers import KIVI
from rdalloc.testing import assert_in_box, assert_in_menu, assert_within_budget

SCALARS = [0.0, -0.0, 5e-324, 1e-310, 1e-300, 1e-30, 0.5, 1.0, 3.0, 1e30, 1e300, -1.0, -1e300, np.nan, np.inf,
           -np.inf, True, False, 0, 3, 2 ** 70, "3", None]
VALID = [5e-324, 1e-310, 1e-300, 1e-30, 0.5, 1.0, 3.0, 1e30, 1e300]
ALPHAS = (1e-300, 1e-150, 1e-30, 0.5, 1.0, 3.0, 1e30, 1e150, 1e300)
BUDGETS = VALID + [12.0, 24.0, 100.0] * 3 + SCALARS
SETTINGS = settings(max_examples=int(os.environ.get("EXTREME_EXAMPLES", 150)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def extreme(draw, n: int, valid: tuple = tuple(VALID)):
    """A scalar, a length-``n`` vector of extreme values (float, int, bool or object dtype), an empty array or a vector
    of the wrong length."""
    kind = draw(st.sampled_from(["valid"] * 8 + ["scalar", "vector", "empty", "wrong_length", "object", "bool"]))
    if kind == "valid":  # positive and finite, from the smallest subnormal to 1e300
        return np.array([draw(st.sampled_from(valid)) for _ in range(n)])
    if kind == "scalar":
        return draw(st.sampled_from(SCALARS))
    if kind == "empty":
        return np.array([])
    if kind == "object":
        return np.array([draw(st.sampled_from(SCALARS)) for _ in range(n)], dtype=object)
    if kind == "bool":
        return np.ones(n, dtype=bool)
    m = n + 1 if kind == "wrong_length" else n
    values = [draw(st.sampled_from([v for v in SCALARS if isinstance(v, float)])) for _ in range(m)]
    with np.errstate(over="ignore"):  # float32: 1e300 becomes inf
        return np.asarray(values, dtype=draw(st.sampled_from([np.float64, np.float32])))


def _refused_or(call, names: tuple[str, ...]):
    """``call()``'s result, or ``None`` when it raised ValueError/TypeError naming one of ``names``."""
    try:
        out = call()
    except (ValueError, TypeError) as e:
        event(f"refused ({names[0]}, ...)")
        message = str(e)
        assert any(name in message for name in names), f"{type(e).__name__} names no argument of {names}: {message}"
        return None
    event(f"answered ({names[0]}, ...)")
    return out


def _sane(x):
    """Sanity inputs to the invariant checks: finite float64 where the call accepted them."""
    return np.asarray(x, dtype=np.float64)


@SETTINGS
@given(st.data())
def test_waterfill(data):
    n = 3
    alpha = data.draw(extreme(n, ALPHAS))
    beta = data.draw(st.sampled_from([4.0, 1.5, 1e300, 1.0, np.nan, 0.5, 2]))
    sizes = data.draw(extreme(n))
    budget = data.draw(st.sampled_from(BUDGETS))
    weights = data.draw(st.one_of(st.just(1.0), extreme(n)))
    model = _refused_or(lambda: ExponentialModel(alpha=alpha, beta=beta), ("alpha", "beta"))
    if model is None:
        return
    r = _refused_or(lambda: rdalloc.waterfill(model, sizes, budget, weights=weights),
                    ("model", "sizes", "budget", "weights", "alpha", "beta"))
    if r is None:
        return
    bits = np.asarray(r.bits, dtype=np.float64)
    assert np.isfinite(bits).all(), bits
    assert_in_box(bits, 1.0, 8.0, atol=1e-9)
    assert_within_budget(bits, np.broadcast_to(_sane(sizes), bits.shape), float(budget), rtol=1e-9)
    assert not np.isnan(np.asarray(r.distortion)).any(), r.distortion


@SETTINGS
@given(st.data())
def test_allocate(data):
    n = 3
    alpha = data.draw(extreme(n, ALPHAS))
    sizes = data.draw(extreme(n))
    budget = data.draw(st.sampled_from(BUDGETS))
    weights = data.draw(st.one_of(st.just(1.0), extreme(n)))
    metadata = data.draw(st.one_of(st.just(0.0), extreme(n)))
    menu = (1, 2, 4, 8)
    model = _refused_or(lambda: ExponentialModel(alpha=alpha, beta=4.0), ("alpha", "beta"))
    if model is None:
        return
    r = _refused_or(lambda: rdalloc.allocate(model, sizes, budget, weights=weights, metadata=metadata, menu=menu),
                    ("model", "sizes", "budget", "weights", "metadata", "menu", "alpha"))
    if r is None:
        return
    bits = np.asarray(r.bits)
    assert_in_menu(bits, menu, model)
    m = np.broadcast_to(_sane(metadata), bits.shape)
    assert_within_budget(bits, np.broadcast_to(_sane(sizes), bits.shape), float(budget), m, rtol=1e-9)
    assert not np.isnan(np.asarray(r.distortion)).any(), r.distortion


@SETTINGS
@given(st.data())
def test_fit_exponential(data):
    bits = data.draw(st.sampled_from([[1, 2, 4], [1, 1, 2], [2, 4], [], [0, 2, 4], [1.5, 2, 3], [True, 2, 3],
                                      [1, 2, 17]]))
    if data.draw(st.booleans()):  # valid: decreasing in the bits, extreme magnitudes
        d = np.sort(np.array([data.draw(st.sampled_from(VALID)) for _ in bits]))[::-1].copy()
    else:
        d = data.draw(extreme(max(len(bits), 1)))
    items = data.draw(st.booleans())
    if items and isinstance(d, np.ndarray) and d.ndim == 1:
        d = np.stack([d, d])
    fit = _refused_or(lambda: rdalloc.fit_exponential(d, bits), ("distortions", "bits"))
    if fit is None:
        return
    for name in ("alpha", "beta"):
        v = np.asarray(getattr(fit, name), dtype=np.float64)
        assert np.isfinite(v).all() and (v > 0).all(), (name, v)
    # beta <= 1 (flat or rising distortions) or a subnormal alpha (distortions near 5e-324): refused by name
    model = _refused_or(lambda: fit.model, ("beta", "alpha"))
    if model is not None:
        assert (np.asarray(model.beta) > 1).all() and np.isfinite(model.alpha).all()


@SETTINGS
@given(st.data())
def test_plan_construction(data):
    key = data.draw(st.one_of(extreme(2), st.just(np.array([[4, 16]])), st.just(np.array([[4.5, 2]])),
                              st.just(np.array([[True, 2]])), st.just(np.array([[-1, 2]])),
                              st.just(np.array([[2 ** 40, 2]]))))
    value = data.draw(st.one_of(st.just(np.array([[2, 0]])), extreme(2)))
    plan = _refused_or(lambda: Plan(key=key, value=value, quantizer="kivi"), ("key", "value", "quantizer"))
    if plan is None:
        return
    for b in (plan.key, plan.value):
        assert np.issubdtype(np.asarray(b).dtype, np.integer)
        assert np.isin(np.asarray(b), [0, 1, 2, 3, 4, 5, 6, 7, 8, 16]).all(), b


@SETTINGS
@given(st.data())
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_plan_applier_on_numpy(data):
    bits = data.draw(st.sampled_from([1, 2, 3, 7, 8, 16, 0]))
    plan = Plan(key=np.array([[bits, 4]]), value=np.array([[2, bits]]), quantizer="kivi")
    ap = PlanApplier(plan, KIVI(group_size=2))
    fill = data.draw(st.sampled_from([0.0, -0.0, 5e-324, 1e-40, 1e-30, 1.0, 3e4, 32752.0] * 3
                                     + [32753.0, 6e4, 1e300, np.nan, np.inf, -np.inf]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.float16] * 3 + [np.int32, np.bool_, object]))
    t = data.draw(st.sampled_from([0, 1, 3]))
    shape = data.draw(st.sampled_from([(1, 2, t, 4)] * 6 + [(1, 3, t, 4), (2, 4), (1, 2, t, 3)]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    x = rng.standard_normal(shape)
    x.ravel()[:: data.draw(st.integers(1, 5))] = fill
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(dtype)  # float16: 1e300 becomes inf
    for method in (ap.fake_quantize, ap.pack):
        out = _refused_or(lambda m=method: m(x, x, layer=0), ("keys", "values", "layer", "tokens", "plan"))
        if out is None:
            continue
        if method == ap.pack:
            out = ap.unpack(out)
        for y in out[:2]:
            y = np.asarray(y)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert not np.isnan(y[~np.isnan(x)]).any(), "a NaN appeared"



@pytest.mark.parametrize("solver", ["waterfill", "allocate", "allocate_weights", "allocate_metadata"])
def test_alpha_over_size_beyond_float64(solver):
    """Found by the sweep above: rates ``w alpha / n`` (or ``metadata / n``) beyond float64 overflowed inside the
    solve. ``waterfill`` (in logs) now answers them; ``allocate`` refuses them by name before any work."""
    model = ExponentialModel(alpha=np.array([1e-30, 1.0, 1e30]), beta=4.0)
    sizes = np.full(3, 1e-300)
    if solver == "waterfill":  # works in logs: answers, within the budget
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = rdalloc.waterfill(model, sizes, average_bits=4)
        assert_within_budget(np.asarray(r.bits), sizes, float(r.budget), rtol=1e-9)
        assert np.isfinite(float(r.distortion)) and int(r.status) == rdalloc.status.OPTIMAL
        np.testing.assert_allclose(r.bits, rdalloc.waterfill(model, np.ones(3), average_bits=4).bits, rtol=1e-12)
        return
    with pytest.raises(ValueError, match=r"weights \* distortion|metadata / sizes"), warnings.catch_warnings():
        warnings.simplefilter("error")
        _solve_out_of_range(solver, model, sizes)
    # a common factor of the weights brings the same problem back in range, with the answer of unit sizes
    scaled = rdalloc.allocate(model, sizes, average_bits=4, weights=1e-100, menu=(1, 2, 4, 8))
    unit = rdalloc.allocate(model, np.ones(3), average_bits=4, menu=(1, 2, 4, 8))
    assert int(scaled.status) == int(unit.status) == rdalloc.status.OPTIMAL  # item 0's 1 or 2 bits tie in float64
    np.testing.assert_allclose(float(scaled.distortion) / 1e-100, float(unit.distortion), rtol=1e-12)


def _solve_out_of_range(solver, model, sizes):
    if solver == "waterfill":
        rdalloc.waterfill(model, sizes, 1e-30)
    elif solver == "allocate":
        rdalloc.allocate(model, sizes, 1e-30, menu=(1, 2, 4, 8))
    elif solver == "allocate_metadata":  # 1e300 bits of metadata on items of 1e-300 elements
        rdalloc.allocate(ExponentialModel(alpha=np.array([1e-300, 1e-150, 1e-300]), beta=4.0), sizes, 1e300,
                         metadata=np.array([5e-324, 5e-324, 1e300]), menu=(1, 2, 4, 8))
    else:  # weights * alpha = 1e330
        rdalloc.allocate(ExponentialModel(alpha=np.array([1e-300, 1e300, 1e-300]), beta=4.0), sizes, 5e-324,
                         weights=np.array([5e-324, 1e30, 5e-324]), menu=(1, 2, 4, 8))
