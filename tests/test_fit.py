"""Fitting distortion models: recovery under noise (hypothesis), pooled vs per item, the closed form against a generic
least-squares solve, endpoints, zeros, the tabulated model and its hull, the automatic choice, and bad input."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from rdalloc import ExponentialModel, TabulatedModel
from rdalloc.cost import item_cost
from rdalloc.fit import (
    DEFAULT_TOLERANCE,
    ExponentialFit,
    ModelChoice,
    choose_model,
    fit_exponential,
    lower_hull,
    tabulate,
)

QBITS = [2, 3, 4, 5, 6, 8]


def synthetic(rng, n_items, bits, beta, sigma=0.0, alpha=None, eviction_factor=None):
    """``alpha * beta**(-b) * exp(sigma * u)``, ``u`` uniform in [-1, 1]; 0 -> alpha / eviction_factor; 16 -> 0."""
    alpha = rng.lognormal(0.0, 1.0, n_items) if alpha is None else np.asarray(alpha, float)
    beta = np.broadcast_to(np.asarray(beta, float), (n_items,))
    b = np.asarray(bits, float)
    d = alpha[:, None] * beta[:, None] ** (-b[None, :]) * np.exp(sigma * rng.uniform(-1, 1, (n_items, len(bits))))
    if bits[0] == 0:
        d[:, 0] = alpha / (eviction_factor or 1.0)
    if bits[-1] == 16:
        d[:, -1] = 0.0
    return alpha, d


bit_sets = st.lists(st.integers(1, 15), min_size=2, max_size=7, unique=True).map(sorted)


# ---- recovery ---------------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 6), qbits=bit_sets, beta=st.floats(1.2, 8.0),
       sigma=st.floats(0.0, 0.3), pooled=st.booleans(), weighted=st.booleans(), endpoints=st.booleans())
def test_alpha_and_beta_are_recovered_within_the_noise_bound(seed, n_items, qbits, beta, sigma, pooled, weighted,
                                                             endpoints):
    # Bounded multiplicative noise |ln noise| <= sigma gives a deterministic bound on the estimation error:
    # dk = -sum w (b - bbar) e / Sxx  =>  |dk| <= sigma sum w |b - bbar| / Sxx;  |d ln alpha_i| <= sigma + |dk| bbar_i.
    rng = np.random.default_rng(seed)
    bits = ([0] if endpoints else []) + qbits + ([16] if endpoints else [])
    per_item_beta = beta if pooled else rng.uniform(1.2, 8.0, n_items)
    alpha, d = synthetic(rng, n_items, bits, per_item_beta, sigma, eviction_factor=3.0)
    w = rng.uniform(0.1, 3.0, (n_items, len(bits))) if weighted else np.ones((n_items, len(bits)))
    fit = fit_exponential(d, bits, pooled=pooled, sample_weights=w if weighted else None)

    x = np.asarray(qbits, float)
    wq = w[:, [bits.index(b) for b in qbits]]
    xbar = (wq * x).sum(1) / wq.sum(1)
    dev = wq * np.abs(x[None, :] - xbar[:, None])
    sxx = (wq * (x[None, :] - xbar[:, None]) ** 2).sum(1)
    dk = sigma * (dev.sum() / sxx.sum() if pooled else dev.sum(1) / sxx)
    slack = 1e-9 * (1 + np.abs(np.log(alpha)) + 16 * np.log(8))
    assert np.all(np.abs(np.log(fit.beta) - np.log(per_item_beta)) <= dk + 1e-9)
    assert np.all(np.abs(np.log(fit.alpha) - np.log(alpha)) <= sigma + dk * xbar + slack)
    if sigma == 0:
        np.testing.assert_allclose(fit.beta, per_item_beta, rtol=1e-9)
        np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-8)


@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 6), qbits=bit_sets, beta=st.floats(1.2, 8.0))
def test_pooled_and_per_item_agree_when_items_share_beta(seed, n_items, qbits, beta):
    rng = np.random.default_rng(seed)
    _, d = synthetic(rng, n_items, qbits, beta)
    pooled = fit_exponential(d, qbits, pooled=True)
    per_item = fit_exponential(d, qbits, pooled=False)
    np.testing.assert_allclose(per_item.beta, pooled.beta, rtol=1e-9)
    np.testing.assert_allclose(per_item.alpha, pooled.alpha, rtol=1e-8)


@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 6), qbits=bit_sets, sigma=st.floats(0.0, 0.5))
def test_pooled_slope_is_the_sxx_weighted_mean_of_item_slopes(seed, n_items, qbits, sigma):
    rng = np.random.default_rng(seed)
    _, d = synthetic(rng, n_items, qbits, rng.uniform(1.5, 6.0, n_items), sigma)
    w = rng.uniform(0.2, 2.0, d.shape)
    pooled = fit_exponential(d, qbits, sample_weights=w)
    per_item = fit_exponential(d, qbits, pooled=False, sample_weights=w)
    x = np.asarray(qbits, float)
    xbar = (w * x).sum(1) / w.sum(1)
    sxx = (w * (x - xbar[:, None]) ** 2).sum(1)
    expected = (sxx * np.log(per_item.beta)).sum() / sxx.sum()
    np.testing.assert_allclose(np.log(pooled.beta), expected, rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 6), qbits=bit_sets, sigma=st.floats(0.0, 1.0),
       weighted=st.booleans())
def test_pooled_closed_form_matches_lstsq_on_the_dummy_variable_design(seed, n_items, qbits, sigma, weighted):
    rng = np.random.default_rng(seed)
    _, d = synthetic(rng, n_items, qbits, rng.uniform(1.5, 6.0, n_items), sigma)
    w = rng.uniform(0.1, 3.0, d.shape) if weighted else np.ones(d.shape)
    fit = fit_exponential(d, qbits, sample_weights=w if weighted else None)
    # y_ik = a_i - k b_k: design [one_hot(item) | -b], rows scaled by sqrt(w) (weighted least squares).
    K = len(qbits)
    X = np.zeros((n_items * K, n_items + 1))
    for i in range(n_items):
        X[i * K:(i + 1) * K, i] = 1.0
        X[i * K:(i + 1) * K, -1] = -np.asarray(qbits, float)
    y = np.log(d).reshape(-1)
    s = np.sqrt(w.reshape(-1))
    coef, *_ = np.linalg.lstsq(X * s[:, None], y * s, rcond=None)
    np.testing.assert_allclose(np.log(fit.alpha), coef[:n_items], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.log(fit.beta), coef[-1], rtol=1e-8, atol=1e-10)


@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_scaling_all_weights_changes_nothing(seed, scale):
    rng = np.random.default_rng(seed)
    _, d = synthetic(rng, 4, QBITS, 4.0, 0.2)
    w = rng.uniform(0.1, 2.0, d.shape)
    a, b = fit_exponential(d, QBITS, sample_weights=w), fit_exponential(d, QBITS, sample_weights=w * scale)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-10)
    np.testing.assert_allclose(a.log_beta_se, b.log_beta_se, rtol=1e-8)


def test_per_item_standard_error_matches_scipy_linregress():
    rng = np.random.default_rng(3)
    _, d = synthetic(rng, 3, QBITS, [3.0, 4.0, 5.0], 0.2)
    fit = fit_exponential(d, QBITS, pooled=False)
    for i in range(3):
        ref = stats.linregress(QBITS, np.log(d[i]))
        assert -ref.slope == pytest.approx(math.log(fit.beta[i]), rel=1e-10)
        assert ref.stderr == pytest.approx(fit.log_beta_se[i], rel=1e-9)
        assert ref.rvalue**2 == pytest.approx(fit.r2[i], rel=1e-9)
        lo, hi = fit.beta_interval(0.9)[i]
        t = stats.t.ppf(0.95, len(QBITS) - 2)
        assert lo == pytest.approx(math.exp(-ref.slope - t * ref.stderr), rel=1e-9)
        assert hi == pytest.approx(math.exp(-ref.slope + t * ref.stderr), rel=1e-9)


def test_confidence_interval_covers_beta_at_about_the_stated_level():
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(400):
        d = 2.0 * 4.0 ** -np.asarray(QBITS, float) * np.exp(rng.normal(0, 0.3, len(QBITS)))
        lo, hi = fit_exponential(d[None, :], QBITS, pooled=False).beta_interval(0.9)[0]
        hits += lo <= 4.0 <= hi
    assert 0.85 <= hits / 400 <= 0.95


# ---- endpoints, zeros, the model --------------------------------------------------------------------------------
def test_endpoints_are_kept_as_measured_and_not_fitted():
    rng = np.random.default_rng(0)
    bits = [0] + QBITS + [16]
    alpha, d = synthetic(rng, 5, bits, 4.0, 0.05, eviction_factor=10.0)
    d[:, -1] = 1e-9  # a tiny but non-zero full-precision error
    fit = fit_exponential(d, bits, quantizer="kivi")
    quantized_only = fit_exponential(d[:, 1:-1], QBITS)
    np.testing.assert_allclose(fit.alpha, quantized_only.alpha, rtol=1e-13)
    np.testing.assert_allclose(fit.beta, quantized_only.beta, rtol=1e-13)
    model = fit.model
    assert isinstance(model, ExponentialModel)
    np.testing.assert_array_equal(model.eviction, d[:, 0])
    np.testing.assert_array_equal(model.full, d[:, -1])
    assert (model.lo, model.hi, model.quantizer) == (2.0, 8.0, "kivi")
    assert np.isscalar(model.beta) and model.beta == pytest.approx(fit.beta[0])
    # Without the endpoints: no eviction, full precision exact.
    m2 = quantized_only.model
    assert not m2.can_evict and m2.full == 0.0


def test_model_from_per_item_fit_has_one_beta_per_item():
    rng = np.random.default_rng(1)
    _, d = synthetic(rng, 4, QBITS, [2.0, 3.0, 4.0, 5.0])
    model = fit_exponential(d, QBITS, pooled=False).model
    np.testing.assert_allclose(model.beta, [2.0, 3.0, 4.0, 5.0], rtol=1e-9)


def test_a_zero_measurement_is_left_out_not_logged():
    rng = np.random.default_rng(2)
    _, d = synthetic(rng, 3, QBITS, 4.0, 0.1)
    d0 = d.copy()
    d0[1, -1] = 0.0  # item 1 measures exactly 0 at 8 bits
    w = np.ones_like(d)
    w[1, -1] = 0.0
    fit = fit_exponential(d0, QBITS)
    ref = fit_exponential(d, QBITS, sample_weights=w)  # same as leaving the point out
    np.testing.assert_allclose(fit.alpha, ref.alpha, rtol=1e-12)
    np.testing.assert_allclose(fit.beta, ref.beta, rtol=1e-12)
    assert np.all(np.isfinite(fit.alpha)) and np.all(np.isfinite(fit.beta))
    assert fit.n_zero.tolist() == [0, 1, 0] and fit.n_points.tolist() == [6, 5, 6]
    assert np.isnan(fit.log_residuals[1, -1])


def test_zeros_leaving_one_point_fail_per_item_but_not_pooled():
    rng = np.random.default_rng(4)
    _, d = synthetic(rng, 3, [2, 4, 8], 4.0, 0.05)
    d[0, 1:] = 0.0
    pooled = fit_exponential(d, [2, 4, 8])  # item 0 has one point: its alpha from the shared slope
    assert pooled.n_points[0] == 1 and np.isfinite(pooled.alpha[0])
    assert pooled.alpha[0] * pooled.beta[0] ** -2 == pytest.approx(d[0, 0])
    with pytest.raises(ValueError, match=r"item 0 leave 1 usable quantized point.*per-item fit needs two"):
        fit_exponential(d, [2, 4, 8], pooled=False)
    d[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"item 0 leave 0 usable"):
        fit_exponential(d, [2, 4, 8])


def test_increasing_data_gives_a_clear_error_when_the_model_is_asked_for():
    d = np.array([[1.0, 2.0, 4.0], [1.0, 0.5, 0.25]])
    fit = fit_exponential(d, [2, 3, 4], pooled=False)
    assert fit.beta[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"fitted beta of item 0 is 0.5.* <= 1"):
        _ = fit.model


def test_fit_round_trips_through_json():
    rng = np.random.default_rng(5)
    _, d = synthetic(rng, 3, [0] + QBITS, 4.0, 0.1, eviction_factor=2.0)
    fit = fit_exponential(d, [0] + QBITS, quantizer="quarot")
    back = ExponentialFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_array_equal(back.alpha, fit.alpha)
    np.testing.assert_array_equal(back.beta_interval(), fit.beta_interval())
    assert back.model.to_dict() == fit.model.to_dict()


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_any_array_backend_is_accepted(backend):
    rng = np.random.default_rng(6)
    _, d = synthetic(rng, 4, [0] + QBITS, 4.0, 0.1, eviction_factor=2.0)
    ref = fit_exponential(d, [0] + QBITS)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        x, bits = torch.asarray(d), torch.asarray([0] + QBITS)
    else:
        jnp = pytest.importorskip("jax.numpy")
        x, bits = jnp.asarray(d.astype(np.float32)), [0] + QBITS
    got = fit_exponential(x, bits, sample_weights=None)
    rtol = 1e-12 if backend == "torch" else 1e-5
    np.testing.assert_allclose(got.alpha, ref.alpha, rtol=rtol)
    np.testing.assert_allclose(got.beta, ref.beta, rtol=rtol)
    assert isinstance(got.alpha, np.ndarray) and got.alpha.dtype == np.float64


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, error, match", [
    (lambda d: d.__setitem__((1, 2), np.nan), ValueError, r"distortions must be finite, got nan at item 1, bits=4"),
    (lambda d: d.__setitem__((0, 0), np.inf), ValueError, r"distortions must be finite, got inf at item 0, bits=2"),
    (lambda d: d.__setitem__((2, 1), -0.5), ValueError, r"distortions must be >= 0, got -0.5 at item 2, bits=3"),
])
def test_bad_values_are_named(mutate, error, match):
    d = np.ones((3, 4))
    mutate(d)
    with pytest.raises(error, match=match):
        fit_exponential(d, [2, 3, 4, 8])


@pytest.mark.parametrize("bits, shape, error, match", [
    ([0, 2, 16], (2, 3), ValueError, r"at least two quantized widths .* got bits=\[0, 2, 16\]"),
    ([2, 4, 3], (2, 3), ValueError, r"bits must be strictly increasing, got \[2, 4, 3\]"),
    ([2, 2, 4], (2, 3), ValueError, r"bits must be strictly increasing"),
    ([2, 3.5, 4], (2, 3), ValueError, r"bits must hold integers in \[0, 16\], got \[2.0, 3.5, 4.0\]"),
    ([2, 4, 17], (2, 3), ValueError, r"bits must hold integers in \[0, 16\]"),
    ([2, 3, 4], (2, 4), ValueError, r"distortions must have shape \(items, 3\) to match bits=\[2, 3, 4\], got shape "
                                    r"\(2, 4\)"),
    ([2, 3, 4], (3,), ValueError, r"got shape \(3,\)"),
    (["a", "b"], (2, 2), TypeError, r"bits must be numeric"),
    ("248", (2, 3), TypeError, r"bits must be a sequence"),
])
def test_bad_bits_and_shapes_are_named(bits, shape, error, match):
    with pytest.raises(error, match=match):
        fit_exponential(np.ones(shape), bits)


def test_bad_weights_and_names():
    d = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"sample_weights must be a scalar, shape \(3,\).*got shape \(2, 2\)"):
        fit_exponential(d, [2, 3, 4], sample_weights=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"sample_weights must be >= 0, got -1.0 at item 0, bits=3"):
        fit_exponential(d, [2, 3, 4], sample_weights=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match=r"distortions must be a real numeric array, got dtype <U1"):
        fit_exponential([["a", "b", "c"]], [2, 3, 4])
    with pytest.raises(TypeError, match=r"quantizer must be a string or None, got int 3"):
        fit_exponential(d, [2, 3, 4], quantizer=3)


# ---- tabulated model and its lower convex hull ------------------------------------------------------------------
def test_tabulate_builds_a_tabulated_model():
    d = np.array([[1.0, 0.3, 0.05, 0.0], [2.0, 0.1, 0.01, 0.0]])
    t = tabulate(d, [0, 2, 4, 16], quantizer="kivi")
    assert isinstance(t, TabulatedModel) and t.bits == (0, 2, 4, 16) and t.quantizer == "kivi"
    np.testing.assert_array_equal(t.distortion, d)
    with pytest.raises(ValueError, match=r"distortions must be >= 0, got -1.0 at item 0, bits=2"):
        tabulate(np.array([[1.0, -1.0]]), [0, 2])


def _hull_brute(C, D):
    """Points minimizing D + lam C for some lam >= 0 (lam over 0+, every pairwise breakpoint and +inf)."""
    K = len(C)
    lams = [1e-300]
    for j in range(K):
        for k in range(K):
            if C[j] != C[k] and np.isfinite(D[j]) and np.isfinite(D[k]):
                s = (D[j] - D[k]) / (C[k] - C[j])
                if s > 0:
                    lams.append(s)
    on = np.zeros(K, dtype=bool)
    for lam in lams:
        v = D + lam * C
        on |= np.isfinite(v) & (v <= v[np.isfinite(v)].min() * (1 + 1e-12) + 1e-300)
    # lam -> inf: the cheapest finite point (lowest distortion among equal cost)
    fin = np.flatnonzero(np.isfinite(D))
    cheapest = fin[np.lexsort((D[fin], C[fin]))[0]]
    on[cheapest] = True
    return on


@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 5), metadata=st.sampled_from([0.0, 8.0, 64.0, 512.0]))
def test_lower_hull_matches_the_lagrangian_definition(seed, n_items, metadata):
    rng = np.random.default_rng(seed)
    bits = [0, 1, 2, 3, 4, 6, 8, 16]
    d = np.sort(rng.lognormal(0, 2, (n_items, len(bits))), axis=1)[:, ::-1] * rng.uniform(0.3, 1.7, (n_items, 8))
    sizes = rng.integers(1, 100, n_items).astype(float)
    on = lower_hull(tabulate(d, bits), sizes, metadata=metadata)
    C = np.asarray(item_cost(np.asarray(bits, float)[None, :], sizes[:, None], metadata))
    for i in range(n_items):
        np.testing.assert_array_equal(on[i], _hull_brute(C[i], d[i]), err_msg=f"item {i}")


def test_lower_hull_examples():
    bits = [0, 2, 4, 8, 16]
    d = np.array([[8.0, 6.0, 4.0, 1.0, 0.0],    # 0, 2, 4 collinear in (cost, D): all kept
                  [8.0, 7.9, 1.0, 0.5, 0.0],    # 2 bits lies above the 0-4 chord
                  [8.0, 9.0, 1.0, 1.0, 0.0]])   # 2 bits worse than evicting; 8 no better than 4
    on = lower_hull(tabulate(d, bits), 1.0)
    assert on.tolist() == [[True, True, True, True, True], [True, False, True, True, True],
                           [True, False, True, False, True]]
    # Exponential model at a menu: a convex curve is all hull (without metadata and eviction).
    m = ExponentialModel(np.array([1.0, 5.0]), 4.0, lo=1, hi=8)
    assert lower_hull(m, 16.0, menu=[1, 2, 3, 4, 5, 6, 8, 16]).all()
    with pytest.raises(TypeError, match="needs menu="):
        lower_hull(m)
    with pytest.raises(ValueError, match=r"sizes must be finite and > 0, got 0.0 at item 1"):
        lower_hull(tabulate(d, bits), np.array([1.0, 0.0, 1.0]))


# ---- automatic choice -------------------------------------------------------------------------------------------
def choice_data(seed=0):
    rng = np.random.default_rng(seed)
    bits = [0, 2, 3, 4, 6, 8, 16]
    alpha, d = synthetic(rng, 5, bits, 4.0, 0.05, eviction_factor=2.5)
    d[3, 1:-1] = alpha[3] * 1.8 ** -np.asarray([2, 3, 4, 6, 8.0])  # item 3 decays at its own rate
    return bits, d


def test_choose_model_tabulates_the_item_the_curve_misses():
    bits, d = choice_data()
    c = choose_model(d, bits, quantizer="kivi")
    assert c.exponential_items == [0, 1, 2, 4] and c.tabulated_items == [3]
    assert c.quantizer == "kivi" and c.tolerance == DEFAULT_TOLERANCE
    table, ok = c.model.table()
    assert ok.all()
    np.testing.assert_array_equal(table[3], d[3])                   # measured
    np.testing.assert_array_equal(table[:, 0], d[:, 0])             # eviction as measured for everyone
    np.testing.assert_array_equal(table[:, -1], 0.0)                # full precision
    np.testing.assert_allclose(table[0, 1:-1], c.fit.curve([2, 3, 4, 6, 8])[0])  # from the curve
    assert "item 3: tabulated: the curve misses a measured point by" in c.summary()
    assert all(c.max_factor[i] <= DEFAULT_TOLERANCE for i in c.exponential_items)
    # The quantizer's beta comes from the items it describes: item 3 left the slope estimate.
    assert c.fit.slope_items.tolist() == [True, True, True, False, True]
    assert abs(math.log(c.fit.beta[0]) - math.log(4.0)) <= 0.05
    assert c.fit.beta[0] == pytest.approx(fit_exponential(np.delete(d, 3, 0), bits).beta[0], rel=1e-12)


def test_choose_model_menu_with_unmeasured_widths():
    bits, d = choice_data()
    menu = [0, 2, 3, 4, 5, 6, 7, 8, 16]
    c = choose_model(d[:, :-1], bits[:-1], menu=menu)  # 16 not measured: exact, 0
    table, ok = c.model.table()
    assert ok[0].all() and not ok[3, menu.index(5)] and not ok[3, menu.index(7)] and ok[3, menu.index(6)]
    assert table[1, menu.index(5)] == pytest.approx(c.fit.curve([5])[1, 0])
    assert (table[:, -1] == 0).all()
    # A huge tolerance puts every item on its curve; 1.0 (exact) on none of the noisy ones.
    assert choose_model(d, bits, tolerance=1e6).exponential.all()
    assert not choose_model(d, bits, tolerance=1.0).exponential.any()
    with pytest.raises(ValueError, match=r"tolerance must be a finite factor >= 1, got 0.5"):
        choose_model(d, bits, tolerance=0.5)


def test_choose_model_round_trips_and_feeds_allocate():
    bits, d = choice_data()
    c = choose_model(d, bits, quantizer="kivi")
    back = ModelChoice.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.exponential.tolist() == c.exponential.tolist() and back.model.bits == c.model.bits
    try:
        from rdalloc.allocate import allocate
    except Exception:  # pragma: no cover - allocate is developed alongside
        pytest.skip("rdalloc.allocate not available")
    a = allocate(c.model, 64.0, average_bits=3.0)
    assert np.isin(np.asarray(a.bits), bits).all()
