"""Task adapters: one LoRA adapter per experience behind a router ("many specialists").

Training: experience k gets its own LoRA adapter ``e<k>`` (through ``peft``; same targets as
``methods/lora.py``: attention q/k/v/o and MLP gate/up/down), trained on experience k only
with the base and every earlier adapter frozen. Adapters are kept side by side and never
merged, so an adapter, once trained, never changes. Adapter k's random initialisation is
seeded by ``seed`` and k, so a resumed run rebuilds exactly what an uninterrupted one has.

Routing (the exported ``AdapterRouterModel``): each input sequence goes to one adapter.

- Told the experience (``set_experience(j)``, task-incremental streams): adapter j (the bare
  base if experience j has no adapter yet, e.g. on a curve point before it is trained).
- Not told: a nearest-centroid router built from the experiences' *training* inputs, fitted
  at ``setup`` from ``router_batches`` training batches spread evenly over the experience's
  steps (or, if the context has no experience, from the first training batches
  seen in the loop):

  - ``router: hidden`` (default): r(x) = normalise(mean over non-pad tokens of the base
    model's last hidden state, adapters off); centroid c_k = normalise(mean_x r(x)) over the
    experience's training sequences; route(x) = argmax_k cos(r(x) - m, c_k - m), where m is the
    mean of the centroids (centring removes the direction every text shares; with one
    experience, plain cosine).
  - ``router: tfidf``: nearest neighbour by bag of tokens. Every stored training sequence s
    has counts n_s of each token id; idf_t = ln((N + 1) / (df_t + 1)) + 1 over the N stored
    sequences of all experiences (df_t: sequences containing t); w(s) = normalise(n_s * idf).
    route(x) = the experience of the stored sequence s with the highest cos(w(x), w(s)).

  ``hidden`` is the default; ``tfidf`` suits fact streams, where a question shares its
  entity's tokens with that fact's paraphrases. The measured router accuracies are in
  ``docs/results/domain-methods.md`` (``benchmarks/router.py`` measures them).

Parameter growth: ``growth()`` = LoRA parameters added per experience (all equal: one adapter
of the configured rank each); in ``describe()``, with the router's accuracy on validation
batches drawn from the seen experiences' training data (``router_valid_accuracy``).

Left out: learned gates or mixtures of adapters (one adapter per sequence, hard routing),
routing per token, and merging adapters into the base.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..training.optim import adamw
from .base import (
    Method,
    MethodContext,
    MethodOptions,
    freeze_all,
    nest,
    shifted_cross_entropy,
    unnest,
    unnest_list,
)
from .lora import LLAMA_LINEAR, lora_config

ROUTERS = ("hidden", "tfidf")


def _decoder(hf_model: nn.Module) -> nn.Module:
    """The decoder stack of an HF causal LM (``model.model`` for Llama), without the LM head."""
    prefix = getattr(hf_model, "base_model_prefix", "")
    return getattr(hf_model, prefix, hf_model) if prefix else hf_model


@torch.no_grad()
def pooled_representation(hf_model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) unit vectors: the mean over non-pad tokens of the last hidden state."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    h = _decoder(hf_model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    m = attention_mask.to(h.dtype)[..., None]
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


def token_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """(B, vocab) counts of each token id over the non-pad positions of each row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = torch.zeros(input_ids.shape[0], vocab, dtype=torch.float32, device=input_ids.device)
    return out.scatter_add_(1, input_ids.long(), attention_mask.float())


class Router:
    """Per-experience statistics of training inputs and the routing rules (module docstring)."""

    def __init__(self, kind: str = "hidden"):
        if kind not in ROUTERS:
            raise ConfigError(f"adapters router must be one of {ROUTERS}, got {kind!r}.")
        self.kind = kind
        self.centroids: list[torch.Tensor] = []  # hidden: (d,) unit vector per experience
        self.counts: list[torch.Tensor] = []  # tfidf: (N_k, vocab) token counts of each training sequence
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.centroids) if self.kind == "hidden" else len(self.counts)

    def add(self, reps: torch.Tensor | None, counts: torch.Tensor | None) -> None:
        """Add an experience from its training sequences' representations (N, d) or counts (N, V)."""
        if self.kind == "hidden":
            self.centroids.append(nn.functional.normalize(reps.float().mean(0), dim=0).cpu())
        else:
            self.counts.append(counts.float().cpu())
        self._table = None

    def _tfidf_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idf (V,), unit TF-IDF rows (N, V), experience of each row (N,)) over all stored sequences."""
        if self._table is None:
            table = torch.cat(self.counts)
            idf = torch.log((table.shape[0] + 1) / ((table > 0).sum(0).float() + 1)) + 1
            owner = torch.cat([torch.full((c.shape[0],), k) for k, c in enumerate(self.counts)])
            self._table = idf, nn.functional.normalize(table * idf, dim=-1), owner
        return self._table

    def scores(self, reps: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor:
        """(B, K) similarity of each input to each experience (the highest wins)."""
        if self.kind == "tfidf":
            idf, rows, owner = self._tfidf_table()
            sims = nn.functional.normalize(counts.float().cpu() * idf, dim=-1) @ rows.T  # (B, N)
            out = torch.full((sims.shape[0], len(self.counts)), -math.inf)
            return out.scatter_reduce_(1, owner.expand_as(sims), sims, reduce="amax")
        c = torch.stack(self.centroids)
        x = reps.float().cpu()
        if len(self) > 1:
            m = c.mean(0)
            c, x = nn.functional.normalize(c - m, dim=-1), nn.functional.normalize(x - m, dim=-1)
        return x @ c.T

    def route(self, reps: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor:
        return self.scores(reps, counts).argmax(-1)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"centroid.{k}": c for k, c in enumerate(self.centroids)}
        out.update({f"counts.{k}": c for k, c in enumerate(self.counts)})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for key, store in (("centroid", self.centroids), ("counts", self.counts)):
            store[:] = [state[f"{key}.{k}"] for k in range(len([s for s in state if s.startswith(key + ".")]))]
        self._table = None


class AdapterRouterModel(nn.Module):
    """The base with every experience's LoRA adapter side by side, and the router in front.

    ``forward(input_ids=, attention_mask=)`` and ``generate(...)`` send each row to one adapter
    (grouping rows by adapter); ``adapter_forward(name, ...)`` uses one adapter (training)."""

    def __init__(self, model: nn.Module, router: Router):
        super().__init__()
        self.base = model  # the plain HF model until the first adapter is added, then inside ``peft``
        self.peft: nn.Module | None = None
        self.router = router
        self.names: list[str] = []
        self.training_adapter: str | None = None
        self.experience: int | None = None

    # --- adapters --------------------------------------------------------------------
    @property
    def config(self):
        return self.base.config

    def add_adapter(self, name: str, lora_config) -> None:
        from peft import get_peft_model

        if self.peft is None:
            self.peft = get_peft_model(self.base, lora_config, adapter_name=name)
        else:
            self.peft.add_adapter(name, lora_config)
        self.names.append(name)

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]

    def _activate(self, name: str) -> None:
        self.peft.set_adapter(name)  # peft also flips requires_grad; only the training adapter may train
        for n, p in self.named_parameters():
            p.requires_grad_(self.training_adapter is not None
                             and (f".lora_A.{self.training_adapter}." in n or f".lora_B.{self.training_adapter}." in n))

    def set_experience(self, j: int | None) -> None:
        self.experience = j

    def adapter_forward(self, name: str | None, **kwargs):
        """Forward with one adapter (``None``: the bare base)."""
        if name is None:
            if self.peft is None:
                return self.base(**kwargs)
            with self.peft.disable_adapter():
                return self.peft(**kwargs)
        self._activate(name)
        return self.peft(**kwargs)

    # --- routing ---------------------------------------------------------------------
    @torch.no_grad()
    def routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str | None]:
        """The adapter of each row: the told experience's, else the router's choice."""
        n = input_ids.shape[0]
        if self.experience is not None:
            return [self.names[self.experience] if self.experience < len(self.names) else None] * n
        if not self.names or not len(self.router):
            return [self.names[0] if self.names else None] * n
        reps = counts = None
        if self.router.kind == "hidden":
            if self.peft is None:
                reps = pooled_representation(self.base, input_ids, attention_mask)
            else:
                with self.peft.disable_adapter():
                    reps = pooled_representation(self.base, input_ids, attention_mask)
        else:
            counts = token_counts(input_ids, attention_mask, self.config.vocab_size)
        return [self.names[min(k, len(self.names) - 1)] for k in self.router.route(reps, counts).tolist()]

    def _groups(self, input_ids, attention_mask) -> dict[str | None, torch.Tensor]:
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.routes(input_ids, attention_mask)):
            groups.setdefault(name, []).append(i)
        return {name: torch.tensor(rows, device=input_ids.device) for name, rows in groups.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        groups = self._groups(input_ids, attention_mask)
        if len(groups) == 1:
            return self.adapter_forward(next(iter(groups)), input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = None
        for name, rows in groups.items():
            out = self.adapter_forward(name, input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs)
            if logits is None:
                logits = out.logits.new_zeros((input_ids.shape[0], *out.logits.shape[1:]))
            logits[rows] = out.logits
        return CausalLMOutputWithPast(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = kwargs.get("pad_token_id")
        pad = pad if pad is not None else (self.config.pad_token_id if self.config.pad_token_id is not None
                                           else self.config.eos_token_id)
        outs: dict[str | None, torch.Tensor] = {}
        groups = self._groups(input_ids, attention_mask)
        for name, rows in groups.items():
            if name is None:
                model = self.base if self.peft is None else self.peft
                ctx = self.peft.disable_adapter() if self.peft is not None else nullcontext()
            else:
                self._activate(name)
                model, ctx = self.peft, nullcontext()
            with ctx:
                outs[name] = model.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs)
        width = max(o.shape[1] for o in outs.values())
        result = input_ids.new_full((input_ids.shape[0], width), int(pad))
        for name, rows in groups.items():
            result[rows, : outs[name].shape[1]] = outs[name]
        return result


def spread_steps(steps: int, n: int) -> list[int]:
    """``min(n, steps)`` distinct steps spread evenly over ``0 .. steps-1`` (a fact stream changes
    fact every few steps, so the first n steps would show the router only the first facts)."""
    n = min(n, steps)
    return sorted({round(i * (steps - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [0][:n]


class TaskAdapters(Method):
    name = "adapters"
    needs_stream = True

    @dataclass
    class Options(MethodOptions):
        lr: float = 1e-4
        rank: int = 8
        alpha: float | None = None  # None: 2 * rank
        target_modules: list[str] | str | None = field(default_factory=lambda: list(LLAMA_LINEAR))  # null: the same
        dropout: float = 0.0
        router: str = "hidden"  # hidden | tfidf
        router_batches: int = 16  # training batches per experience the router is fitted on
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            self.positive("rank", integer=True)
            self.one_of("router", ROUTERS)
            self.positive("router_batches", integer=True)
            self.between("dropout", 0, 1, high_open=True)
            self.alpha = float(self.alpha if self.alpha is not None else 2 * self.rank)
            t = self.target_modules
            self.target_modules = [t] if isinstance(t, str) else list(t or LLAMA_LINEAR)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.rank, self.alpha, self.targets, self.dropout = o.rank, o.alpha, o.target_modules, o.dropout
        self.router_kind, self.router_batches, self.seed = o.router, o.router_batches, o.seed
        self.router = Router(o.router)
        self.adapter_states: list[dict[str, torch.Tensor]] = []  # saved adapters, filled on resume
        self.valid_accuracy: list[float | None] = []
        self._wrapper: AdapterRouterModel | None = None
        self._pending: list[torch.Tensor] = []  # router batches gathered in the loop
        self._fit_in_loop = False
        self._cfg = None
        self._seen: list = []

    def _lora_config(self, model: nn.Module):
        """The LoRA config of every adapter (targets checked on the plain model, then reused)."""
        if self._cfg is None:
            self._cfg = lora_config(model, self.targets, self.rank, self.alpha, self.dropout, who="adapters")
        return copy.deepcopy(self._cfg)

    def _add_adapter(self, wrapper: AdapterRouterModel, k: int, cfg) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + k)
            wrapper.add_adapter(f"e{k}", cfg)

    def _rebuild(self, model: nn.Module) -> AdapterRouterModel:
        """A wrapper over a plain model with the saved adapters (resume)."""
        from peft import set_peft_model_state_dict

        freeze_all(model)
        wrapper = AdapterRouterModel(model, self.router)
        cfg = self._lora_config(model)
        for k, sd in enumerate(self.adapter_states):
            self._add_adapter(wrapper, k, cfg)
            set_peft_model_state_dict(wrapper.peft, sd, adapter_name=f"e{k}")
        return wrapper

    # --- hooks -----------------------------------------------------------------------
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        wrapper = model if isinstance(model, AdapterRouterModel) else self._rebuild(model)
        wrapper.set_experience(None)
        k = len(wrapper.names)
        self._add_adapter(wrapper, k, self._lora_config(wrapper.base))
        wrapper.training_adapter = f"e{k}"
        wrapper._activate(f"e{k}")
        params = wrapper.adapter_params(f"e{k}")
        self._optimizers = [adamw(params, lr=self.lr, weight_decay=0.0)]
        self._wrapper = wrapper
        exp = context.experience if context is not None else None
        self._seen = list(context.seen_experiences) if context is not None else []
        self._pending, self._fit_in_loop = [], False
        if len(self.router) == k:  # no statistics for this experience yet (not a re-run)
            if exp is not None and getattr(exp, "steps", 0):
                for i in spread_steps(exp.steps, self.router_batches):
                    self._observe(wrapper, exp.train_batch(i))
                self._fit_router()
            else:
                self._fit_in_loop = True
        return wrapper

    def _observe(self, wrapper: AdapterRouterModel, batch: dict) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.router.kind == "hidden":
            with wrapper.peft.disable_adapter():
                self._pending.append(pooled_representation(wrapper.base, ids, mask))
        else:
            self._pending.append(token_counts(ids, mask, wrapper.config.vocab_size))

    def _fit_router(self) -> None:
        if self._pending:
            rows = torch.cat(self._pending)
            self.router.add(rows, None) if self.router.kind == "hidden" else self.router.add(None, rows)
        self._pending, self._fit_in_loop = [], False

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if self._fit_in_loop and len(self._pending) < self.router_batches:  # router statistics from the loop
            self._observe(model, batch)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.adapter_forward(model.training_adapter, input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"])
        return shifted_cross_entropy(out.logits, batch["labels"])

    def export(self, model: nn.Module) -> nn.Module:
        if self._fit_in_loop:
            self._fit_router()
        model.training_adapter = None
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def after_experience(self, model: nn.Module, experience: Any) -> None:
        """Router accuracy on validation batches of the seen experiences (training data, not test)."""
        seen = self._seen
        if not seen:
            self.valid_accuracy.append(None)
            return
        right = total = 0
        for k, e in enumerate(seen):
            if e.valid_batch is None:
                continue
            b = e.valid_batch(0)
            names = model.routes(b["input_ids"], b.get("attention_mask"))
            right += sum(n == f"e{k}" for n in names)
            total += len(names)
        self.valid_accuracy.append(right / total if total else None)

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        """The plain base: a copy of the model with the LoRA layers removed (never merged)."""
        if isinstance(model, AdapterRouterModel):
            return copy.deepcopy(model.peft).unload() if model.peft is not None else model.base
        return model

    # --- state -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        out = nest("router", self.router.state())
        if self._wrapper is not None and self._wrapper.peft is not None:
            states = [get_peft_model_state_dict(self._wrapper.peft, adapter_name=n) for n in self._wrapper.names]
        else:
            states = self.adapter_states
        for k, sd in enumerate(states):
            out.update(nest(f"adapter.{k}", sd))
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.router = Router(self.router_kind)
        self.router.load(unnest("router", state))
        self.adapter_states = unnest_list("adapter", state)
        self._wrapper = None

    # --- reporting -------------------------------------------------------------------
    def growth(self) -> list[int]:
        """LoRA parameters added by each experience's adapter."""
        if self._wrapper is not None:
            return [sum(p.numel() for p in self._wrapper.adapter_params(n)) for n in self._wrapper.names]
        return [sum(v.numel() for v in sd.values()) for sd in self.adapter_states]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "growth": self.growth(), "router_valid_accuracy": self.valid_accuracy}


def router_inputs(stream, tokenizer, seq_len: int = 128) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Held-out inputs of every experience of a stream, as (experience index, encoded batch):
    domain: non-overlapping ``seq_len`` windows of the test tokens; facts: the question probes;
    task_il / class_il: the test prompts."""
    out = []
    for k, e in enumerate(stream.experiences):
        if stream.kind == "domain":
            n = (e.test.numel()) // seq_len
            ids = e.test[: n * seq_len].view(n, seq_len).long()
            out.append((k, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
            continue
        texts = [f.question for f in e.test] if stream.kind == "facts" else [p for p, _ in e.test]
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        out.append((k, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return out


@torch.no_grad()
def router_accuracy(route: Callable[[torch.Tensor, torch.Tensor], list], stream, tokenizer, seq_len: int = 128,
                    batch_size: int = 32) -> dict[str, Any]:
    """Fraction of held-out inputs (``router_inputs``) that ``route(input_ids, attention_mask)``
    sends to their own experience's adapter (``e<k>``, or index k), overall and per experience."""
    per, right_all, total = [], 0, 0
    for k, enc in router_inputs(stream, tokenizer, seq_len):
        right = 0
        n = enc["input_ids"].shape[0]
        for s in range(0, n, batch_size):
            got = route(enc["input_ids"][s:s + batch_size], enc["attention_mask"][s:s + batch_size])
            right += sum(g in (k, f"e{k}") for g in (got.tolist() if torch.is_tensor(got) else got))
        per.append(right / max(n, 1))
        right_all, total = right_all + right, total + n
    return {"accuracy": right_all / max(total, 1), "per_experience": per, "n": total}
