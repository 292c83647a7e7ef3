"""Answer evaluation: greedy answers to prompts, exact match, "contains" and token F1, held-out NLL.

Scoring rules (both on SQuAD-normalised text: lower case, no punctuation, no articles):

- ``exact_match``: the answer, cut at its first newline / sentence end (``cut_answer``), equals the gold
  answer.
- ``contains``: the gold answer appears as whole words in that same first sentence, so that a chat model's
  "The capital of France is Paris." counts for "Paris" (and "Paris" itself counts, so contains >= exact
  match). "New Paris" also contains "Paris": contains is reported beside exact match, never instead of it.

Chat models: when the tokenizer has a chat template (and the model was opened with ``chat=True``), a
question probe "Question: ... Answer:" is sent as one user turn holding the question alone, through the
template with its generation prompt; statement completions never use the template.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter

import torch
from torch import nn

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style)."""
    s = s.lower().translate(_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def contains_match(pred: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears as whole words in the normalised (cut) answer."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {p} ")


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def cut_answer(text: str) -> str:
    """The answer part of a generated continuation: up to a newline, a new question or sentence end."""
    text = text.split("\n", 1)[0]
    text = re.split(r"\s(?:Question|Answer|Context):", text, maxsplit=1)[0]
    # a full stop ends the answer, except after an initial or a short abbreviation ("St. John's")
    text = re.split(r"(?<![A-Z])(?<!\b[A-Z][a-z])\.(?:\s|$)", text, maxsplit=1)[0]
    return text.strip().rstrip(".,;").strip()


def chat_prompt(tokenizer, prompt: str) -> str:
    """A question probe as one user turn through the tokenizer's chat template (generation prompt added)."""
    q = re.sub(r"^\s*Question:\s*", "", prompt)
    q = re.sub(r"\s*Answer:\s*$", "", q)
    return tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The end-of-sequence ids that end an answer: the tokenizer's and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


# a cut made by ``cut_answer`` that no later text can move: a newline, a new "Question:" etc.,
# or a full stop followed by whitespace (the text after it is dropped whatever it is)
_FINAL_CUT = re.compile(r"\n|\s(?:Question|Answer|Context):|(?<![A-Z])(?<!\b[A-Z][a-z])\.\s")


def answer_is_final(text: str) -> bool:
    """True when ``cut_answer(text + anything) == cut_answer(text)``: generation can stop."""
    return _FINAL_CUT.search(text) is not None


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 10,
                   batch_size: int = 64, chat: bool | None = None) -> list[str]:
    """Greedy continuation of each prompt, cut to its answer (``cut_answer``).

    Batched and left-padded, with a KV cache; a row leaves the batch (its cache rows are
    dropped) as soon as its answer is final: at EOS (the tokenizer's or the model's generation
    config's, ``stop_ids``), at a newline, or at any cut that later tokens cannot move
    (``answer_is_final``), so no token is scored after an answer's end.
    The answers equal those of ``model.generate(do_sample=False)`` cut by ``cut_answer``.
    ``chat`` (default: the tokenizer's setting, see ``models.tokenizer.uses_chat``) sends each prompt through
    the chat template; a chat answer is a sentence, so at least 24 new tokens are generated."""
    from ..models.tokenizer import uses_chat

    chat = uses_chat(tokenizer) if chat is None else chat
    if chat:
        prompts = [chat_prompt(tokenizer, p) for p in prompts]
        max_new_tokens = max(max_new_tokens, 24)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    tokenizer.padding_side = "left"
    eos = set(stop_ids(model, tokenizer))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
        if _steps_with_a_cache(model):
            rows = _greedy_rows(model, tokenizer, enc["input_ids"], enc["attention_mask"], max_new_tokens, eos)
        else:  # a wrapper model (router, retrieval front end, ...): its own generate
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
            rows = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [cut_answer(t) for t in rows]
    model.train(was_training)
    return out


def _steps_with_a_cache(model: nn.Module) -> bool:
    """Whether the model is a transformers (or PEFT) model that the cached greedy loop can step."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; a broken install only loses the fast path
        PeftModel = ()
    return isinstance(model, (PreTrainedModel, PeftModel))


def _greedy_rows(model: nn.Module, tokenizer, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 eos: set[int]) -> list[str]:
    """Decoded continuations (up to each row's stop) of a left-padded batch."""
    n = ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(n)]
    rows = torch.arange(n)  # batch position -> prompt row
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    # transformers >= 5.2x names the KV cache "cache" (earlier: "past_key_values")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, nxt = getattr(res, cache_kw), res.logits[:, -1].argmax(-1)
    for step in range(max_new_tokens):
        keep = []
        for b, (r, tok) in enumerate(zip(rows.tolist(), nxt.tolist())):
            if tok in eos:
                continue
            generated[r].append(tok)
            if not answer_is_final(tokenizer.decode(generated[r], skip_special_tokens=True)):
                keep.append(b)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < rows.numel():
            sel = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(sel)
            rows, nxt, mask = rows[sel.cpu()], nxt[sel], mask[sel]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = mask.long().sum(-1, keepdim=True) - 1
        res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_kw: cache})
        cache, nxt = getattr(res, cache_kw), res.logits[:, -1].argmax(-1)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


def score_answers(preds: list[str], golds: list[str]) -> dict[str, float]:
    n = max(len(golds), 1)
    return {"exact_match": sum(map(exact_match, preds, golds)) / n,
            "contains": sum(map(contains_match, preds, golds)) / n,
            "f1": sum(map(token_f1, preds, golds)) / n, "n": len(golds)}


LOGITS_BUDGET = 2**30  # bytes of fp32 logits one held-out forward may hold (a 262k-token vocabulary needs it)


@torch.no_grad()
def heldout_nll(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 16,
                max_tokens: int | None = None) -> dict[str, float]:
    """Mean next-token NLL (nats/token) and perplexity over non-overlapping windows of a token stream.

    ``batch_size`` windows per forward, fewer when their fp32 logits would exceed ``LOGITS_BUDGET``
    (Gemma's 262,144-token vocabulary: 32 windows of 128 tokens are 4.3 GB of logits, twice with the
    softmax); the shipped base and SmolLM2 stay under it, so their batches are as given."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        batch_size = max(1, min(batch_size, LOGITS_BUDGET // (seq_len * vocab * 4)))
    ids = ids[: max_tokens] if max_tokens else ids
    n_win = (ids.numel() - 1) // seq_len
    if n_win < 1:
        raise ValueError("held-out text is shorter than one window.")
    windows = ids[: n_win * seq_len + 1]
    total, count = 0.0, 0
    for s in range(0, n_win, batch_size):
        e = min(n_win, s + batch_size)
        x = torch.stack([windows[j * seq_len:(j + 1) * seq_len] for j in range(s, e)]).long().to(device)
        y = torch.stack([windows[j * seq_len + 1:(j + 1) * seq_len + 1] for j in range(s, e)]).long().to(device)
        logits = model(input_ids=x).logits.float()
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}
