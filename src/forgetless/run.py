"""`forgetless run CONFIG.yaml`: any method on any stream, with the naive and joint baselines.

For every experiment of the config (a stream and a list of methods), each method learns the
experiences in order; after each experience (and every ``stream.eval_every`` steps within
one, for the curves) the model is scored on *every* experience's test set, giving the
matrix R (R[i][j] = score on experience j after training through experience i) and b (scores
before training). Metrics come from ``forgetless.evaluate.metrics``.

Baselines:
- ``naive``: sequential full fine-tuning (the method "full"), the lower bound.
- ``joint``: for each i, the base trained on the union of experiences 1..i, interleaved, with
  the same number of steps per experience: the upper bound that shows forgetting comes from
  the order, not from capacity. Its diagonal gives the intransigence of the other methods.

Each method starts a fresh optimizer at every experience and exports (e.g. merges LoRA)
after it, so a run interrupted between experiences resumes from its last finished
experience (``<run>/<experiment>/<method>/state``) and ends with exactly the same R.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import load_config, to_dict
from .engine import train_with_method
from .errors import ConfigError
from .evaluate.metrics import summarize
from .methods import make_method
from .models.checkpoint import atomic_folder, load_model, save_model, write_json
from .models.memory import freeze_query_stats
from .streams import Stream, StreamConfig, build_stream

BASELINES = {"naive": "full", "joint": "full"}
DEFAULT_LRS = {"lora": 1e-4, "adapters": 1e-4, "smf": 3.0, "retrieval": 0.0, "rome": 1.0, "memit": 1.0,
               "titans": 1e-3, "cartridges": 2e-2}  # every other method: 1e-5 (full fine-tuning's)


@dataclass
class ExperimentConfig:
    name: str
    stream: StreamConfig = field(default_factory=StreamConfig)
    methods: list[dict] = field(default_factory=lambda: [{"name": "naive"}, {"name": "joint"}])


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    model: str | None = None  # model folder (default: the shipped base)
    experiments: list[ExperimentConfig] = field(default_factory=list)


def _method_args(spec: dict) -> tuple[str, str, dict]:
    """(label, method name, options) of a method entry such as {name: smf, lr: 3, top_t: 500}."""
    spec = dict(spec)
    label = spec.pop("label", None) or spec["name"]
    name = spec.pop("name")
    base = BASELINES.get(name, name)
    spec.setdefault("lr", DEFAULT_LRS.get(base, 1e-5))
    return label, base, spec


def load_run_config(path: str | Path) -> RunConfig:
    cfg = load_config(RunConfig, path)
    if not cfg.experiments:
        raise ConfigError(f"{path}: 'experiments' is empty; give at least one stream with its methods.")
    for i, exp in enumerate(cfg.experiments):
        labels = []
        for j, spec in enumerate(exp.methods):
            if not isinstance(spec, dict) or "name" not in spec:
                raise ConfigError(f"{path}: experiments[{i}].methods[{j}] needs a 'name'.")
            label, base, opts = _method_args(spec)
            try:
                make_method(base, **opts)
            except ConfigError as e:
                raise ConfigError(f"{path}: experiments[{i}].methods[{j}]: {e}") from None
            labels.append(label)
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{path}: experiments[{i}].methods has duplicate labels {labels}; add 'label:' keys.")
    return cfg


# --------------------------------------------------------------------------- one method on one stream
def _scores(model, stream: Stream, stage: int) -> list[float]:
    """Scores on every experience after training through experience ``stage`` (-1: before training).
    On a task-incremental stream a model that can use the experience id (``set_experience``) is told it."""
    told = stream.task_given and hasattr(model, "set_experience")
    out = []
    for j, e in enumerate(stream.experiences):
        if told:
            model.set_experience(j)
        out.append(stream.score(model, e, stage))
    if told:
        model.set_experience(None)
    return out


def _train_experience(model, method, ctx, batch_fn: Callable[[int], dict], steps: int,
                      on_eval: Callable[[int], None] | None, eval_every: int, progress: bool, desc: str, experience=None):
    """One experience: fresh optimizers (setup), the loop, export, then the method's after_experience.
    A method that trains no weights (``method.trains`` False, e.g. retrieval) skips the loop."""
    model = method.setup(model, ctx)
    if getattr(method, "trains", True):
        train_with_method(method, model, batch_fn, steps, on_eval=on_eval, eval_every=eval_every,
                          progress=progress, desc=desc)
    model = method.export(model)
    model.eval()
    method.after_experience(model, experience)
    return model, method.trainable_params_per_step()


METHOD_STATE = "method_state.safetensors"


def _save_state(state_dir: Path, model, progress_rec: dict, method=None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_model(model, tmp / "model")
        (tmp / "progress.json").write_text(json.dumps(progress_rec))
        if method is not None:
            state = dict(method.state_tensors())
            if method.plasticity is not None:
                state.update({"plasticity." + k: v for k, v in method.plasticity.state_tensors().items()})
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / METHOD_STATE))

    atomic_folder(state_dir, write)


def _load_state(state_dir: Path, method=None) -> tuple[object, dict] | None:
    if not (state_dir / "progress.json").is_file():
        return None
    if method is not None and (state_dir / METHOD_STATE).is_file():
        from safetensors.torch import load_file

        state = load_file(str(state_dir / METHOD_STATE))
        if method.plasticity is not None:
            method.plasticity.load_state_tensors({k[len("plasticity."):]: v for k, v in state.items()
                                                  if k.startswith("plasticity.")})
        method.load_state_tensors({k: v for k, v in state.items() if not k.startswith("plasticity.")})
    return load_model(state_dir / "model"), json.loads((state_dir / "progress.json").read_text())


def run_sequential(stream: Stream, model_dir: Path, label: str, spec: dict, out: Path, progress: bool,
                   log: Callable[[str], None]) -> dict:
    from .learn import open_model

    _, base, opts = _method_args(spec)
    model, tok, ctx = open_model(model_dir)
    freeze_query_stats(model)
    state_dir = out / label / "state"
    method = make_method(base, **opts)  # one method object for the whole stream
    loaded = _load_state(state_dir, method)
    T = len(stream.experiences)
    if loaded:
        model, rec = loaded
        freeze_query_stats(model)
        log(f"{label}: resuming after experience {len(rec['R'])} of {T}")
    else:
        rec = {"b": _scores(model, stream, -1), "b_extra": stream.extra_score(model), "R": [], "extra": [],
               "curve": [], "boundaries": [], "seconds": 0.0, "trainable_params": 0}
        rec["curve"].append({"step": 0, "experience": 0, "scores": rec["b"]})
    t0 = time.time()
    for k in range(len(rec["R"]), T):
        exp = stream.experiences[k]
        offset = rec["boundaries"][-1] if rec["boundaries"] else 0

        def on_eval(step: int, k=k, offset=offset) -> None:
            if step < exp.steps:
                rec["curve"].append({"step": offset + step, "experience": k, "scores": _scores(model_ref[0], stream, k)})

        model_ref = [model]
        every = stream.eval_every or exp.steps
        ctx.extra.update(experience=exp, experience_index=k, seen_experiences=stream.experiences[: k + 1])
        model, params = _train_experience(model, method, ctx, exp.train_batch, exp.steps, on_eval, every,
                                          progress, f"{label}: {exp.name}", experience=exp)
        row = _scores(model, stream, k)
        rec["R"].append(row)
        rec["extra"].append(stream.extra_score(model))
        rec["boundaries"].append(offset + exp.steps)
        rec["curve"].append({"step": offset + exp.steps, "experience": k, "scores": row})
        rec["trainable_params"] = params
        rec["method"] = method.describe()  # e.g. parameter growth, router accuracy, chosen merge weights
        rec["seconds"] += time.time() - t0
        t0 = time.time()
        _save_state(state_dir, method.checkpoint_model(model), rec, method)
        log(f"{label}: after {exp.name}: " + ", ".join(f"{e.name} {s:.3f}" for e, s in zip(stream.experiences, row)))
    return rec


def run_joint(stream: Stream, model_dir: Path, label: str, spec: dict, out: Path, progress: bool,
              log: Callable[[str], None]) -> dict:
    from .learn import open_model

    _, base, opts = _method_args(spec)
    state_file = out / label / "joint_progress.json"
    rec = json.loads(state_file.read_text()) if state_file.is_file() else None
    T = len(stream.experiences)
    if rec is None:
        model, tok, ctx = open_model(model_dir)
        rec = {"b": _scores(model, stream, -1), "b_extra": stream.extra_score(model), "R": [], "extra": [],
               "curve": [{"step": 0, "experience": 0, "scores": None}], "boundaries": [], "seconds": 0.0,
               "trainable_params": 0}
        rec["curve"][0]["scores"] = rec["b"]
    for k in range(len(rec["R"]), T):
        t0 = time.time()
        model, tok, ctx = open_model(model_dir)
        freeze_query_stats(model)
        seen = stream.experiences[: k + 1]
        steps = sum(e.steps for e in seen)

        def batch_fn(step: int, seen=seen) -> dict:  # interleave: experience step % (k+1), its step // (k+1)
            e = seen[step % len(seen)]
            return e.train_batch((step // len(seen)) % e.steps)

        model, params = _train_experience(model, make_method(base, **opts), ctx, batch_fn, steps, None, 0, progress,
                                          f"{label}: experiences 1..{k + 1}")
        row = _scores(model, stream, k)
        rec["R"].append(row)
        rec["extra"].append(stream.extra_score(model))
        end = sum(e.steps for e in stream.experiences[: k + 1])
        rec["boundaries"].append(end)
        rec["curve"].append({"step": end, "experience": k, "scores": row})
        rec["trainable_params"] = params
        rec["seconds"] += time.time() - t0
        state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(state_file, rec)
        log(f"{label}: trained jointly on 1..{k + 1}: " + ", ".join(f"{s:.3f}" for s in row))
    return rec


# --------------------------------------------------------------------------- a whole run
def run_experiment(exp_cfg: ExperimentConfig, model_dir: Path, seed: int, out: Path, progress: bool = True,
                   log: Callable[[str], None] = print, command: str = "") -> dict:
    from .models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    stream = build_stream(model_dir, tok, exp_cfg.stream, seed)
    out.mkdir(parents=True, exist_ok=True)
    methods: dict[str, dict] = {}
    for spec in exp_cfg.methods:
        label, base, opts = _method_args(spec)
        runner = run_joint if spec["name"] == "joint" else run_sequential
        methods[label] = runner(stream, model_dir, label, spec, out, progress, log)
        methods[label]["spec"] = {"name": spec["name"], "method": base, **opts}
    joint = next((m["R"] for lbl, m in methods.items() if m["spec"]["name"] == "joint"), None)
    for label, m in methods.items():
        m["metrics"] = summarize(m["R"], m["b"], joint if m["spec"]["name"] != "joint" else None,
                                 higher_is_better=stream.higher_is_better)
        m["metrics"][stream.extra_name] = m["extra"][-1]
        m["metrics"][stream.extra_name + "_base"] = m["b_extra"]
    results = {
        "title": f"{exp_cfg.name}: {stream.kind} stream", "command": command, "seed": seed,
        "config": to_dict(exp_cfg), "model": str(model_dir),
        "stream": {"name": stream.name, "kind": stream.kind, "metric": stream.metric,
                   "higher_is_better": stream.higher_is_better,
                   "experiences": [e.name for e in stream.experiences], "extra": stream.extra_name, **stream.info},
        "methods": methods,
    }
    write_json(out / "results.json", results)
    from .report.runs import write_metrics_csv, write_run_report

    write_metrics_csv(results, out / "metrics.csv")
    write_run_report(results, out)
    return results


def run(cfg: RunConfig, out_dir: Path, progress: bool = True, log: Callable[[str], None] = print,
        command: str = "") -> dict[str, dict]:
    from .cli import default_model_dir

    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", to_dict(cfg))
    all_results = {}
    for exp in cfg.experiments:
        log(f"== experiment {exp.name} ({exp.stream.kind} stream)")
        all_results[exp.name] = run_experiment(exp, model_dir, cfg.seed, out_dir / exp.name, progress, log, command)
    if len(all_results) > 1:
        from .report.runs import compare_runs

        compare_runs(list(all_results.values()), out_dir)
    return all_results
