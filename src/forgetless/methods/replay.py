"""Experience replay: full fine-tuning on the current batch mixed with examples replayed from
a reservoir buffer of everything seen before (Chaudhry et al. 2019, "tiny episodic memories").

The buffer keeps at most ``buffer_size`` training sequences. Reservoir sampling (Vitter's
algorithm R) gives every sequence seen so far the same probability ``buffer_size / n_seen``
of being in the buffer, whatever the stream's length. Each step adds the current batch's
sequences to the buffer *after* replaying, and appends ``round(ratio * batch)`` replayed
sequences to the batch.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..errors import ConfigError
from .full import FullFinetune


class ReservoirBuffer:
    """Uniform sample of a stream of items, of fixed capacity (algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ConfigError("a replay buffer needs a capacity of at least 1.")
        self.capacity, self.rng = capacity, random.Random(seed)
        self.items: list = []
        self.seen = 0

    def add(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.capacity:
                self.items[j] = item

    def sample(self, n: int) -> list:
        return [self.items[self.rng.randrange(len(self.items))] for _ in range(n)] if self.items else []


def _pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(ids.numel() for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Replay(FullFinetune):
    name = "replay"

    def __init__(self, lr: float = 1e-5, buffer_size: int = 512, ratio: float = 0.5, seed: int = 0,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__(lr=lr, weight_decay=weight_decay, betas=betas)
        if ratio < 0:
            raise ConfigError("replay ratio must be >= 0.")
        self.hparams.update(buffer_size=buffer_size, ratio=ratio, seed=seed)
        self.buffer = ReservoirBuffer(buffer_size, seed)
        self.ratio = ratio

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = [(x[m.bool()], y[m.bool()]) for x, y, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
        replayed = self.buffer.sample(round(self.ratio * len(rows)))
        for r in rows:
            self.buffer.add(r)
        if not replayed:
            return super().loss(model, batch)
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        mixed = _pad_rows(rows + replayed, pad)
        device = batch["input_ids"].device
        return super().loss(model, {k: v.to(device) for k, v in mixed.items()})

    # the buffer (and its random state) is saved with a run's state, so a resumed run replays the same rows
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.buffer.items:
            return {}
        packed = _pad_rows(self.buffer.items, 0)
        version, internal, gauss = self.buffer.rng.getstate()
        return {"ids": packed["input_ids"], "labels": packed["labels"], "lengths": packed["attention_mask"].sum(1),
                "seen": torch.tensor([self.buffer.seen]),
                "rng": torch.tensor([version, *internal], dtype=torch.long)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        n = state["lengths"].tolist()
        self.buffer.items = [(state["ids"][i, :k].clone(), state["labels"][i, :k].clone()) for i, k in enumerate(n)]
        self.buffer.seen = int(state["seen"][0])
        r = state["rng"].tolist()
        self.buffer.rng.setstate((r[0], tuple(r[1:]), None))
