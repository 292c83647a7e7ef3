"""The tiny base model: a Hugging Face LlamaForCausalLM with product-key memory layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .cms import CMSConfig, add_cms
from .memory import MemoryConfig, MemoryPlacement, add_memory_layers
from .titans import TitansConfig, add_titans


@dataclass
class ModelConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    cms: CMSConfig | None = None  # continuum memory system blocks (None: plain MLPs)
    titans: TitansConfig | None = None  # Titans neural memories before some decoder layers (None: none)


@dataclass
class MemorySection:
    """Where the memory sits and its shape (``layers: []`` gives a dense model)."""

    layers: list[int] = field(default_factory=lambda: [2])
    mode: str = "replace"
    n_keys: int = 256
    heads: int = 4
    knn: int = 32
    k_dim: int = 128
    v_dim: int | None = None
    query_norm: str = "whiten"
    query_trainable: bool = True
    gated: bool = True
    key_norm: bool = False
    learn_temperature: bool = False
    whiten_momentum: float = 0.01
    sparse_values: bool = True
    value_init_std: float | None = None

    def placement(self) -> MemoryPlacement:
        mem = MemoryConfig(n_keys=self.n_keys, heads=self.heads, knn=self.knn, k_dim=self.k_dim, v_dim=self.v_dim,
                           query_norm=self.query_norm, query_trainable=self.query_trainable, gated=self.gated,
                           key_norm=self.key_norm, learn_temperature=self.learn_temperature,
                           whiten_momentum=self.whiten_momentum, sparse_values=self.sparse_values, value_init_std=self.value_init_std)
        return MemoryPlacement(layers=list(self.layers), mode=self.mode, memory=mem)


def build_base(model: ModelConfig, memory: MemorySection | None, vocab_size: int, eos_id: int, pad_id: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads, max_position_embeddings=model.max_len,
        rope_theta=model.rope_theta, tie_word_embeddings=model.tie_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    net = LlamaForCausalLM(cfg)
    if memory is not None and memory.layers:
        add_memory_layers(net, placement=memory.placement())
    if model.cms is not None:
        add_cms(net, config=model.cms)
    if model.titans is not None:
        add_titans(net, config=model.titans)
    return net
