"""Model folders: config.json + model.safetensors (+ tokenizer, memory statistics, extras).

Never pickle. Loading rebuilds the architecture from config.json (re-inserting the memory
layers recorded there), then loads the weights *strictly*: a missing or unexpected key is an
error. (Hugging Face's ``from_pretrained`` would silently drop custom weights and rebuild a
random MLP; see the dependency notes.)

Writes are atomic: everything goes into a temporary sibling folder that is renamed into
place only when complete, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..files import (
    atomic_folder,
    recover,
    verify_checksums,
    write_checksums,
    write_json,
)

__all__ = ["CONFIG", "MEMORY_STATS", "MIX_PREFIX", "WEIGHTS", "atomic_folder", "build_from_config", "load_memory_stats",
           "load_model", "save_model", "write_json"]
from .cms import CMS_CONFIG_KEY, CMSConfig, add_cms
from .memory import CONFIG_KEY, MemoryPlacement, add_memory_layers, named_memory_layers

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MEMORY_STATS = "memory_stats.safetensors"
MIX_PREFIX = "pretrain_mix."  # key prefix in MEMORY_STATS: statistics over the whole pretraining mixture (general text + fact lines)


def _state_dict_for_save(model: nn.Module, values_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    value_keys = {name + ".values" for name in named_memory_layers(model)}
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen and v.shape == sd[seen[ptr]].shape:
            continue  # tied weight (e.g. lm_head = embed_tokens): stored once
        if ptr is not None:
            seen[ptr] = k
        t = v.detach()
        if values_dtype is not None and k in value_keys:
            t = t.to(values_dtype)
        out[k] = t.contiguous().cpu()
    return out


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    memory_stats: dict[str, torch.Tensor] | None = None,
    extra_json: dict[str, object] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    values_dtype: torch.dtype | None = None,
) -> Path:
    """Save a (memory-augmented) HF causal LM as a plain folder, atomically.

    ``values_dtype=torch.bfloat16`` stores memory value tables in bf16 (half the size);
    they are cast back to the model's dtype on load.
    """

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        save_file(_state_dict_for_save(model, values_dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if memory_stats:
            save_file({k: v.contiguous().cpu() for k, v in memory_stats.items()}, str(tmp / MEMORY_STATS))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        write_checksums(tmp, [WEIGHTS, MEMORY_STATS, "tokenizer.json"])

    return atomic_folder(out_dir, write, kind="model")


TITANS_CONFIG_KEY = "forgetless_titans"  # models/titans.py


def build_from_config(config_dict: dict) -> nn.Module:
    """Build an untrained HF causal LM (with its memory layers, then its CMS blocks) from a config.json dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(config_dict, dict):
        raise CheckpointError(f"config.json must hold a JSON object, not a {type(config_dict).__name__}.")
    d = dict(config_dict)
    placement = d.pop(CONFIG_KEY, None)
    cms = d.pop(CMS_CONFIG_KEY, None)
    titans = d.pop(TITANS_CONFIG_KEY, None)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type; this is not a Hugging Face model folder.")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"config.json names model_type {model_type!r}, which transformers cannot build "
                              f"({str(e).splitlines()[0][:120]}).") from None
    try:
        model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"config.json (model_type {model_type!r}) is not a causal language model "
                              f"({str(e).splitlines()[0][:120]}).") from None
    except (TypeError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"config.json has values transformers cannot build a model from ({e}).") from None
    try:
        if placement is not None:
            add_memory_layers(model, placement=MemoryPlacement.from_dict(placement))
        if cms is not None:
            add_cms(model, config=CMSConfig.from_dict(cms))
        if titans is not None:
            from .titans import TitansConfig, add_titans

            add_titans(model, config=TitansConfig.from_dict(titans))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"config.json: its memory, CMS or Titans section is invalid ({e}).") from None
    return model


INDEX = "model.safetensors.index.json"


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of a folder: model.safetensors, or the shards that model.safetensors.index.json names."""
    w_path, index_path = model_dir / WEIGHTS, model_dir / INDEX
    if w_path.is_file():
        files = [w_path]
    else:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index_path} is not a valid safetensors index (it needs a weight_map).") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir} is missing {len(missing)} of its {len(shards)} weight shards "
                                  f"({missing[0]}{', ...' if len(missing) > 1 else ''}); copy the whole folder again.")
        files = [model_dir / s for s in shards]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} cannot be read ({e}); the checkpoint is corrupt or truncated.") from None
    return state


def _check_causal_lm(config_dict: dict, model_dir: Path) -> None:
    """A folder saved from a model without a language-model head (``LlamaModel``, ``BertModel``) is refused."""
    archs = config_dict.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise CheckpointError(f"{model_dir} holds a {archs[0]}, which has no causal language-model head; "
                              f"forgetless needs a *ForCausalLM model (save it with AutoModelForCausalLM).")


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a folder written by ``save_model`` or by transformers' ``save_pretrained`` (one
    model.safetensors or several shards with their index); strict about every weight."""
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / CONFIG, model_dir / WEIGHTS
    recover(model_dir)  # a save that a crash interrupted: completed or rolled back first
    if not model_dir.exists():
        raise CheckpointError(f"model folder {model_dir} does not exist.")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is a file, not a model folder.")
    if not cfg_path.is_file() or not (w_path.is_file() or (model_dir / INDEX).is_file()):
        raise CheckpointError(f"{model_dir} is not a model folder: it needs {CONFIG} and {WEIGHTS} "
                              f"(or {INDEX} with its shards).")
    try:
        config_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt.") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object.")
    _check_causal_lm(config_dict, model_dir)
    if w_path.is_file():
        verify_checksums(model_dir, [WEIGHTS])
    state = _read_weights(model_dir)
    model = build_from_config(config_dict)
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
        "tie_word_embeddings", False)
    expected = set(model.state_dict())
    missing = expected - set(state)
    if tied:
        missing.discard("lm_head.weight")
    unexpected = set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{w_path} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    sd = model.state_dict()
    for k, v in state.items():
        if v.shape != sd[k].shape:
            raise CheckpointError(f"{w_path}: weight {k} has shape {tuple(v.shape)}, config expects {tuple(sd[k].shape)}.")
        if v.is_floating_point() and v.numel() and not torch.isfinite(v.abs().amax()):  # NaN and inf survive amax
            raise CheckpointError(f"{w_path}: weight {k} holds NaN or infinite values; the checkpoint is corrupt.")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    model.to(dtype)
    model.eval()
    return model


def load_memory_stats(model_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    path = Path(model_dir) / MEMORY_STATS
    if not path.is_file():
        return None
    verify_checksums(model_dir, [MEMORY_STATS])
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the checkpoint is corrupt.") from None
