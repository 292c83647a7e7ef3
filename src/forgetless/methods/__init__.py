"""Continual-learning methods, one file each, behind the hooks of ``base.Method``; plugins
(add-ons with the same hooks) compose with any of them. Each declares its options with their
defaults in one ``Options`` dataclass (``base.MethodOptions``); ``options_table()`` lists them
(``forgetless methods``)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

from ..errors import ConfigError
from .adapters import TaskAdapters
from .agem import AGEM
from .base import Method, MethodContext, MethodOptions, Plugin, PluginOptions
from .cartridges import Cartridges
from .cms import ContinuumUpdates
from .distill import Distillation, LwF
from .eaft import EAFT
from .editing import MEMIT, ROME
from .ewc import EWC, OnlineEWC
from .full import FullFinetune
from .generative_replay import GenerativeReplay
from .lora import LoRA
from .mas import MAS
from .merging import MERGE_METHODS
from .onpolicy_distill import OnPolicyDistillation
from .packnet import PackNet
from .plasticity import ContinualBackprop, make_plasticity
from .progressive import ProgressiveNetworks
from .replay import Replay
from .retrieval import Retrieval
from .rl import PolicyGradient
from .si import SynapticIntelligence
from .smf import SparseMemoryFinetune
from .titans import TitansMemory

__all__ = ["METHODS", "PLUGINS", "Method", "MethodContext", "MethodOptions", "Plugin", "PluginOptions",
           "default_options", "fact_methods", "make_method", "make_plugin", "options_table"]

METHODS: dict[str, type[Method]] = {
    "full": FullFinetune,
    "lora": LoRA,
    "smf": SparseMemoryFinetune,
    "eaft": EAFT,
    "ewc": EWC,
    "online_ewc": OnlineEWC,
    "si": SynapticIntelligence,
    "mas": MAS,
    "replay": Replay,
    "generative_replay": GenerativeReplay,
    "agem": AGEM,
    "distill": Distillation,
    "lwf": LwF,
    "packnet": PackNet,
    "adapters": TaskAdapters,
    "progressive": ProgressiveNetworks,
    "onpolicy_distill": OnPolicyDistillation,
    "rl": PolicyGradient,
    "cms": ContinuumUpdates,
    "retrieval": Retrieval,
    "rome": ROME,
    "memit": MEMIT,
    "titans": TitansMemory,
    "cartridges": Cartridges,
    **MERGE_METHODS,  # merge and its aliases task_arithmetic, ties, dare, dare_ties, stitch, stitch_learned
}

PLUGINS: dict[str, type[Plugin]] = {"continual_backprop": ContinualBackprop}


def make_plugin(spec: Any) -> Plugin:
    """A plugin from ``{name: ..., <options>}``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"a plugin entry needs a 'name' (one of {', '.join(PLUGINS)}), got {spec!r}.")
    opts = dict(spec)
    name = opts.pop("name")
    if name not in PLUGINS:
        raise ConfigError(f"unknown plugin {name!r}; choose from {', '.join(PLUGINS)}.")
    return PLUGINS[name](**opts)


def make_method(name: str, **options: Any) -> Method:
    """A method by registry name with its options (the fields of its ``Options``; a missing one takes
    its default); ``plugins: [...]`` adds plugins (``continual_backprop: {...}`` is shorthand for
    that plugin)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    options = dict(options)
    specs = options.pop("plugins", None) or []
    if not isinstance(specs, list):
        raise ConfigError(f"method {name!r}: 'plugins' must be a list of plugin entries.")
    plugins = [make_plugin(s) for s in specs]
    cbp = make_plasticity(options.pop("continual_backprop", None))
    if cbp is not None:
        plugins.append(cbp)
    method = METHODS[name](**options)  # typed options: unknown keys, wrong types and ranges raise ConfigError
    names = [p.name for p in plugins]
    if len(set(names)) != len(names):
        raise ConfigError(f"method {name!r} lists the plugin {names} more than once.")
    method.plugins = plugins
    return method


def default_options(name: str) -> MethodOptions | PluginOptions:
    """The options a method (or plugin) gets when none are given: its ``Options`` defaults."""
    cls = METHODS[name] if name in METHODS else PLUGINS[name]
    return cls.Options()


def fact_methods() -> list[str]:
    """Registered methods that can learn one experience of facts (``forgetless learn``): those that
    train and do not act only across several experiences (``needs_stream``)."""
    return [n for n, cls in METHODS.items() if not cls.needs_stream]


def _type_text(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def options_table(name: str | None = None) -> dict[str, dict[str, Any]]:
    """``{method: {"kind", "summary", "learns_facts", "options": [{"name", "type", "default"}]}}``
    read from the ``Options`` dataclasses (every method and plugin, or the one named)."""
    entries = {**{n: ("method", c) for n, c in METHODS.items()}, **{n: ("plugin", c) for n, c in PLUGINS.items()}}
    if name is not None:
        if name not in entries:
            raise ConfigError(f"unknown method {name!r}; choose from {', '.join(entries)}.")
        entries = {name: entries[name]}
    out: dict[str, dict[str, Any]] = {}
    for n, (kind, cls) in entries.items():
        hints = typing.get_type_hints(cls.Options)
        opts = []
        for f in dataclasses.fields(cls.Options):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            opts.append({"name": f.name, "type": _type_text(hints[f.name]),
                         "default": list(default) if isinstance(default, tuple) else default})
        doc = (cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        out[n] = {"kind": kind, "summary": doc[0] if doc else "", "options": opts,
                  "learns_facts": kind == "method" and not cls.needs_stream}
    return out
