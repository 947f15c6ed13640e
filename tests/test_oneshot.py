"""Joint compression after prefill in one call (backends/hf/oneshot.py) on tiny random Llama/Qwen2 models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf import PrefillCompression, compress_after_prefill  # noqa: E402
from rdalloc.backends.hf.compat import cache_kwargs, forward  # noqa: E402
from rdalloc.backends.hf.compress import (  # noqa: E402
    CompressedCache,
    CompressedLayer,
    JointAttention,
    compressed_nbytes,
    observe_prefill,
    scale_heads,
    token_weights,
)
from rdalloc.backends.hf.joint import allocate_joint  # noqa: E402
from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from rdalloc.quantizers import KIVI  # noqa: E402

C, M, SINK, WIN, OBS, VOCAB = 64, 8, 4, 8, 8, 128
Q = KIVI(group_size=8)
OPTS = {"quantizer": Q, "sink": SINK, "window": WIN, "observe": OBS}
FULL = {"retention": 1.0, "menu": (0, 16), **OPTS}  # keeps every token at 16 bits: the plain model's numbers


def no_eos(model):
    """Generation runs its full length: a random model would stop at a random end-of-sequence token."""
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def tiny():
    return no_eos(tiny_llama(vocab=VOCAB))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (1, C + M), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def batch():
    """4 sequences, left-padded to C tokens (0, 10, 3 and 17 pads), and their mask."""
    ids = torch.randint(3, VOCAB, (4, C), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, C, dtype=torch.long)
    for row, pads in enumerate((0, 10, 3, 17)):
        mask[row, :pads] = 0
    return ids.masked_fill(mask == 0, 0), mask


def gen(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=kwargs.pop("new", 5), output_scores=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


def no_hooks_left(model, implementation="sdpa"):
    assert model.config._attn_implementation == implementation
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(name.startswith("rdalloc_") for name in transformers.AttentionInterface._global_mapping)


def test_full_retention_batch1_equals_plain_model(tiny, ids):
    want_seq, want_scores = gen(tiny, ids[:, :C], do_sample=False)
    with compress_after_prefill(tiny, **FULL) as press:
        seq, scores = gen(tiny, ids[:, :C], do_sample=False)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
    assert isinstance(press, PrefillCompression) and isinstance(press.cache.layers[0], CompressedLayer)
    assert press.cache.retention == 1.0 and press.cache.compressed_nbytes == press.cache.predicted_nbytes
    assert press.cache.get_seq_length() == C + 4  # the last token generated is never fed back
    no_hooks_left(tiny)


def test_plain_forward_prefill_then_decode_steps(tiny, ids):
    """``model(ids)`` inside the block compresses the cache it returns; decode steps with that cache run compressed."""
    with torch.no_grad():
        full = tiny(ids).logits[0, C:]
        with compress_after_prefill(tiny, **FULL) as press:
            out = tiny(ids[:, :C], use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            assert isinstance(cache.layers[0], CompressedLayer) and cache.layers is press.cache.layers
            steps = [forward(tiny, cache, ids[:, C + i:C + i + 1]).logits[0, -1] for i in range(M)]
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-5, atol=1e-5)


def test_one_call_equals_five_step_path(tiny, ids):
    pre = observe_prefill(tiny, ids[0, :C], window=OBS)
    plan = allocate_joint(token_weights(pre, method="hybrid"), pre.keys, pre.values, retention=0.3, quantizer=Q,
                          sink=SINK, window=WIN)  # the one call's defaults without an importance: hybrid, auto
    five = CompressedCache.compress(pre.keys, pre.values, plan, Q)
    with torch.no_grad():
        with JointAttention(tiny):
            want = forward(tiny, five, ids[:, C:]).logits
        with compress_after_prefill(tiny, retention=0.3, **OPTS) as press:
            cache = DynamicCache(config=tiny.config)
            forward(tiny, cache, ids[:, :C])
            got = forward(tiny, cache, ids[:, C:]).logits
    (one,) = press.plans
    assert np.array_equal(one.value, plan.value) and np.array_equal(one.key, plan.key)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert press.cache.compressed_nbytes == five.compressed_nbytes == compressed_nbytes(plan, Q, head_dim=16)


@pytest.mark.parametrize("options", [{"method": "mse", "mode": "per_head"}, {"method": "rdkv", "importance": True},
                                     {"method": "rdkv", "importance": True, "protect": "auto"},
                                     {"method": "hybrid", "protect": "allocated"},
                                     {"method": "hybrid", "protect": "reserved"}])
def test_options_pass_through_as_in_the_five_step_path(tiny, ids, options):
    from rdalloc.backends.hf.capture import HeadImportance

    options = dict(options)
    if options.pop("importance", False):
        rng = np.random.default_rng(0)
        options["importance"] = HeadImportance(key=rng.uniform(0.5, 2, (2, 2)), value=rng.uniform(0.5, 2, (2, 2)),
                                               method="fisher", units="", windows=1, tokens=1, meta={})
    pre = observe_prefill(tiny, ids[0, :C], window=OBS)
    w = token_weights(pre, method=options["method"])
    if "importance" in options:
        w = scale_heads(w, options["importance"])
    plan = allocate_joint(w, pre.keys, pre.values, retention=0.4, quantizer=Q, sink=SINK, window=WIN,
                          mode=options.get("mode", "global"), protect=options.get("protect", "auto"))
    with compress_after_prefill(tiny, retention=0.4, **options, **OPTS) as press:
        gen(tiny, ids[:, :C], do_sample=False, new=1)
    assert np.array_equal(press.plans[0].value, plan.value) and np.array_equal(press.plans[0].key, plan.key)
    assert press.plans[0].meta["weighting"] == plan.meta["weighting"]
    assert press.plans[0].meta["protect"] == plan.meta["protect"] == options.get("protect", "auto")


@pytest.mark.parametrize("importance", [False, True])
def test_defaults_are_the_measured_configuration(tiny, ids, importance):
    """No options but the quantizer: protect="auto", sink 4 + window 8, 32 observed queries, and RDKV's weights
    with a head importance, the hybrid without one, as the five-step path with those spelled out
    (experiments/results/joint_default/)."""
    from rdalloc.backends.hf.capture import HeadImportance

    rng = np.random.default_rng(1)
    imp = HeadImportance(key=rng.uniform(0.5, 2, (2, 2)), value=rng.uniform(0.5, 2, (2, 2)), method="fisher",
                         units="", windows=1, tokens=1, meta={}) if importance else None
    method = "rdkv" if importance else "hybrid"
    pre = observe_prefill(tiny, ids[0, :C], window=32)
    w = token_weights(pre, method=method)
    plan = allocate_joint(w if imp is None else scale_heads(w, imp), pre.keys, pre.values, retention=0.3,
                          quantizer=Q, sink=4, window=8, protect="auto")
    with compress_after_prefill(tiny, retention=0.3, quantizer=Q, importance=imp) as press:
        gen(tiny, ids[:, :C], do_sample=False, new=1)
    (one,) = press.plans
    assert np.array_equal(one.value, plan.value) and np.array_equal(one.key, plan.key)
    assert one.meta["weighting"] == plan.meta["weighting"] and one.meta["weighting"].startswith(method)
    assert one.meta["protect"] == "auto"
    assert one.meta["protect_chosen"] == plan.meta["protect_chosen"]


def test_compression_is_applied(tiny, ids):
    """At 10 % retention the logits must move: a silently skipped compression would give the full cache's."""
    with torch.no_grad():
        full = tiny(ids).logits[0, C:]
        with compress_after_prefill(tiny, retention=0.1, quantizer=Q, sink=2, window=2, observe=OBS) as press:
            cache = DynamicCache(config=tiny.config)
            forward(tiny, cache, ids[:, :C])
            got = forward(tiny, cache, ids[:, C:]).logits[0]
    assert press.cache.retention <= 0.1
    assert (press.plans[0].value == 0).any()  # tokens evicted
    assert (got - full).abs().max() > 1e-2


def test_batch_of_four_with_left_padding_full_retention(tiny, batch):
    ids, mask = batch
    want_seq, want_scores = gen(tiny, ids, mask, do_sample=False)
    with compress_after_prefill(tiny, **FULL) as press:
        seq, scores = gen(tiny, ids, mask, do_sample=False)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    # pads are never kept nor charged: each sequence's plan covers its own tokens only
    assert [p.tokens for p in press.plans] == [C, C - 10, C - 3, C - 17]
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes == press.cache.fp16_nbytes


def test_batch_rows_equal_each_sequence_alone(tiny, batch):
    """Per-sequence budgets: a padded row gets the plan and the numbers it gets alone (masks per row and head)."""
    ids, mask = batch
    with compress_after_prefill(tiny, retention=0.3, **OPTS) as press:
        seq, scores = gen(tiny, ids, mask, do_sample=False, new=3)
    for row in (1, 3):
        alone = ids[row:row + 1, mask[row].bool()]
        with compress_after_prefill(tiny, retention=0.3, **OPTS) as single:
            s1, sc1 = gen(tiny, alone, do_sample=False, new=3)
        assert np.array_equal(single.plans[0].value, press.plans[row].value)
        assert torch.equal(s1[0, alone.shape[1]:], seq[row, C:])
        torch.testing.assert_close(sc1[:, 0], scores[:, row], rtol=1e-4, atol=1e-4)
    counts = {tuple(p.kept().sum(-1).ravel()) for p in press.plans}
    assert len(counts) > 1  # rows keep different numbers of tokens


@pytest.mark.parametrize(("budget", "protect", "r"), [("sequence", "auto", 0.3), ("shared", "reserved", 0.3),
                                                      ("shared", "allocated", 0.3), ("shared", "auto", 0.3),
                                                      ("shared", "auto", 0.15), ("shared", "allocated", 0.15)])
def test_budgets_are_met_and_bytes_equal_the_plans(tiny, batch, budget, protect, r):
    ids, mask = batch
    with compress_after_prefill(tiny, retention=r, budget=budget, protect=protect, **OPTS) as press:
        gen(tiny, ids, mask, do_sample=False, new=2)
    fp16_bits = [16.0 * 2 * 2 * 2 * p.tokens * 16 for p in press.plans]  # layers x kv_heads x tokens x head_dim
    spend = [p.usage.total_bits for p in press.plans]
    if budget == "sequence":
        for p, s, f in zip(press.plans, spend, fp16_bits):
            assert s <= r * f and p.budget_bits == pytest.approx(r * f)
    else:
        assert sum(spend) <= r * sum(fp16_bits)
        assert all(p.budget_bits == pytest.approx(r * sum(fp16_bits)) for p in press.plans)
        assert all(p.meta["budget"] == "shared" and p.meta["protect"] == protect for p in press.plans)
    for p in press.plans:  # the protected tokens of every sequence are kept, pinned or reserved
        assert (p.value[..., :SINK] > 0).all() and (p.value[..., -WIN:] > 0).all()
    held = press.cache.compressed_nbytes
    assert held == press.cache.predicted_nbytes == sum(compressed_nbytes(p, Q, head_dim=16) for p in press.plans)
    assert 0 <= 8 * held - sum(spend) < 8 * 2 * 3 * 2 * len(spend)  # padding of each bit stream to whole bytes


def test_shared_budget_moves_bits_between_sequences(tiny, batch):
    ids, mask = batch
    spends = {}
    for budget in ("sequence", "shared"):
        with compress_after_prefill(tiny, retention=0.3, budget=budget, **OPTS) as press:
            gen(tiny, ids, mask, do_sample=False, new=1)
        spends[budget] = [p.usage.total_bits for p in press.plans]
    assert spends["shared"] != spends["sequence"]


def test_nbytes_budget(tiny, ids):
    with compress_after_prefill(tiny, nbytes=5000, **OPTS) as press:
        gen(tiny, ids[:, :C], do_sample=False, new=1)
    assert press.plans[0].budget_bits == 8 * 5000 and press.plans[0].usage.total_bits <= 8 * 5000


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_full_retention_equals_plain(tiny, batch, beams):
    ids, mask = batch[0][:2], batch[1][:2]
    with torch.no_grad():
        want = tiny.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=beams, do_sample=False)
        with compress_after_prefill(tiny, **FULL) as press:
            got = tiny.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=beams, do_sample=False)
    assert torch.equal(got, want)
    assert press.rows == [0] * beams + [1] * beams  # beams of a sequence share its plan and its packed prefix
    assert press.cache.layers[0].rows[0] is press.cache.layers[0].rows[beams - 1]


def test_beam_search_and_sampling_on_a_compressed_cache(tiny, batch):
    ids, mask = batch
    with torch.no_grad(), compress_after_prefill(tiny, retention=0.3, **OPTS) as press:
        beam = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
        torch.manual_seed(0)
        sampled = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_beams=2)
    assert beam.shape == (4, C + 4) and sampled.shape == (4, C + 4)
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes


def test_sampling_full_retention_equals_plain(tiny, ids):
    with torch.no_grad():
        torch.manual_seed(3)
        want = tiny.generate(ids[:, :C], max_new_tokens=6, do_sample=True, top_k=20)
        with compress_after_prefill(tiny, **FULL):
            torch.manual_seed(3)
            got = tiny.generate(ids[:, :C], max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(got, want)


def test_reorder_select_and_repeat_rows(tiny, batch):
    """The cache API generate calls moves whole rows: prefix and appended tokens."""
    ids, mask = batch
    with torch.no_grad(), compress_after_prefill(tiny, retention=0.3, **OPTS) as press:
        cache = DynamicCache(config=tiny.config)
        forward(tiny, cache, ids[:2], attention_mask=mask[:2])
        layer = cache.layers[0]
        rows = list(layer.rows)
        forward(tiny, cache, ids[:2, :1], attention_mask=torch.ones(2, C + 1, dtype=torch.long))
        appended = layer.keys.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert layer.rows == rows[::-1] and torch.equal(layer.keys, appended.flip(0))
        cache.batch_repeat_interleave(2)
        assert layer.rows == [rows[1], rows[1], rows[0], rows[0]] and layer.keys.shape[0] == 4
        cache.batch_select_indices(torch.tensor([0, 3]))
        assert layer.rows == rows[::-1] and torch.equal(layer.keys, appended.flip(0))
        k, _, valid = layer.prefix()
        assert valid.shape[0] == 2 and press.cache.plans[0].tokens == C
        with pytest.raises(ValueError, match="can only drop appended tokens"):
            layer.crop(-2)


def test_failed_calls_leave_nothing_behind(tiny, ids, batch):
    want_seq, want_scores = gen(tiny, ids[:, :C], do_sample=False)
    # an input of the wrong shape: refused before the model runs
    with pytest.raises(ValueError, match=r"position_ids \(generate derives them from attention_mask\)"), \
            compress_after_prefill(tiny, **FULL):
        gen(tiny, ids[:, :C], torch.ones(1, C - 1, dtype=torch.long))
    no_hooks_left(tiny)
    # an exception inside generate, half way through the prefill: the cache it was given stays as it was
    cache = DynamicCache(config=tiny.config)
    hook = tiny.model.layers[1].register_forward_pre_hook(lambda module, args: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError), compress_after_prefill(tiny, **FULL) as press:
            forward(tiny, cache, ids[:, :C])
    finally:
        hook.remove()
    no_hooks_left(tiny)
    assert all(type(layer) is DynamicLayer for layer in cache.layers) and press.cache is None
    assert not press.attached and not press.pending and press._prefill is None
    # the next correct call, in a new block and inside a block where a call failed, gives the plain numbers
    with compress_after_prefill(tiny, **FULL) as press:
        seq, scores = gen(tiny, ids[:, :C], do_sample=False)
    assert torch.equal(seq, want_seq) and torch.equal(scores, want_scores)
    with compress_after_prefill(tiny, **FULL) as press:
        with pytest.raises(ValueError, match="not left-padded"):
            gen(tiny, batch[0], batch[1].flip(1))
        seq, scores = gen(tiny, ids[:, :C], do_sample=False)
    assert torch.equal(seq, want_seq) and torch.equal(scores, want_scores)
    no_hooks_left(tiny)


def test_bad_options_and_inputs(tiny, ids):
    with pytest.raises(ValueError, match="exactly one of retention"):
        compress_after_prefill(tiny, retention=0.3, nbytes=100)
    with pytest.raises(ValueError, match="retention must be a fraction"):
        compress_after_prefill(tiny, retention=1.5)
    with pytest.raises(ValueError, match="budget must be one of"):
        compress_after_prefill(tiny, retention=0.3, budget="batch")
    with pytest.raises(ValueError, match="method must be one of"):
        compress_after_prefill(tiny, retention=0.3, method="snap")
    with pytest.raises(ValueError, match="menu must contain 0"):
        compress_after_prefill(tiny, retention=0.3, menu=(2, 4))
    with pytest.raises(ValueError, match="cannot share"):
        compress_after_prefill(tiny, retention=0.3, mode="per_head", budget="shared")
    with pytest.raises(ValueError, match="protect must be one of"):
        compress_after_prefill(tiny, retention=0.3, protect="pinned")
    with pytest.raises(ValueError, match="row 0 has 8 tokens, not more than the observation window"), \
            compress_after_prefill(tiny, **FULL):
        gen(tiny, ids[:, :8])
    with pytest.raises(ValueError, match=r"below the \d+ bits"), \
            compress_after_prefill(tiny, retention=0.05, protect="reserved", **OPTS):
        gen(tiny, ids[:, :C])
    with pytest.raises(ValueError, match=r"infeasible .* least budget accepted"), \
            compress_after_prefill(tiny, retention=0.05, **OPTS):  # auto: not even the pinned tokens at 2 bits fit
        gen(tiny, ids[:, :C])
    cache = DynamicCache(config=tiny.config)
    forward(tiny, cache, ids[:, :C])
    with pytest.raises(ValueError, match="not prefilled inside this block"), compress_after_prefill(tiny, **FULL):
        tiny(ids[:, C:C + 1], **cache_kwargs(tiny, cache))
    no_hooks_left(tiny)


def test_bfloat16_model(ids):
    model = no_eos(tiny_llama(vocab=VOCAB)).to(torch.bfloat16)
    want_seq, want_scores = gen(model, ids[:, :C], do_sample=False)
    with compress_after_prefill(model, **FULL) as press:
        seq, scores = gen(model, ids[:, :C], do_sample=False)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
    assert press.cache.layers[0].rows[0].sink_kv[0].dtype == torch.bfloat16
    with compress_after_prefill(model, retention=0.3, **OPTS) as press:
        seq, _ = gen(model, ids[:, :C], do_sample=False)
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes and seq.shape == (1, C + 5)


def test_eager_model_keeps_its_implementation(ids):
    model = no_eos(tiny_llama(vocab=VOCAB))
    model.set_attn_implementation("eager")
    want_seq, want_scores = gen(model, ids[:, :C], do_sample=False)
    with compress_after_prefill(model, **FULL):
        seq, scores = gen(model, ids[:, :C], do_sample=False)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    no_hooks_left(model, "eager")


def test_qwen2_left_padded_batch():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    no_eos(model)
    ids = torch.randint(3, VOCAB, (2, C), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, C, dtype=torch.long)
    mask[1, :9] = 0
    want_seq, want_scores = gen(model, ids, mask, do_sample=False)
    with compress_after_prefill(model, **FULL):
        seq, scores = gen(model, ids, mask, do_sample=False)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    with compress_after_prefill(model, retention=0.3, **OPTS) as press:
        gen(model, ids, mask, do_sample=False)
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes


def test_gemma2_sliding_window_and_softcapping_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                          num_hidden_layers=2, head_dim=16, vocab_size=VOCAB, sliding_window=16)
    model = Gemma2ForCausalLM(config).eval()
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"layer 0 .*sliding-window attention.*soft-caps"):
        with compress_after_prefill(model, retention=0.5):
            pass
    no_hooks_left(model, implementation)


def test_chunked_prefill_is_refused_before_anything_runs(tiny, ids):
    """``prefill_chunk_size`` shorter than the prompt would compress the first chunk alone (the rest of the prompt kept
    at full precision, outside the budget): refused with a message, the model left as it was; a chunk holding the
    whole prompt is one prefill and gives the plain model's numbers."""
    want_seq, want_scores = gen(tiny, ids[:, :C], do_sample=False)
    calls = []
    hook = tiny.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with compress_after_prefill(tiny, **FULL) as press:
            with pytest.raises(ValueError, match=r"chunk_size=16\) would prefill the 64-token prompt in chunks"):
                gen(tiny, ids[:, :C], do_sample=False, prefill_chunk_size=16)
            assert not calls and press.cache is None
            seq, scores = gen(tiny, ids[:, :C], do_sample=False, prefill_chunk_size=C)
    finally:
        hook.remove()
    assert torch.equal(seq, want_seq) and torch.equal(scores, want_scores)
    assert "generate" not in vars(tiny)
    no_hooks_left(tiny)
    tiny.generation_config.prefill_chunk_size = 16  # set on the model's generation config: refused too
    try:
        with pytest.raises(ValueError, match="pass prefill_chunk_size=None"), compress_after_prefill(tiny, **FULL):
            gen(tiny, ids[:, :C], do_sample=False)
    finally:
        tiny.generation_config.prefill_chunk_size = None
    assert "generate" not in vars(tiny)
    no_hooks_left(tiny)


def test_shared_budget_below_the_reservation_needs_the_allocation(tiny, batch):
    """15 % of the batch's FP16 bytes cannot hold its 4 x 12 protected tokens (48 of 226, 21 %) at 16 bits: reserved
    is refused with a message naming the way out; auto (the default) pins them inside the allocation."""
    ids, mask = batch
    with pytest.raises(ValueError, match="protect='allocated'"), \
            compress_after_prefill(tiny, retention=0.15, budget="shared", protect="reserved", **OPTS):
        gen(tiny, ids, mask, do_sample=False, new=1)
    with compress_after_prefill(tiny, retention=0.15, budget="shared", **OPTS) as press:
        gen(tiny, ids, mask, do_sample=False, new=1)
    assert {p.meta["protect_chosen"] for p in press.plans} == {"allocated"}
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes
