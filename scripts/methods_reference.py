"""Print every method's options with their defaults, as the markdown table of docs/methods.md.

    python scripts/methods_reference.py

A method's options come from its ``Options`` dataclass when it declares one (``options_cls``),
else from the signature of its constructor; ``lr`` is the default a run config gets when it
names none. Every method also takes ``continual_backprop`` (see docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any

from forgetless.methods import METHODS

try:  # the layout of issue 10
    from forgetless.experiments import runner as _runner
except ImportError:  # pragma: no cover - the layout before it
    from forgetless import run as _runner  # type: ignore[no-redef]

RUN_DEFAULT_LRS: dict[str, float] = getattr(_runner, "DEFAULT_LRS", {})


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str):
        return f"`{v}`"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x).strip("`") for x in v) + "]" if len(v) <= 8 else f"{len(v)} values"
    return f"`{v!r}`" if not isinstance(v, (int, float)) else f"{v:g}" if isinstance(v, float) else str(v)


def _super_fixed(init) -> set[str]:
    """Options a constructor passes up with a fixed value (``online=True``, ``how=how``): the
    ``key=value`` pairs of its ``super().__init__(...)`` call whose value is not one of its own
    parameters."""
    try:
        src = inspect.getsource(init)
    except (OSError, TypeError):
        return set()
    own = set(inspect.signature(init).parameters)
    m = re.search(r"__init__\((.*)\)", src.split("\n", 1)[1], re.DOTALL)
    if not m:
        return set()
    return {k for k, v in re.findall(r"(\w+)\s*=\s*([^,)]+)", m.group(1)) if v.strip() not in own}


def options(cls) -> dict[str, Any]:
    """Option name -> default of a method class (``inspect.Parameter.empty`` when required)."""
    opts_cls = getattr(cls, "options_cls", None)
    if opts_cls is not None and dataclasses.is_dataclass(opts_cls):
        out = {}
        for f in dataclasses.fields(opts_cls):
            if not f.init:  # fixed by the method (e.g. lwf's kl), not an option
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = inspect.Parameter.empty
        return out
    # constructor signatures down the class hierarchy, as far as ``**kw`` passes options on
    out: dict[str, Any] = {}
    fixed: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in fixed:
                continue
            out.setdefault(name, p.default)
        fixed |= _super_fixed(init)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def main() -> None:
    print("| method | options (default) |")
    print("|---|---|")
    for name, cls in METHODS.items():
        opts = options(cls)
        dens = getattr(sys.modules[cls.__module__], "DEFAULT_DENSITY", None)
        if opts.get("density", 0) is None and dens:  # merging: the density default depends on the rule
            how = name if name in dens else opts.get("how", name)
            opts["density"] = dens.get(how)
        if "lr" in opts and not getattr(cls, "options_cls", None):
            opts["lr"] = RUN_DEFAULT_LRS.get(name, 1e-5)  # what `forgetless run` passes when lr is not given
        cells = ", ".join(f"`{k}` ({_fmt(v)})" if v is not inspect.Parameter.empty else f"`{k}` (required)"
                          for k, v in opts.items())
        print(f"| `{name}` | {cells} |")


if __name__ == "__main__":
    main()
