"""Distillation to the model before the update: Learning without Forgetting (Li & Hoiem 2016)
and KL regularisation toward the previous model, with the KL direction selectable.

At the start of every experience a frozen copy of the model (the *teacher*: the model
before this update) is kept. The loss is

    L = L_task(current batch) + alpha * T^2 * mean_t KL_t

over the attended positions t of the distillation inputs (``inputs``):

- ``current``: the current batch itself (LwF: no old data needed);
- ``replay``:  a batch of ``replay_size`` sequences from a reservoir buffer of earlier
  training sequences (as in experience replay, saved with a run's state).

with the per-position KL between the temperature-T softmaxes of teacher (p) and student (q):

- ``forward``: KL(p || q) = sum p (log p - log q), mode-covering: the student keeps mass
  wherever the old model had it (classic knowledge distillation, LwF);
- ``reverse``: KL(q || p) = sum q (log q - log p), mode-seeking: the student may drop some
  of the old modes but puts little mass where the old model had none (on-policy
  distillation's choice).

Registered as ``distill`` (all options) and ``lwf`` (current inputs, forward KL, T = 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_rows, pad_rows
from ..errors import ConfigError
from .base import MethodContext, shifted_cross_entropy
from .full import FullFinetune
from .replay import ReservoirBuffer


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "forward",
                    temperature: float = 1.0) -> torch.Tensor:
    """KL between the temperature softmaxes at every position: (..., V) -> (...)."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if direction == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    raise ConfigError(f"kl direction must be 'forward' or 'reverse', got {direction!r}.")


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
              direction: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Mean KL over the positions where ``mask`` is 1, scaled by T^2 (Hinton et al. 2015)."""
    kl = kl_per_position(student_logits, teacher_logits, direction, temperature)
    m = mask.to(kl.dtype)
    return temperature ** 2 * (kl * m).sum() / m.sum().clamp_min(1)


class Distillation(FullFinetune):
    name = "distill"

    @dataclass
    class Options(FullFinetune.Options):
        alpha: float = 1.0  # weight of the KL term
        temperature: float = 2.0
        kl: str = "forward"  # forward | reverse
        inputs: str = "current"  # current | replay
        buffer_size: int = 512  # inputs: replay
        replay_size: int = 8  # inputs: replay
        seed: int = 0  # inputs: replay

        def validate(self) -> None:
            super().validate()
            self.at_least("alpha", 0)
            self.positive("temperature")
            self.one_of("kl", ("forward", "reverse"))
            self.one_of("inputs", ("current", "replay"))
            self.positive("buffer_size", integer=True)
            self.positive("replay_size", integer=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.alpha, self.temperature, self.kl, self.inputs = o.alpha, o.temperature, o.kl, o.inputs
        self.buffer = ReservoirBuffer(o.buffer_size, o.seed)
        self.replay_size = o.replay_size
        self.teacher: nn.Module | None = None

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return super().setup(model, context)

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """With ``inputs: replay``: the replayed rows to distil on go into the batch under
        ``"distill_inputs"`` (None while the buffer is empty); the batch's rows enter the buffer."""
        if self.inputs == "current":
            return batch
        rows = batch_rows(batch)
        replayed = self.buffer.sample(self.replay_size)
        for r in rows:
            self.buffer.add(r)
        inputs = None
        if replayed:
            pad = int(getattr(model.config, "pad_token_id", None) or 0)
            inputs = {k: v.to(batch["input_ids"].device) for k, v in pad_rows(replayed, pad).items()}
        return {**batch, "distill_inputs": inputs}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.inputs == "current":  # one forward pass serves the task loss and the KL
            inputs = batch
            student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            task = shifted_cross_entropy(student, batch["labels"])
        else:
            inputs = batch.get("distill_inputs")
            task = super().loss(model, batch)
        if inputs is None or self.alpha == 0:
            return task
        if self.inputs != "current":
            student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        with torch.no_grad():
            teacher = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return task + self.alpha * masked_kl(student, teacher, inputs["attention_mask"], self.kl, self.temperature)

    def after_experience(self, model: nn.Module, experience) -> None:
        self.teacher = None  # the next experience copies the updated model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.buffer.state_tensors()

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_tensors(state)


class LwF(Distillation):
    name = "lwf"

    @dataclass
    class Options(Distillation.Options):
        kl: str = field(default="forward", init=False)
        inputs: str = field(default="current", init=False)
