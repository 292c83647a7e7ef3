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
    """Next-token cross-entropy of ``model`` over the positions where ``batch["labels"] != -100``.

    Only the positions that predict a label are scored: a forward pre-hook on the model's output
    embedding (``get_output_embeddings()``, the LM head) hands it the hidden states of those
    positions alone, so padding, the last position and, with ``loss_on="answer"``, the prompt
    cost no vocabulary-sized matmul, softmax or copy (forward and backward). The loss is the same
    mean as ``shifted_cross_entropy`` over the full logits (up to float rounding of the smaller
    matmul). Post-processing of the logits that acts per position (soft-capping, scaling) is
    unaffected. A callable without an LM head (e.g. a ``functional_call`` wrapper), or a head that
    is called on something other than (batch, positions, hidden), takes the full-logits path."""
    labels = batch["labels"]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or labels.dim() != 2:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return shifted_cross_entropy(out.logits, labels)
    target = labels[:, 1:]
    scored = target != -100  # (B, T-1): positions 0..T-2 whose next token is a label
    where = nn.functional.pad(scored, (0, 1), value=False)  # (B, T)
    picked = []

    def pick(module: nn.Module, args: tuple):
        hidden = args[0]
        if picked or hidden.dim() != 3 or hidden.shape[:2] != where.shape:
            return None  # not the call this hook expects: leave it alone
        picked.append(True)
        return (hidden[where][None], *args[1:])  # (1, M, hidden)

    handle = head.register_forward_pre_hook(pick)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    if not picked:
        return shifted_cross_entropy(out.logits, labels)
    logits = out.logits[0].float()  # (M, V), in the order of where.nonzero()
    return nn.functional.cross_entropy(logits, target[scored])
