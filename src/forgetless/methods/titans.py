"""Titans test-time memory (Behrouz et al. 2024) as a stream method.

``setup`` gives the model a ``models.titans.NeuralMemory`` before each of the chosen decoder
layers (once; seeded, so a resumed run rebuilds the same memory) and trains only the
memories' *outer* parameters (W_q, W_k, W_v, W_o, the norm, the initial memory M_0) on the
experience's batches with AdamW; the base stays frozen (``others: train`` trains it too). The
training loss is the ordinary LM loss of the model *with* its test-time writes, so the outer
loop learns, through the inner gradient steps, what to write.

At test time nothing is stored between inputs: within each scored sequence the memory reads
chunk i with what it wrote from chunks 1..i-1 (on the domain stream: the first part of each
held-out window is written, the rest is scored with it; see ``models/titans.py``). A control
is the same method with ``theta: 0`` (no test-time writes: the memory is then a fixed MLP
branch reading M_0).

Options: ``layers``, ``key_dim``, ``hidden``, ``chunk``, ``eta`` (momentum), ``theta`` (inner
learning rate), ``alpha`` (forgetting), as in ``TitansConfig``; ``lr``, ``weight_decay`` of the
outer AdamW; ``others`` (freeze | train); ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.memory import memory_layers
from ..models.titans import TITANS_CONFIG_KEY, TitansConfig, add_titans, titans_memories
from ..training.optim import adamw
from .base import Method, MethodContext, MethodOptions, freeze_all


class TitansMemory(Method):
    name = "titans"

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-3
        layers: list[int] = field(default_factory=lambda: [1])
        key_dim: int = 64
        hidden: int = 128
        chunk: int = 16
        eta: float = 0.9
        theta: float = 0.5
        alpha: float = 0.01
        others: str = "freeze"  # freeze | train
        weight_decay: float = 0.0
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            self.one_of("others", ("freeze", "train"))
            self.at_least("weight_decay", 0)
            TitansConfig(layers=self.layers, key_dim=self.key_dim, hidden=self.hidden, chunk=self.chunk,
                         eta=self.eta, theta=self.theta, alpha=self.alpha)  # its checks

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.cfg = TitansConfig(layers=o.layers, key_dim=o.key_dim, hidden=o.hidden, chunk=o.chunk, eta=o.eta,
                                theta=o.theta, alpha=o.alpha)
        self.others, self.weight_decay, self.seed = o.others, o.weight_decay, o.seed

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        if getattr(model.config, TITANS_CONFIG_KEY, None) is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + 7)
                add_titans(model, config=TitansConfig.from_dict(self.cfg.to_dict()))
        elif TitansConfig.from_dict(model.config.forgetless_titans) != self.cfg:
            raise ConfigError("the model already has Titans memories with other settings than this method's.")
        freeze_all(model)
        params = [p for m in titans_memories(model) for p in m.parameters()]
        if self.others == "train":
            for mem in memory_layers(model):
                mem.config.sparse_values = False
            params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        self._optimizers = [adamw(params, lr=self.lr, weight_decay=self.weight_decay)]
        return model

    def memory_params(self, model: nn.Module) -> int:
        return sum(p.numel() for m in titans_memories(model) for p in m.parameters())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": "MAL (memory before the decoder layer, read added to the residual)"}
