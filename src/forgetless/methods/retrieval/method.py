"""Retrieval baseline: new text goes into an index, never into the weights.

At every experience, ``setup`` decodes each distinct training sequence of the experience
(``experience.train_batch(step)`` for every step, padding skipped) and adds the text to a
``forgetless.retrieval.PassageIndex`` (BM25 or MiniLM vectors). The exported model is a
``RetrievalLM`` around the unchanged base:

- ``generate``: each prompt is the query; the ``top_k`` best passages are put before it as
  ``"Context: <p1> <p2>\\n"`` + prompt (cut to ``max_context_tokens`` tokens), the base
  generates, and the original prompt ids + the new tokens are returned.
- ``forward`` (NLL scoring): logits are returned only for the original positions. With
  ``stride`` s > 0 (default 32) the row is scored in chunks of s tokens and the context of
  a chunk is retrieved with the row's text *before* the chunk (the first chunk gets none),
  so no scored token ever chooses its own context (in-context RALM, Ram et al. 2023, with
  the whole prefix as the query). With ``stride: 0`` one query is made from the whole row:
  cheaper, but the choice of context then sees the tokens it is scored on, which can lower
  the NLL of a T-token row by up to log(N passages) nats in total (a mixture bound).

No weight changes, so ``trains = False`` (the runner skips the training loop).

The shipped base read "Context: ... Question: ... Answer: ..." lines of *known* facts in
pretraining, but it answers them from memory, not from its context (measured by
``benchmarks/retrieval.py``; the figures are in ``docs/results/retrieval.md``).
``reader_steps`` > 0 therefore first fine-tunes the base's
attention weights once (before the first experience, seeded) to read its context, on
batches built only from *known* facts and invented names, never from new facts or probe
wordings; question = a *training* question template, loss on the answer tokens only. Per
example: 1/4 plain known-fact question lines with no context (to keep what the base knows);
``reader_irrelevant`` (default 1/4) known-fact questions after an *irrelevant* context (a
statement of another subject of the same relation, a known fact's or an invented one's, plus
a second unrelated statement half of the time), labelled with the known fact's own answer, so
the reader learns to answer from memory when the context is not about the question's subject
(with ``top_k`` 1 every question gets some passage: in a fact stream the known-fact questions
get a new fact's statement); the rest (default 1/2) with the answer in the context: a known
fact's statement, or an invented subject with a known or invented answer, plus a distractor
statement half of the time. ``reader_irrelevant: 0`` is the first recipe (3/4 relevant); how
each recipe reads relevant and irrelevant contexts is measured in ``docs/results/retrieval.md``.
The tuned base is what ``checkpoint_model`` saves, so a resumed run does not tune it again.

``min_score`` (default none): hits scoring below it are not put before the input (BM25 score,
or cosine for ``index: dense``); a question with no hit left gets no context.

Left out: re-ranking, query rewriting, chunking of long documents (a passage is a whole
training sequence), per-position retrieval at every token (kNN-LM).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...training.optim import adamw
from ..base import Method, MethodContext, MethodOptions, nest, unnest
from .index import INDEX_KINDS, PassageIndex

CONTEXT_PREFIX = "Context: "


def context_text(passages: list[str]) -> str:
    """The text put before a prompt: ``Context: <p1> <p2>\\n`` (empty when there are no passages)."""
    return CONTEXT_PREFIX + " ".join(" ".join(p.split()) for p in passages) + "\n" if passages else ""


def context_ids(tok, passages: list[str], max_tokens: int) -> list[int]:
    """Token ids of ``context_text(passages)``; a context longer than ``max_tokens`` keeps its
    first ``max_tokens - 1`` tokens and its final newline (none at all when ``max_tokens`` < 8)."""
    if not passages or max_tokens < 8:
        return []
    ids = tok(context_text(passages), add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        ids = ids[: max_tokens - 1] + ids[-1:]
    return ids


def experience_passages(experience: Any, tok) -> list[str]:
    """The text of every distinct training sequence of an experience, in step order (padding skipped)."""
    seen: set[tuple[int, ...]] = set()
    out: list[str] = []
    for step in range(experience.steps):
        batch = experience.train_batch(step)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        for row, m in zip(ids, mask):
            key = tuple(row[m.bool()].tolist())
            if key in seen:
                continue
            seen.add(key)
            text = tok.decode(list(key), skip_special_tokens=True).strip()
            if text:
                out.append(text)
    return out


class RetrievalLM(nn.Module):
    """The base model with retrieved passages put before its input (see the module docstring)."""

    def __init__(self, base: nn.Module, tok, index: PassageIndex, top_k: int = 1, max_context_tokens: int = 64,
                 stride: int = 32, min_score: float | None = None):
        super().__init__()
        self.base = base
        self.tok = tok
        self.index = index
        self.top_k, self.max_context_tokens, self.stride = top_k, max_context_tokens, stride
        self.min_score = min_score
        self.max_positions = getattr(base.config, "max_position_embeddings", None) or 10**9

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _contexts(self, queries: list[str], budgets: list[int]) -> list[list[int]]:
        hits = self.index.search_batch(queries, self.top_k)
        return [context_ids(self.tok, [p for p, sc in h if self.min_score is None or sc >= self.min_score] if q.strip() else [],
                            min(self.max_context_tokens, b))
                for q, h, b in zip(queries, hits, budgets)]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if len(self.index) == 0:
            return CausalLMOutputWithPast(logits=self.base(input_ids=input_ids, attention_mask=attention_mask).logits)
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = [input_ids[b][mask[b].bool()].tolist() for b in range(B)]
        chunks = [(0, T)] if self.stride <= 0 else [(a, min(a + self.stride, T)) for a in range(0, T, self.stride)]
        out = None
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for a, e in chunks:
            queries = [self._decode(r if self.stride <= 0 else r[:a]) for r in real]
            ctxs = self._contexts(queries, [self.max_positions - e] * B)
            L = max(len(c) for c in ctxs) + e
            ids = torch.full((B, L), pad, dtype=input_ids.dtype, device=input_ids.device)
            m = torch.zeros((B, L), dtype=mask.dtype, device=mask.device)
            for b, c in enumerate(ctxs):  # context, then the row; right padding keeps positions exact
                n = len(c)
                ids[b, :n] = torch.tensor(c, dtype=input_ids.dtype)
                ids[b, n:n + e] = input_ids[b, :e]
                m[b, :n] = 1
                m[b, n:n + e] = mask[b, :e]
            logits = self.base(input_ids=ids, attention_mask=m).logits
            if out is None:
                out = logits.new_zeros(B, T, logits.shape[-1])
            for b, c in enumerate(ctxs):
                out[b, a:e] = logits[b, len(c) + a:len(c) + e]
        return CausalLMOutputWithPast(logits=out)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 10, **kwargs) -> torch.Tensor:
        """Original prompt ids + the tokens generated with the retrieved context before each prompt."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = [input_ids[b][mask[b].bool()].tolist() for b in range(B)]
        ctxs = self._contexts([self._decode(r) for r in real],
                              [self.max_positions - max_new_tokens - len(r) for r in real])
        rows = [c + r for c, r in zip(ctxs, real)]
        L = max(len(r) for r in rows)
        pad = kwargs.get("pad_token_id", self.tok.pad_token_id)
        ids = torch.full((B, L), pad if pad is not None else 0, dtype=input_ids.dtype, device=input_ids.device)
        m = torch.zeros((B, L), dtype=mask.dtype, device=mask.device)
        for b, r in enumerate(rows):  # left padding, as for any batched generation
            ids[b, L - len(r):] = torch.tensor(r, dtype=input_ids.dtype)
            m[b, L - len(r):] = 1
        gen = self.base.generate(input_ids=ids, attention_mask=m, max_new_tokens=max_new_tokens, **kwargs)
        return torch.cat([input_ids, gen[:, L:]], dim=1)


# --------------------------------------------------------------------------- the optional reader fine-tune
_SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "vel", "dor", "sa", "qu", "ni", "bar", "to", "ze", "lu", "mon",
              "fa", "ri", "gan", "sho", "pe", "vos", "tel", "ar", "un"]


def _invented_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()


def irrelevant_passage(rng: random.Random, f, known: list) -> str:
    """A statement about a *different* subject of ``f``'s relation, like what BM25 returns for a
    question whose answer is not in the index: half of the time another known fact's statement
    (a different subject and a different answer), else an invented subject with an invented answer
    or another known answer of the relation."""
    from ...data.facts import STATEMENTS

    others = [g for g in known if g.relation == f.relation and g.subject != f.subject and g.answer != f.answer]
    if others and rng.random() < 0.5:
        g = rng.choice(others)
        s, a = g.subject, g.answer
    else:
        s = _invented_name(rng)
        while s == f.subject:
            s = _invented_name(rng)
        answers = [g.answer for g in others]
        a = rng.choice(answers) if answers and rng.random() < 0.5 else _invented_name(rng)
    return rng.choice(STATEMENTS[f.relation]).format(s=s, a=a)


def reader_example(rng: random.Random, known: list, tok, irrelevant: float = 0.25,
                   qa_contexts: float = 0.0) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one reader example built from known facts and invented names only.

    With u ~ U(0, 1): u < 1/4, a plain known-fact question line, no context; u < 1/4 + ``irrelevant``,
    a known-fact question after an *irrelevant* context (``irrelevant_passage``, plus a second
    irrelevant statement of any relation half of the time), labelled with the known fact's own
    answer, i.e. answered from memory; else the context holds the answer (thirds: the known fact's
    statement; an invented subject with a known answer of the relation; an invented subject and
    answer), plus a distractor statement half of the time. ``irrelevant = 0`` is the first recipe.
    ``qa_contexts``: the share of relevant contexts written as a question/answer line in a
    training template ("Question: Name the capital of X. Answer: Y") instead of a statement,
    as the indexed training text of a fact stream often is (0: statements only, the measured
    recipes)."""
    from ...data.facts import QUESTIONS, STATEMENTS, question_lines, statement_lines

    f = rng.choice(known)
    u = rng.random()
    if u < 0.25:  # a plain question line of a known fact, no context
        prompt, answer = rng.choice(question_lines(f)).rsplit(" Answer: ", 1)
        ctx: list[int] = []
    elif u < 0.25 + irrelevant:  # irrelevant context: answer from memory
        passages = [irrelevant_passage(rng, f, known)]
        if rng.random() < 0.5:
            g = rng.choice(known)
            while g.subject == f.subject:
                g = rng.choice(known)
            passages.append(rng.choice(statement_lines(g)))
            rng.shuffle(passages)
        prompt, answer = rng.choice(question_lines(f)).rsplit(" Answer: ", 1)
        ctx = context_ids(tok, passages, 10**9)
    else:
        s, a = f.subject, f.answer
        v = 0.25 + (u - 0.25 - irrelevant) * 0.75 / (0.75 - irrelevant)  # [0.25, 1): thirds as in the first recipe
        if v >= 0.5:
            s = _invented_name(rng)
            a = rng.choice([g.answer for g in known if g.relation == f.relation]) if v < 0.75 else \
                _invented_name(rng) + (" " + _invented_name(rng) if rng.random() < 0.3 else "")
        passages = [rng.choice(STATEMENTS[f.relation]).format(s=s, a=a)]
        if qa_contexts and rng.random() < qa_contexts:
            passages = [rng.choice(QUESTIONS[f.relation]).format(s=s, a=a)]
        if rng.random() < 0.5:
            passages.append(rng.choice(statement_lines(rng.choice(known))))
            rng.shuffle(passages)
        prompt, answer = rng.choice(QUESTIONS[f.relation]).format(s=s, a=a).rsplit(" Answer: ", 1)
        ctx = context_ids(tok, passages, 10**9)
    p = ctx + tok(prompt + " Answer:", add_special_tokens=False)["input_ids"]
    y = tok(" " + answer + "\n", add_special_tokens=False)["input_ids"]
    return p + y, [-100] * len(p) + y


def train_reader(model: nn.Module, tok, known: list, steps: int, lr: float = 1e-4, batch_size: int = 16,
                 seed: int = 0, irrelevant: float = 0.25, qa_contexts: float = 0.0) -> list[float]:
    """Fine-tune the attention weights of ``model`` to answer from its context (and to ignore an
    irrelevant one, see ``reader_example``); returns the losses."""
    if not 0.0 <= irrelevant <= 0.5:
        raise ConfigError(f"reader_irrelevant must be between 0 and 0.5, got {irrelevant}.")
    if not known:
        raise ConfigError("reader_steps needs the model's known facts (facts_known.jsonl).")
    rng = random.Random(seed)
    params = [p for n, p in model.named_parameters() if ".self_attn." in n]
    if not params:
        raise ConfigError("reader_steps needs a model with attention modules named '*.self_attn.*'.")
    was = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses = []
    model.train()
    for _ in range(steps):
        ex = [reader_example(rng, known, tok, irrelevant, qa_contexts) for _ in range(batch_size)]
        L = max(len(x) for x, _ in ex)
        ids = torch.full((batch_size, L), pad, dtype=torch.long)
        labels = torch.full((batch_size, L), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, L), dtype=torch.long)
        for b, (x, y) in enumerate(ex):
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(was[id(p)])
        p.grad = None
    return losses


# --------------------------------------------------------------------------- the method
class Retrieval(Method):
    name = "retrieval"
    trains = False

    @dataclass
    class Options(MethodOptions):
        lr: float = 0.0  # unused: no weight changes (the reader has reader_lr)
        index: str = "bm25"  # bm25 | dense
        top_k: int = 1  # passages put before the input
        max_context_tokens: int = 64
        stride: int = 32  # NLL scoring in chunks of this many tokens (0: one query per row)
        reader_steps: int = 0  # > 0: fine-tune the base once to read its context
        reader_lr: float = 1e-4
        reader_batch: int = 16
        reader_irrelevant: float = 0.25  # reader examples with an irrelevant context
        reader_qa_contexts: float = 0.0
        min_score: float | None = None  # hits below it are dropped
        seed: int = 0

        def validate(self) -> None:  # no super(): lr 0 is allowed here
            self.at_least("lr", 0)
            self.one_of("index", INDEX_KINDS)
            self.require(self.top_k >= 1, "top_k", "an integer >= 1")
            self.require(self.max_context_tokens >= 8, "max_context_tokens", "an integer >= 8")
            self.at_least("stride", 0)
            self.at_least("reader_steps", 0)
            self.positive("reader_lr")
            self.positive("reader_batch", integer=True)
            self.between("reader_irrelevant", 0, 0.5)
            self.between("reader_qa_contexts", 0, 1)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.index_kind, self.top_k, self.max_context_tokens, self.stride = o.index, o.top_k, o.max_context_tokens, o.stride
        self.reader_steps, self.reader_lr, self.reader_batch, self.seed = o.reader_steps, o.reader_lr, o.reader_batch, o.seed
        self.reader_irrelevant, self.reader_qa_contexts, self.min_score = o.reader_irrelevant, o.reader_qa_contexts, o.min_score
        index = o.index
        self.index = PassageIndex(index)
        self.reader_done = False
        self.tok = None

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        base = model.base if isinstance(model, RetrievalLM) else model
        self.tok = context.tokenizer
        if self.tok is None:
            raise ConfigError("the retrieval method needs the model's tokenizer in its context.")
        if self.reader_steps and not self.reader_done:
            from ...data.facts import read_builtin_facts

            known_file = Path(context.model_dir or "") / "facts_known.jsonl"
            known = read_builtin_facts(known_file) if known_file.is_file() else []
            torch.manual_seed(self.seed)
            train_reader(base, self.tok, known, self.reader_steps, self.reader_lr, self.reader_batch, self.seed,
                         self.reader_irrelevant, self.reader_qa_contexts)
            self.reader_done = True
        experience = context.experience
        if experience is not None:
            self.index.add(experience_passages(experience, self.tok))
        for p in base.parameters():
            p.requires_grad_(False)
        return base

    def export(self, model: nn.Module) -> nn.Module:
        base = model.base if isinstance(model, RetrievalLM) else model
        return RetrievalLM(base, self.tok, self.index, self.top_k, self.max_context_tokens, self.stride,
                           self.min_score)

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        return model.base if isinstance(model, RetrievalLM) else model

    def trainable_params_per_step(self) -> int:
        return 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = nest("index", self.index.to_tensors())
        out["reader_done"] = torch.tensor([int(self.reader_done)])
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.index = PassageIndex.from_tensors(
            self.index_kind, unnest("index", state))
        self.reader_done = bool(state["reader_done"].item()) if "reader_done" in state else False
