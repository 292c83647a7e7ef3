"""Full fine-tuning: every parameter trains with AdamW (weight decay 0.1), as in Lin et al. 2025."""

from __future__ import annotations

import torch
from torch import nn

from ..models.memory import memory_layers
from .base import Method, MethodContext


class FullFinetune(Method):
    name = "full"

    def __init__(self, lr: float = 2e-5, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__(lr, weight_decay=weight_decay)
        self.weight_decay, self.betas = weight_decay, tuple(betas)

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        for mem in memory_layers(model):
            mem.config.sparse_values = False  # AdamW needs dense gradients on the value table
        self._optimizers = [torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                              betas=self.betas)]
        return model
