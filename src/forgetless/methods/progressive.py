"""Progressive networks (Rusu et al. 2016) for a decoder LM: one new column per experience, with
lateral connections from the frozen earlier columns; the base and every earlier column never change.

The frozen base is column "0". Experience k (0-based) adds column k: at each decoder layer i (of
``layers``, default all) a narrow per-token MLP of ``width`` units reads the layer's output h_i
and the previous layer's activations of every earlier column, and writes back into the residual
stream:

    a_i^k = act( D_i^k rms(h_i) + sum_{j<k} U_i^{k,j} a_{i-1}^j )     (no lateral term at the first layer)
    h_i  <- h_i + V_i^k a_i^k

with rms(h) = h / sqrt(mean(h^2) + 1e-6) (no parameters), act = SiLU, D with bias, U and V
without. Only the *selected* column writes into the stream; the earlier columns j < k are
computed alongside (each from its own D and laterals, on the same stream) and feed column k
through the laterals U (Rusu's "lateral connections": column k may reuse the features of
columns 0..k-1; column 0, the base, is reached through h_i itself). V^k starts at zero, so a new
column begins as the base model; D and U start as PyTorch's default linear initialisation,
seeded by ``seed`` and k, so a resumed run rebuilds exactly the same columns.

Only column k trains during experience k (AdamW, no weight decay), and column j's output uses
only the base and columns 0..j: once trained, experience j's function is fixed bit for bit
(``tests/test_methods_15a.py`` checks ``torch.equal`` on the logits after later experiences).

Choosing the column (the exported ``ProgressiveModel``):

- told the experience (``set_experience(j)``, task-incremental streams): column j (the bare
  base if column j does not exist yet);
- otherwise the router of ``methods/adapters.py`` (``router: hidden``, nearest centroid of the
  base's mean last hidden state, or ``tfidf``), fitted from ``router_batches`` training
  batches spread over the experience's steps; one column per input sequence.

Parameter growth: column k has L (d w + w + w d) + (L - 1) k w^2 parameters (L layers, width w,
model width d): linear in the number of experiences plus the laterals' quadratic term.
``growth()`` (in ``describe()``) lists each column's parameter count.

Left out: adapters on the lateral connections (Rusu's non-linear lateral adapters with a
learned scale), columns with their own attention, and a per-column output head (the frozen LM
head is shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..training.optim import adamw
from .adapters import ROUTERS, Router, pooled_representation, spread_steps, token_counts
from .base import (
    Method,
    MethodContext,
    MethodOptions,
    freeze_all,
    shifted_cross_entropy,
)


@dataclass
class Options(MethodOptions):
    lr: float = 1e-3
    width: int = 64  # units per layer of each column
    layers: list[int] | None = None  # decoder layers with a column MLP (default: all)
    router: str = "hidden"  # hidden | tfidf (streams that do not give the experience)
    router_batches: int = 16
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self.positive("width", integer=True)
        self.one_of("router", ROUTERS)
        self.positive("router_batches", integer=True)
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
            self.require(bool(self.layers), "layers", "at least one decoder layer")


def rms(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps).to(h.dtype)


class Column(nn.Module):
    """Column k: per chosen layer, D (d -> w, bias), V (w -> d, zero init) and laterals U from the
    k earlier columns' previous-layer activations (none at the first chosen layer)."""

    def __init__(self, n_layers: int, d: int, width: int, n_prev: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(d, width) for _ in range(n_layers))
        self.up = nn.ModuleList(nn.Linear(width, d, bias=False) for _ in range(n_layers))
        self.lateral = nn.ModuleList(
            nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(n_prev if i > 0 else 0))
            for i in range(n_layers))
        for up in self.up:
            nn.init.zeros_(up.weight)

    def activation(self, i: int, x: torch.Tensor, prev: list[torch.Tensor] | None) -> torch.Tensor:
        pre = self.down[i](x)
        if i > 0 and prev is not None:
            for u, a in zip(self.lateral[i], prev):
                pre = pre + u(a)
        return nn.functional.silu(pre)


class ProgressiveModel(nn.Module):
    """The frozen base with its columns: ``forward``/``generate`` like an HF model, one column per sequence."""

    def __init__(self, base: nn.Module, layer_ids: list[int], router: Router, width: int):
        super().__init__()
        self.base = base
        self.width = width
        self.columns = nn.ModuleList()
        self.layer_ids = layer_ids
        self.router = router
        self.experience: int | None = None
        self._active: int | None = None  # the column writing into the stream during a forward
        self._prev: list[torch.Tensor] | None = None
        layers = _decoder_layers(base)
        self._hooks = [layers[l].register_forward_hook(self._hook(i)) for i, l in enumerate(layer_ids)]

    @property
    def config(self):
        return self.base.config

    def _hook(self, i: int):
        def hook(module, args, output):
            if self._active is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            x = rms(h)
            prev = self._prev if i > 0 else None
            acts = [self.columns[c].activation(i, x, prev) for c in range(self._active + 1)]
            self._prev = acts
            h = h + self.columns[self._active].up[i](acts[-1])
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def add_column(self, seed: int) -> None:
        k = len(self.columns)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            col = Column(len(self.layer_ids), self.base.config.hidden_size, self.width, k)
        p = next(self.base.parameters())
        self.columns.append(col.to(device=p.device, dtype=p.dtype))

    def column_forward(self, c: int | None, **kwargs):
        """A forward with column c writing into the stream (``None``: the bare base)."""
        self._active, self._prev = c, None
        try:
            return self.base(**kwargs)
        finally:
            self._active, self._prev = None, None

    def set_experience(self, j: int | None) -> None:
        self.experience = j

    @torch.no_grad()
    def routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int | None]:
        n = input_ids.shape[0]
        K = len(self.columns)
        if self.experience is not None:
            return [self.experience if self.experience < K else None] * n
        if not K:
            return [None] * n
        if len(self.router) < 2:
            return [0] * n
        reps = counts = None
        if self.router.kind == "hidden":
            reps = pooled_representation(self.base, input_ids, attention_mask)  # columns off: the base's view
        else:
            counts = token_counts(input_ids, attention_mask, self.config.vocab_size)
        return [min(k, K - 1) for k in self.router.route(reps, counts).tolist()]

    def _groups(self, input_ids, attention_mask) -> dict[int | None, torch.Tensor]:
        groups: dict[int | None, list[int]] = {}
        for i, c in enumerate(self.routes(input_ids, attention_mask)):
            groups.setdefault(c, []).append(i)
        return {c: torch.tensor(rows, device=input_ids.device) for c, rows in groups.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        groups = self._groups(input_ids, attention_mask)
        if len(groups) == 1:
            return self.column_forward(next(iter(groups)), input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = None
        for c, rows in groups.items():
            sub = {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == input_ids.shape[:1] else v) for k, v in kwargs.items()}
            out = self.column_forward(c, input_ids=input_ids[rows], attention_mask=attention_mask[rows], **sub)
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
        groups = self._groups(input_ids, attention_mask)
        outs = {}
        for c, rows in groups.items():
            self._active = c
            try:
                outs[c] = self.base.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs)
            finally:
                self._active, self._prev = None, None
        width = max(o.shape[1] for o in outs.values())
        result = input_ids.new_full((input_ids.shape[0], width), int(pad))
        for c, rows in groups.items():
            result[rows, : outs[c].shape[1]] = outs[c]
        return result


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, model) if prefix else model
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError("progressive needs a decoder LM with a `layers` list (a Llama-style model).")
    return layers


def column_params(n_layers: int, d: int, width: int, k: int) -> int:
    """Parameters of column k (0-based): L (d w + w + w d) + (L - 1) k w^2."""
    return n_layers * (2 * d * width + width) + max(n_layers - 1, 0) * k * width * width


class ProgressiveNetworks(Method):
    name = "progressive"
    options_cls = Options

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self.opts = self.options
        self.router = Router(self.opts.router)
        self.column_states: list[dict[str, torch.Tensor]] = []  # saved columns, filled on resume
        self.valid_accuracy: list[float | None] = []
        self._wrapper: ProgressiveModel | None = None
        self._pending: list[torch.Tensor] = []
        self._fit_in_loop = False
        self._seen: list = []
        self._training: int | None = None

    def _layer_ids(self, model: nn.Module) -> list[int]:
        n = len(_decoder_layers(model))
        ids = self.opts.layers if self.opts.layers is not None else list(range(n))
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ConfigError(f"progressive layers {bad} do not exist; the model has decoder layers 0..{n - 1}.")
        return ids

    def _new_wrapper(self, model: nn.Module) -> ProgressiveModel:
        freeze_all(model)
        return ProgressiveModel(model, self._layer_ids(model), self.router, self.opts.width)

    def _add(self, wrapper: ProgressiveModel) -> None:
        wrapper.add_column(self.opts.seed * 1_000_003 + len(wrapper.columns))

    def _rebuild(self, model: nn.Module) -> ProgressiveModel:
        wrapper = self._new_wrapper(model)
        for sd in self.column_states:
            self._add(wrapper)
            wrapper.columns[-1].load_state_dict(sd)
        for p in wrapper.columns.parameters():
            p.requires_grad_(False)
        return wrapper

    # --- hooks -----------------------------------------------------------------------
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        wrapper = model if isinstance(model, ProgressiveModel) else self._rebuild(model)
        wrapper.set_experience(None)
        k = len(wrapper.columns)
        self._add(wrapper)
        for p in wrapper.columns.parameters():
            p.requires_grad_(False)
        params = list(wrapper.columns[k].parameters())
        for p in params:
            p.requires_grad_(True)
        self._optimizers = [adamw(params, lr=self.lr, weight_decay=0.0)]
        self._wrapper, self._training = wrapper, k
        exp = context.experience if context is not None else None
        self._seen = list(context.seen_experiences) if context is not None else []
        self._pending, self._fit_in_loop = [], False
        if len(self.router) == k:
            if exp is not None and getattr(exp, "steps", 0):
                for i in spread_steps(exp.steps, self.opts.router_batches):
                    self._observe(wrapper, exp.train_batch(i))
                self._fit_router()
            else:
                self._fit_in_loop = True
        return wrapper

    def _observe(self, wrapper: ProgressiveModel, batch: dict) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if self.router.kind == "hidden":
            self._pending.append(pooled_representation(wrapper.base, ids, mask))
        else:
            self._pending.append(token_counts(ids, mask, wrapper.config.vocab_size))

    def _fit_router(self) -> None:
        if self._pending:
            rows = torch.cat(self._pending)
            self.router.add(rows, None) if self.router.kind == "hidden" else self.router.add(None, rows)
        self._pending, self._fit_in_loop = [], False

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if self._fit_in_loop and len(self._pending) < self.opts.router_batches:  # router statistics from the loop
            self._observe(model, batch)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.column_forward(self._training, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return shifted_cross_entropy(out.logits, batch["labels"])

    def export(self, model: nn.Module) -> nn.Module:
        if self._fit_in_loop:
            self._fit_router()
        for p in model.parameters():
            p.requires_grad_(False)
        self._training = None
        return model

    def after_experience(self, model: nn.Module, experience: Any) -> None:
        """Router accuracy on validation batches of the seen experiences (training data, not test)."""
        right = total = 0
        for k, e in enumerate(self._seen):
            if e.valid_batch is None:
                continue
            b = e.valid_batch(0)
            got = model.routes(b["input_ids"], b.get("attention_mask"))
            right += sum(g == k for g in got)
            total += len(got)
        self.valid_accuracy.append(right / total if total else None)

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        return model.base if isinstance(model, ProgressiveModel) else model

    def trainable_params_per_step(self) -> int:
        return sum(p.numel() for opt in self._optimizers for g in opt.param_groups for p in g["params"])

    # --- state -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"router.{k}": v for k, v in self.router.state().items()}
        states = ([c.state_dict() for c in self._wrapper.columns] if self._wrapper is not None
                  else self.column_states)
        for k, sd in enumerate(states):
            out.update({f"column.{k}.{key}": v for key, v in sd.items()})
        if self.valid_accuracy:  # None (no validation batches) saved as NaN
            out["valid_accuracy"] = torch.tensor([math.nan if a is None else a for a in self.valid_accuracy],
                                                 dtype=torch.float64)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.router = Router(self.opts.router)
        self.router.load({k[len("router."):]: v for k, v in state.items() if k.startswith("router.")})
        n = len({int(k.split(".", 2)[1]) for k in state if k.startswith("column.")})
        self.column_states = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"column.{i}.")}
                              for i in range(n)]
        acc = state["valid_accuracy"].tolist() if "valid_accuracy" in state else []
        self.valid_accuracy = [None if math.isnan(a) else a for a in acc]
        self._wrapper = None

    # --- reporting -------------------------------------------------------------------
    def growth(self) -> list[int]:
        """Parameters added by each experience's column."""
        if self._wrapper is not None:
            return [sum(p.numel() for p in c.parameters()) for c in self._wrapper.columns]
        return [sum(v.numel() for v in sd.values()) for sd in self.column_states]

    def describe(self) -> dict[str, Any]:
        base = sum(p.numel() for p in self._wrapper.base.parameters()) if self._wrapper is not None else None
        return {**super().describe(), "growth": self.growth(), "base_params": base,
                "router_valid_accuracy": self.valid_accuracy}
