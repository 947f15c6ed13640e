"""Joint eviction + quantization after prefill (backends/hf/compress.py, joint.py) on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf.compat import cache_kwargs, forward, generate  # noqa: E402
from rdalloc.backends.hf.compress import (  # noqa: E402
    CompressedCache,
    JointAttention,
    compressed_nbytes,
    observe_prefill,
    reference_attention,
    token_weights,
)
from rdalloc.backends.hf.joint import allocate_joint, eviction_plan, uniform_token_plan  # noqa: E402

from rdalloc.plan import Plan  # noqa: E402
from rdalloc.quantizers import KIVI  # noqa: E402

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, VOCAB = 2, 2, 4, 16, 128
C, M, SINK, WIN = 64, 12, 4, 8
Q = KIVI(group_size=8)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, vocab=VOCAB)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (C + M,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pre(tiny, ids):
    return observe_prefill(tiny, ids[:C], window=WIN)


def full_plan(value=None, key_bits=16):
    v = np.full((LAYERS, KV_HEADS, C), 16) if value is None else value
    return Plan(key=np.full((LAYERS, KV_HEADS, HEAD_DIM), key_bits), value=v, key_axes=("layer", "kv_head", "channel"),
                value_axes=("layer", "kv_head", "token"), quantizer="kivi",
                meta={"sink": SINK, "window": WIN, "quantizer_spec": Q.spec()})


def run(model, cache, ids):
    with torch.no_grad(), JointAttention(model):
        return forward(model, cache, ids[None, C:]).logits[0]


def test_full_retention_equals_plain_model(tiny, ids, pre):
    cache = CompressedCache.compress(pre.keys, pre.values, full_plan(), Q)
    with torch.no_grad():
        plain = tiny(ids[None]).logits[0, C:]
    torch.testing.assert_close(run(tiny, cache, ids), plain, rtol=1e-5, atol=1e-5)
    assert cache.retention == 1.0
    assert cache.get_seq_length() == C + M  # true positions


def test_prefill_rejects_short_context(tiny, ids):
    with pytest.raises(ValueError, match="context has 8 tokens.*window of 8"):
        observe_prefill(tiny, ids[:8], window=8)


@pytest.mark.parametrize("method", ["hybrid", "mse", "rdkv"])
def test_weights_shapes_and_signs(pre, method):
    w = token_weights(pre, method=method)
    assert w.token.shape == (LAYERS, KV_HEADS, C) and w.key.shape == (LAYERS, KV_HEADS, C, HEAD_DIM)
    assert np.all(w.token >= 0) and np.all(w.eviction >= 0) and np.all(w.key >= 0)
    assert np.all(np.isfinite(w.key))
    assert w.method == method


def test_weights_reject_bad_arguments(pre):
    with pytest.raises(ValueError, match="method must be one of"):
        token_weights(pre, method="snap")
    with pytest.raises(ValueError, match="pool must be a positive odd"):
        token_weights(pre, method="rdkv", pool=4)
    with pytest.raises(ValueError, match="evicted must be bool"):
        token_weights(pre, method="mse", evicted=np.zeros((1, 1, 1), bool))


def test_relinearized_eviction_weights(pre):
    w0 = token_weights(pre, method="mse")
    none = token_weights(pre, method="mse", evicted=np.zeros(w0.token.shape, bool))
    np.testing.assert_allclose(none.eviction, w0.eviction * 1.001, rtol=1e-12)


def layer_attention(cache, layer, query, attention=None):
    """The masked attention function on a cache layer after an update with random new K/V."""
    attention = JointAttention(None) if attention is None else attention
    mod = type("M", (), {"layer_idx": layer})()
    g = torch.Generator().manual_seed(5)
    nk = torch.randn(1, KV_HEADS, query.shape[2], HEAD_DIM, generator=g)
    nv = torch.randn(1, KV_HEADS, query.shape[2], HEAD_DIM, generator=g)
    attention.attach(cache)  # as running the model under `JointAttention` does
    k, v = cache.layers[layer].update(nk, nv)
    out, _ = attention.attention(mod, query, k, v, None, scaling=HEAD_DIM ** -0.5)
    return out


def test_masked_attention_equals_explicit_gather(pre):
    value = np.full((LAYERS, KV_HEADS, C), 4)
    value[:, 0, 10:30] = 0
    value[1, 1, 40:45] = 0
    value[:, :, :SINK] = 16
    plan = full_plan(value, key_bits=2)
    cache = CompressedCache.compress(pre.keys, pre.values, plan, Q)
    q = torch.randn(1, Q_HEADS, 3, HEAD_DIM, generator=torch.Generator().manual_seed(3))
    attention = JointAttention(None)
    for layer in range(LAYERS):
        out = layer_attention(cache, layer, q, attention)
        ref = reference_attention(cache.layers[layer], q, HEAD_DIM ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not attention.pending


def test_evicting_in_one_head_leaves_other_heads_unchanged(pre):
    q = torch.randn(1, Q_HEADS, 2, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    base = layer_attention(CompressedCache.compress(pre.keys, pre.values, full_plan(), Q), 0, q)
    value = np.full((LAYERS, KV_HEADS, C), 16)
    value[0, 1, 20] = 0  # kv head 1 = query heads 2, 3
    ev = layer_attention(CompressedCache.compress(pre.keys, pre.values, full_plan(value), Q), 0, q)
    torch.testing.assert_close(ev[:, :, :2], base[:, :, :2], rtol=0, atol=1e-6)
    assert (ev[:, :, 2:] - base[:, :, 2:]).abs().max() > 1e-6


def test_generate_after_compression(tiny, ids, pre):
    w = token_weights(pre)
    plan = allocate_joint(w, pre.keys, pre.values, retention=0.3, quantizer=Q, sink=SINK, window=WIN)
    cache = CompressedCache.compress(pre.keys, pre.values, plan, Q)
    with torch.no_grad(), JointAttention(tiny):
        out = generate(tiny, cache, ids[None, :C + 1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, C + 5)
    assert cache.get_seq_length() == C + 4
    assert tiny.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("mode", ["global", "per_head"])
@pytest.mark.parametrize(("method", "protect"), [("mse", "reserved"), ("rdkv", "reserved"), ("rdkv", "allocated")])
def test_bytes_held_equal_prediction(pre, mode, method, protect):
    w = token_weights(pre, method=method)
    plan = allocate_joint(w, pre.keys, pre.values, retention=0.3, quantizer=Q, sink=SINK, window=WIN, mode=mode,
                          protect=protect)
    cache = CompressedCache.compress(pre.keys, pre.values, plan, Q)
    assert cache.compressed_nbytes == cache.predicted_nbytes == compressed_nbytes(plan, Q, head_dim=HEAD_DIM)
    # the allocator's exact cost is the bytes held up to the padding of each bit stream to whole bytes
    assert 0 <= cache.compressed_nbytes * 8 - plan.usage.total_bits < 8 * 2 * 3 * LAYERS
    assert plan.usage.total_bits <= plan.budget_bits
    assert cache.retention <= 0.3 + 1e-3
    kept = 16 if protect == "reserved" else np.arange(1, 17)  # pinned: any width but 0
    assert np.isin(plan.value[:, :, :SINK], kept).all() and np.isin(plan.value[:, :, -WIN:], kept).all()


def test_baselines_bytes(pre):
    w = token_weights(pre)
    ev = eviction_plan(w, pre.shape, retention=0.4, quantizer=Q, sink=SINK, window=WIN)
    assert set(np.unique(ev.value)) <= {0, 16}
    assert len({int(k) for k in ev.kept().sum(-1).ravel()}) == 1  # same count per head
    un = uniform_token_plan(pre.shape, retention=0.7, quantizer=Q, sink=SINK, window=WIN)
    for p in (ev, un):
        c = CompressedCache.compress(pre.keys, pre.values, p, Q)
        assert c.compressed_nbytes == c.predicted_nbytes <= p.budget_bits / 8


def test_bad_input(pre):
    w = token_weights(pre)
    with pytest.raises(ValueError, match=r"below the \d+ bits .*12 protected tokens"):
        allocate_joint(w, pre.keys, pre.values, retention=0.1, quantizer=Q, sink=SINK, window=WIN, protect="reserved")
    other = Plan(key=np.full((3, KV_HEADS, HEAD_DIM), 16), value=np.full((3, KV_HEADS, C), 16),
                 key_axes=("layer", "kv_head", "channel"), value_axes=("layer", "kv_head", "token"), quantizer="kivi",
                 meta={"sink": SINK, "window": WIN})
    with pytest.raises(ValueError, match="layers=3, but the cache has layers=2"):
        CompressedCache.compress(pre.keys, pre.values, other, Q)
    with pytest.raises(ValueError, match="retention must be"):
        allocate_joint(w, pre.keys, pre.values, retention=1.5, quantizer=Q, sink=SINK, window=WIN)


def test_running_without_joint_attention_is_refused(tiny, ids, pre):
    # Refused at the very first step: a plain attention would silently attend to the padding of evicted tokens.
    cache = CompressedCache.compress(pre.keys, pre.values, full_plan(), Q)
    with torch.no_grad(), pytest.raises(RuntimeError, match="JointAttention"):
        tiny(ids[None, C:C + 1], **cache_kwargs(tiny, cache), use_cache=True)
    assert all(layer.attention is None for layer in cache.layers)


def test_a_call_that_fails_inside_joint_attention_leaves_nothing_behind(tiny, ids, pre):
    """A forward that raises half way (layer 1's cache updated, its attention failing) inside the block: leaving it
    restores the model and drops every handed-over mask, and the next correct call gives the right numbers."""
    want = run(tiny, CompressedCache.compress(pre.keys, pre.values, full_plan(), Q), ids)

    class FailingAtLayerOne(JointAttention):
        def attention(self, module, *args, **kwargs):
            if module.layer_idx == 1:
                raise RuntimeError("boom")
            return super().attention(module, *args, **kwargs)

    broken = CompressedCache.compress(pre.keys, pre.values, full_plan(), Q)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"), FailingAtLayerOne(tiny) as attention:
        try:
            forward(tiny, broken, ids[None, C:])
        finally:
            assert 1 in attention.pending  # what the failed call left, until the block ends
    assert tiny.config._attn_implementation == "sdpa"
    assert not attention.pending and not attention.attached and attention.name is None
    assert all(layer.attention is None for layer in broken.layers)
    assert not any(name.startswith("rdalloc_") for name in transformers.AttentionInterface._global_mapping)
    torch.testing.assert_close(run(tiny, CompressedCache.compress(pre.keys, pre.values, full_plan(), Q), ids), want,
                               rtol=0, atol=0)
    # the prefill observer recovers too: a failed observed prefill, then a correct one
    hook = tiny.model.layers[1].register_forward_pre_hook(lambda module, args: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            observe_prefill(tiny, ids[:C], window=WIN)
    finally:
        hook.remove()
    assert tiny.config._attn_implementation == "sdpa"
    assert torch.equal(observe_prefill(tiny, ids[:C], window=WIN).probs, pre.probs)


def test_scale_heads_puts_each_head_in_loss_units(pre):
    from rdalloc.backends.hf.capture import HeadImportance
    from rdalloc.backends.hf.compress import scale_heads

    w = token_weights(pre, method="hybrid")
    rng = np.random.default_rng(0)
    F = HeadImportance(key=rng.uniform(0.5, 2, (LAYERS, KV_HEADS)), value=rng.uniform(0.5, 2, (LAYERS, KV_HEADS)),
                       method="fisher", units="", windows=1, tokens=1, meta={})
    s = scale_heads(w, F)
    assert s.method == "hybrid+fisher"
    # i.i.d. noise of variance m on a head's whole cache: modelled distortion = F_h * m
    m = 0.3
    np.testing.assert_allclose(s.token.sum(-1) * HEAD_DIM * m, F.value * m, rtol=1e-12)
    np.testing.assert_allclose(s.key.sum(axis=(2, 3)) * m, F.key * m, rtol=1e-12)
    # within a head nothing moves: the scaled weights are proportional to the originals
    for kind in ("token", "eviction", "key"):
        a, b = getattr(w, kind), getattr(s, kind)
        ratio = b.reshape(LAYERS, KV_HEADS, -1) / a.reshape(LAYERS, KV_HEADS, -1)
        np.testing.assert_allclose(ratio, ratio[..., :1] * np.ones_like(ratio), rtol=1e-10)
    # eviction and value errors share a head's scale (both are errors of the head's output)
    np.testing.assert_allclose(s.eviction / w.eviction, s.token / w.token, rtol=1e-10)
    # scaling the importance of one head by 10 moves bits towards that head under a global budget
    hot = HeadImportance(key=F.key * np.array([[10.0, 1.0], [1.0, 1.0]]),
                         value=F.value * np.array([[10.0, 1.0], [1.0, 1.0]]), method="fisher", units="", windows=1,
                         tokens=1, meta={})
    base = allocate_joint(s, pre.keys, pre.values, retention=0.45, quantizer=Q, sink=SINK, window=WIN)
    more = allocate_joint(scale_heads(w, hot), pre.keys, pre.values, retention=0.45, quantizer=Q, sink=SINK, window=WIN)
    assert more.value[0, 0].sum() > base.value[0, 0].sum()
    with pytest.raises(ValueError, match="kv_heads"):
        scale_heads(w, HeadImportance(key=np.ones((1, 1)), value=np.ones((1, 1)), method="fisher", units="",
                                      windows=1, tokens=1, meta={}))
