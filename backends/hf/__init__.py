"""Hugging Face transformers integration: load models offline, capture K/V, calibrate, caches that apply rdalloc plans.

* :mod:`.model` — ``load_model()``: the bundled SmolLM2-135M-Instruct (GGUF, converted once and cached) or any local
  Hugging Face directory, as ``(model, tokenizer, facts)``.
* :mod:`.text` — ``text_windows()``: ``pydoc_data.topics`` (or a UTF-8 file), tokenized once, cut into disjoint
  calibration and evaluation windows.
* :mod:`.capture` — ``capture_kv()``: the K/V the cache holds; ``fisher_importance()``,
  ``attention_importance()``: per-(layer, kv_head) weights for keys and values.
* :mod:`.calibrate` — ``calibrate()``: a :class:`~.calibrate.Calibration` (distortion fits per quantizer, head
  importance); :mod:`.head_plans` — head plans from it and their perplexity (``evaluate_plan``).
* :mod:`.cache` — ``TransformCache``: a ``transformers.Cache`` handing attention ``transform(layer, K, V)`` of the
  full stored cache (simulated quantized KV), for ``model(...)`` and ``model.generate(...)``.
* :mod:`.packed_cache` — ``PackedHeadCache``: a head plan applied for real, K/V stored bit-packed at each head's
  width as tokens arrive (``model.generate(..., cache=PackedHeadCache.for_inputs(plan, model, inputs))``);
  :mod:`.packed_attention` — ``with PackedAttention(model):`` attention read from its codes, not dequantized.
* :mod:`.perplexity` — ``perplexity()`` over windows, a fresh cache per window, with KL to a once-computed FP16
  reference (``reference_logprobs``); :mod:`.paired` — paired block-bootstrap comparisons of two rows.
* :mod:`.compress`, :mod:`.joint` — compress a prefilled cache once (``CompressedCache``, ``JointAttention``) with a
  joint eviction and quantization plan (``allocate_joint``).
* :mod:`.oneshot` — ``with compress_after_prefill(model, retention=0.1): model.generate(...)``: the same in one call,
  for batches, beams and sampling.
* :mod:`.cli` — the ``rdalloc calibrate``, ``allocate`` and ``eval`` commands.

Importing this package is light: the names below import torch and transformers on first use (``rdalloc --help``
loads :mod:`.cli` through it).
"""

from importlib import import_module

_HOMES = {
    "cache": ("TransformCache", "TransformLayer", "cache_factory", "identity_transform"),
    "capture": ("CapturedKV", "HeadImportance", "attention_importance", "capture_kv", "fisher_importance",
                "FisherError", "fisher_error", "fisher_weighted_error"),
    "oneshot": ("PrefillCompression", "compress_after_prefill"),
    "fused_decode": ("FusedLayout", "FusedUnsupported", "fused_attention", "fused_layout"),
    "model": ("INSTALL_HINT", "LoadedModel", "ModelFacts", "cache_dir", "convert_gguf", "load_model", "model_facts",
              "smollm2_gguf", "check_attention_layers", "check_attn_implementation", "model_device"),
    "packed_cache": ("PackedHeadCache", "PackedHeadLayer", "left_padding"),
    "packed_attention": ("PackedAttention", "packed_attention", "supports_packed_attention"),
    "paired": ("PairedComparison", "paired_comparison"),
    "perplexity": ("PerplexityResult", "ReferenceLogProbs", "perplexity", "reference_logprobs"),
    "text": ("TextWindows", "cut_windows", "default_text", "read_text", "text_windows", "tokenize"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(f".{_MODULE_OF[name]}", __name__)
    # bind every name of that module now: importing it made `perplexity` (module and function) the submodule
    globals().update({n: getattr(module, n) for n in _HOMES[_MODULE_OF[name]]})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
