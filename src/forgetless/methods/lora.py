"""LoRA through the `peft` library: low-rank adapters on the decoder's linear layers.

Default targets are all linear layers of the transformer blocks (attention q/k/v/o and MLP
gate/up/down). The product-key memory's own linear layers are named differently
(mem_query, mem_gate, mem_out) and are not adapted unless named in ``target_modules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..training.optim import adamw
from .base import Method, MethodContext, MethodOptions

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(model: nn.Module, targets: list[str] | str, rank: int, alpha: float, dropout: float = 0.0,
                who: str = "LoRA"):
    """A peft ``LoraConfig`` on those of ``targets`` (linear-layer names) the model has; a clear
    error when it has none of them."""
    from peft import LoraConfig

    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not set(targets) & present:
        raise ConfigError(f"{who} target_modules {targets} match no linear layer; the model has {sorted(present)}.")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=[t for t in targets if t in present], bias="none")


class LoRA(Method):
    name = "lora"

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-4
        rank: int = 32
        alpha: float | None = None  # None: 2 * rank
        target_modules: list[str] | str | None = field(default_factory=lambda: list(LLAMA_LINEAR))  # null: the same
        dropout: float = 0.0

        def validate(self) -> None:
            super().validate()
            self.positive("rank", integer=True)
            self.between("dropout", 0, 1, high_open=True)
            self.alpha = float(self.alpha if self.alpha is not None else 2 * self.rank)
            t = self.target_modules
            self.target_modules = [t] if isinstance(t, str) else list(t or LLAMA_LINEAR)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.rank, self.alpha, self.targets, self.dropout = o.rank, o.alpha, o.target_modules, o.dropout

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(model, self.targets, self.rank, self.alpha, self.dropout))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        self._optimizers = [adamw(params, lr=self.lr, weight_decay=0.0)]
        return peft_model

    def export(self, model: nn.Module) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model."""
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
