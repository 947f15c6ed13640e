"""experiments/quantized_cache_peer.py on a tiny random Llama (seconds): the step-by-step teacher-forced protocol
with a DynamicCache equals one full forward and sees a quantized cache; the byte matching picks the largest budget
within the target and the matched cache holds those bytes after the protocol; quanto's bytes counted from its packed
codes (skipped without optimum-quanto)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_families import random_windows, tiny_model  # noqa: E402
from rdalloc.backends.hf import PackedHeadCache  # noqa: E402
from rdalloc.backends.hf.head_plans import head_costs, random_plan, uniform_plan  # noqa: E402
from rdalloc.backends.hf.model import model_facts  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from experiments.quantized_cache_peer import (  # noqa: E402
    full_forward_logits,
    held_bytes,
    match_budget,
    quanto_nbytes,
    teacher_forced_logits,
    token_losses,
)

KIVI16 = {"name": "kivi", "group_size": 16}  # head_dim 16
CONTEXT, CONTINUATION = 20, 9


@pytest.fixture(scope="module")
def llama():
    model, config = tiny_model("llama")
    return model, config, model_facts(model)


def test_step_by_step_dynamic_cache_equals_one_full_forward(llama):
    model, config, _ = llama
    ids = random_windows(2, CONTEXT + CONTINUATION + 1, seed=3)
    cache = DynamicCache(config=config)
    steps = teacher_forced_logits(model, cache, ids, CONTEXT)
    full = full_forward_logits(model, ids, CONTEXT)
    assert steps.shape == full.shape == (2, CONTINUATION, config.vocab_size)
    assert cache.get_seq_length() == CONTEXT + CONTINUATION
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    nll, kl = token_losses(steps, full, ids[:, CONTEXT + 1:])
    assert nll.shape == kl.shape == (2, CONTINUATION)
    assert np.all(kl < 1e-6)
    expected = -torch.log_softmax(full.double(), -1).gather(-1, ids[:, CONTEXT + 1:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_the_protocol_sees_a_quantized_cache_in_decoding(llama):
    model, config, facts = llama
    ids = random_windows(1, CONTEXT + CONTINUATION + 1, seed=4)
    full = full_forward_logits(model, ids, CONTEXT)
    packed = teacher_forced_logits(model, PackedHeadCache(uniform_plan(facts, KIVI16, 2, tokens=29), config), ids,
                                   CONTEXT)
    _, kl = token_losses(packed, full, ids[:, CONTEXT + 1:])
    assert kl.mean() > 1e-4  # 2-bit K/V change every decoding step


def test_protocol_rejects_a_context_that_leaves_nothing_to_score(llama):
    model, config, _ = llama
    ids = random_windows(1, 10)
    with pytest.raises(ValueError, match="context must be an integer in \\[1, 8\\]"):
        teacher_forced_logits(model, DynamicCache(config=config), ids, 9)


def test_byte_matching_picks_the_largest_budget_within_the_target(llama):
    model, config, facts = llama
    tokens = CONTEXT + CONTINUATION

    def make(bits):
        return random_plan(facts, KIVI16, bits, tokens=tokens, seed=1)

    sizes, meta = head_costs(facts, KIVI16, tokens)
    overhead = float(meta.sum() / sizes.sum())  # metadata bits per element, charged in the budget
    target = held_bytes(uniform_plan(facts, KIVI16, 3, tokens=tokens), config, tokens) + 50
    m = match_budget(make, config, tokens, target, low=2 + overhead, high=8 + overhead, tolerance=1e-3)
    assert m.nbytes <= target and m.ratio <= 1.0
    assert m.nbytes > 0.9 * target
    # no budget on a fine grid gives a plan holding more bytes within the target
    grid = [held_bytes(make(b), config, tokens) for b in np.linspace(2 + overhead, 8 + overhead, 61)]
    assert max(n for n in grid if n <= target) <= m.nbytes
    assert max(grid) > target  # the target does bind
    # the matched plan, run through the protocol, holds exactly the bytes the matching predicted
    cache = PackedHeadCache(m.plan, config)
    teacher_forced_logits(model, cache, random_windows(1, tokens + 1, seed=5), CONTEXT)
    assert cache.nbytes == cache.predicted_nbytes == m.nbytes


def test_byte_matching_refuses_an_unreachable_target(llama):
    _, config, facts = llama

    def make(bits):
        return random_plan(facts, KIVI16, bits, tokens=16, seed=1)

    with pytest.raises(ValueError, match="even the lowest budget"):
        match_budget(make, config, 16, 100, low=5.0, high=9.0)
    with pytest.raises(ValueError, match="target must be a positive number of bytes"):
        match_budget(make, config, 16, 0, low=5.0, high=9.0)
    with pytest.raises(ValueError, match="low < high"):
        match_budget(make, config, 16, 10_000, low=5.0, high=3.0)


@pytest.mark.parametrize("nbits", [2, 4])
def test_quanto_bytes_count_packed_codes(llama, nbits):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    model, config, facts = llama
    cache = QuantizedCache("quanto", config, nbits=nbits)  # group 64, residual 128
    teacher_forced_logits(model, cache, random_windows(1, 32 + 3 + 1, seed=6), 32)  # 32 quantized, 3 residual
    elements = facts.kv_heads * 32 * facts.head_dim  # per role and layer
    quantized = facts.layers * 2 * (elements * nbits // 8 + 2 * 2 * elements // 64)
    residual = facts.layers * 2 * 2 * facts.kv_heads * 3 * facts.head_dim
    counted = quanto_nbytes(cache)
    assert counted["bytes"] == quantized + residual
    # float32 model: scale and shift held at 4 bytes each
    assert counted["bytes_as_stored"] == counted["bytes"] + facts.layers * 2 * 2 * 2 * elements // 64
