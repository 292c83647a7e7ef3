"""Full fine-tuning: every parameter trains with AdamW (weight decay 0.1), as in Lin et al. 2025."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.memory import memory_layers
from ..training.optim import adamw
from .base import Method, MethodContext, MethodOptions


class FullFinetune(Method):
    name = "full"

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-5
        weight_decay: float = 0.1
        betas: tuple[float, float] = (0.9, 0.95)

        def validate(self) -> None:
            super().validate()
            self.at_least("weight_decay", 0)
            self.betas = tuple(self.betas)
            self.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.weight_decay, self.betas = self.options.weight_decay, tuple(self.options.betas)

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        for mem in memory_layers(model):
            mem.config.sparse_values = False  # AdamW needs dense gradients on the value table
        self._optimizers = [adamw(model.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                              betas=self.betas)]
        return model
