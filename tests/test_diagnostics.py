"""Fit diagnostics: every flag fires on data built to trigger it and stays quiet on clean data; the numbers in the
report match independent computations; the report renders as text and as plain data."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdalloc.diagnostics import (
    FLAG_KINDS,
    FitReport,
    Flag,
    Tolerances,
    diagnose,
    fit_report,
    per_bit_ratios,
    shared_beta_pvalue,
)
from rdalloc.fit import fit_exponential

BITS = [0, 2, 3, 4, 5, 6, 8, 16]
Q = np.asarray(BITS[1:-1], float)


def clean(seed=0, n_items=6, beta=4.0, sigma=0.03):
    """Exponential data with small bounded noise, eviction within 1.3x of the curve, exact full precision."""
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(0.0, 1.0, n_items)
    beta = np.broadcast_to(np.asarray(beta, float), (n_items,))
    d = np.zeros((n_items, len(BITS)))
    d[:, 1:-1] = alpha[:, None] * beta[:, None] ** -Q * np.exp(sigma * rng.uniform(-1, 1, (n_items, len(Q))))
    d[:, 0] = alpha / 1.3
    return d


def kinds_by_item(report: FitReport) -> dict:
    out = {}
    for f in report.flags:
        out.setdefault(f.item, set()).add(f.kind)
    return out


def test_clean_data_raises_no_flag():
    for seed in range(5):
        report = fit_report(clean(seed), BITS, quantizer="kivi")
        assert report.flags == () and report.ok, report.text()
        assert "flags: none" in report.text()
        report = fit_report(clean(seed), BITS, pooled=False)
        assert report.ok, report.text()


def test_eviction_off_the_curve_in_both_directions():
    d = clean()
    d[1, 0] = d[1, 0] * 1.3 / 5.0   # 5x below the curve's alpha
    d[2, 0] = d[2, 0] * 1.3 * 3.0   # 3x above
    report = fit_report(d, BITS)
    assert kinds_by_item(report) == {1: {"eviction_off_curve"}, 2: {"eviction_off_curve"}}
    f1, f2 = report.flags_for(1)[0], report.flags_for(2)[0]
    alpha = report.fit.alpha
    assert f1.value == pytest.approx(alpha[1] / d[1, 0]) and f1.value == pytest.approx(5.0, rel=0.1)
    assert f2.value == pytest.approx(alpha[2] / d[2, 0]) and f2.value == pytest.approx(1 / 3, rel=0.1)
    assert "x below the curve's extrapolation" in f1.message and "x above" in f2.message
    # Eviction is kept as measured in the model, never moved onto the curve.
    assert report.fit.model.eviction[1] == d[1, 0]
    # Zero eviction distortion: infinitely far below.
    d[3, 0] = 0.0
    assert fit_report(d, BITS).flags_for(3, "eviction_off_curve")[0].value == math.inf


def test_floor_at_high_bits():
    d = clean()
    d[4, -2] = d[4, -3] * 0.95  # 6 -> 8 gains almost nothing
    report = fit_report(d, BITS, pooled=False)
    assert set(kinds_by_item(report)) == {4} and "floor" in kinds_by_item(report)[4]
    flag = report.flags_for(4, "floor")[0]
    assert flag.value == pytest.approx(math.sqrt(1 / 0.95))
    assert "stops improving at high bits: 6->8" in flag.message


def test_non_monotone_data():
    d = clean()
    d[0, [3, 4]] = d[0, [4, 3]]   # D(4) < D(5)
    d[5, -1] = d[5, -2] * 2.0     # full precision worse than 8 bits
    report = fit_report(d, BITS, tolerances=Tolerances(max_factor=1e9, min_r2=-1e9))
    assert kinds_by_item(report) == {0: {"non_monotone"}, 5: {"non_monotone"}}
    assert "D(4)=" in report.flags_for(0)[0].message and "< D(5)=" in report.flags_for(0)[0].message
    assert report.flags_for(5)[0].value == pytest.approx(2.0)


def test_too_few_points_and_zeros():
    d = clean()
    d[2, [3, 4, 5, 6]] = 0.0      # item 2 keeps 2 of its 6 quantized points
    d[3, 6] = 0.0                 # item 3 keeps 5: only the zero is flagged
    report = fit_report(d, BITS)
    assert kinds_by_item(report) == {2: {"too_few_points", "zero_measured"}, 3: {"zero_measured"}}
    assert report.flags_for(2, "too_few_points")[0].value == 2
    assert "exactly 0 at bits [8]" in report.flags_for(3, "zero_measured")[0].message
    # Only two quantized widths measured: every item has too few points.
    two = fit_report(d[:, [0, 1, 3, 7]], [0, 2, 4, 16])
    assert {f.kind for f in two.flags} >= {"too_few_points"}
    assert len(two.flags_for(kind="too_few_points")) == d.shape[0]


def test_an_item_with_no_usable_point_is_reported_not_raised():
    d = clean()
    d[1, 1:-1] = 0.0
    report = fit_report(d, BITS)
    assert report.flags_for(1, "too_few_points")[0].value == 0
    assert np.isnan(report.fit.alpha[1]) and np.isfinite(report.fit.alpha[0])
    json.dumps(report.to_dict())
    assert "n/a" in report.text()


def test_poor_fit_and_heterogeneous_beta():
    d = clean()
    d[3, 1:-1] = d[3, 0] * 1.3 * 2.0 ** -Q  # item 3 decays at 2 per bit, the others at 4
    report = fit_report(d, BITS)
    kinds = kinds_by_item(report)
    assert kinds[3] >= {"poor_fit"} and "beta_heterogeneous" in kinds[None]
    assert report.shared_beta_pvalue < 1e-6
    # Per item, item 3's own curve fits: no poor_fit, and its beta is recovered.
    own = fit_report(d, BITS, pooled=False)
    assert not own.flags_for(3, "poor_fit")
    assert own.per_item.beta[3] == pytest.approx(2.0, rel=0.05)


def test_shared_beta_quiet_when_betas_agree():
    report = fit_report(clean(1, n_items=20, sigma=0.1), BITS)
    assert report.shared_beta_pvalue > 1e-3 and not report.flags_for(kind="beta_heterogeneous")


@given(seed=st.integers(0, 2**32 - 1), n_items=st.integers(2, 5))
def test_shared_beta_pvalue_matches_lstsq_f_test(seed, n_items):
    from scipy import stats

    rng = np.random.default_rng(seed)
    d = clean(seed, n_items, beta=rng.uniform(2, 6, n_items), sigma=0.3)[:, 1:-1]
    y = np.log(d).reshape(-1)
    K = len(Q)
    onehot = np.kron(np.eye(n_items), np.ones((K, 1)))
    x = np.tile(Q, n_items)
    pooled_X = np.hstack([onehot, -x[:, None]])
    items_X = np.hstack([onehot, -onehot * x[:, None]])
    ssr = [np.sum((y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) ** 2) for X in (pooled_X, items_X)]
    df1, df2 = n_items - 1, n_items * K - 2 * n_items
    expected = stats.f.sf(((ssr[0] - ssr[1]) / df1) / (ssr[1] / df2), df1, df2)
    got = shared_beta_pvalue(fit_exponential(d, Q, pooled=False), fit_exponential(d, Q))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


# ---- numbers in the report ----------------------------------------------------------------------------------------
@given(beta=st.floats(1.1, 9.0), alpha=st.floats(1e-3, 1e3))
def test_per_bit_ratios_of_an_exact_exponential_are_beta(beta, alpha):
    bits = [1, 2, 4, 8, 9]
    d = alpha * beta ** -np.asarray(bits, float)
    np.testing.assert_allclose(per_bit_ratios(d[None, :], bits), beta, rtol=1e-9)


def test_per_bit_ratio_edge_cases():
    r = per_bit_ratios([[1.0, 0.25, 0.0, 0.0]], [2, 4, 8, 16])
    assert r[0, 0] == pytest.approx(2.0) and r[0, 1] == math.inf and np.isnan(r[0, 2])


def test_report_numbers_match_the_fits():
    d = clean(2)
    report = fit_report(d, BITS, quantizer="kivi")
    data = report.to_dict()
    json.dumps(data)
    pooled = fit_exponential(d, BITS)
    per_item = fit_exponential(d, BITS, pooled=False)
    assert data["pooled"]["beta"] == pytest.approx(pooled.beta[0])
    assert data["pooled"]["beta_ci"] == pytest.approx(pooled.beta_interval()[0].tolist())
    assert data["pooled"]["r2_within"] == pytest.approx(pooled.r2_overall)
    assert data["pooled"]["max_log_residual"] == pytest.approx(np.max(pooled.max_log_residual))
    for i, row in enumerate(data["items"]):
        assert row["beta"] == pytest.approx(per_item.beta[i])
        assert row["r2"] == pytest.approx(per_item.r2[i])
        assert row["max_log_residual"] == pytest.approx(per_item.max_log_residual[i])
        assert row["pooled_r2"] == pytest.approx(pooled.r2[i])
        assert row["ratios"][1] == pytest.approx(d[i, 1] / d[i, 2])
    assert data["ratio_steps"][0] == [0, 2] and data["quantizer"] == "kivi"
    assert data["pooled"]["beta_ci"][0] < 4.0 < data["pooled"]["beta_ci"][1]
    text = report.text()
    assert f"beta = {pooled.beta[0]:.4g}" in text and "quantizer 'kivi'" in text and "0->2" in text


def test_text_truncates_but_keeps_flagged_rows():
    d = clean(0, n_items=30)
    d[27, 0] = d[27, 0] / 10
    text = fit_report(d, BITS).text(max_rows=5)
    assert "... 25 more items" in text and "\n   27  " in text


def test_text_groups_many_flags_of_one_kind():
    d = clean(0, n_items=30)
    d[:, 0] /= 10  # every eviction far below the curve
    text = fit_report(d, BITS).text(max_rows=5, max_flags=2)
    assert text.count("[eviction_off_curve] item") == 2
    assert "[eviction_off_curve] ... and 28 more items: 2, 3, 4," in text


def test_diagnose_judges_the_fit_it_is_given():
    d = clean()
    d[3, 1:-1] = d[3, 0] * 1.3 * 2.0 ** -Q
    per_item = diagnose(fit_exponential(d, BITS, pooled=False))
    pooled = diagnose(fit_exponential(d, BITS))
    assert not per_item.flags_for(3, "poor_fit") and pooled.flags_for(3, "poor_fit")
    assert per_item.pooled.beta[0] == pytest.approx(pooled.fit.beta[0])


def test_flag_and_tolerance_round_trip_and_validation():
    f = Flag("floor", 2, 1.1, "x")
    assert Flag.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    assert Tolerances.from_dict(Tolerances(min_points=4).to_dict()) == Tolerances(min_points=4)
    assert set(FLAG_KINDS) >= {"eviction_off_curve", "floor", "non_monotone", "too_few_points"}
    with pytest.raises(ValueError, match=r"eviction_factor must be >= 1, got 0.5"):
        Tolerances(eviction_factor=0.5)
    with pytest.raises(ValueError, match=r"min_points must be an integer >= 2, got 1"):
        Tolerances(min_points=1)
    with pytest.raises(TypeError, match=r"level must be a real number, got str '95%'"):
        Tolerances(level="95%")
    with pytest.raises(TypeError, match="fit must be an ExponentialFit"):
        diagnose(np.ones((2, 3)))
    with pytest.raises(ValueError, match="distortions must be finite"):
        fit_report([[1.0, np.nan, 0.1]], [2, 3, 4])
