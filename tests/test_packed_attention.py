"""PackedAttention: attention read from a PackedHeadCache's codes equals the model's attention over the dequantized
tokens (the cache's plain path) — logits within float rounding, the same tokens from generate — at every width,
for token- and channel-grouped quantizers, QuaRot, GQA, left-padded batches, beams and group tails."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf import PackedAttention, PackedHeadCache, supports_packed_attention  # noqa: E402
from rdalloc.backends.hf.compat import forward, generate  # noqa: E402

from rdalloc import Plan  # noqa: E402
from rdalloc.quantizers import Quantizer  # noqa: E402

LAYERS, KV_HEADS, VOCAB = 2, 3, 128
SPECS = {"kivi g8": {"name": "kivi", "group_size": 8}, "quarot": {"name": "quarot"},
         "kivi g4 values per 4 channels": {"name": "kivi", "group_size": 4},
         "absmax": {"name": "absmax"}}


def head_plan(key, value, spec) -> Plan:
    return Plan(key=np.asarray(key), value=np.asarray(value), quantizer=spec["name"], meta={"quantizer_spec": spec})


@pytest.fixture(scope="module")
def llama():  # head_dim 16, 6 query heads over 3 kv heads (GQA groups of 2)
    return tiny_llama(hidden=96, layers=LAYERS, q_heads=6, kv_heads=KV_HEADS, vocab=VOCAB)


@pytest.fixture(scope="module")
def llama64(llama):
    import copy

    return copy.deepcopy(llama).double()


def ids_of(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_stepwise(model, cache, ids, prefill, fused, mask=None):
    """Prefill ``prefill`` tokens then one token at a time; the logits of every step, ``[batch, steps, vocab]``."""
    out = []
    with torch.no_grad():
        ctx = PackedAttention(model) if fused else None
        if ctx is not None:
            ctx.__enter__()
        try:
            m = None if mask is None else mask[:, :prefill]
            kw = {} if m is None else {"attention_mask": m}
            out.append(forward(model, cache, ids[:, :prefill], **kw).logits[:, -1])
            for t in range(prefill, ids.shape[1]):
                kw = {} if mask is None else {"attention_mask": mask[:, :t + 1]}
                out.append(forward(model, cache, ids[:, t:t + 1], **kw).logits[:, -1])
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return torch.stack(out, 1)


WIDTH_PLANS = {  # every width 1..8, 16 and 0 appears in some layer, keys and values alike
    "mixed": ([[2, 16, 4], [3, 0, 8]], [[3, 0, 2], [16, 4, 2]]),
    "1 5 6": ([[1, 5, 6], [7, 1, 16]], [[6, 1, 5], [1, 7, 16]]),
    "keys evicted, values kept": ([[0, 4, 4], [4, 4, 4]], [[4, 4, 4], [4, 4, 0]]),
}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("plan_name", list(WIDTH_PLANS))
def test_fused_logits_equal_the_dequantizing_path(llama64, spec, plan_name):
    key, value = WIDTH_PLANS[plan_name]
    plan = head_plan(key, value, SPECS[spec])
    ids = ids_of(1, 37)  # prefill 29 (group tails: 29 % 8, 29 % 4), 8 decode steps crossing group boundaries
    ref = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64), ids, 29, fused=False)
    got = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64), ids, 29, fused=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("residual", [0, 8, 16])
@pytest.mark.parametrize("quantize_residual", [False, True])
def test_residual_lengths_and_quantized_residual(llama64, residual, quantize_residual):
    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g8"])
    ids = ids_of(1, 30, seed=2)
    kw = dict(residual_length=residual or None, quantize_residual=quantize_residual)
    ref = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64, **kw), ids, 21, fused=False)
    got = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64, **kw), ids, 21, fused=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


def test_float32_model_within_rounding(llama):
    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g8"])
    ids = ids_of(2, 26, seed=3)
    ref = logits_stepwise(llama, PackedHeadCache.from_model(plan, llama), ids, 19, fused=False)
    got = logits_stepwise(llama, PackedHeadCache.from_model(plan, llama), ids, 19, fused=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)


def left_padded(seqs, length):
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.as_tensor(s)
        mask[i, length - len(s):] = 1
    return ids, mask


def test_left_padded_batch_generate_gives_the_same_tokens(llama64):
    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g8"])
    seqs = [ids_of(1, n, seed=n)[0].tolist() for n in (23, 17, 23)]
    ids, mask = left_padded(seqs, 23)
    outs = []
    for fused in (False, True):
        cache = PackedHeadCache.for_inputs(plan, llama64, {"attention_mask": mask})
        with (PackedAttention(llama64) if fused else _null()):
            outs.append(generate(llama64, cache, ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_left_padded_logits_at_real_positions(llama64):
    plan = head_plan(*WIDTH_PLANS["1 5 6"], SPECS["quarot"])
    seqs = [ids_of(1, n, seed=n)[0].tolist() for n in (20, 13)]
    ids, mask = left_padded(seqs, 20)
    ids = torch.cat([ids, ids_of(2, 6, seed=9)], 1)
    mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    ref = logits_stepwise(llama64, PackedHeadCache.for_inputs(plan, llama64, {"attention_mask": mask[:, :20]}),
                          ids, 20, fused=False, mask=mask)
    got = logits_stepwise(llama64, PackedHeadCache.for_inputs(plan, llama64, {"attention_mask": mask[:, :20]}),
                          ids, 20, fused=True, mask=mask)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


def test_beam_search_gives_the_same_tokens(llama64):
    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g4 values per 4 channels"])
    ids = ids_of(2, 18, seed=5)
    outs = []
    for fused in (False, True):
        cache = PackedHeadCache.from_model(plan, llama64)
        with (PackedAttention(llama64) if fused else _null()):
            outs.append(generate(llama64, cache, ids, max_new_tokens=8, num_beams=3, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_the_fused_path_is_the_one_running(llama64, monkeypatch):
    """A cache under PackedAttention does not dequantize its prefix; breaking the fused read changes the logits."""
    import importlib

    pa = importlib.import_module("rdalloc.backends.hf.packed_attention")
    pc = importlib.import_module("rdalloc.backends.hf.packed_cache")

    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g8"])
    ids = ids_of(1, 20)
    calls = []
    real_read = pc._read
    monkeypatch.setattr(pc, "_read", lambda *a: calls.append(1) or real_read(*a))
    good = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64), ids, 16, fused=True)
    assert not calls
    real_affine = pa._affine
    monkeypatch.setattr(pa, "_affine", lambda q, p, b, cd: tuple(1.01 * x for x in real_affine(q, p, b, cd)))
    bad = logits_stepwise(llama64, PackedHeadCache.from_model(plan, llama64), ids, 16, fused=True)
    assert (bad - good).abs().max() > 1e-6


def test_leaving_the_block_restores_the_plain_path(llama64):
    plan = head_plan(*WIDTH_PLANS["mixed"], SPECS["kivi g8"])
    ids = ids_of(1, 20)
    cache = PackedHeadCache.from_model(plan, llama64)
    with PackedAttention(llama64):
        forward(llama64, cache, ids[:, :16])
    assert all(layer.attention is None for layer in cache.layers)
    with torch.no_grad():
        forward(llama64, cache, ids[:, 16:17])  # the plain path reads what the fused block stored
    ref = PackedHeadCache.from_model(plan, llama64)
    with torch.no_grad():
        forward(llama64, ref, ids[:, :16])
        a = forward(llama64, ref, ids[:, 16:18]).logits[:, -1]
        b = forward(llama64, cache, ids[:, 17:18]).logits[:, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_unsupported_quantizer_is_refused_by_name():
    class Odd(Quantizer):
        name = "odd"

    assert "odd" in supports_packed_attention(Odd())
    assert supports_packed_attention(_resolve("kivi")) is None
    assert supports_packed_attention(_resolve("quarot")) is None


def _resolve(name):
    from rdalloc.quantizers import get_quantizer

    return get_quantizer(name)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
