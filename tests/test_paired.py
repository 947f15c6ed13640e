"""rdalloc.backends.hf.paired: paired block-bootstrap comparisons on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from rdalloc.backends.hf.paired import paired_comparison


def ar1(rng, shape, phi, sigma=1.0):
    """Stationary AR(1) noise along the last axis (unit marginal variance times sigma**2)."""
    e = rng.standard_normal(shape) * sigma * np.sqrt(1 - phi**2)
    x = np.empty(shape)
    x[..., 0] = rng.standard_normal(shape[:-1]) * sigma
    for t in range(1, shape[-1]):
        x[..., t] = phi * x[..., t - 1] + e[..., t]
    return x


def test_a_shifted_row_is_decided_both_ways():
    rng = np.random.default_rng(0)
    b = 2.0 + ar1(rng, (4, 512), 0.5)
    a = b - 0.2 + 0.3 * ar1(rng, (4, 512), 0.5)  # lower loss by 0.2 nats per token, with its own noise
    c = paired_comparison(a, b, seed=1)
    assert c.verdict == "better" and c.high < 0 and c.low < c.difference < c.high
    assert c.difference == pytest.approx(np.mean(a - b), abs=1e-12)
    assert c.low < -0.2 < c.high
    assert paired_comparison(b, a, seed=1).verdict == "worse"
    assert (c.unit, c.block, c.units, c.tokens) == ("block", 32, 4 * 16, 4 * 512)


def test_identical_rows_are_undecided():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, size=(3, 100)).astype(np.float32)
    c = paired_comparison(a, a.copy())
    assert (c.difference, c.low, c.high, c.verdict) == (0.0, 0.0, 0.0, "undecided")


def test_a_tiny_shift_in_much_noise_is_undecided():
    rng = np.random.default_rng(2)
    b = ar1(rng, (2, 256), 0.5)
    a = b + 1e-3 + ar1(rng, (2, 256), 0.5)
    c = paired_comparison(a, b)
    assert c.verdict == "undecided" and c.low < 0 < c.high


def test_same_seed_same_interval_and_windows_resampled_when_many():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 40)), rng.normal(size=(30, 40))
    one, two = paired_comparison(a, b, seed=7), paired_comparison(a, b, seed=7)
    assert one == two
    assert paired_comparison(a, b, seed=8) != one
    assert (one.unit, one.block, one.units) == ("window", 40, 30)
    flat = paired_comparison(a[0], b[0], block=8)  # one window of 40 tokens: 5 blocks
    assert (flat.unit, flat.units, flat.tokens) == ("block", 5, 40)
    ragged = paired_comparison(a[:2, :35], b[:2, :35], block=8)  # 4 blocks of 8 and one of 3 per window
    assert ragged.units == 10 and ragged.difference == pytest.approx(np.mean(a[:2, :35] - b[:2, :35]))


def _coverage(block, phi, reps=300, level=0.9):
    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(reps):
        d = 0.5 + ar1(rng, (4, 512), phi)  # true mean difference 0.5
        c = paired_comparison(d, np.zeros_like(d), level=level, block=block, resamples=400, seed=int(rng.integers(1e9)))
        hits += c.low <= 0.5 <= c.high
    return hits / reps


def test_coverage_near_nominal_with_blocks_and_too_low_without():
    # 300 replicates: a binomial standard error of 1.7 points around 90 %
    blocks = _coverage(32, 0.6)
    assert 0.83 <= blocks <= 0.96, blocks
    # an i.i.d. bootstrap (block 1) ignores the dependence: at phi = 0.8 its interval is ~3x too narrow (~45 %)
    iid = _coverage(1, 0.8, reps=100)
    assert iid < 0.7, iid


@pytest.mark.parametrize("kwargs, match", [
    ({"level": 1.0}, "level"), ({"level": 0}, "level"), ({"level": True}, "level"),
    ({"block": 0}, "block"), ({"block": 2.5}, "block"), ({"resamples": 10}, "resamples"),
    ({"seed": -1}, "seed"), ({"min_windows": 1}, "min_windows"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_comparison(np.zeros(10), np.ones(10), **kwargs)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="same tokens"):
        paired_comparison(np.zeros((2, 10)), np.zeros((2, 11)))
    with pytest.raises(ValueError, match=r"b must be finite, got nan at window 1, token 3"):
        b = np.zeros((2, 10))
        b[1, 3] = np.nan
        paired_comparison(np.zeros((2, 10)), b)
    with pytest.raises(ValueError, match="shaped"):
        paired_comparison(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="shaped"):
        paired_comparison([], [])
