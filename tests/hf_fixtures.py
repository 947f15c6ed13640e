"""Shared by the Hugging Face tests: a seeded tiny random Llama (no download), the same saved as a local model
directory, a plain per-token fake quantizer and logits with or without a cache."""

import torch
from rdalloc.backends.hf.compat import forward
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(*, hidden: int = 64, layers: int = 2, q_heads: int = 4, kv_heads: int = 2, vocab: int = 128,
               max_positions: int = 256, seed: int = 0) -> LlamaForCausalLM:
    """``LlamaForCausalLM`` with random weights (``initializer_range=0.1``), eval mode, gradients off."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_attention_heads=q_heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=max_positions, initializer_range=0.1, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return model


def save_model_dir(model: LlamaForCausalLM, directory, text: str) -> None:
    """``model`` saved in ``directory`` as a local Hugging Face model with a character-level tokenizer over its
    vocabulary, and ``text`` as ``directory/text.txt``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0)).save_pretrained(directory)
    model.save_pretrained(directory)
    (directory / "text.txt").write_text(text)


def per_token_quant(bits: int):
    """A cache transform: per-token asymmetric round-to-grid over head_dim at ``bits`` (groups never span tokens)."""

    def q(x):
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        s = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
        return torch.round((x - lo) / s).clamp(0, 2 ** bits - 1) * s + lo

    return lambda layer, key, value: (q(key), q(value))


def logits(model, ids, cache=None):
    """``model(ids).logits`` without gradients; with ``cache``, through :func:`rdalloc.backends.hf.compat.forward`."""
    with torch.no_grad():
        return (model(ids) if cache is None else forward(model, cache, ids)).logits
