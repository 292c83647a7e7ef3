"""Generative replay (LAMOL, Sun et al. 2020; self-synthesized rehearsal, Huang et al. 2024):
when the data of earlier experiences may not be kept, the model writes its own pseudo-examples
of them and replays those.

After each experience, the freshly trained model continues ``samples`` short *prompts* of
that experience by sampling (temperature ``temperature``, nucleus ``top_p``) up to the
length of the experience's training sequences; the generated sequences (prompt included)
go into a reservoir buffer of pseudo-examples. During later experiences, every batch gets
``round(ratio * batch)`` pseudo-examples appended, exactly as in experience replay.

Prompts: the first ``prompt_tokens`` tokens of the experience's training sequences (a
LAMOL task token would need the model to have learned to generate after it; these short
prefixes play that role). Only these prefixes of real data are kept, never whole examples;
``prompt_tokens: 0`` starts every pseudo-example from the beginning-of-text token alone
(the model's unconditional samples), which keeps no data at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.batches import batch_rows
from .base import MethodContext
from .replay import Replay


class GenerativeReplay(Replay):
    name = "generative_replay"
    needs_stream = True

    @dataclass
    class Options(Replay.Options):
        buffer_size: int = 1024  # pseudo-examples kept
        source: str = field(default="buffer", init=False)  # pseudo-examples only
        buffer_tokens: int | None = field(default=None, init=False)
        background_file: str | None = field(default=None, init=False)
        samples: int = 64  # pseudo-examples written after each experience
        prompt_tokens: int = 4  # real tokens each pseudo-example starts from (0: none)
        temperature: float = 1.0
        top_p: float = 0.95
        max_tokens: int = 128  # longest pseudo-example

        def validate(self) -> None:
            super().validate()
            self.positive("samples", integer=True)
            self.at_least("prompt_tokens", 0)
            self.positive("temperature")
            self.between("top_p", 0, 1, low_open=True)
            self.positive("max_tokens", integer=True)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.samples, self.prompt_tokens, self.temperature, self.top_p = o.samples, o.prompt_tokens, o.temperature, o.top_p
        self.max_tokens = o.max_tokens
        self._tok = None
        self.generated: list[str] = []  # the first pseudo-example of each experience, decoded

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self._tok = context.tokenizer
        return super().setup(model, context)

    def replay_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pseudo-examples only: the current batch's real rows never enter the buffer."""
        return self.buffer.sample(round(self.ratio * len(rows)))

    def prompts(self, experience) -> tuple[list[torch.Tensor], int]:
        """Prompts of an experience (prefixes of its training sequences) and the length to generate to."""
        rows, step = [], 0
        while len(rows) < self.samples and step < max(experience.steps, 1):
            rows += batch_rows(experience.train_batch(step))
            step += 1
        rows = (rows * (self.samples // max(len(rows), 1) + 1))[: self.samples]
        length = min(self.max_tokens, max(x.numel() for x, _ in rows))
        bos = self._tok.bos_token_id if self._tok.bos_token_id is not None else self._tok.eos_token_id
        if self.prompt_tokens == 0:
            return [torch.tensor([bos]) for _ in rows], length
        return [x[: self.prompt_tokens] for x, _ in rows], length

    @torch.no_grad()
    def after_experience(self, model: nn.Module, experience) -> None:
        if experience is None:
            return
        prompts, length = self.prompts(experience)
        g_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + self.buffer.seen)
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        pad = self._tok.pad_token_id
        width = max(p.numel() for p in prompts)
        for i in range(0, len(prompts), 32):
            chunk = prompts[i:i + 32]
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(chunk):  # left padding
                ids[b, width - p.numel():], mask[b, width - p.numel():] = p, 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=self.temperature, top_p=self.top_p, top_k=0,
                                 max_new_tokens=max(length - width, 1), pad_token_id=pad,
                                 eos_token_id=None)
            for b, p in enumerate(chunk):
                seq = out[b, width - p.numel():].cpu()
                self.buffer.add((seq.clone(), seq.clone()))
                if i == 0 and b == 0:  # the first pseudo-example of each experience, for the log
                    self.generated.append(self._tok.decode(seq[:48]))
        model.train(was)
        torch.random.set_rng_state(g_state)
