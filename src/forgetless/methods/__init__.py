"""Continual-learning methods, one file each, behind the hooks of ``base.Method``; plugins
(add-ons with the same hooks) compose with any of them."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adapters import TaskAdapters
from .agem import AGEM
from .base import Method, MethodContext, Plugin
from .cms import ContinuumUpdates
from .distill import Distillation, LwF
from .eaft import EAFT
from .ewc import EWC, OnlineEWC
from .full import FullFinetune
from .generative_replay import GenerativeReplay
from .lora import LoRA
from .mas import MAS
from .merging import MERGE_METHODS
from .packnet import PackNet
from .plasticity import ContinualBackprop, make_plasticity
from .replay import Replay
from .retrieval import Retrieval
from .si import SynapticIntelligence
from .smf import SparseMemoryFinetune
from .editing import MEMIT, ROME
from .titans import TitansMemory
from .cartridges import Cartridges

__all__ = ["METHODS", "PLUGINS", "Method", "MethodContext", "Plugin", "make_method", "make_plugin"]

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
    try:
        return PLUGINS[name](**opts)
    except TypeError as e:
        raise ConfigError(f"bad option for plugin {name!r}: {e}.") from None


def make_method(name: str, **options: Any) -> Method:
    """A method by registry name with its options; ``plugins: [...]`` adds plugins
    (``continual_backprop: {...}`` is shorthand for that plugin)."""
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
    try:
        method = METHODS[name](**options)
    except TypeError as e:
        raise ConfigError(f"bad option for method {name!r}: {e}.") from None
    names = [p.name for p in plugins]
    if len(set(names)) != len(names):
        raise ConfigError(f"method {name!r} lists the plugin {names} more than once.")
    method.plugins = plugins
    return method
