"""Hugging Face transformers integration: load models offline, capture K/V, caches that apply rdalloc plans.

* :mod:`.model` — ``load_model()``: the bundled SmolLM2-135M-Instruct (GGUF, converted once and cached) or any local
  Hugging Face directory, as ``(model, tokenizer, facts)``.
* :mod:`.text` — ``text_windows()``: ``pydoc_data.topics`` (or a UTF-8 file), tokenized once, cut into disjoint
  calibration and evaluation windows.
* :mod:`.capture` — ``capture_kv()``: the K/V the cache holds; ``fisher_importance()``,
  ``attention_importance()``: per-(layer, kv_head) weights for keys and values.
* :mod:`.cache` — ``TransformCache``: a ``transformers.Cache`` handing attention ``transform(layer, K, V)`` of the
  full stored cache (simulated quantized KV), for ``model(...)`` and ``model.generate(...)``.
* :mod:`.perplexity` — ``perplexity()`` over windows, a fresh cache per window.

Importing this package imports torch and transformers (rdalloc itself does not).
"""

from .cache import TransformCache, TransformLayer, cache_factory, identity_transform
from .capture import CapturedKV, HeadImportance, attention_importance, capture_kv, fisher_importance
from .model import INSTALL_HINT, LoadedModel, ModelFacts, cache_dir, convert_gguf, load_model, model_facts, smollm2_gguf
from .perplexity import PerplexityResult, perplexity
from .text import TextWindows, cut_windows, default_text, read_text, text_windows, tokenize

__all__ = ["load_model", "LoadedModel", "ModelFacts", "model_facts", "smollm2_gguf", "convert_gguf", "cache_dir",
           "INSTALL_HINT", "text_windows", "TextWindows", "default_text", "read_text", "tokenize", "cut_windows",
           "capture_kv", "CapturedKV", "fisher_importance", "attention_importance", "HeadImportance",
           "TransformCache", "TransformLayer", "cache_factory", "identity_transform", "perplexity",
           "PerplexityResult"]
