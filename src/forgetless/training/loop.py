"""The one training loop: used for pretraining and, through ``lifecycle.fit_experience``, for every
experience a method learns.

The loop knows nothing about what it trains. It asks for

- ``batch_fn(step) -> batch``: a deterministic function of the step, so that a resumed run
  sees exactly the batches an uninterrupted one would;
- ``loss_fn(model, batch) -> loss``;
- optional hooks ``after_backward(step)``, ``after_step(step, loss)``, ``on_eval(step)`` and
  ``on_checkpoint(step)``.

It runs bf16 autocast when asked, clips dense gradients, steps every optimizer and
scheduler, stops with a clear error on a NaN/inf loss (the last checkpoint stays intact),
and shows a progress bar.

Training state (model weights + optimizer states + step) is saved without pickle:
optimizer tensors go to safetensors, the rest to JSON, in one atomically renamed folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, TrainingError
from ..files import recover, verify_checksums, write_checksums
from ..models.checkpoint import atomic_folder, load_model, save_model


@dataclass
class LoopResult:
    step: int
    last_loss: float
    seconds: float
    tokens: int
    skipped: int = 0  # steps that ``skip(step)`` left out


def _dense_grad_norm_clip(params: list[nn.Parameter], max_norm: float) -> float:
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    if not dense:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(dense, max_norm))


def train_loop(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batch_fn: Callable[[int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    steps: int,
    start_step: int = 0,
    schedulers: list | None = None,
    grad_clip: float | None = 1.0,
    bf16: bool = False,
    after_backward: Callable[[int], None] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int], None] | None = None,
    eval_every: int = 0,
    on_checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    desc: str = "training",
    tokens_per_batch: Callable[[Any], int] | None = None,
    skip: Callable[[int], bool] | None = None,
) -> LoopResult:
    """Run steps ``start_step .. steps-1``; returns the step reached and the last loss.

    ``skip(step)`` true leaves that step out (no batch, no update); evaluation and checkpoints
    still happen on their schedule."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    device_type = next(model.parameters()).device.type
    model.train()
    t0, tokens, loss_val = time.time(), 0, float("nan")
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=desc, disable=not progress,
               dynamic_ncols=True)
    ema = None
    skipped = 0
    for step in bar:
        if skip is not None and skip(step):
            skipped += 1
            _after(step + 1, steps, on_eval, eval_every, on_checkpoint, checkpoint_every, model)
            continue
        batch = batch_fn(step)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            raise TrainingError(f"the loss became {loss_val} at step {step}; training stopped "
                                f"(the last saved checkpoint is intact; lower the learning rate).")
        loss.backward()
        if after_backward:
            after_backward(step)
        if grad_clip:
            _dense_grad_norm_clip(params, grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for sch in schedulers or []:
            sch.step()
        if tokens_per_batch:
            tokens += tokens_per_batch(batch)
        ema = loss_val if ema is None else 0.98 * ema + 0.02 * loss_val
        if progress:
            post = {"loss": f"{ema:.3f}"}
            if tokens:
                post["tok/s"] = f"{tokens / max(time.time() - t0, 1e-9):.0f}"
            bar.set_postfix(post, refresh=False)
        if after_step:
            after_step(step, loss_val)
        _after(step + 1, steps, on_eval, eval_every, on_checkpoint, checkpoint_every, model)
    return LoopResult(step=steps, last_loss=loss_val, seconds=time.time() - t0, tokens=tokens, skipped=skipped)


def _after(done: int, steps: int, on_eval, eval_every: int, on_checkpoint, checkpoint_every: int,
           model: nn.Module) -> None:
    """The evaluation and checkpoint due after ``done`` steps."""
    if on_eval and eval_every and (done % eval_every == 0 or done == steps):
        on_eval(done)
        model.train()
    if on_checkpoint and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
        on_checkpoint(done)


# --------------------------------------------------------------------------- training state
OPT_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def _flatten_optimizers(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict] = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        meta.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _unflatten_optimizer(i: int, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"opt{i}."
    for key, v in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(out_dir: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                        step: int, extra: dict | None = None, schedulers: list | None = None, **save_kwargs) -> Path:
    """Atomically write model + optimizer states + step to ``out_dir``."""
    tensors, meta = _flatten_optimizers(optimizers)
    state = {"step": step, "optimizers": meta,
             "schedulers": [s.state_dict() for s in schedulers or []], "extra": extra or {}}

    def write(tmp: Path) -> None:
        save_model(model, tmp / "model", **save_kwargs)
        save_file(tensors, str(tmp / OPT_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        write_checksums(tmp, [OPT_FILE])

    return atomic_folder(out_dir, write, kind="training-state")


def load_training_state(ckpt_dir: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                        schedulers: list | None = None) -> dict:
    """Load a state written by ``save_training_state`` into ``model`` and ``optimizers``."""
    ckpt_dir = Path(ckpt_dir)
    recover(ckpt_dir)
    verify_checksums(ckpt_dir, [OPT_FILE])
    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_text())
        tensors = load_file(str(ckpt_dir / OPT_FILE))
    except (OSError, json.JSONDecodeError, Exception) as e:  # safetensors raises its own error type
        raise CheckpointError(f"cannot resume from {ckpt_dir}: {e}.") from None
    saved = load_model(ckpt_dir / "model")
    missing = set(model.state_dict()) ^ set(saved.state_dict())
    if missing:
        raise CheckpointError(f"cannot resume from {ckpt_dir}: its model does not match the config.")
    model.load_state_dict(saved.state_dict())
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(_unflatten_optimizer(i, tensors, state["optimizers"][i]))
    for s, sd in zip(schedulers or [], state.get("schedulers", [])):
        s.load_state_dict(sd)
    return state
