"""forgetless: continual learning of language models — teach new facts and skills one update at a
time without catastrophic forgetting, and measure learning and forgetting honestly.

The public API (imported lazily, so that ``import forgetless`` stays cheap)::

    import forgetless as fl
    model, tok = fl.open_model(fl.default_model_dir())       # a model folder (the shipped base by default)
    method = fl.make_method("smf", lr=3.0, top_t=500)         # any registered method, typed options
    fit = fl.fit_experience(method, model, fl.MethodContext.for_folder(dir, tok), experience)
    results = fl.run(fl.load_run_config("configs/quickstart.yaml"), Path("runs/quickstart"))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_API = {
    "ForgetlessError": "forgetless.errors",
    "ConfigError": "forgetless.errors",
    "keep_freed_memory": "forgetless.runtime",
    "load_model": "forgetless.models.checkpoint",
    "save_model": "forgetless.models.checkpoint",
    "default_model_dir": "forgetless.models.folder",
    "open_model": "forgetless.models.folder",
    "load_fact_file": "forgetless.data.factfile",
    "Fact": "forgetless.data.facts",
    "summarize": "forgetless.evaluate.metrics",
    "Experience": "forgetless.training.lifecycle",
    "MethodContext": "forgetless.training.lifecycle",
    "fit_experience": "forgetless.training.lifecycle",
    "METHODS": "forgetless.methods",
    "PLUGINS": "forgetless.methods",
    "Method": "forgetless.methods",
    "Plugin": "forgetless.methods",
    "make_method": "forgetless.methods",
    "build_stream": "forgetless.experiments.streams",
    "StreamConfig": "forgetless.experiments.streams",
    "load_run_config": "forgetless.experiments.runner",
    "run": "forgetless.experiments.runner",
    "learn_facts": "forgetless.experiments.facts",
    "bench_facts": "forgetless.experiments.bench",
    "RunResult": "forgetless.experiments.results",
    "FactScores": "forgetless.evaluate.facts",
    "FactEvaluator": "forgetless.evaluate.facts",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")
