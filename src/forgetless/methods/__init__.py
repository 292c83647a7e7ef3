"""Continual-learning methods, one file each, behind the hooks of ``base.Method``."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Method, MethodContext
from .cms import ContinuumUpdates
from .eaft import EAFT
from .ewc import EWC, OnlineEWC
from .replay import Replay
from .retrieval import Retrieval
from .agem import AGEM
from .distill import Distillation, LwF
from .generative_replay import GenerativeReplay
from .mas import MAS
from .plasticity import make_plasticity
from .si import SynapticIntelligence

__all__ = ["METHODS", "Method", "MethodContext", "make_method"]
from .full import FullFinetune
from .lora import LoRA
from .merge import MERGE_METHODS
from .smf import SparseMemoryFinetune
from .adapters import TaskAdapters
from .editing import MEMIT, ROME
from .titans import TitansMemory
from .cartridges import Cartridges
from .packnet import PackNet

METHODS: dict[str, type[Method]] = {
    "retrieval": Retrieval,
    "packnet": PackNet,
    "adapters": TaskAdapters,
    "full": FullFinetune,
    "lora": LoRA,
    "smf": SparseMemoryFinetune,
    "eaft": EAFT,
    "ewc": EWC,
    "online_ewc": OnlineEWC,
    "replay": Replay,
    "generative_replay": GenerativeReplay,
    "si": SynapticIntelligence,
    "mas": MAS,
    "agem": AGEM,
    "distill": Distillation,
    "lwf": LwF,
    "cms": ContinuumUpdates,
    "rome": ROME,
    "memit": MEMIT,
    "titans": TitansMemory,
    "cartridges": Cartridges,
    **MERGE_METHODS,  # merge and its aliases task_arithmetic, ties, dare, dare_ties, stitch, stitch_learned
}


def make_method(name: str, **hparams: Any) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    hparams = dict(hparams)
    plasticity = make_plasticity(hparams.pop("continual_backprop", None))
    try:
        method = METHODS[name](**hparams)
    except TypeError as e:
        raise ConfigError(f"bad option for method {name!r}: {e}.") from None
    if plasticity is not None:  # continual backprop, an option of every method (methods/plasticity.py)
        method.plasticity = plasticity
        method.hparams["continual_backprop"] = plasticity.describe()
    return method
