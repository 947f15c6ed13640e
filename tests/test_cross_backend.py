"""torch and JAX give the same codes, bytes and dequantized values on the same arrays and plans."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdalloc.backends import jax as rdj
from rdalloc.backends import torch as rdt

from rdalloc import Plan, PlanApplier, measure_distortion
from rdalloc.quantizers import KIVI, PerTokenAsymmetric, QuaRot, SymmetricAbsmax, f16_down

MENU = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)


@st.composite
def cases(draw):
    """Shapes, a quantizer and a plan (head, token, or per-channel keys) that the quantizer accepts."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    t = draw(st.integers(1, 13))
    d = draw(st.sampled_from([4, 8, 16]))
    kind = draw(st.sampled_from(["kivi", "quarot", "per_token", "absmax"]))
    g = draw(st.sampled_from([1, 2, 4]))
    q = {"kivi": KIVI(group_size=g), "quarot": QuaRot(), "per_token": PerTokenAsymmetric(group_size=g),
         "absmax": SymmetricAbsmax()}[kind]
    gran = draw(st.sampled_from(["head", "token", "channel"] if kind == "kivi" else ["head", "token"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    menu = np.asarray(MENU)
    nz = menu[menu > 0]
    if gran == "head":
        plan = Plan(key=rng.choice(menu, (1, h)), value=rng.choice(menu, (1, h)), quantizer=kind)
    elif gran == "channel":
        plan = Plan(key=rng.choice(nz, (1, h, d)), value=rng.choice(menu, (1, h, t)), quantizer=kind,
                    key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"))
    else:
        vt = rng.choice(menu, (1, h, t))
        if kind == "kivi":  # KIVI keys group g tokens: per-token key bits constant per aligned block
            kt = np.repeat(rng.choice(nz, (1, h, -(-t // g))), g, axis=2)[:, :, :t]
        else:
            kt = rng.choice(nz, (1, h, t))
        kt = np.where(vt == 0, 0, kt)
        plan = Plan(key=kt, value=vt, quantizer=kind, key_axes=("layer", "kv_head", "token"),
                    value_axes=("layer", "kv_head", "token"))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    x = (rng.standard_normal((2, b, h, t, d)) * scale).astype(np.float32)
    x[0, ..., 0] *= 8.0  # an outlier key channel
    return q, plan, x[0], x[1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_and_jax_agree(case):
    q, plan, k, v = case
    tk, tv = torch.as_tensor(k), torch.as_tensor(v)
    jk, jv = jnp.asarray(k), jnp.asarray(v)
    ta, ja = PlanApplier(plan, q), PlanApplier(plan, q)
    tf, jf = ta.fake_quantize(tk, tv, layer=0), ja.fake_quantize(jk, jv, layer=0)
    tp, jp = ta.pack(tk, tv, layer=0), ja.pack(jk, jv, layer=0)
    for a, b in ((tf.keys, jf.keys), (tf.values, jf.values)):
        np.testing.assert_array_equal(_bits(a.numpy()), _bits(np.asarray(b)))  # bit for bit, the sign of zero too
    # the same codes (payload bytes) and the same float16 parameters
    assert tp.nbytes == jp.nbytes
    for t_part, j_part in ((tp.keys, jp.keys), (tp.values, jp.values)):
        for a, b in zip(t_part.payload, j_part.payload):
            np.testing.assert_array_equal(a.numpy(), np.asarray(b))
        for a, b in zip(t_part.params, j_part.params):
            np.testing.assert_array_equal(a.numpy(), np.asarray(b))
        np.testing.assert_array_equal(t_part.full.numpy(), np.asarray(j_part.full))
    # dequantized from storage == fake quantization, on both
    for fq, (uk, uv) in ((tf, ta.unpack(tp)), (jf, ja.unpack(jp))):
        np.testing.assert_array_equal(np.asarray(uk), np.asarray(fq.keys))
        np.testing.assert_array_equal(np.asarray(uv), np.asarray(fq.values))
    if plan.kept() is not None:
        np.testing.assert_array_equal(np.asarray(jf.kept), plan.kept()[0])
        np.testing.assert_array_equal(tf.kept.numpy(), plan.kept()[0])


def _example():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 2, 3, 12, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 3, 12, 16)).astype(np.float32)
    vt = rng.choice([0, 2, 3, 16], (2, 3, 12))
    plan = Plan(key=rng.choice([1, 2, 4, 16], (2, 3, 16)), value=vt, quantizer="kivi",
                key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"))
    return k, v, plan


def test_jax_functions_run_inside_a_user_jit():
    k, v, plan = _example()
    q = KIVI(group_size=4)
    jk, jv = jnp.asarray(k), jnp.asarray(v)

    @jax.jit
    def roundtrip(keys, values):
        packed = rdj.pack(keys, values, plan, q)  # the plan is a closure constant
        return rdj.fake_quantize(keys, values, plan, q), rdj.unpack(packed), packed

    fq, un, packed = roundtrip(jk, jv)
    eager = rdj.fake_quantize(jk, jv, plan, q)
    tfq = rdt.fake_quantize(torch.as_tensor(k), torch.as_tensor(v), plan, q)
    assert packed.nbytes == rdt.pack(torch.as_tensor(k), torch.as_tensor(v), plan, q).nbytes
    for layer in range(2):
        for a, b, c, d in ((fq[layer].keys, un[layer][0], eager[layer].keys, tfq[layer].keys),
                           (fq[layer].values, un[layer][1], eager[layer].values, tfq[layer].values)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(d.numpy(), np.asarray(c), rtol=1e-6, atol=1e-6)


def test_measure_distortion_agrees():
    k, v, _ = _example()
    cases = [(KIVI(group_size=4), role, gran) for role in ("key", "value") for gran in ("head", "token", "channel")]
    cases += [(QuaRot(), "value", "head"), (SymmetricAbsmax(), "key", "token")]
    for q, role, gran in cases:
        x = k if role == "key" else v
        a = rdt.measure_distortion(torch.as_tensor(x), q, [0, 1, 3, 8, 16], role=role, granularity=gran)
        b = rdj.measure_distortion(jnp.asarray(x), q, [0, 1, 3, 8, 16], role=role, granularity=gran)
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-5, atol=1e-12)


def test_regression_division_rounding():
    """Found by hypothesis: XLA compiles ``x / 255`` as ``x * (1/255)``, one ulp above 1.8239021e-04 / 255 = 12 *
    2**-24, a float16 grid point; a scale taken as f16_up(quotient) then differed between torch and JAX (12 vs 13
    float16 ulps) and so did the codes. The scale is now decided by exact multiplication (f16_ceil_div)."""
    k = np.array([[[[-1.0568389, 0.64042264, 0.10490011, -0.5356694],
                    [2.8927605, 1.304, 0.94708097, -0.70373523]]]], dtype=np.float32)
    plan = Plan(key=np.array([[8]]), value=np.array([[6]]), quantizer="kivi")
    q = KIVI(group_size=1)
    tp = rdt.pack(torch.as_tensor(k), torch.as_tensor(k), plan, q, layer=0)
    jp = rdj.pack(jnp.asarray(k), jnp.asarray(k), plan, q, layer=0)
    np.testing.assert_array_equal(tp.keys.payload[0].numpy(), np.asarray(jp.keys.payload[0]))
    np.testing.assert_array_equal(tp.keys.params[0].numpy(), np.asarray(jp.keys.params[0]))
    assert tp.keys.payload[0][1] == 255  # (x - zero) / scale = 255 exactly with scale = 12 * 2**-24


def test_jax_validation_names_the_problem():
    k, v, plan = _example()
    ap = PlanApplier(plan, KIVI(group_size=4))
    import pytest
    with pytest.raises(TypeError, match="keys must be a jax.Array, got ndarray"):
        ap.fake_quantize(k[0], jnp.asarray(v[0]), layer=0)
    with pytest.raises(TypeError, match="values must be a floating array.*int32"):
        ap.fake_quantize(jnp.asarray(k[0]), jnp.asarray(v[0]).astype(jnp.int32), layer=0)
    with pytest.raises(ValueError, match="tokens=12, but the cache has tokens=6"):
        ap.fake_quantize(jnp.asarray(k[0][:, :, :6]), jnp.asarray(v[0][:, :, :6]), layer=0)


@pytest.mark.parametrize("bits", [[2.5], [True], ["3"], [17], []])
def test_measure_distortion_refuses_the_same_bits_on_every_backend(bits):
    """Bits that are not integer widths the quantizer supports are refused alike on numpy, torch and JAX (JAX used to
    measure 2 bits for 2.5)."""
    x = np.random.default_rng(0).normal(size=(1, 2, 64, 32)).astype(np.float32)
    errors = []
    for measure, arr in ((measure_distortion, x), (rdt.measure_distortion, torch.asarray(x)),
                         (rdj.measure_distortion, jnp.asarray(x))):
        with pytest.raises((TypeError, ValueError), match="bits") as info:
            measure(arr, "kivi", bits, role="key")
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1] == errors[2]


# ---- bit for bit on numpy, torch and JAX -----------------------------------------------------------------------------
def _three_backends(plan, q, k, v):
    """Fake quantization, packed codes and unpacked values of one layer on numpy, torch and JAX, as numpy arrays."""
    out = []
    for conv in (np.asarray, torch.as_tensor, jnp.asarray):
        ap = PlanApplier(plan, q)
        kk, vv = conv(k), conv(v)
        fq = ap.fake_quantize(kk, vv, layer=0)
        packed = ap.pack(kk, vv, layer=0)
        uk, uv = ap.unpack(packed)
        codes = [np.asarray(p) for part in (packed.keys, packed.values) for p in part.payload]
        params = [np.asarray(p) for part in (packed.keys, packed.values) for p in part.params]
        out.append({"keys": np.asarray(fq.keys), "values": np.asarray(fq.values), "unpacked keys": np.asarray(uk),
                    "unpacked values": np.asarray(uv), "codes": codes, "params": params})
    return out


def _assert_bitwise(results):
    """Every backend's arrays equal numpy's bit for bit (the sign of zero included), and unpacking equals fake
    quantization bit for bit."""
    ref = results[0]
    for name, got in zip(("torch", "jax"), results[1:]):
        for key in ("keys", "values", "unpacked keys", "unpacked values"):
            a, b = ref[key], got[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
            bad = np.nonzero(_bits(a) != _bits(b))
            assert bad[0].size == 0, f"{name} {key} differ from numpy at {bad}: {a[bad]} vs {b[bad]}"
        for key in ("codes", "params"):
            assert len(ref[key]) == len(got[key])
            for a, b in zip(ref[key], got[key]):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{name} {key}")
    for r in results:
        for role in ("keys", "values"):
            np.testing.assert_array_equal(_bits(r[role]), _bits(r["unpacked " + role]))


def _bits(a):
    """The bit patterns of ``a`` as unsigned integers (``-0.0 != 0.0``, NaNs by payload)."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.itemsize}")


def test_kivi_7_bit_group_of_one_token_is_bitwise_equal():
    """Found by an outside check: a KIVI key group holding one token (the others padding) at 7 bits has
    ``(x - zero) / scale = 126.5`` exactly. numpy and torch divided (126, half to even); XLA rewrote the division by the
    broadcast scale into a product by its reciprocal (127). Every backend now multiplies by the reciprocal."""
    x = np.float32(0.5390266)
    k = np.zeros((1, 1, 1, 8), np.float32)
    k[..., 0] = x
    k[..., 1:] = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    plan = Plan(key=np.array([[7]]), value=np.array([[7]]), quantizer="kivi")
    q = KIVI(group_size=4)
    results = _three_backends(plan, q, k, k)
    _assert_bitwise(results)
    # the tie itself: one valid element, so zero = f16_down(x), scale = the least float16 with 127 scale >= x - zero
    zero = f16_down(np.asarray(x))
    scale = results[0]["params"][0][0, 0, 0].astype(np.float32)
    assert (x - zero) / scale == 126.5
    assert results[0]["keys"][0, 0, 0, 0] == np.float32(127) * scale + zero  # 126.5 * (1 + 2**-24 ...) rounds to 127
    assert abs(results[0]["keys"][0, 0, 0, 0] - x) <= scale / 2


@pytest.mark.parametrize("bits", range(1, 9))
def test_absmax_zeros_are_positive_on_every_backend(bits):
    """Symmetric absmax decodes the centre code to +0.0 everywhere: XLA folded ``(round(x / s) + c) - c`` into
    ``round(x / s)`` and returned -0.0 for small negative x (numpy and torch: +0.0)."""
    row = np.array([-0.0, 0.0, -1e-4, 1e-4, -0.3, 0.3, 5.0, -5.0], np.float32)
    k = np.stack([row, -row, np.full(8, -0.0, np.float32)])[None, None]  # [1, 1, 3, 8]; the last token all -0.0
    plan = Plan(key=np.array([[bits]]), value=np.array([[bits]]), quantizer="absmax")
    results = _three_backends(plan, SymmetricAbsmax(), k, k)
    _assert_bitwise(results)
    out = results[0]["keys"]
    if bits > 1:
        assert (out[0, 0, :, :4] == 0).all()
        assert not np.signbit(out[out == 0]).any()


def _tie_prone(draw, shape):
    """float32 values that often sit on a quantizer's grid or half-way between two of its points: small integers and
    halves times a power of two, signed zeros, with ordinary normals and subnormals between them."""
    n = int(np.prod(shape))
    kind = draw(st.sampled_from(["grid", "normal", "mixed"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    grid = (rng.integers(-16, 17, n) / 2.0 * 2.0 ** rng.integers(-12, 4)).astype(np.float32)
    grid[rng.random(n) < 0.1] = -0.0
    normal = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 3)).astype(np.float32)
    if kind == "grid":
        x = grid
    elif kind == "normal":
        x = normal
    else:
        x = np.where(rng.random(n) < 0.5, grid, normal)
        x[rng.random(n) < 0.05] = np.float32(1e-40)  # float32 subnormals
    return x.reshape(shape)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_codes_and_values_are_bitwise_equal_on_numpy_torch_and_jax(data):
    """Random small tensors, widths 1..8 (plus 0 and 16), every built-in quantizer: numpy, torch and JAX give the same
    codes, float16 parameters and dequantized values bit for bit, and unpacking equals fake quantization."""
    kind = data.draw(st.sampled_from(["kivi", "quarot", "per_token", "absmax"]))
    g = data.draw(st.sampled_from([1, 2, 4]))
    q = {"kivi": KIVI(group_size=g), "quarot": QuaRot(), "per_token": PerTokenAsymmetric(group_size=g),
         "absmax": SymmetricAbsmax(group_size=g)}[kind]
    h = data.draw(st.integers(1, 2))
    t = data.draw(st.integers(1, 6))
    d = data.draw(st.sampled_from([4, 8]))
    widths = data.draw(st.lists(st.sampled_from(MENU), min_size=2 * h, max_size=2 * h))
    plan = Plan(key=np.array([widths[:h]]), value=np.array([widths[h:]]), quantizer=kind)
    k = _tie_prone(data.draw, (1, h, t, d))
    v = _tie_prone(data.draw, (1, h, t, d))
    _assert_bitwise(_three_backends(plan, q, k, v))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quarot_near_the_smallest_normal_float_is_bitwise_equal(bits):
    """QuaRot's butterfly sums of values near ``2**-126`` fall into float32's subnormal range, which XLA flushes to
    zero and numpy and torch keep; every stage (and the final scaling) is flushed alike, so the three agree."""
    tiny = np.float32(2.0 ** -126)
    rng = np.random.default_rng(7)
    k = (tiny * rng.choice(np.array([1.0, 1.25, 1.5, -1.0, -1.25, 3.0], np.float32), size=(1, 2, 5, 8))).astype(
        np.float32)
    v = k[..., ::-1].copy()
    v[0, 1, 2] = rng.standard_normal(8).astype(np.float32)  # an ordinary token beside the tiny ones
    plan = Plan(key=np.array([[bits, bits]]), value=np.array([[bits, bits]]), quantizer="quarot")
    _assert_bitwise(_three_backends(plan, QuaRot(), k, v))


def test_hadamard_sums_below_the_smallest_normal_are_flushed_on_every_backend():
    """``1.25 * 2**-126 - 2**-126`` is subnormal: XLA flushes it to zero, numpy and torch now do too, at every stage
    and after the scaling (before, numpy and torch kept it and the rotated values differed from JAX's)."""
    from rdalloc.quantizers import hadamard_transform

    tiny = 2.0 ** -126
    x = np.array([[1.25 * tiny, tiny, 3 * tiny, -tiny, 0.0, 1.5 * tiny, 2.0 ** -100, -(2.0 ** -110)]], np.float32)
    ref = hadamard_transform(x)
    assert not ((ref != 0) & (np.abs(ref) < tiny)).any()
    for conv in (torch.as_tensor, jnp.asarray):
        np.testing.assert_array_equal(_bits(np.asarray(hadamard_transform(conv(x)))), _bits(ref))
