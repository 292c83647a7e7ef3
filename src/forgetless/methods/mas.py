"""Memory Aware Synapses (Aljundi et al. 2018): importance as output sensitivity, no labels.

The importance of a parameter is how much the model's output moves when it moves:

    Omega_i = mean over batches of | d/d theta_i  mean_t ||f_t(x)||_2^2 |

where f_t(x) is the model's output at position t: by default the raw logits, the paper's
"output of the learned function" (``output: softmax`` uses the probability vector instead),
averaged over the non-padding positions of a batch of the experience's
training inputs. Labels are never used, so MAS can use any unlabelled data of the
experience. Deviation from the paper, stated: the gradient is taken per *batch* (of
``batch_size`` sequences, ``mas_batches`` of them), not per sample, before the absolute
value; per-sample gradients would cost one backward per sequence. Importances of successive
experiences add up (``gamma`` decays the old ones); the penalty is the shared quadratic one
of ``regularization.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .regularization import QuadraticRegularizer, mean_gradient_statistic


def mas_importance(model: nn.Module, batches: list[dict], output: str = "logits") -> dict[str, torch.Tensor]:
    """Mean over batches of |grad of the mean squared L2 norm of the output|, per parameter."""
    def output_norm(model: nn.Module, b: dict) -> torch.Tensor:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        if output == "softmax":
            out = out.softmax(-1)
        mask = b["attention_mask"].to(out.dtype)
        return ((out ** 2).sum(-1) * mask).sum() / mask.sum().clamp_min(1)

    return mean_gradient_statistic(model, output_norm, batches, torch.abs)


class MAS(QuadraticRegularizer):
    name = "mas"
    needs_stream = True

    @dataclass
    class Options(QuadraticRegularizer.Options):
        lam: float = 1.0
        online: bool = field(default=True, init=False)  # importances add up, always online
        mas_batches: int = 8  # training batches the importance is estimated on
        output: str = "logits"  # logits | softmax

        def validate(self) -> None:
            super().validate()
            self.positive("mas_batches", integer=True)
            self.one_of("output", ("logits", "softmax"))

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.mas_batches, self.output = self.options.mas_batches, self.options.output

    def importance(self, model: nn.Module, experience) -> dict[str, torch.Tensor]:
        batches = [experience.train_batch(i) for i in range(min(self.mas_batches, experience.steps))]
        return mas_importance(model, batches, self.output)
