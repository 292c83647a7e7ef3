"""The shared method interface: a continual-learning method is a small object with hooks.

The loop (``forgetless.training.loop.train_loop``) knows nothing about any method; the one
lifecycle, ``forgetless.training.lifecycle.fit_experience``, calls these hooks around it:

    model = method.setup(model, context)        # per experience: freeze/wrap parameters, fresh optimizers
    batch = method.before_batch(model, batch, step)  # side effects (buffers), batch changes (replay)
    loss  = method.loss(model, batch)           # inside the loop (default: LM loss), no side effects
    method.after_backward(model, step)          # e.g. mask gradients to selected rows
    method.after_step(model, step)              # e.g. accumulate importance weights
    model = method.export(model)                # the model to evaluate (a plain HF model, or a wrapper)
    method.after_experience(model, experience)  # e.g. Fisher, anchors, pruning (on the exported model)
    method.checkpoint_model(model)              # the plain HF model saved in a run's resumable state

An exported model may be a wrapper (a router over adapters, a retrieval front end ...) as long
as it answers ``forward(input_ids=, attention_mask=)`` with ``.logits``, ``generate(...)`` like an
HF model and has ``.config``. When the experience is given at test time (the task-incremental
stream), the runner calls ``model.set_experience(j)`` before scoring experience j, if the
model has that method, and ``set_experience(None)`` afterwards. A wrapper returns its plain
base from ``checkpoint_model`` and keeps everything else in ``state_tensors()``; on resume,
``load_state_tensors`` runs first, then ``setup`` receives that plain model.

One method object lives through a whole stream; what it must remember between experiences
goes in ``state_tensors()`` so that an interrupted run resumes with it.

``MethodContext`` carries what a method may need from the run (the model folder with its
background statistics, the tokenizer, replay data ...). To add a method, copy the shape of
``full.py``: one file, one class, registered in ``forgetless.methods.METHODS``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..training.lifecycle import MethodContext
from ..training.losses import lm_loss_masked, shifted_cross_entropy

__all__ = ["Method", "MethodContext", "Plugin", "freeze_all", "lm_loss_masked", "shifted_cross_entropy"]


class Method:
    """Base class: trains nothing by itself; subclasses choose parameters and optimizers."""

    name = "base"
    trains = True  # False: the runner skips the training loop (the method only indexes data, e.g. retrieval)
    grad_clip: float | None = 1.0  # max norm of dense gradients (None: no clipping)

    def __init__(self, lr: float, **hparams: Any):
        self.lr = lr
        self.hparams = hparams
        self._optimizers: list[torch.optim.Optimizer] = []
        self.plugins: list[Plugin] = []  # add-ons with the same hooks (e.g. continual backprop), run after the method's

    # --- hooks -------------------------------------------------------------------
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._optimizers

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Called once per training step before ``loss``: the place for side effects (filling a
        replay buffer, observing inputs) and for changing the batch (mixing in replayed rows)."""
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch; no side effects (it may be called again, e.g. for a Fisher)."""
        return lm_loss_masked(model, batch)

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_experience(self, model: nn.Module, experience: Any) -> None:
        pass

    def export(self, model: nn.Module) -> nn.Module:
        return model

    def checkpoint_model(self, model: nn.Module) -> nn.Module:
        """The plain HF model to save in a run's state after an experience (default: the exported one)."""
        return model

    # --- state carried across experiences (saved with a run's state, no pickle) ---------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the method keeps between experiences (e.g. Fisher and anchors of EWC)."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state, but a saved state was given.")

    # --- reporting ---------------------------------------------------------------
    def trainable_params_per_step(self) -> int:
        """Parameters an optimizer step may change (for sparse methods: per step, not in total)."""
        return sum(p.numel() for opt in self._optimizers for g in opt.param_groups for p in g["params"])

    def describe(self) -> dict[str, Any]:
        out = {"method": self.name, "lr": self.lr, **self.hparams}
        if self.plugins:
            out["plugins"] = [{"name": p.name, **p.describe()} for p in self.plugins]
        return out


class Plugin:
    """An add-on that composes with any method: the method's hook names, called after the method's
    own by ``training.lifecycle.fit_experience``; ``setup`` also receives the method (for its
    optimizers). ``teardown`` runs when the loop ends, also on an error."""

    name = "plugin"

    def setup(self, model: nn.Module, context: MethodContext, method: Method) -> None:
        pass

    def before_batch(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> None:
        pass

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def teardown(self) -> None:
        pass

    def after_experience(self, model: nn.Module, experience: Any) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
