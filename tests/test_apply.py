"""Applying plans to torch KV tensors: fake quantization == unpack(pack), locality, eviction, validation, no syncs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rdalloc.backends import torch as rdt

from rdalloc import Plan, PlanApplier
from rdalloc.quantizers import KIVI, PerTokenAsymmetric, QuaRot, SymmetricAbsmax, fake_quantize_uniform

L, B, H, T, D = 2, 2, 3, 24, 16
QS = [KIVI(group_size=8), QuaRot(), PerTokenAsymmetric(), SymmetricAbsmax()]
IDS = [q.name for q in QS]
TOKEN_AXES = dict(key_axes=("layer", "kv_head", "token"), value_axes=("layer", "kv_head", "token"))
CHANNEL_AXES = dict(key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"))


def _kv(seed=0, dtype=torch.float32, t=T, d=D):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, B, H, t, d, generator=g)
    k[..., 2] *= 10.0  # an outlier channel, as real keys have
    v = torch.randn(L, B, H, t, d, generator=g)
    return k.to(dtype), v.to(dtype)


def _token_plan(q, rng, menu=(0, 1, 2, 3, 4, 5, 6, 7, 8, 16)):
    vt = rng.choice(menu, (L, H, T))
    if q.name == "kivi":
        return Plan(key=rng.choice([m for m in menu if m], (L, H, D)), value=vt, quantizer=q.name, **CHANNEL_AXES)
    kt = np.where(vt == 0, 0, rng.choice([m for m in menu if m], (L, H, T)))
    return Plan(key=kt, value=vt, quantizer=q.name, **TOKEN_AXES)


# ---- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", QS, ids=IDS)
def test_sixteen_bits_restores_bit_for_bit(q):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        k, v = _kv(dtype=dtype)
        plan = Plan(key=np.full((L, H), 16), value=np.full((L, H), 16), quantizer=q.name)
        for _kh, _vh, kept in rdt.fake_quantize(k, v, plan, q):
            assert kept is None
        out = rdt.fake_quantize(k, v, plan, q)
        packed = rdt.pack(k, v, plan, q)
        for i in range(L):
            assert out[i].keys.dtype == dtype and torch.equal(out[i].keys, k[i]) and torch.equal(out[i].values, v[i])
            uk, uv = rdt.unpack(packed[i])
            assert torch.equal(uk, k[i]) and torch.equal(uv, v[i])


@pytest.mark.parametrize("q", QS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_equals_unpack_of_pack(q, dtype):
    rng = np.random.default_rng(2)
    k, v = _kv(dtype=dtype)
    head = Plan(key=rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 16], (L, H)),
                value=rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 16], (L, H)), quantizer=q.name)
    for plan in (head, _token_plan(q, rng)):
        ap = PlanApplier(plan, q)
        fq = ap.fake_quantize_cache(list(k), list(v))
        un = ap.unpack(ap.pack_cache(list(k), list(v)))
        for i in range(L):
            assert fq[i].keys.dtype == dtype
            assert torch.equal(fq[i].keys, un[i][0]) and torch.equal(fq[i].values, un[i][1])


# ---- locality: an item's result depends on its own bits only --------------------------------------------------------
@pytest.mark.parametrize("q", QS, ids=IDS)
def test_head_plan_equals_uniform_per_head(q):
    """Each head of a head plan is exactly the uniform quantization of that head at its width."""
    rng = np.random.default_rng(4)
    k, v = _kv()
    plan = Plan(key=rng.choice([1, 2, 3, 5, 8, 16], (L, H)), value=rng.choice([0, 2, 4, 6, 7, 16], (L, H)),
                quantizer=q.name)
    out = rdt.fake_quantize(k, v, plan, q)
    for i in range(L):
        for h in range(H):
            for role, x, got in (("key", k, out[i].keys), ("value", v, out[i].values)):
                b = int((plan.key if role == "key" else plan.value)[i, h])
                ref = fake_quantize_uniform(x[i][:, h:h + 1], q, b, role)
                assert torch.equal(got[:, h:h + 1], ref), (i, h, role, b)


@pytest.mark.parametrize("q", [QuaRot(), PerTokenAsymmetric(), SymmetricAbsmax()], ids=["quarot", "per_token",
                                                                                       "absmax"])
def test_token_plan_tokens_untouched_by_neighbours(q):
    rng = np.random.default_rng(5)
    k, v = _kv()
    plan = _token_plan(q, rng)
    out = rdt.fake_quantize(k[0], v[0], plan, q, layer=0)
    # every token equals its own uniform quantization
    for h in range(H):
        for t in range(T):
            b = int(plan.value[0, h, t])
            ref = fake_quantize_uniform(v[0][:, h:h + 1, t:t + 1], q, b, "value")
            assert torch.equal(out.values[:, h:h + 1, t:t + 1], ref)
    # changing other tokens' bits leaves this one's result alone
    vt2, kt2 = plan.value.copy(), plan.key.copy()
    vt2[0, :, 1:] = np.where(vt2[0, :, 1:] == 3, 5, 3)
    kt2[0, :, 1:] = vt2[0, :, 1:]
    out2 = rdt.fake_quantize(k[0], v[0], Plan(key=kt2, value=vt2, quantizer=q.name, **TOKEN_AXES), q, layer=0)
    assert torch.equal(out2.values[:, :, 0], out.values[:, :, 0])
    assert torch.equal(out2.keys[:, :, 0], out.keys[:, :, 0])


def test_kivi_channel_plan_channels_untouched_by_neighbours():
    q = KIVI(group_size=8)
    rng = np.random.default_rng(6)
    k, v = _kv()
    kc = rng.choice([1, 2, 3, 4, 8, 16], (L, H, D))
    vt = np.full((L, H, T), 4)
    out = rdt.fake_quantize(k[1], v[1], Plan(key=kc, value=vt, quantizer="kivi", **CHANNEL_AXES), q, layer=1)
    for h in range(H):
        for c in range(D):
            ref = fake_quantize_uniform(k[1][:, h:h + 1, :, c:c + 1], q, int(kc[1, h, c]), "key")
            assert torch.equal(out.keys[:, h:h + 1, :, c:c + 1], ref)


# ---- eviction -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", QS, ids=IDS)
def test_evicted_tokens_are_zero_and_do_not_leak(q):
    """Evicted entries come back as 0 with kept=False; their values influence nothing else (KIVI keys leave them
    out of each group's min/max)."""
    rng = np.random.default_rng(7)
    k, v = _kv()
    plan = _token_plan(q, rng, menu=(0, 2, 3, 16))
    kept = plan.kept()
    out = rdt.fake_quantize(k, v, plan, q)
    k2, v2 = k.clone(), v.clone()
    gone = torch.as_tensor(~kept)[:, None, :, :, None].expand(L, B, H, T, D)
    k2[gone] = 1e3  # huge values in evicted entries
    v2[gone] = float("nan")  # or garbage (a preallocated cache's unused slots)
    out2 = rdt.fake_quantize(k2, v2, plan, q)
    packed2 = rdt.unpack(rdt.pack(k2, v2, plan, q))
    for i in range(L):
        assert torch.equal(out[i].kept, torch.as_tensor(kept[i]))
        ev = ~out[i].kept
        assert not torch.any(out[i].keys[:, ev]) and not torch.any(out[i].values[:, ev])
        assert torch.equal(out[i].keys, out2[i].keys) and torch.equal(out[i].values, out2[i].values)
        assert torch.equal(packed2[i][0], out[i].keys) and torch.equal(packed2[i][1], out[i].values)


def test_kivi_keys_partial_groups_use_kept_tokens_only():
    """A KIVI key group with evicted tokens is quantized over the kept ones: same as quantizing them alone."""
    q = KIVI(group_size=8)
    k, v = _kv()
    vt = np.full((L, H, T), 3)
    vt[:, :, 3:6] = 0
    plan = Plan(key=np.full((L, H, D), 2), value=vt, quantizer="kivi", **CHANNEL_AXES)
    out = rdt.fake_quantize(k[0], v[0], plan, q, layer=0)
    keep = [t for t in range(8) if not 3 <= t < 6]  # first group of 8 tokens: 5 kept
    x = k[0][:, :, keep]
    ref = fake_quantize_uniform(x, KIVI(group_size=len(keep)), 2, "key")
    assert torch.equal(out.keys[:, :, keep], ref)


def test_kivi_per_token_keys_must_be_constant_per_block():
    q = KIVI(group_size=8)
    k, v = _kv()
    bits = np.repeat(np.array([2, 4, 16]), 8)[None, None, :].repeat(L, 0).repeat(H, 1)  # constant per block
    bits[:, :, [3, 9]] = 0  # eviction inside blocks is fine
    ok = Plan(key=bits, value=np.where(bits == 0, 0, 4), quantizer="kivi", **TOKEN_AXES)
    a = rdt.fake_quantize(k[0], v[0], ok, q, layer=0)
    assert torch.equal(a.keys[:, :, 16:], k[0][:, :, 16:])  # the 16-bit block
    bad = bits.copy()
    bad[1, 2, 5] = 3
    with pytest.raises(ValueError, match=r"groups keys over 8 consecutive tokens.*bits \[2, 3\].*layer 1, "
                                         r"kv_head 2, channel 0, tokens 0\.\.7"):
        rdt.fake_quantize(k[0], v[0], Plan(key=bad, value=np.where(bad == 0, 0, 4), quantizer="kivi", **TOKEN_AXES), q,
                          layer=1)


def test_per_token_quantizer_with_channel_key_bits():
    """Per-channel key bits under a per-token quantizer work when constant over each channel group."""
    q = PerTokenAsymmetric(group_size=4)
    k, v = _kv()
    kc = np.repeat(np.array([[2, 8, 16, 3]]), 4, axis=1)[None].repeat(L, 0).repeat(H, 1)
    plan = Plan(key=kc, value=np.full((L, H, T), 4), quantizer="per_token", **CHANNEL_AXES)
    out = rdt.fake_quantize(k[0], v[0], plan, q, layer=0)
    assert torch.equal(out.keys[..., 8:12], k[0][..., 8:12])
    kc[0, 0, 1] = 5
    with pytest.raises(ValueError, match="per-channel key bits must be constant within each aligned block of 4"):
        rdt.fake_quantize(k[0], v[0], Plan(key=kc, value=np.full((L, H, T), 4), quantizer="per_token", **CHANNEL_AXES),
                          q, layer=0)


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_named():
    q = KIVI(group_size=8)
    k, v = _kv()
    plan = Plan(key=np.full((L, H), 4), value=np.full((L, H), 4), quantizer="kivi")
    ap = PlanApplier(plan, q)
    with pytest.raises(ValueError, match=r"keys must be 4-D \[batch, kv_heads, tokens, head_dim\], got shape "
                                         r"\(3, 24, 16\)"):
        ap.fake_quantize(k[0, 0], v[0], layer=0)
    with pytest.raises(TypeError, match="values must be a floating tensor.*torch.int64"):
        ap.fake_quantize(k[0], v[0].long(), layer=0)
    with pytest.raises(TypeError, match="keys must be a torch.Tensor, got ndarray"):
        ap.fake_quantize(k[0].numpy(), v[0], layer=0)
    with pytest.raises(ValueError, match="kv_heads=3, but the cache has kv_heads=2"):
        ap.fake_quantize(k[0][:, :2], v[0][:, :2], layer=0)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\).*got 2"):
        ap.fake_quantize(k[0], v[0], layer=2)
    with pytest.raises(ValueError, match="agree on"):
        ap.fake_quantize(k[0], v[0][:, :, :5], layer=0)
    with pytest.raises(ValueError, match="distortion-model mismatch"):
        PlanApplier(plan, QuaRot())
    with pytest.raises(ValueError, match=r"holds 12 bits.*'kivi' supports 1\.\.8 bits"):
        PlanApplier(Plan(key=np.full((L, H), 12), value=np.full((L, H), 4), quantizer="kivi"),
                        q).fake_quantize(k[0], v[0], layer=0)
    tok = Plan(key=np.full((L, H, T), 4), value=np.full((L, H, T), 4), quantizer="kivi", **TOKEN_AXES)
    with pytest.raises(ValueError, match="tokens=24, but the cache has tokens=20"):
        rdt.fake_quantize(k[..., :20, :], v[..., :20, :], tok, q)
    ch = Plan(key=np.full((L, H, D), 4), value=np.full((L, H, T), 4), quantizer="quarot", **CHANNEL_AXES)
    with pytest.raises(ValueError, match="head_dim=16, but the cache has head_dim=8"):
        rdt.fake_quantize(k[..., :8], v[..., :8], ch, QuaRot())
    with pytest.raises(ValueError, match="'quarot' rotates all channels.*per-channel key bits"):
        rdt.fake_quantize(k, v, ch, QuaRot())
    with pytest.raises(ValueError, match="power of two, got head_dim=12"):
        rdt.fake_quantize(k[..., :12], v[..., :12], Plan(key=np.full((L, H), 4), value=np.full((L, H), 4)), "quarot")
    with pytest.raises(ValueError, match="does not record its quantizer"):
        rdt.fake_quantize(k, v, Plan(key=np.full((L, H), 4), value=np.full((L, H), 4)))
    with pytest.raises(ValueError, match="the plan has 2 layers, got 1 key"):
        rdt.fake_quantize(k[:1], v[:1], plan, q)
    with pytest.raises(TypeError, match="plan must be an rdalloc.Plan"):
        PlanApplier({"key": 4}, q)


def test_plan_quantizer_is_the_default():
    k, v = _kv()
    plan = Plan(key=np.full((L, H), 3), value=np.full((L, H), 3), quantizer="per_token")
    a = rdt.fake_quantize(k, v, plan)
    b = rdt.fake_quantize(k, v, plan, PerTokenAsymmetric())
    assert all(torch.equal(x.keys, y.keys) for x, y in zip(a, b))
    spec = Plan(key=np.full((L, H), 3), value=np.full((L, H), 3), quantizer="kivi",
                meta={"quantizer_spec": {"name": "kivi", "group_size": 8}})
    assert PlanApplier(spec).quantizer == KIVI(group_size=8)


# ---- CUDA-readiness: no host synchronisation ------------------------------------------------------------------------
@pytest.mark.parametrize("q", QS, ids=IDS)
def test_runs_on_meta_tensors(q):
    """Meta tensors have no data: any .item(), .tolist() or data-dependent shape on the hot path would raise."""
    rng = np.random.default_rng(8)
    k = torch.empty(B, H, T, D, device="meta")
    for plan in (Plan(key=rng.choice([0, 2, 3, 16], (L, H)), value=rng.choice([1, 4, 16], (L, H)), quantizer=q.name),
                 _token_plan(q, rng)):
        ap = PlanApplier(plan, q)
        out = ap.fake_quantize(k, k, layer=0)
        assert out.keys.device.type == "meta" and out.keys.shape == k.shape
        packed = ap.pack(k, k, layer=0)
        assert packed.nbytes == ap.pack(torch.zeros(k.shape), torch.zeros(k.shape), layer=0).nbytes
        uk, uv = ap.unpack(packed)
        assert uk.shape == k.shape and uk.device.type == "meta"
    d = rdt.measure_distortion(k, q, [0, 2, 4, 16], role="key", granularity="token")
    assert d.shape == (H * T, 4)
