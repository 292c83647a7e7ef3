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

import torch
from torch import nn

from ..errors import ConfigError
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

    def __init__(self, lr: float = 1e-5, lam: float = 1.0, gamma: float = 1.0, mas_batches: int = 8,
                 output: str = "logits", weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__(lr=lr, lam=lam, online=True, gamma=gamma, weight_decay=weight_decay, betas=betas)
        if output not in ("logits", "softmax"):
            raise ConfigError(f"mas output must be 'logits' or 'softmax', got {output!r}.")
        self.hparams.update(mas_batches=mas_batches, output=output)
        self.mas_batches, self.output = mas_batches, output

    def importance(self, model: nn.Module, experience) -> dict[str, torch.Tensor]:
        batches = [experience.train_batch(i) for i in range(min(self.mas_batches, experience.steps))]
        return mas_importance(model, batches, self.output)
