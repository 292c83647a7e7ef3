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
background statistics, the tokenizer, replay data ...).

Options (PEFT's ``LoraConfig`` pattern): every method declares *all* its options, with their
defaults, in one dataclass ``Options`` nested in the class; it subclasses the parent class's
``Options`` (``Replay.Options`` extends ``FullFinetune.Options``), and ``MethodOptions`` holds
``lr``. ``Method.__init__(**options)`` parses the keyword options through
``forgetless.config.from_dict`` (an unknown key or a wrong type: the config loader's messages,
naming ``<method>.<key>``), then ``Options.validate()`` checks ranges and choices (one sentence
naming the option) and may normalise (e.g. LoRA's ``alpha: None`` becomes ``2 * rank``). The
parsed options are ``self.options``; ``describe()`` is ``{"method": name, **asdict(options)}``
plus what the method learned at run time (parameter growth, chosen merge weights ...). The
class ``Options`` is the one source of truth for defaults: ``forgetless run``, ``forgetless
learn`` and ``forgetless methods`` (which prints the table) all read it.

To add a method:

1. one file ``methods/<name>.py`` with one class ``class MyMethod(Method)`` (copy ``full.py``);
2. in it ``@dataclass class Options(Method.Options)`` (or the parent's ``Options``) with every
   option and its default, and ``def validate(self)`` that calls ``super().validate()`` and
   then ``self.require(ok, "key", "what it must be")`` / ``self.one_of("key", CHOICES)``;
3. ``def __init__(self, *args, **options)``: ``super().__init__(*args, **options)``, then read
   ``self.options`` (never re-declare defaults in the signature);
4. add ``describe()`` keys only for run-time facts (``{**super().describe(), "growth": ...}``);
5. keep state in ``state_tensors()``, using ``nest(prefix, tensors)`` / ``unnest(prefix,
   state)`` for sub-dictionaries; set ``needs_stream = True`` if the method only acts across
   several experiences (``forgetless learn`` then does not offer it);
6. register the class in ``forgetless.methods.METHODS``; ``tests/test_options.py`` then checks
   that it builds with no options and that ``describe()`` matches its options.

(``options_cls = Options`` on the class is the same as nesting ``Options``: either name works.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from ..training.lifecycle import MethodContext
from ..training.losses import lm_loss_masked, shifted_cross_entropy

__all__ = ["Method", "MethodContext", "MethodOptions", "Plugin", "PluginOptions", "freeze_all", "lm_loss_masked",
           "nest", "parse_options", "shifted_cross_entropy", "unnest", "unnest_list"]

O = TypeVar("O", bound="PluginOptions")


# --------------------------------------------------------------------------- typed options
@dataclass
class PluginOptions:
    """Base of every options dataclass: the ``validate`` hook and its one-sentence checks.

    ``owner`` (the method or plugin name, set when the options are parsed) names the options
    in messages, e.g. "smf option 'top_t' must be a positive integer, got -10."."""

    owner: ClassVar[str] = "method"

    def validate(self) -> None:
        """Check ranges and choices (``require``/``one_of``) and normalise; subclasses call super()."""

    def require(self, ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self.owner} option '{key}' must be {what}, got {getattr(self, key)!r}.")

    def one_of(self, key: str, choices) -> None:
        self.require(getattr(self, key) in tuple(choices), key, f"one of {', '.join(map(repr, choices))}")

    def positive(self, key: str, integer: bool = False) -> None:
        self.require(getattr(self, key) > 0, key, "a positive integer" if integer else "> 0")

    def at_least(self, key: str, low: float) -> None:
        self.require(getattr(self, key) >= low, key, f">= {low:g}")

    def between(self, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
        v = getattr(self, key)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        self.require(ok, key, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


@dataclass
class MethodOptions(PluginOptions):
    """The options every method has: the learning rate (> 0 for a method that trains)."""

    lr: float = 1e-5

    def validate(self) -> None:
        super().validate()
        self.positive("lr")


def parse_options(cls: type[O], options: dict[str, Any], owner: str) -> O:
    """``cls`` from keyword options through the config loader (unknown key, wrong type: its
    messages, naming ``<owner>.<key>``), then ``validate()``."""
    opts = from_dict(cls, dict(options), prefix=f"{owner}.")
    opts.owner = owner
    opts.validate()
    return opts


def _init_fields(opts: PluginOptions) -> dict[str, Any]:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.init}


# --------------------------------------------------------------------------- state helpers
def nest(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"<prefix>.<key>": tensor}``: a sub-dictionary of a method's state under one prefix."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unnest(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``nest``: the entries of ``state`` under ``prefix``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def unnest_list(prefix: str, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A list saved as ``nest(f"{prefix}.{i}", item_i)``: the items in the order of ``i``."""
    p = prefix + "."
    ks = sorted({int(k[len(p):].split(".", 1)[0]) for k in state if k.startswith(p)})
    return [unnest(f"{prefix}.{k}", state) for k in ks]


class Method:
    """Base class: trains nothing by itself; subclasses choose parameters and optimizers."""

    name = "base"
    trains = True  # False: the runner skips the training loop (the method only indexes data, e.g. retrieval)
    needs_stream = False  # True: acts only across several experiences (not offered by `forgetless learn`)
    grad_clip: float | None = 1.0  # max norm of dense gradients (None: no clipping)
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions  # the same class (either name may be declared)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "Options" in cls.__dict__:
            cls.options_cls = cls.__dict__["Options"]
        elif "options_cls" in cls.__dict__:
            cls.Options = cls.__dict__["options_cls"]

    def __init__(self, options: MethodOptions | float | None = None, /, **kwargs: Any):
        """``Method(**options)``, ``Method(MyMethod.Options(...))`` or ``Method(lr, **options)``."""
        if isinstance(options, PluginOptions):
            if kwargs or not isinstance(options, self.Options):
                raise ConfigError(f"method {self.name} takes one {self.Options.__qualname__} or keyword options.")
            kwargs = _init_fields(options)
        elif options is not None:
            kwargs = {"lr": options, **kwargs}
        self.options = parse_options(self.Options, kwargs, self.name)
        self.lr = self.options.lr
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
        out = {"method": self.name, **asdict(self.options)}
        if self.plugins:
            out["plugins"] = [{"name": p.name, **p.describe()} for p in self.plugins]
        return out


class Plugin:
    """An add-on that composes with any method: the method's hook names, called after the method's
    own by ``training.lifecycle.fit_experience``; ``setup`` also receives the method (for its
    optimizers). ``teardown`` runs when the loop ends, also on an error."""

    name = "plugin"
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, **options: Any):
        self.options = parse_options(self.Options, options, self.name)

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
        options = getattr(self, "options", None)  # a plugin that does not call Plugin.__init__ has none
        return asdict(options) if options is not None else {}


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
