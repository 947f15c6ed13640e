"""A seeded tiny random Llama (no download) shared by the Hugging Face tests."""

import torch
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
