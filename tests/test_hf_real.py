"""rdalloc.backends.hf on the real SmolLM2-135M-Instruct and real text (slow: about a minute or two on 2 CPU cores,
plus ~40 s the first time, when the GGUF is converted into the cache). Run with ``pytest -m slow``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hf_fixtures import per_token_quant  # noqa: E402
from rdalloc.backends.hf import (  # noqa: E402
    TransformCache,
    attention_importance,
    cache_dir,
    capture_kv,
    fisher_importance,
    load_model,
    perplexity,
    smollm2_gguf,
    text_windows,
)

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).parent / "data" / "smollm2_kv.npz"


# `real`: the bundled model, loaded once per session (tests/conftest.py).


@pytest.fixture(scope="module")
def windows(real):
    return text_windows(real.tokenizer, length=256, calibration=2, evaluation=2)


def test_loads_through_the_cache_dir(real):
    assert (real.facts.layers, real.facts.kv_heads, real.facts.q_heads, real.facts.head_dim) == (30, 3, 9, 64)
    assert real.facts.name == "SmolLM2-135M-Instruct"
    assert not real.model.training and real.model.dtype == torch.float32
    weights = cache_dir() / "models" / smollm2_gguf().stem / "model.safetensors"
    assert weights.is_file()
    stamp = weights.stat().st_mtime_ns
    again = load_model(progress=False)  # from the cache: no second conversion
    assert weights.stat().st_mtime_ns == stamp
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1028, 30]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, real.model(ids).logits)


def test_converted_model_equals_the_gguf(real):
    """The cached safetensors copy is the GGUF's float32 dequantization, bit for bit (tokenizer included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "def f(x):\n    return x * 2  # the quick brown fox"
    ids = real.tokenizer(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    with torch.no_grad():
        assert torch.equal(real.model(torch.tensor([ids])).logits, direct(torch.tensor([ids])).logits)


def test_perplexity_is_sane_and_quantization_hurts(real, windows):
    plain = perplexity(real.model, windows.evaluation, progress=False)
    assert plain.tokens == 2 * 255 and math.isfinite(plain.ppl) and 1.0 < plain.ppl < 100.0
    four = perplexity(real.model, windows.evaluation, lambda: TransformCache(per_token_quant(4), 30), progress=False)
    two = perplexity(real.model, windows.evaluation, lambda: TransformCache(per_token_quant(2), 30), progress=False)
    assert plain.ppl * 0.99 < four.ppl < two.ppl and math.isfinite(two.ppl)


def test_capture_shapes_and_fixture(real, windows):
    kv = capture_kv(real.model, windows.calibration[:1, :128], progress=False)
    assert kv.keys.shape == (30, 1, 3, 128, 64) == kv.values.shape
    assert torch.isfinite(kv.keys).all() and torch.isfinite(kv.values).all()
    if FIXTURE.is_file():  # scripts/make_kv_fixture.py: the first 128-token calibration window, float16
        data = np.load(FIXTURE)
        assert np.array_equal(data["tokens"], windows.calibration[0, :128].numpy())
        layers = data["layers"]
        np.testing.assert_allclose(data["k"].astype(np.float32), kv.keys[layers, 0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(data["v"].astype(np.float32), kv.values[layers, 0].numpy(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("estimator", [fisher_importance, attention_importance])
def test_importance_on_the_real_model(real, windows, estimator):
    imp = estimator(real.model, windows.calibration[:1, :128], progress=False)
    for w in (imp.key, imp.value):
        assert w.shape == (30, 3) and np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(w.sum(1) > 0)
