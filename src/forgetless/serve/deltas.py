"""Version deltas: what an update changed, stored as safetensors, content-hashed, applied bit for bit.

Three kinds, chosen by the method:

- ``rows``  (sparse memory finetuning): for every tensor that changed, the indices of the changed
  rows and their new values (for SMF only memory value rows change);
- ``lora``  (LoRA): the adapter tensors A, B and the scaling of every adapted linear layer; applying
  adds ``scale * B @ A`` (computed in float64, rounded once) to the parent's weight;
- ``full``  (every other method): the whole state dict.

The candidate's weights are always *defined* as ``apply(parent, delta)``; so a version rebuilt
later from its chain of deltas has the same bytes, and the same ``weights_hash``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

KINDS = ("rows", "lora", "full")
SEP = "::"


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over name, dtype, shape and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def delta_kind(method_name: str) -> str:
    return {"smf": "rows", "lora": "lora"}.get(method_name, "full")


def row_delta(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Changed rows of every changed tensor (0-d tensors are stored whole)."""
    out: dict[str, torch.Tensor] = {}
    for k, new in child.items():
        old = parent[k]
        if torch.equal(old, new):
            continue
        if new.dim() == 0:
            out[f"{k}{SEP}full"] = new.clone()
            continue
        diff = (old != new).reshape(new.shape[0], -1).any(dim=1)
        rows = diff.nonzero().flatten()
        out[f"{k}{SEP}rows"] = rows.to(torch.int64)
        out[f"{k}{SEP}values"] = new[rows].clone()
    return out


def lora_delta(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (A, B, scaling) of every LoRA layer of a peft model, keyed by the plain
    model's weight name."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "scaling")) or "default" not in getattr(mod, "lora_A", {}):
            continue
        plain = name.removeprefix("base_model.model.") + ".weight"
        out[f"{plain}{SEP}lora_A"] = mod.lora_A["default"].weight.detach().clone()
        out[f"{plain}{SEP}lora_B"] = mod.lora_B["default"].weight.detach().clone()
        out[f"{plain}{SEP}scale"] = torch.tensor(float(mod.scaling["default"]), dtype=torch.float64)
    return out


def lora_with_rest(lora: dict[str, torch.Tensor], parent: dict[str, torch.Tensor],
                   merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors plus, whole, any non-adapted tensor that changed anyway (so no change
    is lost from a version)."""
    adapted = {k.rsplit(SEP, 1)[0] for k in lora}
    rest = {f"{k}{SEP}full": v.clone() for k, v in merged.items() if k not in adapted and not torch.equal(v, parent[k])}
    return {**lora, **rest}


def full_delta(child: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole state; a tensor equal to an earlier one (tied embeddings) is stored once, as an
    alias naming that earlier tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: list[str] = []
    for k, v in child.items():
        same = next((s for s in seen if child[s].shape == v.shape and child[s].dtype == v.dtype
                     and torch.equal(child[s], v)), None)
        if same is not None and v.numel() > 1:
            out[f"{k}{SEP}alias"] = torch.tensor(list(same.encode()), dtype=torch.uint8)
        else:
            out[f"{k}{SEP}full"] = v.clone()
            seen.append(k)
    return out


def apply_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A new state: ``state`` with ``delta`` applied (``state`` itself is left unchanged)."""
    out = dict(state)
    if kind == "full":
        for key, v in delta.items():
            name, part = key.rsplit(SEP, 1)
            if part == "full":
                out[name] = v.clone()
        for key, v in delta.items():
            name, part = key.rsplit(SEP, 1)
            if part == "alias":
                out[name] = out[bytes(v.tolist()).decode()].clone()
        return out
    if kind == "rows":
        for key, v in delta.items():
            name, part = key.rsplit(SEP, 1)
            if part == "full":
                out[name] = v.clone()
            elif part == "rows":
                t = state[name].clone()
                t[v] = delta[f"{name}{SEP}values"].to(t.dtype)
                out[name] = t
        return out
    if kind == "lora":
        for key, a in delta.items():
            name, part = key.rsplit(SEP, 1)
            if part == "full":  # anything else the training changed (none for plain LoRA)
                out[name] = a.clone()
            if part != "lora_A":
                continue
            b, scale = delta[f"{name}{SEP}lora_B"], delta[f"{name}{SEP}scale"]
            w = state[name]
            out[name] = (w.double() + (b.double() @ a.double()) * scale.double()).to(w.dtype)
        return out
    raise ValueError(f"unknown delta kind {kind!r}")


def tie_aware_load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` in place (tied weights stay tied: both names carry the same values)."""
    with torch.no_grad():
        sd = model.state_dict()
        for k, v in state.items():
            sd[k].copy_(v)
