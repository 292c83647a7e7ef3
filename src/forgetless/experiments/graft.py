"""Graft product-key memory layers onto a pretrained model (``forgetless graft``).

1. A memory is added *beside* the MLP of the chosen decoder layers (``mode="parallel"``) with zero
   values, so the grafted model computes exactly what the pretrained one did.
2. Warm-up: only the memory's own parameters are trained (values with SparseAdam; query projection, sub-keys,
   gate and output projection with AdamW); every pretrained weight stays frozen, embeddings and norms
   included. The loss is next-token prediction on offline text: ``background_text.jsonl`` (the model
   folder's, else the shipped sample of general text) or a JSONL file given with ``text``.
3. Background slot statistics (``evaluate.slots.collect_background``) are collected on that same text and
   stored both as the general and as the "mix" background (a grafted model has no pretraining mixture of
   its own), so ``forgetless learn --method smf`` can rank slots by TF-IDF.
4. The result is saved as a forgetless model folder (config.json records the memory placement).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.batches import lm_batch
from ..errors import ConfigError, DataSourceError
from ..evaluate.slots import collect_background
from ..models.checkpoint import MIX_PREFIX, save_model
from ..models.folder import eval_file, load_background_ids, open_model
from ..models.memory import (
    MemoryConfig,
    MemoryPlacement,
    add_memory_layers,
    decoder_layers,
    memory_layers,
    named_memory_layers,
)
from ..training.optim import LazyAdam, adamw


@dataclass
class GraftConfig:
    steps: int = 200
    layers: list[int] = field(default_factory=list)  # empty: the middle decoder layer
    n_keys: int = 256  # n_keys^2 slots
    heads: int = 4
    knn: int = 32
    k_dim: int = 128
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3  # query, keys, gate, output projection (AdamW)
    values_lr: float = 1e-2  # value table (SparseAdam)
    stats_batches: int = 16  # batches of background statistics
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # autocast on CUDA


def memory_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for m in memory_layers(model) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def graft_memory(model_dir: str | Path, out_dir: str | Path, cfg: GraftConfig, text: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Graft, warm up, collect statistics and save (see the module docstring); returns the record."""
    torch.manual_seed(cfg.seed)
    model, tok = open_model(model_dir, device=cfg.device)
    present = named_memory_layers(model)
    if present:  # a model folder records one memory placement: the grafted one would replace it
        raise ConfigError(f"{model_dir} already has memory layers ({', '.join(present)}); graft onto a model "
                          "without memory layers (its config can hold one placement only).")
    n_layers = len(decoder_layers(model))
    layers = cfg.layers or [n_layers // 2]
    mem_cfg = MemoryConfig(n_keys=cfg.n_keys, heads=cfg.heads, knn=min(cfg.knn, cfg.n_keys), k_dim=cfg.k_dim)
    add_memory_layers(model, placement=MemoryPlacement(layers=layers, mode="parallel", memory=mem_cfg))
    mem = memory_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in mem.values():
        p.requires_grad_(True)
    text_path = Path(text) if text else eval_file(model_dir, "background_text.jsonl", "grafting")
    ids = load_background_ids(text_path, tok)
    if ids.numel() <= cfg.seq_len + 1:
        raise DataSourceError(f"{text_path} is shorter than one window of {cfg.seq_len} tokens.")
    values = [p for n, p in mem.items() if n.endswith(".values")]
    dense = [p for n, p in mem.items() if not n.endswith(".values")]
    opts = [adamw(dense, lr=cfg.lr, weight_decay=0.0)]
    sparse = any(m.config.sparse_values for m in memory_layers(model))
    opts.append(LazyAdam(values, lr=cfg.values_lr) if sparse else adamw(values, lr=cfg.values_lr))
    model.train()
    losses, t0 = [], time.time()
    use_bf16 = cfg.bf16 and cfg.device.startswith("cuda")
    for step in range(cfg.steps):
        batch = {k: v.to(cfg.device) for k, v in lm_batch(ids, cfg.seq_len, cfg.batch_size, cfg.seed + step).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
        if step % max(cfg.steps // 10, 1) == 0 or step == cfg.steps - 1:
            log(f"graft step {step + 1}/{cfg.steps}: loss {loss.item():.3f}")
    seconds = time.time() - t0
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    model.eval()
    stats_batches = (lm_batch(ids, cfg.seq_len, cfg.batch_size, 10_000_000 + cfg.seed + i)["input_ids"]
                     for i in range(cfg.stats_batches))
    stats = collect_background(model, stats_batches)
    stats.update({MIX_PREFIX + k: v.clone() for k, v in stats.items()})
    record = {"source_model": str(model_dir), "text": str(text_path), **asdict(cfg), "layers": layers,
              "trained": "memory parameters only (values, sub-keys, query, gate, output projection)",
              "memory_parameters": sum(p.numel() for p in mem.values()),
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}
    save_model(model, out_dir, tokenizer=tok, memory_stats=stats, extra_json={"graft_record.json": record})
    log(f"grafted {len(layers)} memory layer(s) ({record['memory_parameters']:,} parameters) at {layers}; "
        f"{tokens:,} tokens in {seconds:.0f} s ({record['tokens_per_second']:.0f} tokens/s); written to {out_dir}")
    return record
