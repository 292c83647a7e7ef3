"""Shared pieces of the on-policy methods (``onpolicy_distill`` and ``rl``): prompts taken from
the training batches, completions sampled from the model's own policy, per-token log-probs and
the verifiable rewards.

Prompts come from the *training* batch a method receives (never from a test set):

- a row whose labels are ``-100`` on a prefix and set after it (the topic streams' "Text: ...
  Topic:" rows): prompt = the unlabelled prefix, answer = the labelled text (the topic label);
- a row whose text contains ``Answer:`` (the fact stream's question/answer lines, written in the
  *training* question templates; the held-out probe wording is never trained on): prompt = the
  text up to and including the last ``Answer:``, answer = the rest;
- otherwise (the domain stream's text windows, or fact statements): prompt = the first
  ``prompt_tokens`` tokens, target = the next ``answer_tokens`` tokens of the document (no
  answer string: the reward is the fraction of sampled tokens equal to the document's).

If any row of a batch has an answer, only answer rows are used. Rows with the same prompt are
kept once; at most ``max_prompts`` prompts per batch, in batch order.

Sampling is seeded per (experience, step) so that a resumed run samples exactly what an
uninterrupted one does (the global RNG is forked and restored around ``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate.answers import cut_answer, exact_match


@dataclass
class Prompt:
    ids: list[int]  # prompt token ids
    target: list[int]  # the training data's continuation (gold answer tokens, or the document's next tokens)
    answer: str | None  # the gold answer text (None: continuation reward)


def _row(batch: dict, b: int) -> tuple[list[int], list[int]]:
    keep = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b][keep].tolist()
    labels = batch["labels"][b][keep].tolist() if "labels" in batch else list(ids)
    return ids, labels


def prompts_from_batch(batch: dict, tok, max_prompts: int = 4, prompt_tokens: int = 16,
                       answer_tokens: int = 8) -> list[Prompt]:
    """The prompts of a training batch (module docstring)."""
    answered, plain = [], []
    for b in range(batch["input_ids"].shape[0]):
        ids, labels = _row(batch, b)
        unlabelled = [i for i, l in enumerate(labels) if l == -100]
        if unlabelled and len(unlabelled) < len(ids) and unlabelled == list(range(len(unlabelled))):
            p = len(unlabelled)
            target = ids[p:]
            answered.append(Prompt(ids[:p], target, tok.decode(target, skip_special_tokens=True).strip()))
            continue
        text = tok.decode(ids, skip_special_tokens=True)
        cut = text.rfind("Answer:")
        if cut >= 0 and text[cut + len("Answer:"):].strip():
            cut += len("Answer:")
            p_ids = tok(text[:cut], add_special_tokens=False)["input_ids"]
            answer = text[cut:].strip()
            target = ids[len(p_ids):] if ids[: len(p_ids)] == p_ids else tok(" " + answer, add_special_tokens=False)["input_ids"]
            answered.append(Prompt(p_ids, target, answer))
        elif len(ids) > prompt_tokens:
            plain.append(Prompt(ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + answer_tokens], None))
    out, seen = [], set()
    for p in answered or plain:
        if tuple(p.ids) not in seen:
            seen.add(tuple(p.ids))
            out.append(p)
    return out[:max_prompts]


def pad_id(tok, model: nn.Module) -> int:
    """The padding token: the tokenizer's, else the model config's, else EOS."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    return int(pad if pad is not None else tok.eos_token_id)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def stop_token_ids(tok) -> set[int]:
    """Token ids whose text holds a newline (an answer ends at the end of its line), plus EOS."""
    stops = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    if tok.eos_token_id is not None:
        stops.add(int(tok.eos_token_id))
    return stops


def completion_mask(completions: torch.Tensor, stops: set[int]) -> torch.Tensor:
    """(N, T) 1 on each completion's tokens up to and including its first stop token."""
    is_stop = torch.zeros_like(completions, dtype=torch.bool)
    for s in stops:
        is_stop |= completions == s
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # stops strictly before t
    return (before == 0).long()


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, P + T) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (N, P + T) 1 on prompt tokens and on kept completion tokens
    completion: torch.Tensor  # (N, P + T) 1 on the kept completion tokens only
    prompt_index: list[int]  # which prompt each row answers (rows of one prompt are consecutive)


@torch.no_grad()
def sample(model: nn.Module, prompts: list[Prompt], per_prompt: int, max_new_tokens: int, pad: int, eos: int,
           stops: set[int], seed: int, temperature: float = 1.0) -> Rollout:
    """``per_prompt`` completions of every prompt sampled from the model (temperature, no top-k/p)."""
    rows = [p.ids for p in prompts for _ in range(per_prompt)]
    ids, mask = left_pad(rows, pad)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    model.train(was_training)
    comp = out[:, ids.shape[1]:]
    cmask = completion_mask(comp, stops) if comp.shape[1] else comp.long()
    full_comp = torch.cat([torch.zeros_like(mask), cmask], 1)
    attn = torch.cat([mask, cmask], 1)
    return Rollout(out, attn, full_comp, [i for i in range(len(prompts)) for _ in range(per_prompt)])


def completion_texts(rollout: Rollout, tok) -> list[str]:
    out = []
    for ids, m in zip(rollout.input_ids, rollout.completion):
        out.append(tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True))
    return out


def rewards(rollout: Rollout, prompts: list[Prompt], tok) -> torch.Tensor:
    """(N,) verifiable rewards: exact match of the cut answer with the gold answer; without an
    answer, the fraction of the document's next tokens the completion reproduces position by position."""
    texts = completion_texts(rollout, tok)
    out = []
    for r, (text, k) in enumerate(zip(texts, rollout.prompt_index)):
        p = prompts[k]
        if p.answer is not None:
            out.append(exact_match(cut_answer(text), p.answer))
        else:
            got = rollout.input_ids[r][rollout.completion[r].bool()].tolist()
            n = len(p.target)
            out.append(sum(a == b for a, b in zip(got, p.target)) / n if n else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def shifted(logits: torch.Tensor, input_ids: torch.Tensor, completion: torch.Tensor):
    """(logits predicting t+1 (N, L-1, V), the token at t+1 (N, L-1), mask of completion tokens at t+1)."""
    return logits[:, :-1].float(), input_ids[:, 1:], completion[:, 1:].float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the given tokens: (..., V), (...) -> (...)."""
    return F.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,): mean over each row's masked positions (0 for a row with none)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def forward_logits(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Logits of a rollout, with the positions ``generate`` used for left-padded prompts."""
    pos = (rollout.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=pos).logits
