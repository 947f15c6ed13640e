"""Both one-call protocols on every supported family (tiny random models from configs, tests/hf_families.py):
``PackedHeadCache`` (a head plan stored packed; read by the model's attention or by ``PackedAttention``) and
``compress_after_prefill`` (joint compression after prefill),
through ``generate`` on a left-padded batch, in float32 and bfloat16."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_families import FAMILIES, REFUSED, tiny_model
from rdalloc.backends.hf import PackedAttention, PackedHeadCache, compress_after_prefill, model_facts
from rdalloc.backends.hf.head_plans import uniform_plan

from rdalloc.quantizers import KIVI

Q = KIVI(group_size=16)  # head_dim 16: KIVI's default group of 32 channels does not fit
C, NEW = 48, 6


def batch(seed=0):
    """Two sequences of C tokens, the second left-padded by 7."""
    ids = torch.randint(3, 128, (2, C), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kwargs)
    scores = torch.stack(out.scores).float()
    return out.sequences, scores.masked_fill(torch.isinf(scores), 0)  # min_new_tokens sets the end token to -inf


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_head_cache_on_every_family(family, dtype):
    model, _ = tiny_model(family, dtype=dtype)
    inputs = batch()
    want_seq, want_scores = generate(model, inputs)
    facts = model_facts(model)
    full = PackedHeadCache.for_inputs(uniform_plan(facts, Q, 16, tokens=C + NEW), model, inputs, quantizer=Q)
    seq, scores = generate(model, inputs, cache=full)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)  # 16 bits: stored bit for bit
    low = PackedHeadCache.for_inputs(uniform_plan(facts, Q, 2, tokens=C + NEW), model, inputs, quantizer=Q)
    _, scores = generate(model, inputs, cache=low)
    assert low.nbytes == low.predicted_nbytes < low.fp16_nbytes / 3
    assert (scores - want_scores).abs().max() > 1e-3  # the 2-bit storage is what attention reads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_attention_on_every_family(family, dtype):
    """Attention read from the codes gives what the model's attention over the dequantized tokens gives."""
    model, _ = tiny_model(family, dtype=dtype)
    inputs = batch(2)
    plan = uniform_plan(model_facts(model), Q, 3, tokens=C + NEW)
    want_seq, want_scores = generate(model, inputs, cache=PackedHeadCache.for_inputs(plan, model, inputs, quantizer=Q))
    cache = PackedHeadCache.for_inputs(plan, model, inputs, quantizer=Q)
    with PackedAttention(model):
        seq, scores = generate(model, inputs, cache=cache)
    if dtype == "float32":
        assert torch.equal(seq, want_seq)
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-4)
    else:  # bfloat16: the fused read accumulates in float32, the model's SDPA in bfloat16; near ties may flip later
        torch.testing.assert_close(scores[0], want_scores[0], rtol=0, atol=0.1)
    assert all(layer.attention is None for layer in cache.layers)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compress_after_prefill_on_every_family(family, dtype):
    model, _ = tiny_model(family, dtype=dtype)
    inputs = batch(1)
    want_seq, want_scores = generate(model, inputs)
    opts = {"quantizer": Q, "sink": 4, "window": 8, "observe": 8}
    with compress_after_prefill(model, retention=1.0, menu=(0, 16), **opts) as press:
        seq, scores = generate(model, inputs)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-4 if dtype == "float32" else 0.05)
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes == press.cache.fp16_nbytes
    with compress_after_prefill(model, retention=0.3, **opts) as press:
        _, scores = generate(model, inputs)
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes
    # the plans' exact spend is within the budget; the bytes held add only the padding of each bit stream to whole
    # bytes (joint.py's module docstring), under 1 byte per stream, 3 streams per (layer, kv head) and sequence
    facts, budget = model_facts(model), 0.3 * press.cache.fp16_nbytes
    assert sum(p.usage.total_bits for p in press.plans) <= 8 * budget
    assert press.cache.compressed_nbytes - budget < 3 * facts.layers * facts.kv_heads * len(press.plans)
    assert (scores - want_scores).abs().max() > 1e-3  # the compressed cache is what attention reads
    assert model.config._attn_implementation == "sdpa" and not model._forward_hooks


@pytest.mark.parametrize("family", REFUSED)
def test_both_protocols_refuse_sliding_window_models_naming_the_layer(family):
    model, _ = tiny_model(family)
    with pytest.raises(ValueError, match="layer 0"):
        PackedHeadCache(uniform_plan(model_facts(model), Q, 4, tokens=C), model.config, quantizer=Q)
    with pytest.raises(ValueError, match="layer 0"), compress_after_prefill(model, retention=0.5, quantizer=Q):
        pass
