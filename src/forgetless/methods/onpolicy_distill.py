"""On-policy distillation (Agarwal et al. 2024, GKD; Lu & Thinking Machines 2025): the student
samples completions from its *own* policy on the experience's prompts, and is trained toward a
teacher by the per-token reverse KL on the tokens it sampled.

Per optimizer step, ``prompts`` prompts are taken from the training batch
(``rollouts.prompts_from_batch``: the fact stream's training question lines, the topic
streams' "Text: ... Topic:" rows, the first ``prompt_tokens`` tokens of the domain stream's
windows) and ``samples`` completions of each are drawn from the student q (temperature
``temperature``, at most ``max_new_tokens`` tokens). At every sampled position t (context x,
o_<t), with the teacher p:

    KL_t = KL(q_t || p_t) = sum_v q_t(v) (log q_t(v) - log p_t(v))
    L_kl = 1/N sum_i 1/|o_i| sum_t KL_t

``estimator``:

- ``full`` (default): L_kl as written, differentiated exactly (the gradient of KL_t with
  respect to the student's logits z is q (log q - log p - KL_t));
- ``sampled``: the single-sample form used by on-policy distillation with an RL loop: the
  per-token reward -(log q(o_t) - log p(o_t)) as a fixed advantage of log q(o_t),
  L = 1/N sum_i 1/|o_i| sum_t sg(log q(o_t) - log p(o_t)) log q(o_t); its expectation over
  o_t ~ q_t is the gradient of KL_t.

Teachers (``teacher``):

- ``finetuned`` (default): a copy of the model before the experience, fine-tuned first by SFT
  on the experience's own training batches (``teacher_steps``, default the experience's step
  count; AdamW at ``teacher_lr``, default ``lr``; the LM loss of the batches, as ``full``).
  The student starts from the model before the experience and learns only by L_kl: what it
  learns of the new data comes through the teacher, on the student's own samples.
- ``before``: the frozen model before the experience; L = L_SFT(batch) + ``alpha`` * L_kl, an
  on-policy reverse-KL regulariser toward the old model (``distill`` with ``kl: reverse``
  regularises on the *data's* tokens instead).

Sampling is seeded per (experience, step), and the fine-tuned teacher is trained
deterministically at ``setup``, so a resumed run equals an uninterrupted one.

Left out: mixing teacher-generated sequences (GKD's lambda), sequence-level KL terms through
the future tokens (the per-token KL is the discount-0 form), and teachers larger than the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..training.loop import train_loop
from ..training.optim import adamw
from . import rollouts as R
from .base import MethodContext, lm_loss_masked
from .full import FullFinetune
from .rl import zero_loss

TEACHERS = ("finetuned", "before")
ESTIMATORS = ("full", "sampled")


@dataclass
class Options(FullFinetune.Options):
    lr: float = 1e-5
    teacher: str = "finetuned"  # finetuned | before
    teacher_lr: float | None = None  # finetuned teacher: SFT learning rate (default lr)
    teacher_steps: int | None = None  # finetuned teacher: SFT steps (default: the experience's steps)
    alpha: float = 1.0  # teacher "before": weight of the reverse KL added to the SFT loss
    estimator: str = "full"  # full | sampled
    samples: int = 2  # completions per prompt
    prompts: int = 4  # prompts per step
    max_new_tokens: int = 8
    temperature: float = 1.0
    prompt_tokens: int = 16  # domain stream: prompt length
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self.one_of("teacher", TEACHERS)
        self.one_of("estimator", ESTIMATORS)
        for key in ("samples", "prompts", "max_new_tokens", "prompt_tokens"):
            self.positive(key, integer=True)
        self.at_least("alpha", 0)
        self.positive("temperature")
        if self.teacher_steps is not None:
            self.positive("teacher_steps", integer=True)
        if self.teacher_lr is not None:
            self.positive("teacher_lr")


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1/N sum_i mean_t KL(q_t || p_t) over the masked (sampled) positions."""
    logq, logp = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    return R.sequence_mean((logq.exp() * (logq - logp)).sum(-1), mask).mean()


def reverse_kl_sampled(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """The single-sample surrogate: 1/N sum_i mean_t sg(log q(o_t) - log p(o_t)) * log q(o_t)."""
    lq = R.token_logprobs(student_logits, tokens)
    lp = R.token_logprobs(teacher_logits, tokens)
    return R.sequence_mean((lq - lp).detach() * lq, mask).mean()


def finetune_teacher(model: nn.Module, batch_fn, steps: int, lr: float, weight_decay: float,
                     betas: tuple[float, float], grad_clip: float = 1.0) -> nn.Module:
    """A frozen copy of ``model`` after ``steps`` SFT steps (AdamW, LM loss) on ``batch_fn(0..steps-1)``."""
    teacher = copy.deepcopy(model).train()
    params = list(teacher.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, lr=lr, weight_decay=weight_decay, betas=betas)
    train_loop(teacher, [opt], batch_fn, lm_loss_masked, steps, grad_clip=grad_clip, progress=False)
    teacher.eval()
    for p in params:
        p.requires_grad_(False)
    return teacher


class OnPolicyDistillation(FullFinetune):
    name = "onpolicy_distill"
    options_cls = Options

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self.opts = self.options
        self.teacher: nn.Module | None = None
        self.tok = None
        self._stops: set[int] | None = None
        self._k = -1
        self._kls: list[float] = []
        self.mean_kl: list[float] = []  # per finished experience: mean reverse KL to the teacher on the samples

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        o = self.opts
        self.tok = context.tokenizer if context is not None else None
        if self.tok is None:
            raise ConfigError("method onpolicy_distill needs the model's tokenizer (MethodContext.tokenizer).")
        if self._stops is None:
            self._stops = R.stop_token_ids(self.tok)
        self._k = int(context.experience_index) if context is not None else self._k + 1
        self._kls = []
        model = super().setup(model, context)
        if o.teacher == "before":
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        else:
            exp = context.experience if context is not None else None
            if exp is None:
                raise ConfigError("onpolicy_distill with teacher 'finetuned' needs the experience's training batches "
                                  "(MethodContext.experience).")
            steps = o.teacher_steps or exp.steps
            self.teacher = finetune_teacher(model, exp.train_batch, steps, o.teacher_lr or o.lr, o.weight_decay, o.betas)
        return model

    def _rollout(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """This step's prompts and the student's samples, seeded by (seed, experience, step)."""
        o = self.opts
        prompts = R.prompts_from_batch(batch, self.tok, o.prompts, o.prompt_tokens)
        if not prompts:
            return {"rollout": None}
        seed = o.seed * 1_000_003 + self._k * 10_007 + step
        return {"rollout": R.sample(model, prompts, o.samples, o.max_new_tokens, R.pad_id(self.tok, model),
                                    int(self.tok.eos_token_id), self._stops, seed, o.temperature)}

    @torch.no_grad()
    def _teacher_logits(self, roll: R.Rollout) -> torch.Tensor:
        return R.shifted(R.forward_logits(self.teacher, roll), roll.input_ids, roll.completion)[0]

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Sampling, the teacher's logits and the KL record happen here (the loss stays pure)."""
        out = self._rollout(model, batch, step)
        roll = out["rollout"]
        if roll is not None:
            out["teacher_logits"] = self._teacher_logits(roll)
            with torch.no_grad():
                logits, _, mask = R.shifted(R.forward_logits(model, roll), roll.input_ids, roll.completion)
                self._kls.append(float(reverse_kl_full(logits, out["teacher_logits"], mask)))
        return {**batch, **out}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        o = self.opts
        if "rollout" not in batch:  # called outside the loop: this batch's step-0 samples
            batch = {**batch, **self._rollout(model, batch, 0)}
        sft = lm_loss_masked(model, batch) if o.teacher == "before" else None
        roll = batch["rollout"]
        if roll is None:
            return sft if sft is not None else zero_loss(model)
        t_logits = batch["teacher_logits"] if "teacher_logits" in batch else self._teacher_logits(roll)
        logits, tokens, mask = R.shifted(R.forward_logits(model, roll), roll.input_ids, roll.completion)
        if o.estimator == "sampled":
            kl = reverse_kl_sampled(logits, t_logits, tokens, mask)
        else:
            kl = reverse_kl_full(logits, t_logits, mask)
        return kl if sft is None else sft + o.alpha * kl

    def after_experience(self, model: nn.Module, experience) -> None:
        self.teacher = None
        self.mean_kl.append(sum(self._kls) / len(self._kls) if self._kls else 0.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean_kl": torch.tensor(self.mean_kl, dtype=torch.float64)} if self.mean_kl else {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.mean_kl = state["mean_kl"].tolist() if "mean_kl" in state else []

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mean_kl": self.mean_kl}
