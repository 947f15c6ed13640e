"""PackedHeadCache on tiny random Llama and Qwen2 models (seconds): 16 bits equals DynamicCache, parity with the
simulation (TransformCache), bytes held equal the prediction, left padding, beams, bf16, bad input; and one slow test
on the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf import PackedHeadCache, TransformCache, left_padding  # noqa: E402
from rdalloc.backends.hf.compat import forward, generate  # noqa: E402
from rdalloc.backends.hf.head_plans import plan_transform  # noqa: E402
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from rdalloc import Plan  # noqa: E402
from rdalloc.accounting import predict_nbytes  # noqa: E402

LAYERS, KV_HEADS, VOCAB = 2, 3, 128
KIVI8 = {"name": "kivi", "group_size": 8}
QUAROT = {"name": "quarot"}


def head_plan(key, value, spec=KIVI8) -> Plan:
    return Plan(key=np.asarray(key), value=np.asarray(value), quantizer=spec["name"], meta={"quantizer_spec": spec})


MIXED = ([[2, 16, 4], [3, 0, 8]], [[3, 0, 2], [16, 4, 2]])  # every kind of head: 0, 16 and several widths
FULL = ([[16] * KV_HEADS] * LAYERS,) * 2


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(hidden=96, layers=LAYERS, q_heads=6, kv_heads=KV_HEADS, vocab=VOCAB)  # head_dim 16


@pytest.fixture(scope="module")
def llama64(llama):
    import copy

    return copy.deepcopy(llama).double()


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=96, intermediate_size=128, num_attention_heads=6, num_key_value_heads=KV_HEADS,
                         num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=256,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


def token_ids(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, cache, ids, mask=None):
    """Logits of ``ids`` with ``cache`` (positions counted over real tokens when ``mask`` left-pads)."""
    kw = {}
    if mask is not None:
        kw = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]}
    with torch.no_grad():
        return forward(model, cache, ids, **kw).logits


def left_padded(seqs, length):
    """A left-padded batch (pad id 0) and its attention mask from a list of 1-D token tensors."""
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - s.numel():] = s
        mask[i, length - s.numel():] = 1
    return ids, mask


# ---- 16 bits: the plain model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_sixteen_bits_equals_dynamic_cache(which, request):
    model = request.getfixturevalue(which)
    ids = token_ids(1, 37)
    cache = PackedHeadCache(head_plan(*FULL), model.config)
    assert torch.equal(run(model, cache, ids), run(model, DynamicCache(config=model.config), ids))
    step = run(model, cache, ids[:, :1])  # one decode step after the prompt
    ref = DynamicCache(config=model.config)
    run(model, ref, ids)
    assert torch.equal(step, run(model, ref, ids[:, :1]))
    assert cache.nbytes == cache.predicted_nbytes == cache.fp16_nbytes == 2 * LAYERS * 2 * KV_HEADS * 38 * 16


def test_sixteen_bits_left_padded_batch_equals_dynamic_cache(llama):
    seqs = [token_ids(1, n, seed=n)[0] for n in (30, 27, 19, 30)]
    ids, mask = left_padded(seqs, 30)
    ours = run(llama, PackedHeadCache(head_plan(*FULL), llama.config, attention_mask=mask), ids, mask)
    ref = run(llama, DynamicCache(config=llama.config), ids, mask)
    real = mask.bool()
    assert torch.equal(ours[real], ref[real])
    for beams in (1, 3):  # beam search expands the batch (rows repeated) and reorders it every step
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, attention_mask=mask, num_beams=beams)
        out = generate(llama, PackedHeadCache(head_plan(*FULL), llama.config, attention_mask=mask), ids, **kw)
        assert torch.equal(out, llama.generate(ids, **kw))


def test_sixteen_bits_beam_search_and_sampling_equal_dynamic_cache(llama):
    ids = token_ids(2, 21)
    for kw in (dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)):
        kw.update(max_new_tokens=10, min_new_tokens=10)
        torch.manual_seed(5)
        ref = llama.generate(ids, **kw)
        for _ in range(2):  # several calls in a row, a fresh cache each
            torch.manual_seed(5)
            assert torch.equal(generate(llama, PackedHeadCache(head_plan(*FULL), llama.config), ids, **kw), ref)


# ---- parity with the simulation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,residual", [(KIVI8, None), (KIVI8, 16), (QUAROT, None), (QUAROT, 16),
                                           ({"name": "absmax"}, 3)], ids=["kivi", "kivi-r16", "quarot", "quarot-r16",
                                                                          "absmax-r3"])
def test_quantize_residual_reproduces_transform_cache(llama, spec, residual):
    """Prefill 21 tokens then decode one at a time: every step's logits equal the simulation's (quantizer groups
    complete and partial, flushes at the residual length, 0- and 16-bit heads)."""
    plan = head_plan(*MIXED, spec)
    ids = token_ids(2, 45)
    ours = PackedHeadCache(plan, llama.config, quantize_residual=True, residual_length=residual)
    sim = TransformCache(plan_transform(plan), llama.config)
    torch.testing.assert_close(run(llama, ours, ids[:, :21]), run(llama, sim, ids[:, :21]), rtol=0, atol=1e-5)
    for i in range(21, 45):
        torch.testing.assert_close(run(llama, ours, ids[:, i:i + 1]), run(llama, sim, ids[:, i:i + 1]), rtol=0,
                                   atol=1e-5)
        assert ours.nbytes == ours.predicted_nbytes
    assert ours.get_seq_length() == sim.get_seq_length() == 45


def test_quantize_residual_generate_matches_simulation_greedy_and_beams(qwen):
    plan = head_plan([[2, 3, 4], [3, 2, 16]], [[2, 2, 3], [4, 0, 2]])
    ids = token_ids(2, 13)
    for kw in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        kw.update(max_new_tokens=12, min_new_tokens=12, output_scores=True, return_dict_in_generate=True)
        a = generate(qwen, PackedHeadCache(plan, qwen.config, quantize_residual=True), ids, **kw)
        b = generate(qwen, TransformCache(plan_transform(plan), qwen.config), ids, **kw)
        assert torch.equal(a.sequences, b.sequences)
        for sa, sb in zip(a.scores, b.scores):
            torch.testing.assert_close(sa, sb, rtol=0, atol=1e-4)
    plain = generate(qwen, DynamicCache(config=qwen.config), ids, max_new_tokens=12, min_new_tokens=12,
                     do_sample=False)
    assert not torch.equal(a.sequences, plain)  # 2-3 bits change what is generated here


def test_without_quantize_residual_the_residual_is_full_precision(llama):
    """The stored tokens read as the simulation's; the residual tokens as they are (KIVI's scheme)."""
    plan = head_plan([[2] * 3] * 2, [[2] * 3] * 2)
    ids = token_ids(1, 21)  # keys: 16 stored (2 groups of 8), 5 in the residual; values all stored
    ours = PackedHeadCache(plan, llama.config)
    seen = {}
    layer = ours.layers[0]
    original = layer.update

    def spy(k, v, *a, **kw):
        seen["in"] = (k, v)
        seen["out"] = original(k, v, *a, **kw)
        return seen["out"]

    layer.update = spy
    run(llama, ours, ids)
    (k, v), (kq, vq) = seen["in"], seen["out"]
    fq = plan_transform(plan)(0, k, v)
    assert torch.equal(kq[:, :, :16], fq[0][:, :, :16]) and torch.equal(kq[:, :, 16:], k[:, :, 16:])
    assert torch.equal(vq, fq[1])  # per-token values are quantized on arrival
    assert [(s, r) for _, _, s, r in layer.token_counts()] == [(16, 5), (21, 0)]


# ---- memory ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,residual", [(KIVI8, None), (KIVI8, 24), (QUAROT, None), (QUAROT, 5)])
def test_bytes_held_equal_the_prediction(llama, spec, residual):
    plan = head_plan(*MIXED, spec)
    cache = PackedHeadCache(plan, llama.config, residual_length=residual)
    ids = token_ids(3, 40)
    run(llama, cache, ids[:, :11])
    assert cache.nbytes == cache.predicted_nbytes
    for i in range(11, 40):  # every length: group tails, flushes
        run(llama, cache, ids[:, i:i + 1])
        assert cache.nbytes == cache.predicted_nbytes, i + 1
    for layer in cache.layers:  # the figure is the storage: no tensor is a view keeping more alive
        for group in layer.groups:
            for st in group.states:
                for t in (*st.codes, *st.params, st.full, st.residual):
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    # with nothing in the residual the figure is rdalloc.accounting's for the whole length
    if spec is QUAROT and residual is None:
        assert cache.nbytes == predict_nbytes(plan, None, batch=3, tokens=40, head_dim=16)
    if residual is None:
        assert cache.nbytes < 0.6 * cache.fp16_nbytes


def test_prediction_counts_each_part_by_hand(llama):
    """One layer's figure by hand: KIVI g=8, keys 2 bits on every head, values 16 bits, 19 tokens, batch 1."""
    plan = head_plan([[2] * 3] * 2, [[16] * 3] * 2)
    cache = PackedHeadCache(plan, llama.config)
    run(llama, cache, token_ids(1, 19))
    keys = 3 * (16 * 16 * 2 // 8 + 2 * 2 * 16 * 2) + 2 * 3 * 3 * 16  # 16 stored tokens: codes + (scale, zero) per
    values = 2 * 3 * 19 * 16  # group of 8 tokens of a channel; 3 residual tokens at 2 bytes; values at 16 bits
    assert cache.layers[0].nbytes == keys + values
    assert cache.nbytes == cache.predicted_nbytes == 2 * (keys + values)


# ---- padding -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,quantize_residual", [(2, False), (3, True), (4, False)])
def test_left_padded_rows_are_stored_as_alone(llama64, bits, quantize_residual):
    """Each row of a left-padded batch of 4 gives the logits it gives alone at batch 1 (float64: no rounding flip
    can move a code), prefill and decode; pads never enter a group's statistics."""
    plan = head_plan([[bits, 16, bits], [bits, bits, 0]], [[bits] * 3, [bits, 16, bits]])
    seqs = [token_ids(1, n, seed=n)[0] for n in (26, 23, 20, 13)]
    ids, mask = left_padded(seqs, 26)
    cache = PackedHeadCache(plan, llama64.config, attention_mask=mask, quantize_residual=quantize_residual)
    batch = [run(llama64, cache, ids, mask)]
    steps = token_ids(4, 9, seed=7)
    for i in range(9):
        mask = torch.cat([mask, torch.ones((4, 1), dtype=mask.dtype)], dim=1)
        batch.append(run(llama64, cache, steps[:, i:i + 1], mask)[:, -1:])
    alone_bytes = 0
    for row, s in enumerate(seqs):
        alone = PackedHeadCache(plan, llama64.config, quantize_residual=quantize_residual)
        ref = [run(llama64, alone, s[None])]
        ref += [run(llama64, alone, steps[row:row + 1, i:i + 1]) for i in range(9)]
        torch.testing.assert_close(batch[0][row, -s.numel():], ref[0][0], rtol=0, atol=1e-10)
        for a, b in zip(batch[1:], ref[1:]):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-10)
        alone_bytes += alone.nbytes
    assert cache.nbytes == cache.predicted_nbytes == alone_bytes  # each row holds what it holds alone


def test_generate_left_padded_batch_equals_each_row_alone(llama64):
    plan = head_plan([[3] * 3] * 2, [[3] * 3] * 2)
    seqs = [token_ids(1, n, seed=n)[0] for n in (17, 9, 14)]
    ids, mask = left_padded(seqs, 17)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    cache = PackedHeadCache.for_inputs(plan, llama64, {"input_ids": ids, "attention_mask": mask})
    out = generate(llama64, cache, ids, attention_mask=mask, **kw)
    for row, s in enumerate(seqs):
        alone = generate(llama64, PackedHeadCache.from_model(plan, llama64), s[None], **kw)
        assert torch.equal(out[row, -10:], alone[0, -10:])


def test_left_padding_reads_the_mask():
    assert left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])).tolist() == [2, 0, 4]
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        left_padding(torch.tensor([[0, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        left_padding(torch.ones(3))
    with pytest.raises(ValueError, match="0 \\(pad\\) and 1"):
        left_padding(torch.tensor([[0, 2]]))


# ---- dtypes, devices, failures, bad input -------------------------------------------------------------------------
def test_bfloat16(llama):
    import copy

    model = copy.deepcopy(llama).to(torch.bfloat16)
    ids = token_ids(2, 19)
    assert torch.equal(run(model, PackedHeadCache(head_plan(*FULL), model.config), ids),
                       run(model, DynamicCache(config=model.config), ids))
    plan = head_plan(*MIXED)
    cache = PackedHeadCache(plan, model.config, quantize_residual=True)
    ours = run(model, cache, ids)
    sim = run(model, TransformCache(plan_transform(plan), model.config), ids)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, sim, rtol=0, atol=0)
    k, v = cache.layers[0].update(*(torch.zeros((2, KV_HEADS, 1, 16), dtype=torch.bfloat16),) * 2)
    assert k.dtype == torch.bfloat16 and k.device == ids.device and k.shape == (2, KV_HEADS, 20, 16)
    assert cache.nbytes == cache.predicted_nbytes


def test_a_failed_call_leaves_no_state(llama):
    plan = head_plan(*MIXED)
    ids = token_ids(1, 12)
    cache = PackedHeadCache(plan, llama.config)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="kv heads"):
        layer.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    with pytest.raises(ValueError, match="magnitude"):
        layer.update(torch.full((1, 3, 3, 16), 1e6), torch.zeros(1, 3, 3, 16))
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    fresh = PackedHeadCache(plan, llama.config)
    assert torch.equal(run(llama, cache, ids), run(llama, fresh, ids))
    with pytest.raises(ValueError, match="batch 2"):
        layer.update(torch.zeros(2, 3, 1, 16), torch.zeros(2, 3, 1, 16))
    with pytest.raises(ValueError, match="agree"):
        layer.update(torch.zeros(1, 3, 1, 16), torch.zeros(1, 3, 2, 16))
    assert cache.get_seq_length() == 12
    assert torch.equal(run(llama, cache, ids[:, :1]), run(llama, fresh, ids[:, :1]))


def test_bad_arguments_are_refused(llama):
    plan = head_plan(*MIXED)
    with pytest.raises(TypeError, match="plan must be an rdalloc.Plan"):
        PackedHeadCache({"key": 4}, llama.config)
    with pytest.raises(ValueError, match="layers=3"):
        PackedHeadCache(head_plan([[4] * 3] * 3, [[4] * 3] * 3), llama.config)
    with pytest.raises(ValueError, match="kv_heads=2"):
        PackedHeadCache(head_plan([[4] * 2] * 2, [[4] * 2] * 2), llama.config)
    axes = ("layer", "kv_head", "token")
    token_plan = Plan(key=np.full((2, 3, 4), 4), value=np.full((2, 3, 4), 4), key_axes=axes, value_axes=axes,
                      quantizer="kivi")
    with pytest.raises(ValueError, match="head plan"):
        PackedHeadCache(token_plan, llama.config)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="residual_length"):
            PackedHeadCache(plan, llama.config, residual_length=bad)
    with pytest.raises(ValueError, match="multiple of quantizer 'kivi'"):
        PackedHeadCache(plan, llama.config, residual_length=12)
    with pytest.raises(TypeError, match="quantize_residual"):
        PackedHeadCache(plan, llama.config, quantize_residual=1)
    with pytest.raises(ValueError, match="mismatch"):
        PackedHeadCache(plan, llama.config, quantizer="quarot")
    with pytest.raises(ValueError, match="not left-padded"):
        PackedHeadCache(plan, llama.config, attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(TypeError, match="config"):
        PackedHeadCache(plan, "llama")
    narrow = tiny_llama(hidden=72, layers=2, q_heads=6, kv_heads=3).config  # head_dim 12
    with pytest.raises(ValueError, match="head_dim=12"):
        PackedHeadCache(head_plan(*MIXED, {"name": "kivi", "group_size": 4}), narrow)
    sliding = Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=2,
                          layer_types=["full_attention", "sliding_attention"], use_sliding_window=True,
                          sliding_window=8)
    with pytest.raises(ValueError, match="layer 1 of this model is 'sliding_attention'"):
        PackedHeadCache(plan, sliding)
    with pytest.raises(NotImplementedError, match="crop"):
        PackedHeadCache(plan, llama.config).crop(-1)


# ---- the bundled model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_perplexity_equals_the_simulation(real):
    """A mixed head plan (2..8 bits, 4 average) on SmolLM2-135M: the packed cache with ``quantize_residual`` gives the
    simulation's perplexity (``head_plans.evaluate_plan``) within float rounding and holds the bytes it predicts."""
    pytest.importorskip("gguf")
    from rdalloc.backends.hf import perplexity, text_windows
    from rdalloc.backends.hf.head_plans import evaluate_plan, random_plan

    windows = text_windows(real.tokenizer, length=160, calibration=1, evaluation=2).evaluation
    plan = random_plan(real.facts, "kivi", 4.0, tokens=160, seed=0)
    assert len(set(plan.key.ravel().tolist()) | set(plan.value.ravel().tolist())) > 2
    made = []

    def factory():
        made.append(PackedHeadCache.from_model(plan, real.model, quantize_residual=True))
        return made[-1]

    ours = perplexity(real.model, windows, factory, progress=False)
    sim = evaluate_plan(real.model, windows, plan, progress=False)
    assert ours.ppl == pytest.approx(sim.ppl, rel=1e-6, abs=0)
    assert len(made) == 2 and all(c.nbytes == c.predicted_nbytes > 0 for c in made)
    assert made[0].nbytes < 0.4 * made[0].fp16_nbytes
