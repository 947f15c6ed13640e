"""Distortion-model mismatch: an inverted bit order is detected, the penalty equals the distortion computed directly,
and applying a plan with another quantizer warns."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdalloc import ExponentialModel, Plan, TabulatedModel, waterfill
from rdalloc.fit import fit_exponential
from rdalloc.mismatch import MismatchReport, ModelMismatchWarning, check_quantizer, compare_models, evaluate_distortion

N = 8


def inverted_pair():
    """Equal alphas; the true betas rise over the items, the assumed ones fall: the optimal bits fall over the items
    under one model and rise under the other."""
    beta = np.linspace(2.0, 6.0, N)
    true = ExponentialModel(np.ones(N), beta, lo=1, hi=8, quantizer="kivi")
    assumed = ExponentialModel(np.ones(N), beta[::-1].copy(), lo=1, hi=8, quantizer="quarot")
    return true, assumed


def direct(model, bits, w=1.0):
    alpha, beta = np.asarray(model.alpha, float), np.broadcast_to(np.asarray(model.beta, float), (N,))
    return float(np.sum(w * alpha * beta ** -np.asarray(bits, float)))


def test_inverted_order_is_detected_and_the_penalty_is_the_direct_distortion():
    true, assumed = inverted_pair()
    sizes, weights = 64.0, np.linspace(1.0, 2.0, N)
    r = compare_models(true, assumed, sizes, average_bits=3.0, weights=weights)
    # The orders are exactly reversed.
    assert np.all(np.diff(r.bits_true) < 0) and np.all(np.diff(r.bits_assumed) > 0)
    assert r.spearman == pytest.approx(-1.0) and r.kendall == pytest.approx(-1.0) and r.order_inverted
    # The penalty is what the true curve says about the two allocations, computed directly.
    opt = waterfill(true, sizes, average_bits=3.0, weights=weights)
    wrong = waterfill(assumed, sizes, average_bits=3.0, weights=weights)
    np.testing.assert_allclose(r.bits_true, opt.bits, rtol=1e-12)
    np.testing.assert_allclose(r.bits_assumed, wrong.bits, rtol=1e-12)
    assert r.distortion_optimal == pytest.approx(float(opt.distortion), rel=1e-12)
    assert r.distortion_optimal == pytest.approx(direct(true, opt.bits, weights), rel=1e-12)
    assert r.distortion_mismatched == pytest.approx(direct(true, wrong.bits, weights), rel=1e-12)
    assert r.penalty == pytest.approx(direct(true, wrong.bits, weights) - direct(true, opt.bits, weights), rel=1e-9)
    assert r.penalty > 0 and r.relative_penalty == pytest.approx(r.penalty / r.distortion_optimal)
    # ... and here the mismatched allocation is worse than giving every item 3 bits.
    assert r.distortion_uniform == pytest.approx(direct(true, np.full(N, 3.0), weights), rel=1e-12)
    assert r.worse_than_uniform
    text = r.summary()
    assert "WORSE than uniform" in text and "reverses the bit order" in text and "'quarot'" in text


def test_shared_beta_mismatch_keeps_the_order_but_costs_distortion():
    rng = np.random.default_rng(0)
    alpha = rng.lognormal(0, 1, N)
    true = ExponentialModel(alpha, 5.3, lo=1, hi=8, quantizer="quarot")
    assumed = ExponentialModel(alpha, 3.6, lo=1, hi=8, quantizer="kivi")
    r = compare_models(true, assumed, 128.0, average_bits=4.0)
    assert r.spearman == pytest.approx(1.0) and not r.order_inverted
    assert r.penalty > 0
    assert r.distortion_mismatched == pytest.approx(direct(true, r.bits_assumed), rel=1e-12)


@given(seed=st.integers(0, 2**32 - 1), average=st.floats(1.5, 7.5))
def test_penalty_is_never_negative_and_zero_for_the_same_model(seed, average):
    rng = np.random.default_rng(seed)
    true = ExponentialModel(rng.lognormal(0, 2, N), rng.uniform(1.5, 6, N), lo=1, hi=8)
    assumed = ExponentialModel(rng.lognormal(0, 2, N), rng.uniform(1.5, 6, N), lo=1, hi=8)
    sizes = rng.integers(8, 256, N).astype(float)
    r = compare_models(true, assumed, sizes, average_bits=average)
    assert r.penalty >= -1e-9 * r.distortion_optimal
    assert r.distortion_mismatched == pytest.approx(direct(true, r.bits_assumed), rel=1e-12)
    same = compare_models(true, true, sizes, average_bits=average)
    assert same.penalty == 0.0


def test_fitted_models_end_to_end():
    rng = np.random.default_rng(1)
    bits = [0, 2, 3, 4, 6, 8, 16]
    q = np.asarray(bits[1:-1], float)
    alpha = rng.lognormal(0, 1, N)
    d_kivi = np.zeros((N, len(bits)))
    d_quarot = np.zeros((N, len(bits)))
    d_kivi[:, 1:-1] = alpha[:, None] * 3.6 ** -q * np.exp(rng.normal(0, 0.05, (N, len(q))))
    d_quarot[:, 1:-1] = alpha[::-1, None] * 5.3 ** -q * np.exp(rng.normal(0, 0.05, (N, len(q))))
    d_kivi[:, 0], d_quarot[:, 0] = alpha, alpha[::-1]
    kivi = fit_exponential(d_kivi, bits, quantizer="kivi").model
    quarot = fit_exponential(d_quarot, bits, quantizer="quarot").model
    r = compare_models(kivi, quarot, 128.0, average_bits=3.0)
    assert r.true_quantizer == "kivi" and r.assumed_quantizer == "quarot"
    assert r.order_inverted and r.penalty > 0
    back = MismatchReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.penalty == pytest.approx(r.penalty) and back.bits_assumed.tolist() == r.bits_assumed.tolist()


def test_menu_path_uses_integer_allocation():
    pytest.importorskip("rdalloc.allocate")
    from rdalloc.allocate import allocate

    true, assumed = inverted_pair()
    true = ExponentialModel(true.alpha, true.beta, eviction=np.full(N, 0.5), lo=1, hi=8, quantizer="kivi")
    menu = [0, 1, 2, 3, 4, 5, 6, 8, 16]
    r = compare_models(true, assumed, 64.0, average_bits=3.0, menu=menu)
    assert r.solver == "allocate" and np.isin(r.bits_true, menu).all() and np.isin(r.bits_assumed, menu).all()
    opt = allocate(true, 64.0, average_bits=3.0, menu=menu)
    np.testing.assert_array_equal(r.bits_true, np.asarray(opt.bits))
    assert r.distortion_optimal == pytest.approx(float(opt.distortion), rel=1e-12)
    assert r.order_inverted and r.penalty > 0
    # Tabulated models compare on a menu too.
    t_true = TabulatedModel(tuple(menu), true.table(menu)[0].clip(max=1e300), allowed=true.table(menu)[1])
    r2 = compare_models(t_true, assumed, 64.0, average_bits=3.0, menu=menu)
    assert r2.distortion_mismatched == pytest.approx(evaluate_distortion(t_true, r2.bits_assumed))


def test_evaluate_distortion_endpoints_and_infeasible_widths():
    m = ExponentialModel(np.array([1.0, 2.0]), 4.0, eviction=np.array([0.3, 0.4]), lo=2, hi=8, full=0.0)
    assert evaluate_distortion(m, [0, 16]) == pytest.approx(0.3)
    assert evaluate_distortion(m, [2, 3], weights=[1.0, 0.5]) == pytest.approx(1 / 16 + 0.5 * 2 / 64)
    assert evaluate_distortion(m, [1, 2]) == np.inf  # 1 bit is outside the fitted range
    assert evaluate_distortion(m, [1, 2], weights=[0.0, 1.0]) == pytest.approx(2 / 16)  # unless it weighs nothing


# ---- the quantizer guard -----------------------------------------------------------------------------------------
def test_check_quantizer_warns_on_mismatch_only():
    model = ExponentialModel(np.ones(2), 4.0, quantizer="kivi")
    plan = Plan(key=np.full((2, 2), 4), value=np.full((2, 2), 4), quantizer="kivi")
    for source in ("kivi", model, plan):
        with pytest.warns(ModelMismatchWarning, match=r"quantizer 'kivi' but is applied with 'quarot'"):
            assert check_quantizer(source, "quarot") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_quantizer(plan, "KIVI ") is True     # same name, case and spaces aside
        assert check_quantizer(None, "quarot") is True    # unknown: nothing to check
        assert check_quantizer(model, None) is True
        assert check_quantizer(model, model) is True
    assert issubclass(ModelMismatchWarning, UserWarning)


def test_check_quantizer_points_the_warning_at_the_caller():
    with pytest.warns(ModelMismatchWarning) as record:
        check_quantizer("kivi", "quarot")
    assert record[0].filename == __file__


def test_an_adapter_can_point_the_warning_at_its_own_caller():
    def apply_plan(plan_quantizer, quantizer):
        check_quantizer(plan_quantizer, quantizer, stacklevel=2)

    with pytest.warns(ModelMismatchWarning) as record:
        apply_plan("kivi", "quarot"); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
    assert record[0].filename == __file__ and record[0].lineno == line


def test_check_quantizer_rejects_non_names():
    with pytest.raises(TypeError, match=r"quantizer must be a quantizer name \(str\).*got int 3"):
        check_quantizer("kivi", 3)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input():
    true, assumed = inverted_pair()
    with pytest.raises(ValueError, match=r"same items: true_model has 8, assumed_model has 3"):
        compare_models(true, ExponentialModel(np.ones(3)), 64.0, average_bits=3.0)
    with pytest.raises(ValueError, match=r"quantized ranges do not overlap"):
        compare_models(true, ExponentialModel(np.ones(N), lo=9, hi=12), 64.0, average_bits=3.0)
    t = TabulatedModel((2, 4), np.ones((N, 2)))
    with pytest.raises(TypeError, match=r"must be an ExponentialModel for the continuous comparison.*pass menu="):
        compare_models(t, assumed, 64.0, average_bits=3.0)
    with pytest.raises(TypeError, match=r"give exactly one of budget= .* or average_bits="):
        compare_models(true, assumed, 64.0)
    with pytest.raises(ValueError, match=r"sizes must be finite and > 0, got -1.0 at item 0"):
        compare_models(true, assumed, -1.0, average_bits=3.0)
    with pytest.raises(TypeError, match=r"true_model must be an ExponentialModel or TabulatedModel, got dict"):
        compare_models({}, assumed, 64.0, average_bits=3.0)
