"""Cartridges (Eyuboglu et al. 2025): a trainable KV prefix per corpus, trained by self-study.

A *cartridge* is the key/value cache of P virtual tokens for every attention layer: tensors
(P, n_kv_heads, head_dim) of keys and values per layer, put before the input as a prefilled
cache (the input's positions start at P). The model itself stays frozen; only the cartridge
trains. One cartridge per experience; the corpus of experience k is the text of its training
sequences (as for ``retrieval``: each distinct training row, padding skipped).

- **Initialisation**: the keys and values the frozen model computes for the first P tokens
  of the corpus (the paper's best initialisation).
- **Self-study** (``setup``): the corpus is cut into chunks of ``chunk_tokens`` tokens; for
  ``samples`` chunks (spread over the corpus) the model reads ``"Context: <chunk>\\n"`` and
  samples a question and its answer after ``"Question:"`` (temperature ``temperature``, up to
  ``max_new_tokens`` tokens, seeded): the model writes its own training conversations.
- **Context distillation** (``loss``): for a batch of samples, the teacher is the frozen
  model reading chunk + conversation, the student is the frozen model with the cartridge
  reading the conversation only; loss = KL(teacher || student) of the next-token
  distributions over the conversation's tokens. ``before_batch`` replaces the loop's batch by
  step s's ``batch`` samples (s * batch, ... cyclically).
- **Routing** (the exported ``CartridgeLM``): told the experience (task-incremental),
  cartridge j; else the nearest experience by ``methods.adapters.Router`` (``hidden``:
  centroids of the base's mean last hidden state; ``tfidf``: bag of tokens), fitted on the
  experience's training rows. Before any cartridge, the bare model.

Storage per cartridge: 2 x layers x P x n_kv_heads x head_dim x 4 bytes (float32), in
``describe()["cartridge_bytes"]``.

Left out: the paper's seed-prompt families (structuring, summarisation, ...), chunk
sampling with the corpus's global summary, composing several cartridges at once, and
training the cartridge for more steps than the stream's budget.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .adapters import ROUTERS, Router, pooled_representation, spread_steps, token_counts
from .base import Method, MethodContext, MethodOptions, freeze_all


def _cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def build_cache(model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor], batch: int):
    """A prefilled HF ``DynamicCache`` holding a cartridge ((P, H, D) per layer) for ``batch`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for l, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1),
                     v.permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1), l)
    return cache


@torch.no_grad()
def prefix_kv(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values ((P, H, D) per layer) the model computes for the token ids (P,)."""
    kw = _cache_kwarg(model)
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    keys, values = [], []
    for l in range(model.config.num_hidden_layers):
        layer = cache.layers[l]
        keys.append(layer.keys[0].permute(1, 0, 2).contiguous().clone())
        values.append(layer.values[0].permute(1, 0, 2).contiguous().clone())
    del kw
    return keys, values


def cartridge_forward(model: nn.Module, keys, values, input_ids, attention_mask, **kwargs):
    """The frozen model reading ``input_ids`` after the cartridge."""
    B = input_ids.shape[0]
    P = keys[0].shape[0]
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + P
    return model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                 **{_cache_kwarg(model): build_cache(model, keys, values, B)}, use_cache=True, **kwargs)


class Cartridge(nn.Module):
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.keys = nn.ParameterList([nn.Parameter(k.clone()) for k in keys])
        self.values = nn.ParameterList([nn.Parameter(v.clone()) for v in values])

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class CartridgeLM(nn.Module):
    """The frozen base with one cartridge per experience and a router in front."""

    def __init__(self, base: nn.Module, router: Router):
        super().__init__()
        self.base = base
        self.cartridges = nn.ModuleList()
        self.router = router
        self.experience: int | None = None

    @property
    def config(self):
        return self.base.config

    def set_experience(self, j: int | None) -> None:
        self.experience = j

    @torch.no_grad()
    def routes(self, input_ids, attention_mask) -> list[int | None]:
        n = input_ids.shape[0]
        if self.experience is not None:
            return [self.experience if self.experience < len(self.cartridges) else None] * n
        if not len(self.cartridges) or not len(self.router):
            return [0 if len(self.cartridges) else None] * n
        if self.router.kind == "hidden":
            got = self.router.route(pooled_representation(self.base, input_ids, attention_mask), None)
        else:
            got = self.router.route(None, token_counts(input_ids, attention_mask, self.config.vocab_size))
        return [min(k, len(self.cartridges) - 1) for k in got.tolist()]

    def _groups(self, input_ids, attention_mask) -> dict[int | None, torch.Tensor]:
        groups: dict[int | None, list[int]] = {}
        for i, c in enumerate(self.routes(input_ids, attention_mask)):
            groups.setdefault(c, []).append(i)
        return {c: torch.tensor(r, device=input_ids.device) for c, r in groups.items()}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = None
        for c, rows in self._groups(input_ids, attention_mask).items():
            if c is None:
                out = self.base(input_ids=input_ids[rows], attention_mask=attention_mask[rows])
            else:
                cart = self.cartridges[c]
                out = cartridge_forward(self.base, list(cart.keys), list(cart.values), input_ids[rows],
                                        attention_mask[rows])
            if logits is None:
                logits = out.logits.new_zeros((input_ids.shape[0], *out.logits.shape[1:]))
            logits[rows] = out.logits
        return CausalLMOutputWithPast(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pad = kwargs.get("pad_token_id")
        pad = pad if pad is not None else (self.config.pad_token_id or 0)
        outs = {}
        groups = self._groups(input_ids, attention_mask)
        for c, rows in groups.items():
            ids, m = input_ids[rows], attention_mask[rows]
            if c is None:
                outs[c] = self.base.generate(input_ids=ids, attention_mask=m, **kwargs)
                continue
            cart = self.cartridges[c]
            P = cart.keys[0].shape[0]
            cache = build_cache(self.base, [k.detach() for k in cart.keys], [v.detach() for v in cart.values], len(rows))
            full = torch.cat([m.new_ones(len(rows), P), m], dim=1)
            outs[c] = self.base.generate(input_ids=ids, attention_mask=full, **{_cache_kwarg(self.base): cache},
                                         **kwargs)
        width = max(o.shape[1] for o in outs.values())
        result = input_ids.new_full((input_ids.shape[0], width), int(pad))
        for c, rows in groups.items():
            result[rows, : outs[c].shape[1]] = outs[c]
        return result


def _rows(experience) -> list[list[int]]:
    """Each distinct training row of an experience (padding skipped), in step order."""
    seen, out = set(), []
    for step in range(experience.steps):
        b = experience.train_batch(step)
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
        for row, m in zip(b["input_ids"], mask):
            key = tuple(row[m.bool()].tolist())
            if key and key not in seen:
                seen.add(key)
                out.append(list(key))
    return out


class Cartridges(Method):
    name = "cartridges"

    needs_stream = True

    @dataclass
    class Options(MethodOptions):
        lr: float = 2e-2
        prefix_tokens: int = 32  # P virtual tokens per layer
        samples: int = 32  # self-study conversations per experience
        chunk_tokens: int = 96
        max_new_tokens: int = 24
        temperature: float = 0.8
        batch: int = 8  # conversations per distillation step
        router: str = "hidden"  # hidden | tfidf
        router_batches: int = 8
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            for k in ("prefix_tokens", "samples", "batch", "router_batches"):
                self.positive(k, integer=True)
            self.at_least("chunk_tokens", 8)
            self.at_least("max_new_tokens", 2)
            self.positive("temperature")
            self.one_of("router", ROUTERS)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        prefix_tokens, samples, chunk_tokens, max_new_tokens = o.prefix_tokens, o.samples, o.chunk_tokens, o.max_new_tokens
        temperature, batch, router, router_batches, seed = o.temperature, o.batch, o.router, o.router_batches, o.seed
        self.P, self.n_samples, self.chunk_tokens = prefix_tokens, samples, chunk_tokens
        self.max_new, self.temperature, self.batch, self.seed = max_new_tokens, temperature, batch, seed
        self.router_kind, self.router_batches = router, router_batches
        self.router = Router(router)
        self.saved: list[dict[str, torch.Tensor]] = []  # cartridges restored on resume
        self.wrapper: CartridgeLM | None = None
        self.tok = None
        self.data: list[tuple[list[int], list[int]]] = []  # (context ids, conversation ids)

    # --- self-study ----------------------------------------------------------------------
    @torch.no_grad()
    def self_study(self, base: nn.Module, rows: list[list[int]], k: int) -> list[tuple[list[int], list[int]]]:
        tok = self.tok
        corpus = [t for r in rows for t in r]
        chunks = [corpus[i:i + self.chunk_tokens] for i in range(0, max(len(corpus) - 8, 1), self.chunk_tokens)]
        picks = spread_steps(len(chunks), self.n_samples)
        picks = [picks[i % len(picks)] for i in range(self.n_samples)]
        head = tok("Context: ", add_special_tokens=False)["input_ids"]
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        q = tok("Question:", add_special_tokens=False)["input_ids"]
        out = []
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        for i in picks:
            ctx = head + chunks[i] + nl
            ids = torch.tensor([ctx + q])
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            gen = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=self.temperature, max_new_tokens=self.max_new,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append((ctx, q + gen[0, ids.shape[1]:].tolist()))
        return out

    # --- hooks -------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> CartridgeLM:
        if isinstance(model, CartridgeLM):
            return model
        freeze_all(model)
        w = CartridgeLM(model, self.router)
        for sd in self.saved:
            n = len(sd) // 2
            w.cartridges.append(Cartridge([sd[f"k.{l}"] for l in range(n)], [sd[f"v.{l}"] for l in range(n)]))
        return w

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self.tok = context.tokenizer
        exp = context.experience
        if self.tok is None or exp is None:
            raise ConfigError("cartridges needs the tokenizer and the experience (run it through `forgetless run`).")
        w = self._wrap(model)
        w.set_experience(None)
        base = w.base
        freeze_all(base)
        k = len(w.cartridges)
        rows = _rows(exp)
        corpus = [t for r in rows for t in r]
        keys, values = prefix_kv(base, torch.tensor(corpus[: self.P]))
        if keys[0].shape[0] < self.P:
            raise ConfigError(f"experience {exp.name!r} has fewer than {self.P} training tokens for the cartridge.")
        w.cartridges.append(Cartridge(keys, values))
        with torch.random.fork_rng(devices=[]):
            self.data = self.self_study(base, rows, k)
        if len(self.router) == k:
            pend = []
            for i in spread_steps(exp.steps, self.router_batches):
                b = exp.train_batch(i)
                if self.router.kind == "hidden":
                    pend.append(pooled_representation(base, b["input_ids"], b.get("attention_mask")))
                else:
                    pend.append(token_counts(b["input_ids"], b.get("attention_mask"), base.config.vocab_size))
            rows_t = torch.cat(pend)
            self.router.add(rows_t, None) if self.router.kind == "hidden" else self.router.add(None, rows_t)
        self._optimizers = [torch.optim.Adam(w.cartridges[k].parameters(), lr=self.lr)]
        self.wrapper = w
        return w

    def distill_batch(self, i: int) -> list[tuple[list[int], list[int]]]:
        return [self.data[(i * self.batch + j) % len(self.data)] for j in range(self.batch)]

    def before_batch(self, model: nn.Module, batch: dict, step: int) -> dict:
        """The stream's batch is replaced by the step's self-study samples."""
        return {"self_study": self.distill_batch(step)}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return distillation_loss(model.base, model.cartridges[-1], batch["self_study"], self.tok.pad_token_id or 0)

    def export(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        return model.base if isinstance(model, CartridgeLM) else model

    def trainable_params_per_step(self) -> int:
        return sum(p.numel() for opt in self._optimizers for g in opt.param_groups for p in g["params"])

    # --- state -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"router.{k}": v for k, v in self.router.state().items()}
        if self.wrapper is not None:
            carts = [{**{f"k.{l}": p.detach() for l, p in enumerate(c.keys)},
                      **{f"v.{l}": p.detach() for l, p in enumerate(c.values)}} for c in self.wrapper.cartridges]
        else:
            carts = self.saved
        for i, sd in enumerate(carts):
            out.update({f"cartridge.{i}.{k}": v for k, v in sd.items()})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.router = Router(self.router_kind)
        self.router.load({k[len("router."):]: v for k, v in state.items() if k.startswith("router.")})
        n = len({k.split(".")[1] for k in state if k.startswith("cartridge.")})
        self.saved = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"cartridge.{i}.")}
                      for i in range(n)]
        self.wrapper = None

    def cartridge_bytes(self) -> list[int]:
        if self.wrapper is not None:
            return [c.nbytes() for c in self.wrapper.cartridges]
        return [sum(v.numel() * v.element_size() for v in sd.values()) for sd in self.saved]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cartridge_bytes": self.cartridge_bytes()}


def distillation_loss(base: nn.Module, cart: Cartridge, samples: list[tuple[list[int], list[int]]],
                      pad: int) -> torch.Tensor:
    """Mean over conversation tokens of KL(teacher with the chunk in context || student with the cartridge)."""
    B = len(samples)
    Lt = max(len(c) + len(x) for c, x in samples)
    Ls = max(len(x) for _, x in samples)
    t_ids = torch.full((B, Lt), pad, dtype=torch.long)
    t_mask = torch.zeros((B, Lt), dtype=torch.long)
    s_ids = torch.full((B, Ls), pad, dtype=torch.long)
    s_mask = torch.zeros((B, Ls), dtype=torch.long)
    for b, (c, x) in enumerate(samples):
        t_ids[b, :len(c) + len(x)] = torch.tensor(c + x)
        t_mask[b, :len(c) + len(x)] = 1
        s_ids[b, :len(x)] = torch.tensor(x)
        s_mask[b, :len(x)] = 1
    with torch.no_grad():
        t_logits = base(input_ids=t_ids, attention_mask=t_mask).logits.float()
    s_logits = cartridge_forward(base, list(cart.keys), list(cart.values), s_ids, s_mask).logits.float()
    total, count = 0.0, 0
    for b, (c, x) in enumerate(samples):
        n = len(x) - 1  # positions predicting conversation tokens 2..n+1
        t = t_logits[b, len(c):len(c) + n].log_softmax(-1)
        s = s_logits[b, :n].log_softmax(-1)
        total = total + (t.exp() * (t - s)).sum()
        count += n
    return total / max(count, 1)
