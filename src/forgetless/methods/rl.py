"""RL against SFT: a small group-relative policy gradient (GRPO-style, Shao et al. 2024) with a
KL penalty to the reference model and a verifiable reward, and SFT on the very same prompts.

Per optimizer step, from the experience's training batch (``rollouts.prompts_from_batch``:
the fact stream's training question lines, the topic streams' "Text: ... Topic:" rows, the
domain stream's window starts), up to ``prompts`` prompts x ``group_size`` (G) completions
are sampled from the current policy pi (temperature ``temperature``, at most
``max_new_tokens`` tokens, an answer ends at its line's end). With rewards r_i:

    A_i   = r_i - mean_group(r)                 (``scale_std``: divided by std_group(r) + 1e-6,
                                                  the population standard deviation)
    L_pg  = - 1/N sum_i A_i * 1/|o_i| sum_t log pi(o_it | prompt, o_i<t)
    L_kl  = 1/N sum_i 1/|o_i| sum_t KL_t        (``kl_estimator``)
              full: KL_t = sum_v pi(v) (log pi(v) - log pi_ref(v)) at each sampled position
              k3:   KL_t = exp(d) - d - 1, d = log pi_ref(o_it) - log pi(o_it) (Schulman's estimator)
    L     = L_pg + beta * L_kl

One gradient step per batch of samples (strictly on-policy, so no importance ratio or clipping).
pi_ref is the model before the experience (a frozen copy). Rewards (``rollouts.rewards``):
exact match of the cut answer with the gold answer (facts: the fact's answer; topic streams:
the topic label); on the domain stream, which has no answers, the fraction of the document's
next ``answer_tokens`` tokens that the completion reproduces position by position.

``objective: sft`` is the baseline on the same prompts and budget: the same prompts per step,
the same steps, loss = cross-entropy of the gold continuation (answer / label / next tokens)
given the prompt; it needs no samples (G copies of one gold sequence would give the same
gradient).

``describe()`` reports, for ``grpo``, the mean reward of the samples over each experience
(``mean_reward``).

Left out: PPO-style clipping and several updates per batch, a learned value baseline, length
normalisation variants (Dr. GRPO), rewards for partial answers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import rollouts as R
from .base import MethodContext, lm_loss_masked
from .full import FullFinetune

OBJECTIVES = ("grpo", "sft")
KL_ESTIMATORS = ("full", "k3")


@dataclass
class Options(FullFinetune.Options):
    lr: float = 1e-5
    objective: str = "grpo"  # grpo | sft (the baseline on the same prompts)
    group_size: int = 4  # G samples per prompt
    prompts: int = 4  # prompts per step (taken from the training batch)
    beta: float = 0.05  # weight of the KL penalty to the reference model
    kl_estimator: str = "full"  # full | k3
    scale_std: bool = True  # divide the advantage by the group's standard deviation
    max_new_tokens: int = 8
    temperature: float = 1.0
    prompt_tokens: int = 16  # domain stream: prompt length
    answer_tokens: int = 8  # domain stream: reference continuation length
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self.one_of("objective", OBJECTIVES)
        self.one_of("kl_estimator", KL_ESTIMATORS)
        self.require(self.group_size >= 2 or self.objective == "sft", "group_size",
                     "at least 2 (a group baseline needs two samples)")
        for key in ("prompts", "max_new_tokens", "prompt_tokens", "answer_tokens"):
            self.positive(key, integer=True)
        self.at_least("beta", 0)
        self.positive("temperature")


# --------------------------------------------------------------------------- the mathematics
def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """(N,) rewards, consecutive groups of ``group_size`` -> (N,) r - group mean (/ (group std + eps))."""
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale_std:
        a = a / (r.std(1, unbiased=False, keepdim=True) + eps)
    return a.reshape(-1)


def policy_gradient_loss(token_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """- mean_i A_i * mean_t log pi(o_it): its gradient is the group-baseline REINFORCE estimator."""
    return -(advantages.detach() * R.sequence_mean(token_logp, mask)).mean()


def kl_full(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i mean_t KL(pi_t || pi_ref_t), the exact KL over the vocabulary at each sampled position."""
    logq, logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    return R.sequence_mean((logq.exp() * (logq - logp)).sum(-1), mask).mean()


def kl_k3(token_logp: torch.Tensor, ref_token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i mean_t (exp(d) - d - 1), d = log pi_ref - log pi at the sampled tokens (unbiased, >= 0)."""
    d = ref_token_logp.float() - token_logp.float()
    return R.sequence_mean(d.exp() - d - 1, mask).mean()


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A zero loss connected to the trainable parameters (a batch without usable prompts)."""
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def sft_batch(prompts: list[R.Prompt], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + gold continuation rows, loss on the continuation only."""
    rows = [p.ids + p.target for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, len(p.ids): len(r)] = torch.tensor(p.target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- the method
class PolicyGradient(FullFinetune):
    name = "rl"
    options_cls = Options

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self.opts = self.options
        self.ref: nn.Module | None = None
        self.tok = None
        self._stops: set[int] | None = None
        self._k = -1
        self._rewards: list[float] = []
        self.mean_rewards: list[float] = []  # per finished experience (grpo)

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self.tok = context.tokenizer if context is not None else None
        if self.tok is None:
            raise ConfigError(f"method {self.name} needs the model's tokenizer (MethodContext.tokenizer).")
        if self._stops is None:
            self._stops = R.stop_token_ids(self.tok)
        self._k = int(context.experience_index) if context is not None else self._k + 1
        self._rewards = []
        model = super().setup(model, context)
        if self.opts.objective == "grpo" and self.opts.beta > 0:
            self.ref = copy.deepcopy(model).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        return model

    def _rollout(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """This step's prompts and (grpo) samples with their rewards, seeded by (seed, experience, step)."""
        o = self.opts
        prompts = R.prompts_from_batch(batch, self.tok, o.prompts, o.prompt_tokens, o.answer_tokens)
        out: dict[str, Any] = {"prompts": prompts}
        if prompts and o.objective == "grpo":
            seed = o.seed * 1_000_003 + self._k * 10_007 + step
            roll = R.sample(model, prompts, o.group_size, o.max_new_tokens, R.pad_id(self.tok, model),
                            int(self.tok.eos_token_id), self._stops, seed, o.temperature)
            out.update(rollout=roll, rewards=R.rewards(roll, prompts, self.tok))
        return out

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Sampling happens here (the loss stays a pure function of the batch)."""
        out = self._rollout(model, batch, step)
        if "rewards" in out:
            self._rewards.append(float(out["rewards"].mean()))
        return {**batch, **out}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        o = self.opts
        if "prompts" not in batch:  # called outside the loop: this batch's step-0 samples
            batch = {**batch, **self._rollout(model, batch, 0)}
        prompts = batch["prompts"]
        if not prompts:
            return zero_loss(model)
        if o.objective == "sft":
            return lm_loss_masked(model, sft_batch(prompts, R.pad_id(self.tok, model)))
        roll, r = batch["rollout"], batch["rewards"]
        adv = group_advantages(r, o.group_size, o.scale_std)
        logits, tokens, mask = R.shifted(R.forward_logits(model, roll), roll.input_ids, roll.completion)
        tlp = R.token_logprobs(logits, tokens)
        loss = policy_gradient_loss(tlp, mask, adv)
        if self.ref is not None:
            with torch.no_grad():
                ref_logits = R.shifted(R.forward_logits(self.ref, roll), roll.input_ids, roll.completion)[0]
            kl = kl_full(logits, ref_logits, mask) if o.kl_estimator == "full" else \
                kl_k3(tlp, R.token_logprobs(ref_logits, tokens), mask)
            loss = loss + o.beta * kl
        return loss

    def after_experience(self, model: nn.Module, experience) -> None:
        self.ref = None
        if self.opts.objective == "grpo":
            self.mean_rewards.append(sum(self._rewards) / len(self._rewards) if self._rewards else 0.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean_rewards": torch.tensor(self.mean_rewards, dtype=torch.float64)} if self.mean_rewards else {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.mean_rewards = state["mean_rewards"].tolist() if "mean_rewards" in state else []

    def describe(self) -> dict[str, Any]:
        d = {**super().describe()}
        if self.opts.objective == "grpo":
            d["mean_reward"] = self.mean_rewards
        return d
