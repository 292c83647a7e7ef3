"""Experience replay: full fine-tuning on the current batch mixed with replayed sequences
(Chaudhry et al. 2019, "tiny episodic memories"), from one of two sources (``source``):

- ``buffer`` (default): a reservoir buffer of the stream's own past training sequences. It
  keeps at most ``buffer_size`` sequences; reservoir sampling (Vitter's algorithm R) gives
  every sequence seen so far the same probability ``buffer_size / n_seen`` of being in the
  buffer, whatever the stream's length. Each step adds the current batch's sequences to the
  buffer *after* replaying. ``buffer_tokens`` gives the size in tokens instead: the capacity
  in sequences becomes ``buffer_tokens // mean length`` of the first batch's sequences.
- ``background``: windows of the base model's *pretraining* text (``background_text.jsonl``
  next to the model, a seeded sample of its training split written by
  ``scripts/sample_background.py``, or any JSONL of ``{"text": ...}`` given as
  ``background_file``). This is the variant the seeds recommend for language models: it
  protects general ability without storing any of the stream's data.
- ``both``: half of the replayed sequences from each.

``round(ratio * batch)`` replayed sequences are appended to every batch (background windows
have the current batch's width). The buffer, its random state and the count of background
draws are saved with a run's state, so a resumed run replays exactly the same sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.batches import batch_rows, pad_rows
from ..errors import ConfigError
from ..models.folder import eval_file, load_background_ids
from .base import MethodContext
from .full import FullFinetune

BACKGROUND_FILE = "background_text.jsonl"
SOURCES = ("buffer", "background", "both")


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

    # saved without pickle: rows padded into tensors, the random state as integers
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.items:
            return {}
        packed = pad_rows(self.items, 0)
        version, internal, _ = self.rng.getstate()
        return {"ids": packed["input_ids"], "labels": packed["labels"], "lengths": packed["attention_mask"].sum(1),
                "seen": torch.tensor([self.seen]), "rng": torch.tensor([version, *internal], dtype=torch.long)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if "ids" not in state:
            return
        n = state["lengths"].tolist()
        self.items = [(state["ids"][i, :k].clone(), state["labels"][i, :k].clone()) for i, k in enumerate(n)]
        self.seen = int(state["seen"][0])
        r = state["rng"].tolist()
        self.rng.setstate((r[0], tuple(r[1:]), None))


class Replay(FullFinetune):
    name = "replay"

    @dataclass
    class Options(FullFinetune.Options):
        buffer_size: int = 512  # sequences kept (reservoir sampling)
        ratio: float = 0.5  # replayed sequences per sequence of the batch
        source: str = "buffer"  # buffer | background | both
        buffer_tokens: int | None = None  # the buffer's size in tokens instead (capacity from the first batch)
        background_file: str | None = None  # JSONL of {"text": ...} (default: the model's background_text.jsonl)
        seed: int = 0

        def validate(self) -> None:
            super().validate()
            self.positive("buffer_size", integer=True)
            self.at_least("ratio", 0)
            self.one_of("source", SOURCES)
            if self.buffer_tokens is not None:
                self.positive("buffer_tokens", integer=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.buffer_tokens = o.buffer_tokens
        self.buffer = ReservoirBuffer(o.buffer_size, o.seed)
        self.ratio, self.source, self.seed = o.ratio, o.source, o.seed
        self.background_file = o.background_file
        self._background: torch.Tensor | None = None
        self._bg_draws = 0

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        if self.source != "buffer" and self._background is None:
            path = (Path(self.background_file) if self.background_file
                    else eval_file(context.model_dir, BACKGROUND_FILE, "background replay"))
            self._background = load_background_ids(path, context.tokenizer)
        return super().setup(model, context)

    def _background_rows(self, n: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = self._background
        width = min(width, ids.numel() - 1)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._bg_draws)
        self._bg_draws += 1
        starts = torch.randint(0, ids.numel() - width, (n,), generator=g).tolist()
        return [(ids[s:s + width].clone(), ids[s:s + width].clone()) for s in starts]

    def replay_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The replayed rows for a batch of ``rows`` (and the buffer update)."""
        n = round(self.ratio * len(rows))
        n_bg = {"buffer": 0, "background": n, "both": n // 2}[self.source]
        replayed = self.buffer.sample(n - n_bg) if self.source != "background" else []
        if n_bg:
            replayed += self._background_rows(n_bg, max(x.numel() for x, _ in rows))
        if self.source != "background":
            if self.buffer_tokens and self.buffer.seen == 0:  # a token budget: capacity from the first batch
                mean_len = sum(x.numel() for x, _ in rows) / len(rows)
                self.buffer.capacity = max(1, int(self.buffer_tokens // mean_len))
            for r in rows:
                self.buffer.add(r)
        return replayed

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The batch with replayed rows mixed in; the batch's own rows enter the buffer."""
        rows = batch_rows(batch)
        replayed = self.replay_rows(rows)
        if not replayed:
            return batch
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        mixed = pad_rows(rows + replayed, pad)
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in mixed.items()}

    def describe(self) -> dict:
        out = super().describe()
        if self.buffer_tokens:  # the capacity in sequences that the token budget gave
            out["buffer_size"] = self.buffer.capacity
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = self.buffer.state_tensors()
        if self._bg_draws:
            out["background_draws"] = torch.tensor([self._bg_draws])
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_tensors(state)
        if "background_draws" in state:
            self._bg_draws = int(state["background_draws"][0])
