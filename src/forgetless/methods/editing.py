"""Knowledge editing: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023), closed-form edits of
the MLP down-projections of a Llama-style decoder.

An MLP's down-projection ``W`` (d_model x d_ff) is read as a linear associative memory: the
key k is its input at the *last token of the subject* (e.g. "...capital of Andorra"), the
value W k is what it writes into the residual stream there. An edit makes a chosen key map
to a new value while disturbing the keys the model usually sees as little as possible, with
the key covariance ``C = E[k k^T]`` estimated on background text (the model folder's
``background_text.jsonl``; computed once, cached as safetensors, see ``key_covariance``).

- **Edit prompts** (``edit_prompts``): the fact's *training* question templates and its
  statements cut before the answer (never the held-out probe wording).
- **Key** k*: the mean over the edit prompts of the layer's down-projection input at the
  subject's last token (the prompt's last token when the fact has no subject).
- **Target** (``optimise_delta``): a vector delta added to the down-projection output at
  the subject's last token of every prompt, found with Adam so that the model emits the new
  answer: mean NLL of the answer tokens + ``kl_weight`` x KL(original || edited) of the next
  token after "<subject> is a" (ROME's "essence" term) + ``weight_decay`` x |delta|^2/|v0|^2,
  |delta| clamped to ``clamp_norm`` x |v0| (v0: the mean output).
- **ROME** (one layer l, facts edited one after another): v* = W k* + delta and
  ``rome_update``: W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*). Then W' k* = v*
  exactly, and every key k with (C^-1 k*)^T k = 0 is unchanged.
- **MEMIT** (layers R = l_1..l_L, all facts of an experience in one batch): targets
  z_i = h_i + delta_i of the residual stream after layer l_L (delta optimised at l_L's MLP
  output). For each l in R in order: keys K (d_ff x n) at l with the current weights, the
  still-missing residual (z - h(l_L)) spread over the remaining layers, R_l = (z - h) / (L - i),
  and ``memit_delta``: Delta = R_l K^T (lam C + K K^T)^-1, the minimiser of
  |Delta K - R_l|^2 + lam tr(Delta C Delta^T).

Both are methods with ``trains = False``: the edit happens in ``setup`` (``fit_experience`` skips the
SGD loop), on the facts of the experience (``context.experience.facts``: set by the fact stream
and by ``forgetless learn`` / ``bench facts``). ``lr`` is the step size
of the delta optimisation. The edited model is a plain HF model; resuming needs no state.

Left out: ROME's random context prefixes for the key ("{random text}. <prompt>"), causal
tracing to choose the layer (defaults: ROME layer 1, MEMIT layers 0 and 1 of the 4-layer
base, whose layer 2 holds the product-key memory instead of an MLP), the second-moment
statistics from Wikipedia (ours: the model's background text), and MEMIT's chunking of very
large edit batches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataSourceError
from ..files import cache_dir
from .base import Method, MethodContext, MethodOptions

STATS_FILE = "editing_stats.safetensors"


# --------------------------------------------------------------------------- closed forms
def rome_update(W: torch.Tensor, C: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W' = W + (v - W k) (C^-1 k)^T / ((C^-1 k)^T k): W' k = v, keys C^-1-orthogonal to k unchanged."""
    u = torch.linalg.solve(C.double(), k.double())
    delta = torch.outer(v.double() - W.double() @ k.double(), u) / (u @ k.double())
    return (W.double() + delta).to(W.dtype)


def memit_delta(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """Delta = R K^T (lam C + K K^T)^-1 (K: d_in x n keys, R: d_out x n residuals): the minimiser
    of |Delta K - R|_F^2 + lam tr(Delta C Delta^T)."""
    K, R = K.double(), R.double()
    A = lam * C.double() + K @ K.T
    return (R @ torch.linalg.solve(A, K).T).to(C.dtype)


# --------------------------------------------------------------------------- the model's MLPs
def down_proj(model: nn.Module, layer: int) -> nn.Linear:
    from ..models.memory import decoder_layers

    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(f"editing layer {layer} does not exist; the model has {len(layers)} layers.")
    lin = getattr(getattr(layers[layer], "mlp", None), "down_proj", None)
    if not isinstance(lin, nn.Linear):
        raise ConfigError(f"layer {layer} has no plain MLP down_proj (e.g. it holds a memory layer); "
                          f"choose other editing layers.")
    return lin


def _fingerprint(model_dir: Path) -> str:
    w = Path(model_dir) / "model.safetensors"
    st = w.stat() if w.is_file() else None
    return f"{st.st_size}:{int(st.st_mtime)}" if st else "none"


def _stats_path(model_dir: Path) -> Path:
    """Beside the model when its folder is writable, else in the user's cache."""
    model_dir = Path(model_dir)
    if os.access(model_dir, os.W_OK):
        return model_dir / STATS_FILE
    return cache_dir("editing", hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:16], STATS_FILE)


@torch.no_grad()
def key_covariance(model: nn.Module, token_ids: torch.Tensor, layers: list[int], max_tokens: int,
                   seq_len: int = 128) -> dict[int, torch.Tensor]:
    """E[k k^T] of each layer's down-projection input over (at most) ``max_tokens`` tokens of text."""
    ids = token_ids[:max_tokens].tolist()
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    hooks = []
    for l in layers:
        lin = down_proj(model, l)

        def pre(mod, args, l=l):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[l] = sums.get(l, 0) + x.T @ x

        hooks.append(lin.register_forward_pre_hook(pre))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(ids), seq_len * 8):
            chunk = ids[s:s + seq_len * 8]
            n = len(chunk) // seq_len
            if n == 0:
                break
            x = torch.tensor(chunk[: n * seq_len], device=device).view(n, seq_len)
            model(input_ids=x, attention_mask=torch.ones_like(x))
            count[0] += x.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not count[0]:
        raise DataSourceError("the key covariance needs background text; none was found.")
    return {l: (sums[l] / count[0]).float() for l in layers}


def load_or_compute_covariance(model: nn.Module, tok, model_dir: Path | None, layers: list[int],
                               max_tokens: int) -> dict[int, torch.Tensor]:
    """The cached covariance of each layer (``editing_stats.safetensors``), computed if missing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..models.folder import load_background_ids

    if model_dir is None:
        raise ConfigError("knowledge editing needs the model folder (its background_text.jsonl).")
    path = _stats_path(model_dir)
    meta = {"model": _fingerprint(model_dir)}
    stored: dict[str, torch.Tensor] = {}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("model") == meta["model"]:
                stored = {k: f.get_tensor(k) for k in f.keys()}
    name = lambda l: f"cov.{max_tokens}.{l}"  # noqa: E731  (one entry per token budget and layer)
    missing = [l for l in layers if name(l) not in stored]
    if missing:
        ids = load_background_ids(Path(model_dir) / "background_text.jsonl", tok)
        stored.update({name(l): c for l, c in key_covariance(model, ids, missing, max_tokens).items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in sorted(stored.items())}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    have = {l: stored[name(l)] for l in layers}
    return {l: have[l] for l in layers}


# --------------------------------------------------------------------------- prompts of a fact
def edit_prompts(fact, limit: int = 8) -> list[tuple[str, str]]:
    """(prompt, target) pairs to edit a fact with: its training question templates, then its
    statements cut before the answer (never the held-out probes)."""
    from ..data.facts import QUESTIONS, question_lines

    out: list[tuple[str, str]] = []
    if fact.subject and fact.relation in QUESTIONS:
        for line in question_lines(fact):
            q, a = line.rsplit(" Answer: ", 1)
            out.append((q + " Answer:", " " + a + "\n"))
    for s in [fact.statement, *fact.paraphrases]:
        core = s.rstrip(".").rstrip()
        if core.endswith(fact.answer) and len(core) > len(fact.answer):
            out.append((core[: -len(fact.answer)].rstrip(), " " + fact.answer + "."))
    if not out:
        raise DataSourceError(f"fact {fact.id!r}: no statement ends with its answer, so it cannot be edited.")
    q = [p for p in out if p[0].startswith("Question:")]
    st = [p for p in out if not p[0].startswith("Question:")]
    mixed = [x for pair in zip(q, st) for x in pair] + q[len(st):] + st[len(q):]  # both kinds within the limit
    return mixed[:limit]


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    pos: torch.Tensor  # subject's last token in each row


def _subject_position(tok, prompt: str, subject: str) -> int:
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    at = prompt.rfind(subject) if subject else -1
    if at < 0:
        return n - 1
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    end = at + len(subject)
    last = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > at]
    return last[-1] if last else n - 1


def _batch(tok, pairs: list[tuple[str, str]], subject: str, device) -> _Batch:
    rows, labels, pos = [], [], []
    for p, t in pairs:
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ti = tok(t, add_special_tokens=False)["input_ids"]
        rows.append(pi + ti)
        labels.append([-100] * len(pi) + ti)
        pos.append(_subject_position(tok, p, subject))
    L = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, (r, y) in enumerate(zip(rows, labels)):
        ids[b, :len(r)], lab[b, :len(y)], mask[b, :len(r)] = torch.tensor(r), torch.tensor(y), 1
    return _Batch(ids.to(device), mask.to(device), lab.to(device), torch.tensor(pos, device=device))


class _AddAt:
    """A forward hook adding ``delta`` to a module's output at given (row, position) pairs."""

    def __init__(self, module: nn.Module):
        self.module, self.delta, self.pos, self.handle = module, None, None, None

    def __enter__(self):
        def hook(mod, args, out):
            if self.delta is None or self.pos is None:
                return out
            out = out.clone()
            out[torch.arange(out.shape[0], device=out.device), self.pos] += self.delta.to(out.dtype)
            return out

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def _residual(model, b: _Batch, layer: int) -> torch.Tensor:
    """Mean residual stream after decoder layer ``layer`` at the subject positions of a batch."""
    hs = model(input_ids=b.ids, attention_mask=b.mask, output_hidden_states=True).hidden_states[layer + 1]
    return hs[torch.arange(hs.shape[0], device=hs.device), b.pos].float().mean(0)


@torch.no_grad()
def _keys_and_outputs(model, lin: nn.Linear, b: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean input, mean output) of ``lin`` at the subject positions of a batch."""
    got = {}

    def hook(mod, args, out):
        r = torch.arange(out.shape[0], device=out.device)
        got["k"], got["v"] = args[0][r, b.pos].float(), out[r, b.pos].float()

    h = lin.register_forward_hook(hook)
    try:
        model(input_ids=b.ids, attention_mask=b.mask)
    finally:
        h.remove()
    return got["k"].mean(0), got["v"].mean(0)


def optimise_delta(model: nn.Module, tok, fact, lin: nn.Linear, steps: int, lr: float, prompts: int,
                   kl_weight: float, weight_decay: float, clamp_norm: float) -> tuple[torch.Tensor, dict]:
    """The vector added to ``lin``'s output at the subject's last token that makes the model emit
    the fact's answer after each edit prompt (module docstring); returns it and a small record."""
    device = next(model.parameters()).device
    b = _batch(tok, edit_prompts(fact, prompts), fact.subject, device)
    _, v0 = _keys_and_outputs(model, lin, b)
    essence = _batch(tok, [(f"{fact.subject} is a", " ")], fact.subject, device) if fact.subject and kl_weight else None
    was_grad = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was = model.training
    model.eval()
    ref = None
    if essence is not None:
        with torch.no_grad():
            n = int(essence.mask.sum()) - 1
            ref = model(input_ids=essence.ids[:, :n + 1], attention_mask=essence.mask[:, :n + 1]).logits[:, n - 1].float().log_softmax(-1)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    limit = clamp_norm * v0.norm()
    losses = []
    try:
        with _AddAt(lin) as add:
            for _ in range(steps):
                add.delta, add.pos = delta, b.pos
                logits = model(input_ids=b.ids, attention_mask=b.mask).logits[:, :-1].float()
                lab = b.labels[:, 1:]
                nll = nn.functional.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")
                nll = (nll.sum(1) / (lab != -100).sum(1)).mean()
                loss = nll + weight_decay * delta.pow(2).sum() / v0.pow(2).sum()
                if ref is not None:
                    add.pos = essence.pos
                    lp = model(input_ids=essence.ids[:, :n + 1], attention_mask=essence.mask[:, :n + 1]).logits[:, n - 1]
                    loss = loss + kl_weight * nn.functional.kl_div(lp.float().log_softmax(-1), ref, log_target=True,
                                                                   reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    if delta.norm() > limit:
                        delta.mul_(limit / delta.norm())
                losses.append(float(nll.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(was_grad[id(p)])
        model.train(was)
    return delta.detach(), {"nll_first": losses[0] if losses else None, "nll_last": losses[-1] if losses else None}


# --------------------------------------------------------------------------- the methods
@dataclass
class EditOptions(MethodOptions):
    lr: float = 1.0  # Adam step size of the target (delta) optimisation
    layers: list[int] | None = None  # the edited layers (None: rome [1], memit [0, 1])
    steps: int = 40  # optimisation steps per fact (ROME) or per edit batch (MEMIT)
    prompts: int = 8  # edit prompts per fact
    kl_weight: float = 0.0625
    weight_decay: float = 0.1
    clamp_norm: float = 4.0
    cov_tokens: int = 100_000  # background tokens for C = E[k k^T]
    cov_ridge: float = 1e-4  # C + ridge * mean(diag C) * I, so that C is safely invertible
    lam: float = 200.0  # MEMIT: weight of the covariance (keys to preserve) against the new keys (see the docs)

    def validate(self) -> None:
        super().validate()
        for k in ("steps", "prompts"):
            self.positive(k, integer=True)
        self.at_least("cov_tokens", 256)
        self.positive("lam")
        self.at_least("kl_weight", 0)
        self.at_least("weight_decay", 0)
        self.positive("clamp_norm")
        if self.layers is not None:
            self.layers = [int(l) for l in ([self.layers] if isinstance(self.layers, int) else self.layers)]
            self.require(bool(self.layers), "layers", "a non-empty list of decoder layers")


def _experience_facts(context: MethodContext) -> list:
    facts = getattr(context.experience, "facts", None)
    if facts is None:
        facts = context.extra.get("facts")
    if facts is None:
        raise ConfigError("knowledge editing edits facts: use it on a fact stream, `forgetless learn` or "
                          "`bench facts` (a domain or topic experience has no facts).")
    return list(facts)


class _Editor(Method):
    Options = EditOptions
    trains = False
    grad_clip = None
    default_layers = [1]

    def __init__(self, *args, **options: Any):
        super().__init__(*args, **options)
        self.opts = self.options
        if self.opts.layers is None:
            self.opts.layers = list(self.default_layers)
        self.edits = 0
        self.records: list[dict] = []

    def _covariances(self, model, context: MethodContext) -> dict[int, torch.Tensor]:
        covs = load_or_compute_covariance(model, context.tokenizer, context.model_dir, self.opts.layers,
                                          self.opts.cov_tokens)
        out = {}
        for l, C in covs.items():
            eye = torch.eye(C.shape[0], dtype=C.dtype)
            out[l] = C + self.opts.cov_ridge * C.diagonal().mean() * eye
        return out

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        if context.tokenizer is None:
            raise ConfigError(f"{self.name} needs the model's tokenizer in its context.")
        for l in self.opts.layers:
            down_proj(model, l)
        facts = _experience_facts(context)
        covs = self._covariances(model, context)
        for p in model.parameters():
            p.requires_grad_(False)
        self.edit(model, context.tokenizer, facts, covs)
        self.edits += len(facts)
        return model

    def edit(self, model, tok, facts, covs) -> None:
        raise NotImplementedError

    def trainable_params_per_step(self) -> int:
        return 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"edits": torch.tensor([self.edits])}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.edits = int(state["edits"].item()) if "edits" in state else 0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "edits": self.edits, "last_edits": self.records[-4:]}

    def _delta(self, model, tok, fact, lin):
        o = self.opts
        return optimise_delta(model, tok, fact, lin, o.steps, o.lr, o.prompts, o.kl_weight, o.weight_decay, o.clamp_norm)


class ROME(_Editor):
    """Rank-one edits of one layer's down-projection, one fact after another."""

    name = "rome"

    def edit(self, model, tok, facts, covs) -> None:
        layer = self.opts.layers[0]
        if len(self.opts.layers) != 1:
            raise ConfigError("rome edits one layer; give `layers: [l]` (memit spreads edits over several).")
        lin = down_proj(model, layer)
        device = lin.weight.device
        for fact in facts:
            delta, rec = self._delta(model, tok, fact, lin)
            b = _batch(tok, edit_prompts(fact, self.opts.prompts), fact.subject, device)
            k, _ = _keys_and_outputs(model, lin, b)
            with torch.no_grad():
                W = lin.weight.float()
                v = W @ k + delta
                lin.weight.copy_(rome_update(W, covs[layer].to(device), k, v).to(lin.weight.dtype))
            self.records.append({"fact": fact.id, **rec})


class MEMIT(_Editor):
    """All facts of an experience at once, spread over several layers by least squares."""

    name = "memit"
    default_layers = [0, 1]

    def edit(self, model, tok, facts, covs) -> None:
        layers = sorted(self.opts.layers)
        last = down_proj(model, layers[-1])
        device = last.weight.device
        batches = [_batch(tok, edit_prompts(f, self.opts.prompts), f.subject, device) for f in facts]
        Z = []
        for fact, b in zip(facts, batches):  # target residual after the last layer: h + delta
            delta, rec = self._delta(model, tok, fact, last)
            Z.append(_residual(model, b, layers[-1]) + delta)
            self.records.append({"fact": fact.id, **rec})
        Z = torch.stack(Z)
        for i, l in enumerate(layers):
            lin = down_proj(model, l)
            K = torch.stack([_keys_and_outputs(model, lin, b)[0] for b in batches])  # (n, d_ff)
            H = torch.stack([_residual(model, b, layers[-1]) for b in batches])  # (n, d)
            R = (Z - H) / (len(layers) - i)
            with torch.no_grad():
                D = memit_delta(K.T, R.T, covs[l].to(device), self.opts.lam)
                lin.weight.add_(D.to(lin.weight.dtype))
