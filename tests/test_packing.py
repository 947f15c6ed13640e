"""Bit packing and packed storage: identity at every width, the stream format, bytes held == bytes predicted."""

from __future__ import annotations

import numpy as np
import pytest

jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
from hypothesis import given, settings
from hypothesis import strategies as st

from rdalloc import Plan, PlanApplier, predict_nbytes
from rdalloc.accounting import item_costs, plan_usage
from rdalloc.bitpack import pack_bits, unpack_bits
from rdalloc.cost import item_cost
from rdalloc.layout import tensor_layout
from rdalloc.quantizers import KIVI, PerTokenAsymmetric, QuaRot, SymmetricAbsmax

BACKENDS = {"numpy": np.asarray, "torch": torch.as_tensor, "jax": jnp.asarray}


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---- pack_bits / unpack_bits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_identity_every_width(backend, bits):
    rng = np.random.default_rng(bits)
    conv = BACKENDS[backend]
    # (eager JAX compiles every op for every new shape: fewer lengths there)
    for n in (0, 1, 9, 1001) if backend == "jax" else (0, 1, 2, 3, 7, 8, 9, 15, 17, 63, 64, 65, 1001):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        packed = pack_bits(conv(codes), bits)
        assert _np(packed).dtype == np.uint8 and _np(packed).shape == (-(-n * bits // 8),)
        np.testing.assert_array_equal(_np(unpack_bits(packed, bits, n)), codes)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 2 ** 32 - 1))
def test_pack_unpack_identity_hypothesis(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, n).astype(np.uint8)
    packed = pack_bits(torch.as_tensor(codes), bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, n).numpy(), codes)
    # the stream is the codes' bits concatenated LSB-first
    stream = np.unpackbits(_np(packed), bitorder="little")[: n * bits]
    ref = ((codes[:, None] >> np.arange(bits)) & 1).reshape(-1)
    np.testing.assert_array_equal(stream, ref)
    assert not stream[n * bits:].any()


def test_stream_format_example():
    # 3-bit codes 1, 2, 3: bits 100 010 110 (LSB first) -> byte 0 = 1 | 2<<3 | (3<<6 & 255) = 209, byte 1 = 3>>2 = 0
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3], np.uint8), 3), [209, 0])
    np.testing.assert_array_equal(pack_bits(np.array([1, 0, 1, 1], np.uint8), 1), [0b1101])
    np.testing.assert_array_equal(pack_bits(np.array([5, 10], np.uint8), 4), [0xA5])


def test_pack_bad_input():
    with pytest.raises(ValueError, match="integer width in 1..8, got 9"):
        pack_bits(np.zeros(4, np.uint8), 9)
    with pytest.raises(ValueError, match="got 0"):
        unpack_bits(np.zeros(4, np.uint8), 0, 4)
    with pytest.raises(TypeError, match="1-D uint8"):
        pack_bits(np.zeros(4, np.int32), 3)
    with pytest.raises(TypeError, match="1-D uint8"):
        pack_bits(np.zeros((2, 4), np.uint8), 3)
    with pytest.raises(ValueError, match="needs 4 bytes, got 3"):
        unpack_bits(np.zeros(3, np.uint8), 3, 10)


# ---- packed caches: bytes held == bytes predicted --------------------------------------------------------------
L, B, H, T, D = 2, 2, 3, 24, 16


def _kv(seed=0, t=T, d=D):
    rng = np.random.default_rng(seed)
    k = torch.as_tensor(rng.standard_normal((L, B, H, t, d)).astype(np.float32))
    v = torch.as_tensor(rng.standard_normal((L, B, H, t, d)).astype(np.float32))
    return k, v


def _plans(q, rng, t=T, d=D):
    """A head plan, a token plan with eviction and (KIVI) a per-channel key plan, with every kind of width."""
    name = q.name
    plans = [Plan(key=rng.choice([0, 1, 3, 5, 16], (L, H)), value=rng.choice([2, 4, 6, 7, 8, 16], (L, H)),
                  quantizer=name)]
    vt = rng.choice([0, 1, 2, 3, 4, 16], (L, H, t))
    if name == "kivi":
        plans.append(Plan(key=rng.choice([1, 2, 3, 8, 16], (L, H, d)), value=vt, key_axes=("layer", "kv_head",
                          "channel"), value_axes=("layer", "kv_head", "token"), quantizer=name))
    else:
        kt = np.where(vt == 0, 0, rng.choice([2, 5, 16], (L, H, t)))
        plans.append(Plan(key=kt, value=vt, key_axes=("layer", "kv_head", "token"),
                          value_axes=("layer", "kv_head", "token"), quantizer=name))
    return plans


QS = [KIVI(group_size=8), QuaRot(), PerTokenAsymmetric(), SymmetricAbsmax(), PerTokenAsymmetric(group_size=4)]


@pytest.mark.parametrize("q", QS, ids=lambda q: f"{q.name}{getattr(q, 'group_size', '')}")
def test_bytes_held_equal_bytes_predicted(q):
    rng = np.random.default_rng(1)
    k, v = _kv()
    for plan in _plans(q, rng):
        ap = PlanApplier(plan, q)
        packed = ap.pack_cache(list(k), list(v))
        predicted = predict_nbytes(plan, q, batch=B, tokens=T, head_dim=D)
        usage = plan_usage(plan, q, batch=B, tokens=T, head_dim=D)
        assert packed.nbytes == predicted
        assert packed.nbytes * 8 == usage.total_bits + packed.padding_bits
        assert packed.usage == usage
        if plan.key_axes[-1] != "channel":  # head_dim a multiple of 8: no stream padding, exact to the byte
            assert packed.padding_bits == 0 and packed.nbytes * 8 == usage.total_bits
        else:  # per-channel keys of heads that evict: kept-token counts vary, streams may end mid-byte
            assert 0 <= packed.padding_bits < 8 * 2 * L * 7
        assert packed.fp16_nbytes == 2 * 2 * L * B * H * T * D
        assert packed.retention == (usage.total_bits + packed.padding_bits) / 8 / packed.fp16_nbytes
        # the per-item cost model C_i(b) = n_i b + m_i [0 < b < 16] adds up to the same bits
        total = 0.0
        for role in ("key", "value"):
            sizes, meta = item_costs(plan, q, role, batch=B, tokens=T, head_dim=D)
            total += float(np.sum(item_cost(getattr(plan, role), sizes, meta)))
        assert total == pytest.approx(usage.total_bits, rel=1e-12)
        # bytes really occupied: full-precision parts at float32 here
        full = sum(t.full_elements for layer in packed.layers for t in (layer.keys, layer.values))
        assert sum(t.storage_nbytes for layer in packed.layers for t in (layer.keys, layer.values)) == \
            packed.nbytes + 2 * full


def test_head_plan_bytes_by_hand():
    """One layer, KIVI g=8: keys at 3 bits (per channel, 24 tokens -> 3 groups), values at 16 and 0."""
    q = KIVI(group_size=8)
    plan = Plan(key=np.array([[3, 3, 3]]), value=np.array([[16, 0, 2]]), quantizer="kivi")
    k, v = _kv()
    packed = PlanApplier(plan, q).pack(k[0], v[0], layer=0)
    n = B * T * D  # elements per head
    key_bytes = 3 * (n * 3 // 8 + B * D * 3 * 4)  # payload + 3 groups/channel x 4 bytes
    value_bytes = 2 * n + (n * 2 // 8 + B * T * (D // 8) * 4)  # full head + evicted head + 2-bit head
    assert packed.keys.nbytes == key_bytes and packed.values.nbytes == value_bytes
    assert packed.values.full_elements == n and packed.values.payload[0].shape == (n * 2 // 8,)


def test_padding_is_counted_when_streams_are_not_whole_bytes():
    """KIVI per-channel keys with 7 kept tokens per channel: 3-bit streams of 7 * channels codes need padding."""
    q = KIVI(group_size=4)
    t = 9
    rng = np.random.default_rng(3)
    vt = np.full((L, H, t), 4)
    vt[:, :, [1, 5]] = 0  # evict two tokens everywhere
    plan = Plan(key=rng.choice([3, 5], (L, H, D)), value=vt, key_axes=("layer", "kv_head", "channel"),
                value_axes=("layer", "kv_head", "token"), quantizer="kivi")
    k, v = _kv(t=t)
    packed = PlanApplier(plan, q).pack_cache(list(k), list(v))
    usage = plan_usage(plan, q, batch=B, tokens=t, head_dim=D)
    assert packed.padding_bits > 0
    assert packed.nbytes == predict_nbytes(plan, q, batch=B, tokens=t, head_dim=D)
    assert packed.nbytes * 8 == usage.total_bits + packed.padding_bits
    # evicted tokens are not stored: 7 of 9 tokens per channel; groups [0..3] [4..7] [8] all keep a token
    lay = tensor_layout(plan, q, "key", 0, (B, H, t, D))
    assert sum(lay.counts().values()) == B * H * 7 * D
    assert sum(lay.groups().values()) == B * H * D * 3


def test_evicted_items_are_not_stored():
    q = PerTokenAsymmetric()
    k, v = _kv()
    vt = np.full((L, H, T), 4)
    kept_before = PlanApplier(Plan(key=vt, value=vt, key_axes=("layer", "kv_head", "token"),
                                   value_axes=("layer", "kv_head", "token"), quantizer="per_token"), q)
    vt2 = vt.copy()
    vt2[0, 1, :10] = 0
    ap = PlanApplier(Plan(key=vt2, value=vt2, key_axes=("layer", "kv_head", "token"),
                          value_axes=("layer", "kv_head", "token"), quantizer="per_token"), q)
    full, evicted = kept_before.pack_cache(list(k), list(v)), ap.pack_cache(list(k), list(v))
    per_token = 2 * B * (D * 4 // 8 + 4)  # keys and values: payload + scale and zero
    assert full.nbytes - evicted.nbytes == 10 * per_token
    everything = Plan(key=np.zeros((L, H)), value=np.zeros((L, H)), quantizer="per_token")
    assert PlanApplier(everything, q).pack_cache(list(k), list(v)).nbytes == 0


def test_sixteen_bits_costs_two_bytes_whatever_the_dtype():
    plan = Plan(key=np.full((L, H), 16), value=np.full((L, H), 16), quantizer="kivi")
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        k, v = (x.to(dtype) for x in _kv())
        packed = PlanApplier(plan, KIVI(group_size=8)).pack_cache(list(k), list(v))
        assert packed.nbytes == packed.fp16_nbytes and packed.retention == 1.0
        assert packed.layers[0].keys.storage_nbytes == B * H * T * D * k.element_size()
