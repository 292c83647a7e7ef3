"""Config files: YAML -> nested dataclasses, validated with messages that name the bad key."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
# a decimal number written as text: accepted where a float is expected, because PyYAML follows
# YAML 1.1 and loads `lr: 1e-4` (an exponent without a dot) as the string "1e-4"; any other
# string ("fast", "1e-4x", "nan") is refused with "expects a number"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce, e.g. int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' expects {' or '.join(_type_name(a) for a in args)}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping of options, got {value!r}.")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}.")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true or false, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as the string "1e-4"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}.")
        return value
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; expected one of: {', '.join(names)}.")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}': {e}.") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist.")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) file; give a YAML config.") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options at the top level.")
    return data


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    try:
        return from_dict(cls, load_yaml(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if str(path) in msg else f"{path}: {msg}") from None
