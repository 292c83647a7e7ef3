"""Continual-learning methods, one file each, behind the hooks of ``base.Method``."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Method, MethodContext
from .eaft import EAFT
from .ewc import EWC, OnlineEWC
from .replay import Replay

__all__ = ["METHODS", "Method", "MethodContext", "make_method"]
from .full import FullFinetune
from .lora import LoRA
from .smf import SparseMemoryFinetune

METHODS: dict[str, type[Method]] = {
    "full": FullFinetune,
    "lora": LoRA,
    "smf": SparseMemoryFinetune,
    "eaft": EAFT,
    "ewc": EWC,
    "online_ewc": OnlineEWC,
    "replay": Replay,
}


def make_method(name: str, **hparams: Any) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    try:
        return METHODS[name](**hparams)
    except TypeError as e:
        raise ConfigError(f"bad option for method {name!r}: {e}.") from None
