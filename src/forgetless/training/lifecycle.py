"""The one experience lifecycle: every caller (``forgetless run``, ``learn``, ``bench facts``, the
service, benchmarks, scripts and tests) runs an experience through ``fit_experience``.

For a method ``m`` with plugins ``p1..pn`` (add-ons with the same hook names, e.g. continual
backprop), one experience is::

    freeze the memory layers' query statistics          (fine-tuning never moves every lookup)
    context.experience, .experience_index, .seen_experiences are set
    model = m.setup(model, context); p.setup(model, context, m)        for each plugin p
    for step in range(experience.steps):                                 (skipped if not m.trains)
        batch = m.before_batch(model, batch_fn(step), step); p.before_batch(...)   side effects here
        loss  = m.loss(model, batch)                                     pure: no side effects
        loss.backward(); m.after_backward(model, step); p.after_backward(model, step)
        clip dense gradients, optimizer steps
        m.after_step(model, step); p.after_step(model, step)
    p.teardown()                                                         (also when training fails)
    model = m.export(model); model.eval()
    m.after_experience(model, experience); p.after_experience(model, experience)

What a method or plugin keeps between experiences is in ``state_tensors()`` (saved without pickle
by the runner, plugins under ``plugins.<name>.``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from ..errors import TrainingError
from ..models.checkpoint import load_memory_stats
from ..models.memory import freeze_query_stats
from ..models.precision import autocast_dtype
from .loop import LoopResult, train_loop


@dataclass
class Experience:
    """One unit of a stream: training batches by step, a test set, and validation batches drawn
    from the *training* data (never the test set) for methods that choose a setting per experience."""

    name: str
    train_batch: Callable[[int], dict]  # step within the experience -> batch
    steps: int
    test: Any = None  # what the stream's scorer needs
    info: dict = field(default_factory=dict)
    valid_batch: Callable[[int], dict] | None = None
    facts: list | None = None  # fact streams: the experience's facts (for methods that edit them directly)
    skip: Callable[[nn.Module, int], bool] | None = None  # (model, step) -> leave this step out (e.g. fact already learned)


@dataclass
class MethodContext:
    """What a method may use: the model folder (background statistics, data files), the tokenizer,
    and the experience being learned with its index and the experiences seen so far (1..k+1)."""

    model_dir: Path | None = None
    tokenizer: Any = None
    memory_stats: dict[str, torch.Tensor] | None = None
    experience: Experience | None = None
    experience_index: int = 0
    seen_experiences: list[Experience] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form additions of a caller

    @classmethod
    def for_folder(cls, model_dir: str | Path, tokenizer) -> "MethodContext":
        return cls(model_dir=Path(model_dir), tokenizer=tokenizer, memory_stats=load_memory_stats(model_dir))


class Hooks(Protocol):  # what fit_experience calls on a method (see methods.base.Method)
    name: str
    trains: bool
    grad_clip: float | None
    plugins: list

    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module: ...
    def optimizers(self) -> list[torch.optim.Optimizer]: ...
    def before_batch(self, model: nn.Module, batch: dict, step: int) -> dict: ...
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor: ...
    def after_backward(self, model: nn.Module, step: int) -> None: ...
    def after_step(self, model: nn.Module, step: int) -> None: ...
    def export(self, model: nn.Module) -> nn.Module: ...
    def after_experience(self, model: nn.Module, experience: Any) -> None: ...
    def trainable_params_per_step(self) -> int: ...


@dataclass
class FitResult:
    model: nn.Module  # the exported model (a plain HF model or a wrapper), in eval mode
    trainable_params: int  # parameters an optimizer step may change
    steps: int
    train_seconds: float  # the loop, without on_eval time
    eval_seconds: float  # time spent in on_eval
    loop: LoopResult | None = None
    setup_seconds: float = 0.0  # the method's (and plugins') setup


def fit_experience(method: Hooks, model: nn.Module, context: MethodContext, experience: Experience,
                   index: int = 0, seen: list[Experience] | None = None,
                   on_eval: Callable[[nn.Module, int], None] | None = None, eval_every: int = 0,
                   progress: bool = True, desc: str | None = None, bf16: bool | None = None,
                   train: bool = True) -> FitResult:
    """Run one experience with ``method`` (and its plugins); returns the exported model and figures.
    ``on_eval(model, step)`` is called every ``eval_every`` steps and at the end of the loop, on the
    model being trained (before export). ``train=False`` skips the loop (setup, export and
    after_experience only, e.g. to build a router over untrained adapters).

    The model may be on any device: every batch the method sees (in the loop and through the
    experiences in its context) is moved there. ``bf16=None`` chooses bf16 autocast where the device
    computes bf16 natively (``models.precision``)."""
    freeze_query_stats(model)
    device = next(model.parameters()).device
    if bf16 is None:
        bf16 = autocast_dtype(device) is not None
    if device.type != "cpu":
        experience = on_device(experience, device)
        seen = [on_device(e, device) for e in seen] if seen is not None else None
    context.experience, context.experience_index = experience, index
    context.seen_experiences = list(seen) if seen is not None else [experience]
    plugins = list(getattr(method, "plugins", []) or [])
    t_setup = time.time()
    model = method.setup(model, context)
    for p in plugins:
        p.setup(model, context, method)
    setup_seconds = time.time() - t_setup
    eval_time = [0.0]
    loop = None
    t0 = time.time()
    try:
        if train and method.trains and experience.steps > 0:
            def batch_fn(step: int) -> dict:
                batch = method.before_batch(model, experience.train_batch(step), step)
                for p in plugins:
                    p.before_batch(model, batch, step)
                return batch

            def after_backward(step: int) -> None:
                method.after_backward(model, step)
                for p in plugins:
                    p.after_backward(model, step)

            def after_step(step: int, loss: float) -> None:
                method.after_step(model, step)
                for p in plugins:
                    p.after_step(model, step)

            def timed_eval(step: int) -> None:
                t = time.time()
                on_eval(model, step)
                eval_time[0] += time.time() - t

            loop = train_loop(model, method.optimizers(), batch_fn, method.loss, experience.steps,
                              grad_clip=method.grad_clip, bf16=bf16, after_backward=after_backward,
                              after_step=after_step, on_eval=timed_eval if on_eval else None,
                              eval_every=eval_every if on_eval else 0, progress=progress,
                              desc=desc or f"{method.name}: {experience.name}",
                              skip=(lambda step: experience.skip(model, step)) if experience.skip else None)
    finally:
        for p in plugins:
            p.teardown()
    if loop is not None:
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"training made {len(bad)} weight tensors NaN or infinite (e.g. {bad[0]}); nothing was "
                                f"saved from this experience (lower the learning rate).")
    train_seconds = time.time() - t0 - eval_time[0]
    params = method.trainable_params_per_step()
    model = method.export(model)
    model.eval()
    method.after_experience(model, experience)
    for p in plugins:
        p.after_experience(model, experience)
    return FitResult(model=model, trainable_params=params, steps=experience.steps - loop.skipped if loop is not None else 0,
                     train_seconds=train_seconds, eval_seconds=eval_time[0], loop=loop, setup_seconds=setup_seconds)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, a mapping such as a dict or ``BatchEncoding``, or a list/tuple of them) with
    every tensor on ``device``; a tensor already there is returned as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def on_device(experience: Experience, device: torch.device) -> Experience:
    """The experience with its training and validation batches delivered on ``device``."""
    def moved(fn):
        return None if fn is None else (lambda i: to_device(fn(i), device))

    return replace(experience, train_batch=moved(experience.train_batch), valid_batch=moved(experience.valid_batch))


def method_state(method) -> dict[str, torch.Tensor]:
    """Every tensor a method and its plugins keep between experiences, plugins under ``plugins.<name>.``."""
    out = dict(method.state_tensors())
    for p in getattr(method, "plugins", []) or []:
        out.update({f"plugins.{p.name}.{k}": v for k, v in p.state_tensors().items()})
    return out


def load_method_state(method, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``method_state``."""
    own = {k: v for k, v in state.items() if not k.startswith("plugins.")}
    for p in getattr(method, "plugins", []) or []:
        prefix = f"plugins.{p.name}."
        p.load_state_tensors({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    method.load_state_tensors(own)
