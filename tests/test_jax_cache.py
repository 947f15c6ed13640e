"""The fixed-capacity packed JAX KV cache (rdalloc.backends.jax_cache): storage equals rdalloc.apply's fake
quantization at every length, decode attention equals a plain softmax reference, one compilation for every length, a
traced layer index, sharding kept, capacity and argument errors."""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from rdalloc.backends import jax_cache as jc  # noqa: E402

from rdalloc import Plan  # noqa: E402
from rdalloc.apply import PlanApplier  # noqa: E402
from rdalloc.quantizers import AsymmetricQuantizer, Grouping, get_quantizer  # noqa: E402

B, H, D, CAP = 2, 4, 16, 24
KIVI = get_quantizer("kivi", group_size=4)
QUAROT = get_quantizer("quarot")
PLAN_BITS = (np.array([[1, 2, 3, 4], [5, 6, 8, 16]]), np.array([[8, 16, 2, 1], [3, 4, 5, 7]]))
append_jit = jax.jit(jc.append)
dequantize_jit = jax.jit(jc.dequantize)
attend_jit = jax.jit(jc.attend)


def make_plan(q, key=PLAN_BITS[0], value=PLAN_BITS[1]):
    return Plan(key=key, value=value, quantizer=q.name)


def kv(seed, layers=2, tokens=CAP, dtype=np.float32):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(layers, B, H, tokens, D)) * rng.uniform(0.5, 3, size=(1, 1, H, 1, D))
    v = rng.normal(size=(layers, B, H, tokens, D))
    return jnp.asarray(k.astype(dtype)), jnp.asarray(v.astype(dtype))


def expected(plan, q, K, V, layer, t):
    """What the cache must hold after ``t`` tokens: rdalloc.apply's fake quantization; for token-grouped keys the
    full groups quantized and the residual tail as given."""
    ap = PlanApplier(plan, q)  # on numpy arrays: eager, no compilation per length (same codes as JAX, bit for bit)
    K, V = np.asarray(K[layer]), np.asarray(V[layer])
    fq = ap.fake_quantize(K[:, :, :t], V[:, :, :t], layer=layer)
    keys = np.array(fq.keys)
    if q.grouping("key", D).axis == "token":
        g = q.grouping("key", D).size
        base = t - t % g
        if base:
            keys[:, :, :base] = ap.fake_quantize(K[:, :, :base], V[:, :, :base], layer=layer).keys
        keys[:, :, base:t] = K[:, :, base:t]
        keys[:, plan.key[layer] == 0] = 0
    return keys, np.array(fq.values)


def reference_attention(q, keys, values, kept_heads, scale):
    """Explicit softmax attention in float64 numpy (GQA: consecutive query heads share a kv head)."""
    q = np.asarray(q, np.float64)
    r = q.shape[1] // keys.shape[1]
    out = np.zeros(q.shape)
    for h in range(q.shape[1]):
        kvh = h // r
        if not kept_heads[kvh]:
            continue
        s = np.einsum("bd,btd->bt", q[:, h, 0], keys[:, kvh]) * scale
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, h, 0] = np.einsum("bt,btd->bd", w / w.sum(-1, keepdims=True), values[:, kvh])
    return out


@pytest.mark.parametrize("q", [KIVI, QUAROT, get_quantizer("absmax")], ids=lambda q: q.name)
@pytest.mark.parametrize("chunks", [(1,) * 9, (5, 3, 1, 3, 5)], ids=["one_by_one", "chunks"])
def test_storage_equals_fake_quantization_at_every_length(q, chunks):
    plan = make_plan(q)
    K, V = kv(1)
    cache = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=q)
    t = 0
    for n in chunks:
        for layer in range(2):
            cache = append_jit(cache, jnp.int32(layer), K[layer, :, :, t:t + n], V[layer, :, :, t:t + n])
        t += n
        assert np.array_equal(np.array(cache.length), [t, t])
        for layer in range(2):
            keys, values = dequantize_jit(cache, jnp.int32(layer))
            ek, ev = expected(plan, q, K, V, layer, t)
            np.testing.assert_array_equal(np.array(keys[:, :, :t]), ek, err_msg=f"keys, layer {layer}, t={t}")
            np.testing.assert_array_equal(np.array(values[:, :, :t]), ev, err_msg=f"values, layer {layer}, t={t}")
    assert not bool(cache.overflow)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_width_16_bit_for_bit_and_eviction(dtype):
    plan = Plan(key=np.array([[16, 0, 4, 16]]), value=np.array([[16, 0, 16, 2]]), quantizer="kivi")
    K, V = kv(2, layers=1, tokens=9, dtype=np.float32)
    K, V = K.astype(dtype), V.astype(dtype)
    cache = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, dtype=dtype, quantizer=KIVI)
    cache = append_jit(cache, 0, K[0, :, :, :6], V[0, :, :, :6])
    cache = append_jit(cache, 0, K[0, :, :, 6:9], V[0, :, :, 6:9])
    keys, values = dequantize_jit(cache, 0)
    assert keys.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.array(keys[:, 0, :9]).view(np.uint16 if dtype != np.float32 else np.uint32),
                                  np.array(K[0, :, 0]).view(np.uint16 if dtype != np.float32 else np.uint32))
    np.testing.assert_array_equal(np.array(values[:, 2, :9]), np.array(V[0, :, 2]))
    assert not np.any(np.array(keys[:, 1])) and not np.any(np.array(values[:, 1]))  # evicted head: zeros
    # attention gives the evicted head's query heads nothing; the others attend over their tokens
    q = jnp.asarray(np.random.default_rng(3).normal(size=(B, 2 * H, 1, D)).astype(np.float32))
    out = np.array(attend_jit(cache, 0, q))
    assert not np.any(out[:, 2:4]) and np.all(np.abs(out[:, [0, 1, 4, 5, 6, 7]]).sum(-1) > 0)


@pytest.mark.parametrize("q", [KIVI, QUAROT], ids=lambda q: q.name)
def test_attend_equals_reference(q):
    plan = make_plan(q, value=np.array([[8, 16, 2, 1], [3, 4, 5, 7]]))
    K, V = kv(4)
    rng = np.random.default_rng(5)
    cache = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=q)
    cache = append_jit(cache, 1, K[1, :, :, :7], V[1, :, :, :7])
    for t in range(7, 12):
        cache = append_jit(cache, 1, K[1, :, :, t:t + 1], V[1, :, :, t:t + 1])
        query = jnp.asarray(rng.normal(size=(B, 2 * H, 1, D)).astype(np.float32))
        out = np.array(attend_jit(cache, jnp.int32(1), query))
        ek, ev = expected(plan, q, K, V, 1, t + 1)
        ref = reference_attention(query, ek, ev, plan.key[1] > 0, 1 / np.sqrt(D))
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)


def test_decode_step_compiles_once_for_every_length():
    plan = make_plan(KIVI)
    K, V = kv(6, tokens=CAP)
    traces = []

    def step(cache, k, v, query):
        traces.append(1)  # runs once per trace
        cache = jc.append(cache, 0, k, v)
        return cache, jc.attend(cache, 0, query)

    step_jit = jax.jit(step)
    cache = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=KIVI)
    cache = append_jit(cache, 0, K[0, :, :, :3], V[0, :, :, :3])
    query = jnp.ones((B, H, 1, D), jnp.float32)
    for t in range(3, 23):  # 20 lengths
        cache, out = step_jit(cache, K[0, :, :, t:t + 1], V[0, :, :, t:t + 1], query)
    assert int(cache.length[0]) == 23 and np.all(np.isfinite(np.array(out)))
    assert len(traces) == 1
    assert step_jit._cache_size() == 1


def test_scan_over_layers_with_traced_layer_index_and_fori_loop_carry():
    plan = make_plan(QUAROT)
    K, V = kv(7, tokens=10)
    query = jnp.asarray(np.random.default_rng(8).normal(size=(2, B, H, 1, D)).astype(np.float32))

    def decode_token(cache, t):
        def one_layer(c, layer):
            k = lax.dynamic_slice_in_dim(K[layer], t, 1, axis=2)
            v = lax.dynamic_slice_in_dim(V[layer], t, 1, axis=2)
            c = jc.append(c, layer, k, v)
            return c, jc.attend(c, layer, query[layer])
        return lax.scan(one_layer, cache, jnp.arange(2, dtype=jnp.int32))

    @jax.jit
    def run(cache):
        def body(t, carry):
            c, _ = carry
            return decode_token(c, t)
        return lax.fori_loop(0, 10, body, (cache, jnp.zeros((2, B, H, 1, D))))

    empty = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=QUAROT)
    cache, outs = run(empty)
    # the same tokens appended eagerly with Python-int layers
    ref = empty
    for layer in range(2):
        ref = append_jit(ref, layer, K[layer], V[layer])
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    for layer in range(2):
        np.testing.assert_allclose(np.array(outs[layer]), np.array(jc.attend(ref, layer, query[layer])), rtol=1e-6,
                                   atol=1e-6)


def test_capacity_overflow():
    plan = make_plan(KIVI)
    K, V = kv(9, tokens=CAP + 2)
    cache = jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=KIVI)
    cache = append_jit(cache, 0, K[0, :, :, :CAP - 1], V[0, :, :, :CAP - 1])
    with pytest.raises(ValueError, match=r"appending 2 tokens to layer 0 holding 23 would exceed the capacity of 24"):
        jc.append(cache, 0, K[0, :, :, :2], V[0, :, :, :2])
    # under jit: the chunk that does not fit is not written, the length stays, overflow turns (and stays) True
    after = append_jit(cache, 0, K[0, :, :, CAP - 1:CAP + 1], V[0, :, :, CAP - 1:CAP + 1])
    assert bool(after.overflow) and int(after.length[0]) == CAP - 1
    for a, b in zip(jax.tree_util.tree_leaves((after.keys, after.values)),
                    jax.tree_util.tree_leaves((cache.keys, cache.values))):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    full = append_jit(after, 0, K[0, :, :, CAP - 1:CAP], V[0, :, :, CAP - 1:CAP])
    assert int(full.length[0]) == CAP and bool(full.overflow)
    assert not bool(cache.overflow)


def test_bad_arguments():
    plan = make_plan(KIVI)
    K, V = kv(10, tokens=2)
    make = dict(batch=B, capacity=CAP, head_dim=D, quantizer=KIVI)
    axes = ("layer", "kv_head", "token")
    token_plan = Plan(key=np.full((1, 1, 3), 4), value=np.full((1, 1, 3), 4), key_axes=axes, value_axes=axes)
    with pytest.raises(ValueError, match="head plan"):
        jc.create_cache(token_plan, **make)
    with pytest.raises(TypeError, match="plan must be an rdalloc.Plan"):
        jc.create_cache({"key": 1}, **make)
    with pytest.raises(ValueError, match="capacity must be a positive integer, got 0"):
        jc.create_cache(plan, **{**make, "capacity": 0})
    with pytest.raises(ValueError, match=r"head_dim must be a multiple of 8 \(.*\), got 12"):
        jc.create_cache(plan, **{**make, "head_dim": 12})
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        jc.create_cache(plan, **{**make, "dtype": jnp.int32})
    with pytest.raises(ValueError, match=r"evicted whole: plan key bits 0 and value bits 4 at \(layer, kv_head\)"):
        jc.create_cache(Plan(key=np.array([[0, 4]]), value=np.array([[4, 4]])), **make)
    with pytest.raises(ValueError, match="plan.key holds 9 bits"):
        jc.create_cache(Plan(key=np.array([[9, 4]]), value=np.array([[4, 4]])), **make)
    cache = jc.create_cache(plan, **make)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        jc.append(cache, 2, K[0], V[0])
    with pytest.raises(TypeError, match="layer must be an int or a scalar integer array"):
        jc.append(cache, 0.5, K[0], V[0])
    with pytest.raises(ValueError, match=r"keys has shape \(2, 4, 2, 8\)"):
        jc.append(cache, 0, K[0, ..., :8], V[0])
    with pytest.raises(TypeError, match="values must be a floating jax.Array"):
        jc.append(cache, 0, K[0], np.asarray(V[0]))
    with pytest.raises(ValueError, match="keys and values must have the same shape"):
        jc.append(cache, 0, K[0], V[0, :, :, :1])
    with pytest.raises(ValueError, match=r"q must be \[batch=2, q_heads \(a multiple of kv_heads=4\)"):
        jc.attend(cache, 0, jnp.ones((B, 6, 1, D)))
    with pytest.raises(TypeError, match="cache must be a PackedKVCache"):
        jc.attend(None, 0, jnp.ones((B, 4, 1, D)))


def test_bytes_held_pad_layers_to_the_widest_layer_not_heads_to_the_widest_head():
    plan = Plan(key=np.array([[2, 4, 4, 4], [8, 8, 2, 2]]), value=np.array([[4, 4, 4, 4], [16, 1, 1, 16]]),
                quantizer="kivi")
    cache = jc.create_cache(plan, batch=1, capacity=32, head_dim=D, quantizer=KIVI)
    plane = 32 // 8 * D  # one bit-plane of one head: 32 tokens (8 per byte) x 16 channels
    # keys: layer 1 needs 20 planes (layer 0: 14); params 8 groups x 16 channels x 2 f16; residual 4 x 16 f32
    keys = 2 * 20 * plane + 2 * 4 * 8 * 16 * 2 * 2 + 2 * 4 * 4 * 16 * 4
    # values: layer 0 needs 16 planes; params 32 tokens x 4 groups x 2 f16; two full-precision slots (layer 1)
    values = 2 * 16 * plane + 2 * 4 * 32 * 4 * 2 * 2 + 2 * 2 * 32 * 16 * 4
    assert cache.nbytes == keys + values
    assert cache.keys.codes.shape == (2, 20, 1, 4, 16) and cache.values.full.shape == (2, 2, 1, 32, 16)
    # the plan itself: codes at each head's width, parameters of quantized heads, 2 bytes per full element
    plan_keys = (14 + 20) * plane + 8 * 8 * 16 * 2 * 2
    plan_values = (16 + 2) * plane + 6 * 32 * 4 * 2 * 2 + 2 * 32 * 16 * 2
    assert cache.plan_nbytes == plan_keys + plan_values


SHARDING_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rdalloc import Plan
    from rdalloc.quantizers import get_quantizer
    from rdalloc.backends import jax_cache as jc
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("heads",))
    kv_sharding = NamedSharding(mesh, P(None, "heads"))
    plan = Plan(key=np.array([[4, 2, 16, 8]] * 2), value=np.array([[3, 16, 4, 1]] * 2), quantizer="kivi")
    q = get_quantizer("kivi", group_size=4)
    cache = jc.create_cache(plan, batch=1, capacity=16, head_dim=16, quantizer=q, sharding=kv_sharding)
    k = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5, 16)), jnp.float32), kv_sharding)
    cache = jax.jit(jc.append)(cache, jnp.int32(1), k, k)
    step = jax.jit(lambda c, layer, x: jc.append(c, layer, x, x))
    cache = step(cache, jnp.int32(1), k[:, :, :1])
    for a in jax.tree_util.tree_leaves((cache.keys, cache.values)):
        assert a.sharding.spec[:2] == (None, "heads"), (a.shape, a.sharding)
        shapes = {s.data.shape for s in a.addressable_shards}
        assert len(a.addressable_shards) == 4 and shapes == {(a.shape[0], a.shape[1] // 4, *a.shape[2:])}, shapes
    # each head's planes lie in its own shard's part: the sharded cache reads back what an unsharded one holds
    plain = jc.create_cache(plan, batch=1, capacity=16, head_dim=16, quantizer=q)
    host = jax.device_get(k)
    plain = jc.append(jc.append(plain, 1, jnp.asarray(host), jnp.asarray(host)), 1, jnp.asarray(host[:, :, :1]),
                      jnp.asarray(host[:, :, :1]))
    for a, b in zip(jax.jit(jc.dequantize)(cache, 1), jc.dequantize(plain, 1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    query = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 1, 16)), jnp.float32)
    out = jax.jit(jc.attend)(cache, jnp.int32(1), query)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jc.attend(plain, 1, query)), rtol=1e-6, atol=1e-6)
    try:
        jc.create_cache(Plan(key=np.full((1, 2), 4), value=np.full((1, 2), 4)), batch=1, capacity=8, head_dim=16,
                        quantizer=q, sharding=kv_sharding)
        raise AssertionError("no error")
    except ValueError as e:
        assert "splits kv heads over 4 devices, which does not divide the plan's kv_heads=2" in str(e), e
    try:
        jc.create_cache(plan, batch=1, capacity=8, head_dim=16, quantizer=q,
                        sharding=NamedSharding(mesh, P(None, None, "heads")))
        raise AssertionError("no error")
    except ValueError as e:
        assert "may shard only the kv-head axis" in str(e), e
    print("OK")
""")


def test_storage_keeps_head_sharding():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


# ---- the fused read (attend) against the dequantize-then-attend oracle ----------------------------------------
@dataclass(frozen=True)
class TokenGroupedBoth(AsymmetricQuantizer):
    """Keys and values both grouped along tokens (no built-in quantizer groups values so): the fused path's token-
    grouped value algebra and value residual."""

    group_size: int = 4
    name: ClassVar[str] = "token_both"

    def grouping(self, role, head_dim):
        return Grouping("token", self.group_size)


@dataclass(frozen=True)
class Cubed(AsymmetricQuantizer):
    """Not affine (decode cubes the affine value): the fused path must fall back to the oracle."""

    name: ClassVar[str] = "cubed"

    def grouping(self, role, head_dim):
        return Grouping("channel", head_dim)

    def decode(self, codes, params, bits):
        return (codes * params[0] + params[1]) ** 3


FUSED_QUANTIZERS = [KIVI, QUAROT, get_quantizer("absmax", group_size=8), get_quantizer("per_token", group_size=4),
                    TokenGroupedBoth(), get_quantizer("kivi", group_size=8)]
# every width 1..8 and 16 on keys and values, an evicted head, a layer holding only 16-bit and evicted heads
FUSED_PLAN = (np.array([[1, 2, 3, 4], [5, 6, 7, 8], [16, 0, 4, 16], [0, 16, 0, 16]]),
              np.array([[8, 7, 6, 5], [4, 3, 2, 1], [16, 0, 16, 3], [0, 16, 0, 16]]))


@pytest.mark.parametrize("q", FUSED_QUANTIZERS, ids=lambda q: f"{q.name}{getattr(q, 'group_size', '')}")
def test_fused_attend_equals_dequantized_oracle(q):
    assert jc.fusable(q)
    plan = Plan(key=FUSED_PLAN[0], value=FUSED_PLAN[1])
    L, cap = 4, 21  # capacity not a multiple of 8 (a partial byte of tokens) nor of the group sizes
    rng = np.random.default_rng(11)
    cache = jc.create_cache(plan, batch=B, capacity=cap, head_dim=D, quantizer=q)
    oracle = jax.jit(jc.attend_dequantized)
    t = 0
    for n in (1, 4, 2, 6, 1, 7):  # lengths 1, 5, 7, 13, 14, 21: odd lengths, partial groups, a full cache
        k = rng.normal(size=(L, B, H, n, D)) * rng.uniform(0.5, 3, size=(1, 1, H, 1, D))
        v = rng.normal(size=(L, B, H, n, D))
        for layer in range(L):
            cache = append_jit(cache, jnp.int32(layer), jnp.asarray(k[layer], jnp.float32),
                               jnp.asarray(v[layer], jnp.float32))
        t += n
        for layer in range(L):
            query = jnp.asarray(rng.normal(size=(B, 3 * H, 1, D)).astype(np.float32))  # GQA: 3 query heads each
            got = np.array(attend_jit(cache, jnp.int32(layer), query))
            want = np.array(oracle(cache, jnp.int32(layer), query))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"layer {layer}, length {t}")
            evicted = np.repeat(FUSED_PLAN[0][layer] == 0, 3)
            assert not np.any(got[:, evicted]) and np.all(np.abs(got[:, ~evicted]).sum(-1) > 0)
    assert int(cache.length[0]) == cap and not bool(cache.overflow)


def test_fused_attend_scale_dtype_and_fallback():
    plan = make_plan(KIVI)
    K, V = kv(12, tokens=9)
    cache = append_jit(jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=KIVI), 1, K[1], V[1])
    query = jnp.asarray(np.random.default_rng(13).normal(size=(B, H, 1, D)), jnp.bfloat16)
    got = jc.attend(cache, 1, query, scale=0.3)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.array(got, np.float32),
                               np.array(jc.attend_dequantized(cache, 1, query, scale=0.3), np.float32), rtol=1e-2)
    cubed = Cubed()
    assert not jc.fusable(cubed)
    plan = Plan(key=np.full((1, H), 4), value=np.full((1, H), 4))
    cache = append_jit(jc.create_cache(plan, batch=B, capacity=CAP, head_dim=D, quantizer=cubed), 0, K[0], V[0])
    query = query.astype(jnp.float32)
    np.testing.assert_array_equal(np.array(jc.attend(cache, 0, query)), np.array(jc.attend_dequantized(cache, 0,
                                                                                                          query)))


def test_compute_slots_skip_evicted_and_16_bit_heads():
    plan = Plan(key=FUSED_PLAN[0], value=FUSED_PLAN[1], quantizer="kivi")
    spec = jc.create_cache(plan, batch=1, capacity=8, head_dim=D, quantizer=KIVI).spec
    S, head, slot = spec.compute_slots("key", full=False)
    assert S == 4 and head[2].tolist() == [2, 4, 4, 4] and head[3].tolist() == [4] * 4
    assert slot[2].tolist() == [4, 4, 0, 4] and slot[1].tolist() == [0, 1, 2, 3]
    F, fhead, fslot = spec.compute_slots("value", full=True)
    assert F == 2 and fhead[2].tolist() == [0, 2] and fslot[3].tolist() == [2, 0, 2, 1] and fhead[0].tolist() == [4, 4]
