"""Shared test helpers: a tiny Llama built in memory (seeded), so tests need no model files."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab: int = 32, hidden: int = 16, layers: int = 1, positions: int = 32, seed: int | None = 0,
               **config) -> LlamaForCausalLM:
    """A seeded ``LlamaForCausalLM`` with 2 attention heads and an MLP twice the hidden size."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions, **config)
    return LlamaForCausalLM(cfg)
