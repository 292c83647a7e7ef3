"""The package's layers import only downwards (see README, "Layout"):
errors/files/config -> runtime -> models -> data -> evaluate -> report -> training -> methods -> experiments -> serve -> cli.

Every import statement counts, also the ones inside functions."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "forgetless"
LAYERS = ["errors", "files", "config", "runtime", "models", "data", "evaluate", "report", "training", "methods", "experiments", "serve",
          "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
PEERS = {("errors", "config"), ("errors", "files"), ("files", "config")}  # the bottom level


def layer_of(module: str) -> str | None:
    """``forgetless.models.memory`` -> ``models``; the package front (``forgetless``) has no layer."""
    parts = module.split(".")
    if parts[0] != "forgetless" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def imports_of(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute module) of every forgetless import in a file."""
    package = list(path.relative_to(src.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("forgetless")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            if mod.startswith("forgetless"):
                out.append((node.lineno, mod))
    return out


def violations(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).with_suffix("")
        own = layer_of(".".join(rel.parts))
        if own is None:
            continue
        for line, mod in imports_of(path, src):
            target = layer_of(mod)
            if target is None or target == own or (own, target) in PEERS or (target, own) in PEERS:
                continue
            if RANK[target] > RANK[own]:
                bad.append(f"{path.relative_to(src)}:{line} ({own}) imports {mod} ({target})")
    return bad


def test_every_module_belongs_to_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.name != "__init__.py"}
    assert tops <= set(LAYERS), f"modules outside the layers: {sorted(tops - set(LAYERS))}"


def test_imports_point_down_only():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "forgetless"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "bad.py").write_text("def f():\n    from ..experiments.runner import run\n")
    (pkg / "models" / "good.py").write_text("from ..errors import ConfigError\nfrom .memory import x\n")
    assert violations(pkg) == ["models/bad.py:2 (models) imports forgetless.experiments.runner (experiments)"]


@pytest.mark.parametrize("module", ["forgetless.cli", "forgetless.experiments.runner", "forgetless.methods"])
def test_modules_import(module):
    __import__(module)
