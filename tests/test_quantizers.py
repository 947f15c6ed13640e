"""Quantizers: reference semantics, error bounds, metadata accounting, the registry, distortion measurement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch")
from hypothesis import given, settings
from hypothesis import strategies as st

from rdalloc.measure import measure_distortion
from rdalloc.quantizers import (
    KIVI,
    AsymmetricQuantizer,
    Grouping,
    PerTokenAsymmetric,
    Quantizer,
    QuaRot,
    SymmetricAbsmax,
    available_quantizers,
    exp2,
    f16_ceil_div,
    f16_down,
    f16_up,
    fake_quantize_uniform,
    from_groups,
    get_quantizer,
    hadamard_transform,
    register_quantizer,
    to_groups,
)

QUANTIZERS = [KIVI(group_size=8), QuaRot(), PerTokenAsymmetric(), SymmetricAbsmax(), KIVI(group_size=4),
              PerTokenAsymmetric(group_size=4)]
IDS = ["kivi8", "quarot", "per_token", "absmax", "kivi4", "per_token_g4"]
FIXTURE = Path(__file__).parent / "data" / "smollm2_kv.npz"


def _kv(shape=(2, 3, 21, 16), seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if outliers:  # keys have outlier channels; make groups differ in range
        x[..., 3] *= 8.0
    return x


def _step_and_view(q: Quantizer, x: np.ndarray, bits: int, role: str):
    """Per-element quantization step of ``x`` in the quantizer's (transformed) group view."""
    grouping = q.grouping(role, x.shape[-1])
    xt = np.asarray(q.transform(x, role))
    xg = np.asarray(to_groups(xt, grouping))
    T = x.shape[-2]
    valid = None
    if grouping.axis == "token" and T % grouping.size:
        valid = np.asarray(to_groups(np.ones(x.shape, dtype=bool), grouping))
    params = q.fit(xg, bits, valid)
    return np.broadcast_to(params[0], xg.shape), xg, grouping


# ---- reference semantics ---------------------------------------------------------------------------------------------
def test_registry_names_and_specs():
    assert {"kivi", "quarot", "per_token", "absmax"} <= set(available_quantizers())
    q = get_quantizer("kivi", group_size=16)
    assert q == KIVI(group_size=16) and q.spec() == {"name": "kivi", "group_size": 16}
    assert get_quantizer(q.spec()) == q and get_quantizer(q) is q
    assert get_quantizer("absmax").metadata_bits_per_group == 16
    assert get_quantizer("quarot").metadata_bits_per_group == 32
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        get_quantizer("nope")
    with pytest.raises(TypeError, match="keyword arguments"):
        get_quantizer(q, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        KIVI(group_size=0)
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer(PerTokenAsymmetric, "kivi")


@pytest.mark.parametrize("q", QUANTIZERS, ids=IDS)
@pytest.mark.parametrize("role", ["key", "value"])
def test_sixteen_bits_is_identity_and_zero_evicts(q, role):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.as_tensor(_kv()).to(dtype)
        assert fake_quantize_uniform(x, q, 16, role) is x
        z = fake_quantize_uniform(x, q, 0, role)
        assert z.dtype == dtype and not torch.any(z)


@pytest.mark.parametrize("q", QUANTIZERS, ids=IDS)
@pytest.mark.parametrize("role", ["key", "value"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_error_within_half_a_step(q, role, bits):
    x = _kv(seed=bits)
    xh = np.asarray(fake_quantize_uniform(x, q, bits, role))
    assert xh.dtype == np.float32 and np.all(np.isfinite(xh))
    step, xg, grouping = _step_and_view(q, x, bits, role)
    xhg = np.asarray(to_groups(np.asarray(q.transform(xh, role)), grouping))
    err = np.abs(xhg - xg)
    # half a step, plus float32 rounding (and the rotation's, for QuaRot)
    slack = 4e-7 * np.abs(xg).max() * (8 if q.mixes_channels else 1)
    real = np.broadcast_to(np.asarray(to_groups(np.ones(x.shape, bool), grouping)), xg.shape)
    assert np.all(err[real] <= step[real] / 2 + slack), float(np.max(err[real] - step[real] / 2))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([KIVI(group_size=4), PerTokenAsymmetric(), SymmetricAbsmax(), QuaRot()]),
       st.integers(1, 8), st.floats(-12, 3), st.floats(-3, 3), st.integers(0, 2 ** 31 - 1))
def test_codes_in_range_and_error_bound(q, bits, log_scale, offset, seed):
    """Without clipping, codes of every element lie in [0, 2**b - 1] and errors within half a step, at any scale
    inside the float16 range (tiny float16-subnormal steps included) and offset."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 2, 8, 8)) * 10.0 ** log_scale + offset * 10.0 ** log_scale).astype(np.float32)
    step, xg, grouping = _step_and_view(q, x, bits, "value")
    params = q.fit(xg, bits)
    codes = q.encode(xg, params, bits)
    assert np.all(codes >= 0) and np.all(codes <= 2 ** bits - 1) and np.all(codes == np.round(codes))
    err = np.abs(q.decode(codes, params, bits) - xg)
    assert np.all(err <= step / 2 + 2e-7 * np.abs(xg).max())


@pytest.mark.parametrize("q", [KIVI(group_size=8), PerTokenAsymmetric(), QuaRot()], ids=["kivi", "per_token", "quarot"])
def test_asymmetric_reference_semantics(q):
    """codes and reconstruction follow s = (max-min)/(2**b-1), q = clip(round((x-min)/s)), x_hat = q s + min, with
    min and s rounded through float16 (down and up)."""
    x = _kv(seed=3)
    for bits in (2, 5):
        grouping = q.grouping("value", x.shape[-1])
        xg = np.asarray(to_groups(np.asarray(q.transform(x, "value")), grouping)).astype(np.float64)
        lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
        zero = lo.astype(np.float16).astype(np.float64)
        zero = np.where(zero > lo, np.nextafter(lo.astype(np.float16), np.float16(-np.inf)).astype(np.float64), zero)
        s = (hi - zero) / (2 ** bits - 1)
        s16 = s.astype(np.float16).astype(np.float64)
        s16 = np.where(s16 < s, np.nextafter(s.astype(np.float16), np.float16(np.inf)).astype(np.float64), s16)
        codes = np.clip(np.round((xg - zero) / s16), 0, 2 ** bits - 1)
        ref = codes * s16 + zero
        scale, z = q.fit(xg.astype(np.float32), bits)
        np.testing.assert_array_equal(scale, s16.astype(np.float32))
        np.testing.assert_array_equal(z, zero.astype(np.float32))
        got = np.asarray(to_groups(np.asarray(q.transform(fake_quantize_uniform(x, q, bits, "value"), "value")),
                                   grouping))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(xg).max())
        # the reference s differs from the stored one by at most one float16 ulp
        assert np.all(s16 - s <= np.spacing(s.astype(np.float16)).astype(np.float64) + 1e-30)


def test_params_are_float16_values():
    x = _kv(seed=5)
    for q in QUANTIZERS:
        step, xg, _ = _step_and_view(q, x, 3, "key")
        for p in q.fit(xg, 3):
            np.testing.assert_array_equal(p.astype(np.float16).astype(np.float32), p)


@pytest.mark.parametrize("q", QUANTIZERS, ids=IDS)
def test_constant_groups_no_nan(q):
    """max == min gives scale 0 and no NaN; asymmetric quantizers reconstruct a float16-representable constant
    exactly."""
    for c in (0.0, 1.5, -3.25):
        x = np.full((1, 2, 8, 16), c, dtype=np.float32)
        for bits in (1, 2, 8):
            for role in ("key", "value"):
                xh = np.asarray(fake_quantize_uniform(x, q, bits, role))
                assert np.all(np.isfinite(xh))
                # asymmetric: zero = the constant; (rotated, a constant vector is no longer constant)
                if isinstance(q, AsymmetricQuantizer) and not q.mixes_channels:
                    np.testing.assert_array_equal(xh, x)


def test_f16_directed_rounding():
    v = np.array([1.0001, -3.3, 0.0, 1e-9, -1e-9, 2.0], dtype=np.float32)
    d, u = f16_down(v), f16_up(v)
    assert np.all(d <= v) and np.all(u >= v)
    np.testing.assert_array_equal(d.astype(np.float16).astype(np.float32), d)
    np.testing.assert_array_equal(u.astype(np.float16).astype(np.float32), u)
    assert d[5] == u[5] == 2.0 and d[2] == u[2] == 0.0


def test_f16_ceil_div_is_the_smallest_float16_that_covers():
    rng = np.random.default_rng(11)
    num = np.concatenate([np.abs(rng.standard_normal(2000)) * 10.0 ** rng.uniform(-9, 3, 2000),
                          [0.0, 12 * 2.0 ** -24 * 255, 1.8239021e-04]]).astype(np.float32)
    for den in (0.5, 1.0, 3.0, 7.0, 255.0):
        s = f16_ceil_div(num, den)
        s16 = s.astype(np.float16)
        np.testing.assert_array_equal(s16.astype(np.float32), s)
        assert np.all(s * np.float32(den) >= num)
        below = np.nextafter(s16, np.float16(-np.inf)).astype(np.float32)
        assert np.all((below * np.float32(den) < num) | (s == 0))


def test_float16_range_edges_do_not_warn():
    """Neighbours of the largest float16 overflow to inf while being considered; numpy must not warn (warnings are
    errors in this suite)."""
    v = np.array([65504.0, -65504.0, 65000.0], dtype=np.float32)
    np.testing.assert_array_equal(f16_down(v), v.astype(np.float16).astype(np.float32))
    assert f16_ceil_div(np.array([65504.0], np.float32), 1.0)[0] == 65504.0


def test_exp2_is_exact_on_arrays():
    b = np.arange(0, 17, dtype=np.int32)
    np.testing.assert_array_equal(exp2(b, np.zeros(1, np.float32)), 2.0 ** np.arange(17))
    assert exp2(3, None) == 8.0


def test_absmax_semantics():
    q = SymmetricAbsmax()
    x = np.array([[[[0.0, 1.0, -2.0, 0.5, -0.25, 0.75, 1.5, -1.0]]]], dtype=np.float32)
    # b = 1: sign quantization to +-max|x|
    np.testing.assert_array_equal(fake_quantize_uniform(x[..., 1:], q, 1, "key"),
                                  np.where(x[..., 1:] > 0, 2.0, -2.0).astype(np.float32))
    for bits in (2, 3, 8):
        xh = np.asarray(fake_quantize_uniform(x, q, bits, "key"))
        assert xh[..., 0] == 0.0  # zero is exact
        c = 2 ** (bits - 1) - 1
        s = f16_up(np.float32(2.0) / np.float32(c))
        np.testing.assert_allclose(xh, np.clip(np.round(x / s), -c, c) * s, rtol=0, atol=1e-7)


# ---- the Hadamard rotation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_hadamard_matches_scipy_and_preserves_attention(d):
    eye = np.eye(d, dtype=np.float64)
    np.testing.assert_allclose(hadamard_transform(eye), scipy.linalg.hadamard(d) / math.sqrt(d), atol=1e-12)
    rng = np.random.default_rng(d)
    qv, kv = rng.standard_normal((5, d)), rng.standard_normal((7, d))
    np.testing.assert_allclose(hadamard_transform(qv) @ hadamard_transform(kv).T, qv @ kv.T, atol=1e-10)
    np.testing.assert_allclose(hadamard_transform(hadamard_transform(kv)), kv, atol=1e-12)


def test_hadamard_needs_power_of_two():
    with pytest.raises(ValueError, match="power of two, got head_dim=48"):
        hadamard_transform(np.zeros((2, 48)))
    with pytest.raises(ValueError, match="head_dim=48"):
        fake_quantize_uniform(np.zeros((1, 1, 4, 48), np.float32), QuaRot(), 4, "key")


def test_quarot_rotates_back():
    x = _kv()
    xh = np.asarray(fake_quantize_uniform(x, QuaRot(), 8, "key"))
    # error after rotating back is small in the original coordinates, and the same as in the rotated ones
    assert np.mean((xh - x) ** 2) < 1e-3
    np.testing.assert_allclose(np.mean((hadamard_transform(xh) - hadamard_transform(x)) ** 2),
                               np.mean((xh - x) ** 2), rtol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_bits_and_groupings():
    x = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match=r"9 bits.*'kivi' supports 1\.\.8 bits"):
        fake_quantize_uniform(x, KIVI(), 9, "key")
    with pytest.raises(ValueError, match="over 32 channels, which does not divide head_dim=16"):
        fake_quantize_uniform(x, KIVI(group_size=32), 4, "value")
    fake_quantize_uniform(x, KIVI(group_size=32), 4, "key")  # keys group over tokens: fine
    with pytest.raises(ValueError, match="role must be 'key' or 'value', got 'query'"):
        fake_quantize_uniform(x, KIVI(), 4, "query")
    with pytest.raises(ValueError, match="grouping axis"):
        Grouping("head", 4)


# ---- group views ----------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 13), st.sampled_from([4, 8]),
       st.sampled_from(["token", "channel"]), st.sampled_from([1, 2, 4]))
def test_group_view_round_trip(b, h, t, d, axis, g):
    x = np.arange(b * h * t * d, dtype=np.float32).reshape(b, h, t, d)
    grouping = Grouping(axis, g)
    xg = np.asarray(to_groups(x, grouping))
    assert xg.shape == (b, h, *grouping.view_shape(t, d))
    np.testing.assert_array_equal(from_groups(xg, grouping, t, d), x)
    if axis == "token":  # a group is g consecutive tokens of one channel
        np.testing.assert_array_equal(xg[0, 0, 0, 0, : min(g, t)], x[0, 0, : min(g, t), 0])
    else:
        np.testing.assert_array_equal(xg[0, 0, 0, 0], x[0, 0, 0, :g])


# ---- metadata ------------------------------------------------------------------------------------------------------
def test_item_metadata_bits():
    T, D = 21, 16
    kivi = KIVI(group_size=8)
    # keys: a channel of 21 tokens holds ceil(21/8) = 3 groups of 32 bits
    assert kivi.item_metadata_bits("key", "head", T, D) == 16 * 3 * 32
    np.testing.assert_array_equal(kivi.item_metadata_bits("key", "channel", T, D, batch=2), np.full(D, 2 * 3 * 32))
    per_tok = kivi.item_metadata_bits("key", "token", T, D)
    assert per_tok.shape == (T,) and math.isclose(per_tok.sum(), 16 * 3 * 32)
    np.testing.assert_allclose(per_tok[:16], 16 * 32 / 8)  # full blocks share over 8 tokens
    np.testing.assert_allclose(per_tok[16:], 16 * 32 / 5)  # the last block over 5
    # values: a token holds 16/8 = 2 groups
    np.testing.assert_array_equal(kivi.item_metadata_bits("value", "token", T, D), np.full(T, 64))
    assert SymmetricAbsmax().item_metadata_bits("value", "head", T, D) == T * 16
    assert QuaRot().item_metadata_bits("key", "head", T, D) == T * 32
    np.testing.assert_allclose(PerTokenAsymmetric().item_metadata_bits("key", "channel", T, D), np.full(D, T * 2))
    with pytest.raises(ValueError, match="granularity"):
        kivi.item_metadata_bits("key", "layer", T, D)


# ---- a user quantizer ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Midrise(Quantizer):
    """Test quantizer: symmetric midrise over a token (all 2**b levels, no zero level), one parameter."""

    name: ClassVar[str] = "test_midrise"
    params: ClassVar[tuple[str, ...]] = ("scale",)
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 6

    def grouping(self, role, head_dim):
        return Grouping("channel", head_dim)

    def fit(self, x, bits, valid=None):
        import array_api_compat
        xp = array_api_compat.array_namespace(x)
        return (f16_up(2.0 * xp.max(xp.abs(x), axis=-1, keepdims=True) / (exp2(bits, x) - 1.0)),)

    def encode(self, x, params, bits):
        import array_api_compat
        xp = array_api_compat.array_namespace(x)
        top = exp2(bits, x) - 1.0
        return xp.clip(xp.round(x / xp.where(params[0] > 0, params[0], 1.0) + top / 2.0), 0.0, top)

    def decode(self, codes, params, bits):
        return (codes - (exp2(bits, codes) - 1.0) / 2.0) * params[0]


register_quantizer(Midrise, overwrite=True)


def test_user_quantizer_is_registered_and_measured():
    q = get_quantizer("test_midrise")
    assert isinstance(q, Midrise) and q.metadata_bits_per_group == 16
    x = torch.as_tensor(_kv())
    d = measure_distortion(x, "test_midrise", [0, 2, 3, 4, 6, 16], role="value")
    assert d.shape == (3, 6) and torch.all(d[:, 1:4] > d[:, 2:5])
    with pytest.raises(ValueError, match=r"'test_midrise' supports 2\.\.6 bits"):
        measure_distortion(x, q, [1], role="value")


# ---- distortion measurement ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", QUANTIZERS[:4], ids=IDS[:4])
@pytest.mark.parametrize("role", ["key", "value"])
def test_distortion_decreases_with_bits(q, role):
    x = torch.as_tensor(_kv(shape=(1, 3, 64, 64)))
    for gran in ("head", "token", "channel"):
        d = measure_distortion(x, q, list(range(1, 9)), role=role, granularity=gran)
        assert torch.all(d > 0)
        m = d.mean(dim=0)
        assert torch.all(m[1:] < m[:-1]), gran
        if gran == "head":
            assert torch.all(d[:, 1:] < d[:, :-1])
        else:  # a 64-element item can be lucky at one width; nearly every step still decreases
            assert torch.mean((d[:, 1:] < d[:, :-1]).double()) > 0.95, gran


@pytest.mark.parametrize("q", [KIVI(group_size=4), QuaRot()], ids=["kivi", "quarot"])
@pytest.mark.parametrize("chunk", [None, 1], ids=["one-chunk", "head-by-head"])
def test_measure_matches_a_per_item_oracle_and_plan_order(q, chunk, monkeypatch):
    """Against fake quantization item by item, whether all heads are quantized at once or one head per chunk, and
    for QuaRot (errors measured in rotated coordinates for head/token items) as for KIVI."""
    import rdalloc.measure

    if chunk is not None:
        monkeypatch.setattr(rdalloc.measure, "_CHUNK_ELEMENTS", chunk)
    x = _kv(shape=(2, 2, 2, 12, 8), seed=7)  # [layers, batch, heads, tokens, head_dim]
    bits = [0, 2, 3, 16]
    for role in ("key", "value"):
        for gran, item_shape in (("head", (2, 2)), ("token", (2, 2, 12)), ("channel", (2, 2, 8))):
            d = np.asarray(measure_distortion(x, q, bits, role=role, granularity=gran))
            assert d.shape == (int(np.prod(item_shape)), len(bits))
            for k, b in enumerate(bits):
                err = np.stack([(fake_quantize_uniform(x[l], q, b, role) - x[l]) ** 2 for l in range(2)])
                ax = {"head": (1, 3, 4), "token": (1, 4), "channel": (1, 3)}[gran]
                np.testing.assert_allclose(d[:, k].reshape(item_shape), err.mean(axis=ax), rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(measure_distortion(x, q, [16], role="key")[:, 0], 0.0)


def test_measure_bad_input():
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="granularity"):
        measure_distortion(x, "kivi", [2], role="key", granularity="layer")
    with pytest.raises(ValueError, match="at least one"):
        measure_distortion(x, "kivi", [], role="key")
    with pytest.raises(TypeError, match="integers"):
        measure_distortion(x, "kivi", [2.5], role="key")
    with pytest.raises(ValueError, match="got shape"):
        measure_distortion(torch.zeros(4, 8), "kivi", [2], role="key")
    with pytest.raises(TypeError, match="real floating"):
        measure_distortion(torch.zeros(1, 1, 4, 8, dtype=torch.int32), "kivi", [2], role="key")


# ---- real K/V from SmolLM2-135M ------------------------------------------------------------------------------------
def _fit_beta(bits: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Least squares of ``log D = log alpha - b log beta`` per row of ``d`` (items, bits): the decay ``beta``."""
    slope = np.polyfit(bits, np.log(d).T, 1)[0]
    return np.exp(-slope)


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"{FIXTURE} not generated (scripts/make_kv_fixture.py)")
def test_real_kv_betas_per_quantizer():
    """Distortion of real SmolLM2-135M keys/values per quantizer, and the decay per bit fitted on it.

    Fitted on 2..4 bits (where mixed-precision allocations live) and, for reference, on 2..8 bits (at high rate every
    uniform quantizer tends to beta = 4). Per-head betas of KIVI and QuaRot must differ: the reason a curve is fitted
    per quantizer.
    """
    data = np.load(FIXTURE)
    k, v = data["k"].astype(np.float32), data["v"].astype(np.float32)
    assert k.ndim == 4 and k.shape[-1] == 64 and k.shape == v.shape
    per_head, pooled = {}, {}
    print(f"\nfitted beta per bit on SmolLM2-135M K/V {k.shape} (pooled over heads; per-head median):")
    for lo, hi in ((2, 4), (2, 8)):
        bits = np.arange(lo, hi + 1)
        for name in ("kivi", "quarot", "per_token", "absmax"):
            for role, x in (("key", k), ("value", v)):
                x5 = torch.as_tensor(x[:, None])  # [layers, batch=1, kv_heads, tokens, head_dim]
                d = measure_distortion(x5, name, bits.tolist(), role=role, granularity="head").numpy()
                assert d.shape == (k.shape[0] * k.shape[1], bits.size)
                assert np.all(np.isfinite(d)) and np.all(d > 0)
                assert np.all(d[:, 1:] < d[:, :-1])
                per_head[lo, hi, name, role] = _fit_beta(bits, d)
                pooled[lo, hi, name, role] = float(_fit_beta(bits, d.mean(axis=0, keepdims=True))[0])
                print(f"  bits {lo}..{hi}  {name:10s} {role:5s} beta = {pooled[lo, hi, name, role]:.3f}  "
                      f"(per-head median {np.median(per_head[lo, hi, name, role]):.3f})")
    for key, b in per_head.items():
        assert np.all(np.isfinite(b)) and np.all(b > 1), key
    for role in ("key", "value"):
        diff = per_head[2, 4, "kivi", role] - per_head[2, 4, "quarot", role]
        assert np.mean(np.abs(diff)) > 0.02, role
        assert pooled[2, 4, "kivi", role] != pooled[2, 4, "quarot", role]
