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

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import load_config, to_dict
from ..errors import ConfigError
from ..evaluate.metrics import summarize
from ..files import MARKER, FolderLock, check_output
from ..methods import make_method
from ..models.checkpoint import atomic_folder, load_model, save_model, write_json
from ..models.folder import default_model_dir, open_model
from ..models.tokenizer import load_tokenizer
from ..report.runs import compare_runs, write_metrics_csv, write_run_report
from ..training.lifecycle import (
    Experience,
    MethodContext,
    fit_experience,
    load_method_state,
    method_state,
)
from .results import FactRecord, FactScores, MethodResult, RunResult
from .streams import Stream, StreamConfig, build_stream

BASELINES = {"naive": "full", "joint": "full"}


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
    """(label, method name, options) of a method entry such as {name: smf, lr: 3, top_t: 500}; a
    missing option (lr included) takes the default of the method's ``Options``."""
    spec = dict(spec)
    label = spec.pop("label", None) or spec["name"]
    name = spec.pop("name")
    return label, BASELINES.get(name, name), spec


PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]{0,99}$")


def _plain_name(value: str, where: str) -> None:
    """Names become folder names under --out: no separators, no '..', nothing hidden."""
    if not isinstance(value, str) or not PLAIN_NAME.match(value) or ".." in value:
        raise ConfigError(f"{where} {value!r} must be a plain name (letters, digits and . _ + = , -; no '/' or '..'), "
                          f"since it names a folder of the run.")


def load_run_config(path: str | Path) -> RunConfig:
    cfg = load_config(RunConfig, path)
    if not cfg.experiments:
        raise ConfigError(f"{path}: 'experiments' is empty; give at least one stream with its methods.")
    _plain_name(cfg.name, f"{path}: name")
    names = [e.name for e in cfg.experiments]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: experiment names {names} repeat; each experiment needs its own name.")
    for i, exp in enumerate(cfg.experiments):
        _plain_name(exp.name, f"{path}: experiments[{i}].name")
        if not exp.methods:
            raise ConfigError(f"{path}: experiments[{i}].methods is empty; give at least one method.")
        labels = []
        for j, spec in enumerate(exp.methods):
            if not isinstance(spec, dict) or "name" not in spec:
                raise ConfigError(f"{path}: experiments[{i}].methods[{j}] needs a 'name'.")
            label, base, opts = _method_args(spec)
            _plain_name(label, f"{path}: experiments[{i}].methods[{j}] label")
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


METHOD_STATE = "method_state.safetensors"


def _save_state(state_dir: Path, model, progress_rec: dict, method=None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_model(model, tmp / "model")
        (tmp / "progress.json").write_text(json.dumps(progress_rec))
        if method is not None:
            state = method_state(method)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / METHOD_STATE))

    atomic_folder(state_dir, write)


def _load_state(state_dir: Path, method=None) -> tuple[object, dict] | None:
    if not (state_dir / "progress.json").is_file():
        return None
    if method is not None and (state_dir / METHOD_STATE).is_file():
        from safetensors.torch import load_file

        load_method_state(method, load_file(str(state_dir / METHOD_STATE)))
    return load_model(state_dir / "model"), json.loads((state_dir / "progress.json").read_text())


def _state_name(label: str) -> str:
    """A method label as a folder name (``bench facts`` labels such as ``lora lr=0.0001 rank=8``)."""
    return re.sub(r"[^\w.=+-]+", "_", label)


def new_record(model, stream: Stream, model_dir: Path | None) -> dict:
    """The progress record of a method before training: scores of the base, the curve's first point
    and, on a fact stream, the base model's fact scores."""
    rec = {"b": _scores(model, stream, -1), "b_extra": stream.extra_score(model), "R": [], "extra": [],
           "curve": [], "boundaries": [], "seconds": 0.0, "train_seconds": 0.0, "steps": 0, "trainable_params": 0}
    rec["curve"].append({"step": 0, "experience": 0, "scores": rec["b"]})
    if stream.facts is not None and model_dir is not None:
        rec["facts_base"] = asdict(stream.facts.base(model_dir))
        rec["facts_curve"] = [{**asdict(stream.facts.base_curve(model_dir)), "step": 0}]
    return rec


def _fact_point(stream: Stream, rec: dict, model, k: int, step: int, offset: int) -> None:
    """A point of the fact curve: the facts taught so far, the known-fact sample, held-out text."""
    if stream.facts is None:
        return
    taught = stream.facts.taught(stream.experiences, k, step)
    rec.setdefault("facts_curve", []).append({**asdict(stream.facts.evaluator(model, taught, len(taught))),
                                              "step": offset + step})


def _fact_final(stream: Stream, rec: dict, model) -> None:
    """The final fact scores (every taught fact; every known fact when ``final_all_known``)."""
    if stream.facts is not None:
        rec["facts_final"] = asdict(stream.facts.evaluator(model, stream.facts.facts, len(stream.facts.facts),
                                                           final=True))


def learn_stream(stream: Stream, model, ctx: MethodContext, method, rec: dict, label: str, progress: bool,
                 log: Callable[[str], None], state_dir: Path | None = None):
    """The one sequential pipeline: ``method`` learns the stream's experiences from ``len(rec["R"])``
    on, each through ``fit_experience``; after each one the model is scored on every experience
    (R), on the extra column and, on a fact stream, with the fact evaluator (the curve; the final
    fact scores after the last one). With ``state_dir`` the model, method state and ``rec`` are
    saved after every experience (resume). Returns the exported model; ``rec`` is updated in place."""
    T = len(stream.experiences)
    t0 = time.time()
    for k in range(len(rec["R"]), T):
        exp = stream.experiences[k]
        offset = rec["boundaries"][-1] if rec["boundaries"] else 0

        def on_eval(m, step: int, k=k, offset=offset) -> None:
            if step < exp.steps:
                rec["curve"].append({"step": offset + step, "experience": k, "scores": _scores(m, stream, k)})
                _fact_point(stream, rec, m, k, step, offset)

        fit = fit_experience(method, model, ctx, exp, k, stream.experiences[: k + 1], on_eval=on_eval,
                             eval_every=stream.eval_every or exp.steps, progress=progress, desc=f"{label}: {exp.name}")
        model, params = fit.model, fit.trainable_params
        row = _scores(model, stream, k)
        rec["R"].append(row)
        rec["extra"].append(stream.extra_score(model))
        rec["boundaries"].append(offset + exp.steps)
        rec["curve"].append({"step": offset + exp.steps, "experience": k, "scores": row})
        _fact_point(stream, rec, model, k, exp.steps, offset)
        if k == T - 1:
            _fact_final(stream, rec, model)
        rec["trainable_params"] = params
        rec["train_seconds"] = rec.get("train_seconds", 0.0) + fit.train_seconds
        rec["steps"] = rec.get("steps", 0) + fit.steps
        rec["method"] = method.describe()  # e.g. parameter growth, router accuracy, chosen merge weights
        rec["seconds"] += time.time() - t0
        t0 = time.time()
        if state_dir is not None:
            _save_state(state_dir, method.checkpoint_model(model), rec, method)
        log(f"{label}: after {exp.name}: " + ", ".join(f"{e.name} {s:.3f}" for e, s in zip(stream.experiences, row)))
    return model


def run_sequential(stream: Stream, model_dir: Path, label: str, spec: dict, out: Path, progress: bool,
                   log: Callable[[str], None]) -> dict:
    _, base, opts = _method_args(spec)
    model, tok = open_model(model_dir, device=stream.device, chat=stream.chat)
    ctx = MethodContext.for_folder(model_dir, tok)
    state_dir = out / _state_name(label) / "state"
    method = make_method(base, **opts)  # one method object for the whole stream
    loaded = _load_state(state_dir, method)
    T = len(stream.experiences)
    if loaded:
        model, rec = loaded
        log(f"{label}: resuming after experience {len(rec['R'])} of {T}")
    else:
        rec = new_record(model, stream, model_dir)
    learn_stream(stream, model, ctx, method, rec, label, progress, log, state_dir)
    return rec


def run_joint(stream: Stream, model_dir: Path, label: str, spec: dict, out: Path, progress: bool,
              log: Callable[[str], None]) -> dict:
    _, base, opts = _method_args(spec)
    state_file = out / _state_name(label) / "joint_progress.json"
    rec = json.loads(state_file.read_text()) if state_file.is_file() else None
    T = len(stream.experiences)
    if rec is None:
        model, tok = open_model(model_dir, device=stream.device)
        rec = new_record(model, stream, model_dir)
    for k in range(len(rec["R"]), T):
        t0 = time.time()
        model, tok = open_model(model_dir, device=stream.device, chat=stream.chat)
        ctx = MethodContext.for_folder(model_dir, tok)
        seen = stream.experiences[: k + 1]
        steps = sum(e.steps for e in seen)

        def batch_fn(step: int, seen=seen) -> dict:  # interleave: experience step % (k+1), its step // (k+1)
            e = seen[step % len(seen)]
            return e.train_batch((step // len(seen)) % e.steps)

        union = Experience(f"experiences 1..{k + 1}", batch_fn, steps, info={"interleaved": [e.name for e in seen]})
        fit = fit_experience(make_method(base, **opts), model, ctx, union, k, seen, progress=progress,
                             desc=f"{label}: experiences 1..{k + 1}")
        model, params = fit.model, fit.trainable_params
        row = _scores(model, stream, k)
        rec["R"].append(row)
        rec["extra"].append(stream.extra_score(model))
        end = sum(e.steps for e in stream.experiences[: k + 1])
        rec["boundaries"].append(end)
        rec["curve"].append({"step": end, "experience": k, "scores": row})
        _fact_point(stream, rec, model, k, stream.experiences[k].steps, end - stream.experiences[k].steps)
        if k == T - 1:
            _fact_final(stream, rec, model)
        rec["trainable_params"] = params
        rec["train_seconds"] = fit.train_seconds  # the last joint fit is the final model
        rec["steps"] = fit.steps
        rec["seconds"] += time.time() - t0
        state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(state_file, rec)
        log(f"{label}: trained jointly on 1..{k + 1}: " + ", ".join(f"{s:.3f}" for s in row))
    return rec


def method_result(rec: dict, spec: dict) -> MethodResult:
    """A finished progress record as the typed result of one method."""
    facts = None
    if "facts_final" in rec:
        steps = int(rec.get("steps") or 0)
        facts = FactRecord(base=FactScores(**rec["facts_base"]), final=FactScores(**rec["facts_final"]),
                           curve=[FactScores(**p) for p in rec.get("facts_curve", [])], steps=steps,
                           seconds_per_step=float(rec.get("train_seconds") or 0.0) / max(steps, 1),
                           trainable_params_per_step=int(rec.get("trainable_params") or 0))
    return MethodResult(spec=spec, b=rec["b"], R=rec["R"], b_extra=rec.get("b_extra"), extra=rec["extra"],
                        curve=rec["curve"], boundaries=rec["boundaries"], seconds=rec["seconds"],
                        trainable_params=rec["trainable_params"], method=rec.get("method") or {}, facts=facts)


# --------------------------------------------------------------------------- a whole run
def run_experiment(exp_cfg: ExperimentConfig, model_dir: Path, seed: int, out: Path, progress: bool = True,
                   log: Callable[[str], None] = print, command: str = "", machine: dict | None = None,
                   device: str = "cpu") -> dict:
    tok = load_tokenizer(model_dir, chat=exp_cfg.stream.chat)
    torch.manual_seed(seed)
    stream = build_stream(model_dir, tok, exp_cfg.stream, seed, device=device)
    out.mkdir(parents=True, exist_ok=True)
    methods: dict[str, MethodResult] = {}
    for spec in exp_cfg.methods:
        label, base, opts = _method_args(spec)
        runner = run_joint if spec["name"] == "joint" else run_sequential
        rec = runner(stream, model_dir, label, spec, out, progress, log)
        methods[label] = method_result(rec, {"name": spec["name"], "method": base, **opts})
        if methods[label].facts is not None:
            f = methods[label].facts
            log(f"{label}: learned {f.final.learned:.1%}, retained {f.final.retained:.1%} (drop "
                f"{f.retained_drop:.1%}), held-out NLL {f.heldout_nll_delta:+.3f}, "
                f"{f.seconds_per_step * 1000:.0f} ms/step, {f.steps} steps")
    joint = next((m.R for m in methods.values() if m.spec["name"] == "joint"), None)
    for m in methods.values():
        m.metrics = summarize(m.R, m.b, joint if m.spec["name"] != "joint" else None,
                              higher_is_better=stream.higher_is_better)
        m.metrics[stream.extra_name] = m.extra[-1]
        m.metrics[stream.extra_name + "_base"] = m.b_extra
    result = RunResult(
        title=f"{exp_cfg.name}: {stream.kind} stream", command=command, seed=seed, config=to_dict(exp_cfg),
        model=str(model_dir), machine=machine or {},
        stream={"name": stream.name, "kind": stream.kind, "metric": stream.metric,
                "higher_is_better": stream.higher_is_better,
                "experiences": [e.name for e in stream.experiences], "extra": stream.extra_name, **stream.info},
        methods=methods)
    results = result.to_dict()
    write_json(out / "results.json", results)
    write_metrics_csv(results, out / "metrics.csv")
    write_run_report(results, out)
    return results


def config_hash(cfg: RunConfig) -> str:
    """A hash of everything that makes a run's results (the config, its seed and model)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _changes(old, new, where: str = "") -> list[str]:
    """Where two config dicts differ, as 'key: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _changes(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in _changes(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _check_resumable(cfg: RunConfig, out_dir: Path, restart: bool) -> None:
    """A run folder holds one config: a rerun with another config is refused (or, with ``restart``,
    the old results are removed and the run starts fresh)."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return
    try:
        saved = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = {}
    if saved.get("config_hash") == config_hash(cfg):
        return
    if not restart:
        old_cfg = saved.get("config") or {}
        changed = _changes(old_cfg, to_dict(cfg))
        shown = "; ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
        raise ConfigError(f"{out_dir} holds a run of a different config ({shown or 'changed'}); rerun with --restart "
                          f"to start it afresh there, or choose another --out.")
    for child in out_dir.iterdir():  # start fresh: everything but the lock
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def run(cfg: RunConfig, out_dir: Path, progress: bool = True, log: Callable[[str], None] = print,
        command: str = "", restart: bool = False, device: str = "cpu") -> dict[str, dict]:
    """Run every experiment of ``cfg`` into ``out_dir``, resuming what a previous run of the same
    config finished. One run at a time per folder (a lock); a different config is refused. The models
    are trained and evaluated on ``device`` (not part of the config: a run may resume on another)."""
    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    check_output(out_dir, "run")
    with FolderLock(out_dir, "forgetless run"):
        _check_resumable(cfg, out_dir, restart)
        write_json(out_dir / MARKER, {"kind": "run", "config_hash": config_hash(cfg), "config": to_dict(cfg)})
        write_json(out_dir / "config.json", to_dict(cfg))
        all_results = {}
        for exp in cfg.experiments:
            log(f"== experiment {exp.name} ({exp.stream.kind} stream)")
            all_results[exp.name] = run_experiment(exp, model_dir, cfg.seed, out_dir / exp.name, progress, log,
                                                   command, device=device)
        if len(all_results) > 1:
            compare_runs(list(all_results.values()), out_dir)
    return all_results
