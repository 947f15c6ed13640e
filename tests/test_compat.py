"""The guard against a silently ignored cache (backends/hf/compat.py): every cache class rdalloc ships, handed to
``model(...)`` and ``model.generate(...)`` through the compat helpers, must change the logits at low bits and hold
the tokens afterwards. If a transformers release stops taking the cache under the keyword rdalloc passes, the model
runs without it (full-precision logits, an empty cache) and these tests fail."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import per_token_quant, tiny_llama  # noqa: E402
from packaging.version import Version  # noqa: E402
from rdalloc.backends import hf  # noqa: E402
from rdalloc.backends.hf import compat  # noqa: E402
from rdalloc.backends.hf.cache import TransformCache  # noqa: E402
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402

from rdalloc.plan import Plan  # noqa: E402
from rdalloc.quantizers import KIVI  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, C, NEW = 2, 2, 16, 48, 6
Q = KIVI(group_size=8)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=LAYERS, q_heads=4, kv_heads=KV_HEADS, vocab=128)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (C + NEW,), generator=torch.Generator().manual_seed(3))


def transform_cache(tiny, ids):
    """A 2-bit per-token fake-quantizing cache, empty: it sees the whole sequence."""
    return TransformCache(per_token_quant(2), tiny.config), 0, None


def compressed_cache(tiny, ids):
    """The first ``C`` tokens compressed to 2-bit keys and values (4 sink tokens, the last 4 kept at 16 bits)."""
    pre = observe_prefill(tiny, ids[:C], window=8)
    value = np.full((LAYERS, KV_HEADS, C), 2)
    value[..., :4] = value[..., -4:] = 16
    plan = Plan(key=np.full((LAYERS, KV_HEADS, HEAD_DIM), 2), value=value, key_axes=("layer", "kv_head", "channel"),
                value_axes=("layer", "kv_head", "token"), quantizer="kivi",
                meta={"sink": 4, "window": 4, "quantizer_spec": Q.spec()})
    return CompressedCache.compress(pre.keys, pre.values, plan, Q), C, JointAttention


CACHES = {TransformCache: transform_cache, CompressedCache: compressed_cache}


def test_every_shipped_cache_class_is_guarded():
    shipped = {obj for mod in (hf.cache, hf.compress) for _, obj in inspect.getmembers(mod, inspect.isclass)
               if issubclass(obj, Cache) and obj.__module__.startswith("rdalloc")}
    assert shipped == set(CACHES)


def _run(context, tiny, fn):
    with torch.no_grad():
        if context is None:
            return fn()
        with context(tiny):
            return fn()


@pytest.mark.parametrize("make", CACHES.values(), ids=[c.__name__ for c in CACHES])
def test_low_bit_cache_changes_forward_logits_and_holds_the_tokens(tiny, ids, make):
    cache, start, context = make(tiny, ids)
    with torch.no_grad():
        plain = tiny(ids[None]).logits[0, start:]
    out = _run(context, tiny, lambda: compat.forward(tiny, cache, ids[None, start:]))
    assert cache.get_seq_length() == C + NEW
    assert (out.logits[0] - plain).abs().max() > 1e-3  # the 2-bit cache was used


@pytest.mark.parametrize("make", CACHES.values(), ids=[c.__name__ for c in CACHES])
def test_low_bit_cache_changes_generate_logits_and_holds_the_tokens(tiny, ids, make):
    cache, start, context = make(tiny, ids)
    prompt = ids[None, :C + 1] if start else ids[None, :C]
    args = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                return_dict_in_generate=True)
    with torch.no_grad():
        plain = tiny.generate(prompt, **args)
    out = _run(context, tiny, lambda: compat.generate(tiny, cache, prompt, **args))
    assert cache.get_seq_length() == prompt.shape[1] + NEW - 1  # the last generated token is never fed back
    assert (out.logits[0] - plain.logits[0]).abs().max() > 1e-3


def test_an_ignored_cache_is_an_error(tiny, ids, monkeypatch):
    """The guard itself can fail: a release that drops the cache (forward ignores an unknown keyword in
    ``**kwargs``), simulated by handing the model no cache at all."""
    monkeypatch.setattr(compat, "cache_kwargs", lambda model, cache: {})
    with pytest.raises(RuntimeError, match="ignored the TransformCache"):
        compat.forward(tiny, TransformCache(per_token_quant(2), tiny.config), ids[None, :8])
    with pytest.raises(RuntimeError, match="ignored the TransformCache"):
        compat.generate(tiny, TransformCache(per_token_quant(2), tiny.config), ids[None, :8], max_new_tokens=2)


def test_cache_keyword_follows_the_installed_release(tiny):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40, then is ignored)."""
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert compat.cache_keyword(tiny) == ("cache" if renamed else "past_key_values")
    assert compat.cache_keyword(tiny.model) == compat.cache_keyword(tiny)


def test_cache_keyword_refuses_a_model_without_one():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="NoCache.forward takes none of the cache keywords"):
        compat.cache_keyword(NoCache())
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        compat.forward(NoCache(), object(), None)


def test_no_deprecation_warning(tiny, ids):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.forward(tiny, TransformCache(per_token_quant(2), tiny.config), ids[None, :8])
