"""Losses shared by the training loop and the methods."""

from __future__ import annotations

import torch
from torch import nn


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; labels of -100 are ignored.
    ``reduction="none"`` gives one value per (sequence, position), shape (B, T-1)."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    out = nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                      reduction=reduction)
    return out.view(lb.shape) if reduction == "none" else out


def lm_loss_masked(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` over the positions where ``batch["labels"] != -100``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return shifted_cross_entropy(out.logits, batch["labels"])
