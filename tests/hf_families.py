"""Tiny random decoder models of several transformers families, built from configs (no download), for the tests.

``tiny_model(family, dtype=..., head_dim=...) -> (model, config)``: a seeded 2-layer model (hidden 64, 4 query heads,
vocabulary 128), eval mode, gradients off, cached per process (treat it as read-only). The families differ where the
KV cache code can go wrong:

=========  ==========  ==================================================================================
family     kv heads    what it exercises
=========  ==========  ==================================================================================
llama      2 (GQA 2)   the reference
qwen2      1 (GQA 4)   q/k/v biases, multi-query
qwen3      4 (GQA 1)   RMS norm on queries and keys (the cache holds normed keys)
mistral    2 (GQA 2)   Mistral attention, with ``sliding_window=None`` (full attention)
gemma      1 (GQA 4)   scaled embeddings, ``head_dim * heads != hidden`` at head_dim 32
gemma2     2 (GQA 2)   sliding-window layers and soft-capped logits (what rdalloc refuses)
=========  ==========  ==================================================================================

``head_dim`` is 16 or 32 (16: KIVI's default group of 32 channels does not fit, a group of 16 does).
"""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
"""The families rdalloc supports; ``"gemma2"`` is built too, for the refusal tests."""
REFUSED = ("gemma2",)
HIDDEN, Q_HEADS, LAYERS, VOCAB = 64, 4, 2, 128
_KV_HEADS = {"llama": 2, "qwen2": 1, "qwen3": 4, "mistral": 2, "gemma": 1, "gemma2": 2}


def family_config(family: str, *, head_dim: int = 16):
    """The transformers config of ``family``'s tiny model (see the module docstring)."""
    import transformers

    common = dict(hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=Q_HEADS,
                  num_key_value_heads=_KV_HEADS[family], num_hidden_layers=LAYERS, vocab_size=VOCAB,
                  head_dim=head_dim, max_position_embeddings=256, initializer_range=0.1, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return transformers.GemmaConfig(**common)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=8, query_pre_attn_scalar=head_dim)
    raise ValueError(f"family must be one of {FAMILIES + REFUSED}, got {family!r}")


@functools.cache
def tiny_model(family: str, *, dtype: str = "float32", head_dim: int = 16, seed: int = 0):
    """``(model, config)``: ``family``'s tiny random causal LM in ``dtype`` (``"float32"`` or ``"bfloat16"``), eval
    mode, gradients off, on CPU. Cached per process: do not modify it."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, head_dim=head_dim)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family != "llama":  # a random init with std 0.1 leaves norms at 1; perturb them so q/k norms do something
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model, model.config


def random_windows(count: int = 2, length: int = 24, *, seed: int = 0) -> torch.Tensor:
    """``[count, length]`` random token ids of the tiny vocabulary."""
    return torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))
