"""Batch building: every training batch is a dict of ``input_ids``, ``attention_mask`` and
``labels`` (-100 where no loss is taken), right-padded."""

from __future__ import annotations

import random
import re

import torch

from ..models.tokenizer import uses_chat
from .facts import Fact, teaching_sentences

# a question/answer teaching line: an optional "Question:"/"Q:"/"Quiz:" label, the question up to its
# "?", an optional "Answer:"/"A:"/"Reply:" label, then the answer (possibly in a sentence)
_QA_LINE = re.compile(r"^\s*(?:(?:Question|Q|Quiz):\s*)?(?P<q>[^?\n]+\?)\s*(?:(?:Answer|A|Reply):\s*)?(?P<a>\S.*?)\s*$",
                      re.DOTALL)


def pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) rows of different lengths into one batch."""
    width = max(ids.numel() for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_rows(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (ids, labels) of each sequence of a batch, without padding."""
    return [(x[m.bool()].cpu(), y[m.bool()].cpu())
            for x, y, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]


def text_batch(tok, texts: list[str], return_offsets: bool = False) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``texts`` with the loss on every real token."""
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", return_offsets_mapping=return_offsets)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    if return_offsets:
        out["offset_mapping"] = enc["offset_mapping"]
    return out


def chat_line(tok, line: str, answer: str) -> str | None:
    """A question/answer teaching line as a chat: the question as one user turn, the answer (the rest of
    the line, holding ``answer``) as the assistant's turn, through the tokenizer's chat template, exactly
    as a question probe is asked; None for a line that is not a question followed by its answer."""
    m = _QA_LINE.match(line)
    if not m or answer not in m["a"]:
        return None
    text = tok.apply_chat_template([{"role": "user", "content": m["q"].strip()},
                                    {"role": "assistant", "content": m["a"]}], tokenize=False)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]  # the tokenizer adds it itself
    return text


def fact_batch(tok, fact: Fact, n: int, loss_on: str = "all", device: torch.device | str = "cpu",
               questions: bool = False, material: str | None = None, step: int = 0,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of n teaching lines of ``fact`` (each ending in a newline, like pretraining);
    ``material`` and ``step`` as in ``data.facts.teaching_sentences`` (default: statements);
    ``loss_on="answer"`` takes the loss on the answer's tokens only. With a chat tokenizer
    (``models.tokenizer.uses_chat``) the question/answer lines go through its chat template
    (``chat_line``); statements and clozes stay plain text."""
    lines = teaching_sentences(fact, n, questions, material, step, seed)
    chat = uses_chat(tok)
    sents = [(chat and chat_line(tok, s, fact.answer)) or s + "\n" for s in lines]
    batch = text_batch(tok, sents, return_offsets=loss_on == "answer")
    if loss_on == "answer":
        offsets = batch.pop("offset_mapping")
        for b, s in enumerate(sents):
            start = s.rfind(fact.answer)
            end = start + len(fact.answer)
            in_answer = (offsets[b, :, 0] < end) & (offsets[b, :, 1] > start)
            batch["labels"][b, ~in_answer] = -100
    return {k: v.to(device) for k, v in batch.items()}


def lm_batch(stream_ids: torch.Tensor, seq_len: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """``batch`` windows of ``seq_len`` tokens at seeded random offsets of a token stream."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream_ids.numel() - seq_len - 1, (batch,), generator=g)
    x = stream_ids[starts[:, None] + torch.arange(seq_len)[None, :]]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def label_batch(tok, pairs: list[tuple[str, str]], batch_size: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """``batch_size`` (prompt, label) pairs drawn with ``rng``, as "prompt label\\n" with the loss on
    the label (and its newline) only."""
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
    texts = [p + " " + label + "\n" for p, label in chosen]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for b, (p, _) in enumerate(chosen):
        labels[b, : len(tok(p, add_special_tokens=False)["input_ids"])] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
