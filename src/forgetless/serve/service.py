"""The serving core: the promoted model, the learning worker, promotion and rollback.

- ``current`` is one (model, version) pair, replaced by a single assignment: a request reads it
  once and uses that model to the end, so a promotion swaps atomically between requests.
- Learning runs on a deep copy of the served model (the served weights are never trained); the
  candidate's weights are rebuilt as ``apply(parent, delta)`` so that a later rebuild from the
  store has the same bytes.
- Fault injection for the crash tests: ``FORGETLESS_SERVE_FAULT=train|promote|swap`` kills the
  process (SIGKILL) during training, before the promotion commit, or after it and before the
  swap; ``FORGETLESS_SERVE_STEP_DELAY=seconds`` slows every training step.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.batches import fact_batch, text_batch
from ..data.facts import Fact, load_known_facts, teaching_sentences
from ..errors import ConfigError, ForgetlessError
from ..methods import make_method
from ..models.folder import load_heldout_ids, open_model
from ..models.memory import freeze_query_stats, memory_layers
from ..training.lifecycle import Experience, MethodContext, fit_experience
from .deltas import (
    apply_delta,
    delta_kind,
    full_delta,
    lora_delta,
    lora_with_rest,
    model_state,
    row_delta,
    tensors_hash,
    tie_aware_load,
)
from .gate import GateThresholds, RetentionSet, decide
from .metrics import Metrics
from .store import Store

# Settings measured on the shipped base to make it answer one taught fact (docs/serve.md).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "smf": {"lr": 5.0, "steps": 8, "options": {"protect": 0.0}},  # the setting measured in docs/serve.md
    "lora": {"lr": 1e-3, "steps": 8},
    "full": {"lr": 1e-4, "steps": 4},
}
FALLBACK_DEFAULTS = {"steps": 8}


@dataclass
class ServeConfig:
    model_dir: Path
    store_dir: Path
    name: str | None = None  # the model's name in the API (default: the folder's name)
    token: str | None = None
    protect_generation: bool = False
    auto_promote: bool = True
    method: str | None = None  # default learning method (None: smf on a memory model, else lora)
    gate: GateThresholds = field(default_factory=GateThresholds)
    retention_facts: int = 20
    heldout_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_facts: int = 16
    max_texts: int = 4
    max_steps: int = 64
    max_new_tokens: int = 256
    max_queue: int = 8
    batch_size: int = 16
    threads: int = 0  # torch threads (0: leave as is)
    seed: int = 0


@dataclass
class Served:
    model: nn.Module
    version: int
    weights_hash: str

    def info(self) -> dict:
        return {"version": self.version, "hash": self.weights_hash}


def _fault(point: str) -> None:
    if os.environ.get("FORGETLESS_SERVE_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def teaching_batch(tok, fact: Fact, n: int, questions: bool) -> dict[str, torch.Tensor]:
    """``fact_batch`` (loss on all tokens), without any training line that starts with the fact's own
    probe: a user's question may coincide with a training question template, and the probe is held out."""
    probe = fact.question.strip()
    pool = list(dict.fromkeys(teaching_sentences(fact, 64, questions)))
    lines = [s for s in pool if not s.startswith(probe)]
    if len(lines) == len(pool):
        return fact_batch(tok, fact, n, "all", "cpu", questions)
    return text_batch(tok, [lines[i % len(lines)] + "\n" for i in range(n)])


class Service:
    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.name = cfg.name or cfg.model_dir.name
        self.metrics = (metrics or Metrics()).of(self.name)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        base, self.tok = open_model(cfg.model_dir)
        self.ctx = MethodContext.for_folder(cfg.model_dir, self.tok)
        freeze_query_stats(base)
        base.eval()
        self.template = base
        self.base_state = model_state(base)
        self.has_memory = bool(memory_layers(base))
        self.default_method = cfg.method or ("smf" if self.has_memory else "lora")
        self.store = Store(cfg.store_dir)
        self.store.init_base(tensors_hash(self.base_state), str(cfg.model_dir))
        self.requeued = self.store.recover()
        self.max_positions = int(getattr(base.config, "max_position_embeddings", 1024))
        self._retention(base)
        vid = self.store.served()
        self.current = Served(self._build(vid), vid, self.store.version(vid)["weights_hash"])
        self._promote_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.worker = threading.Thread(target=self._work, name=f"forgetless-learner-{self.name}", daemon=True)
        for v in self.store.versions():
            if v["status"] in ("base", "promoted") and "retained" in (v["figures"] or {}):
                self.metrics.retention(v["id"], v["figures"]["retained"])
        self._refresh_gauges()

    # ------------------------------------------------------------------ set-up
    def _retention(self, base: nn.Module) -> None:
        known = load_known_facts(self.cfg.model_dir)
        heldout = load_heldout_ids(self.cfg.model_dir, self.tok, self.cfg.heldout_tokens)
        saved = self.store.q("SELECT v FROM meta WHERE k = 'retention_ids'")
        if saved:
            import json

            ids = json.loads(saved[0][0])
            by_id = {f.id: f for f in known}
            self.retention = RetentionSet.__new__(RetentionSet)
            self.retention.tok, self.retention.heldout = self.tok, heldout
            self.retention.facts = [by_id[i] for i in ids if i in by_id]
        else:
            import json

            self.retention = RetentionSet(base, self.tok, known, heldout, self.cfg.retention_facts, self.cfg.seed)
            figures = self.retention.measure(base, [])
            self.store.tx([("INSERT OR REPLACE INTO meta VALUES ('retention_ids', ?)",
                            (json.dumps([f.id for f in self.retention.facts]),)),
                           ("UPDATE versions SET figures = ? WHERE id = 0", (json.dumps(figures),))])

    def start(self) -> None:
        self.worker.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    # ------------------------------------------------------------------ versions
    def state_of(self, vid: int) -> dict[str, torch.Tensor]:
        """The weights of a version, rebuilt from the base and its chain of deltas; hash-checked."""
        chain = self.store.chain(vid)
        if not chain:
            raise ConfigError(f"there is no version {vid}.")
        state = self.base_state
        for v in chain[1:]:
            state = apply_delta(state, self.store.read_blob(v["blob"]), v["kind"])
        got = tensors_hash(state)
        if got != chain[-1]["weights_hash"]:
            raise ForgetlessError(f"version {vid} rebuilt to hash {got[:12]}, the log says "
                                  f"{chain[-1]['weights_hash'][:12]}; the store is corrupt.")
        return state

    def _model_from_state(self, state: dict[str, torch.Tensor]) -> nn.Module:
        m = copy.deepcopy(self.template)
        tie_aware_load(m, state)
        m.eval()
        return m

    def _build(self, vid: int) -> nn.Module:
        return self.template if vid == 0 else self._model_from_state(self.state_of(vid))

    def _serve(self, vid: int, kind: str, who: str, model: nn.Module | None = None,
               extra: list[tuple[str, tuple]] | None = None) -> dict:
        """Make ``vid`` the served version: one commit, then one assignment."""
        v = self.store.version(vid)
        model = model if model is not None else self._build(vid)
        _fault("promote")
        stmts = list(extra or [])
        stmts.append(("INSERT INTO events (kind, version, who, at) VALUES (?, ?, ?, ?)", (kind, vid, who, time.time())))
        if v is not None and v["status"] == "candidate":
            stmts.append(("UPDATE versions SET status = 'promoted' WHERE id = ?", (vid,)))
        self.store.tx(stmts)
        _fault("swap")
        self.current = Served(model, vid, v["weights_hash"] if v else self.store.version(vid)["weights_hash"])
        fig = (self.store.version(vid)["figures"] or {})
        if "retained" in fig:
            self.metrics.retention(vid, fig["retained"])
        self.metrics.served.set(vid)
        return self.current.info()

    def promote(self, vid: int, who: str) -> dict:
        with self._promote_lock:
            v = self.store.version(vid)
            if v is None:
                raise LookupError(f"there is no version {vid}.")
            if v["status"] == "rejected":
                raise PermissionError(f"version {vid} was rejected by the forgetting gate and is never served.")
            if v["status"] != "candidate":
                raise PermissionError(f"version {vid} is not a candidate (it is {v['status']}); "
                                      "use /rollback to serve an earlier version again.")
            out = self._serve(vid, "promote", who)
            self.metrics.update("promoted")
            return out

    def rollback(self, vid: int | None, who: str) -> dict:
        with self._promote_lock:
            if vid is None:  # the parent of the served version: undo its update
                vid = self.store.version(self.current.version)["parent"]
                if vid is None:
                    raise PermissionError("the base is served; there is no earlier version to roll back to.")
            v = self.store.version(vid)
            if v is None:
                raise LookupError(f"there is no version {vid}.")
            if v["status"] not in ("base", "promoted"):
                raise PermissionError(f"version {vid} was never promoted (it is {v['status']}); "
                                      "only promoted versions can be rolled back to.")
            if vid == self.current.version:
                raise PermissionError(f"version {vid} is already served.")
            return self._serve(vid, "rollback", who)

    # ------------------------------------------------------------------ learning
    def submit(self, request: dict, who: str) -> str:
        with self._submit_lock:
            if self.store.pending() >= self.cfg.max_queue:
                raise OverflowError(f"the learning queue is full ({self.cfg.max_queue} updates); try again later.")
            uid = uuid.uuid4().hex[:16]
            self.store.add_update(uid, request, who)
        self.metrics.update("accepted")
        self._refresh_gauges()
        self._wake.set()
        return uid

    def _work(self) -> None:
        while not self._stop:
            u = self.store.next_queued()
            if u is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.store.tx([("UPDATE updates SET state = 'running', started = ?, attempts = attempts + 1 "
                            "WHERE id = ?", (time.time(), u["id"]))])
            self._refresh_gauges()
            try:
                self._learn(u)
            except Exception as e:  # noqa: BLE001 - a failed update is recorded, the server goes on
                msg = str(e) if isinstance(e, ForgetlessError) else f"{type(e).__name__}: {e}"
                self.store.tx([("UPDATE updates SET state = 'failed', error = ?, finished = ? WHERE id = ?",
                                (msg, time.time(), u["id"]))])
                self.metrics.update("failed")
            self._refresh_gauges()

    def _learn(self, u: dict) -> None:
        req = u["request"]
        facts = [Fact(**f) for f in req.get("facts", [])]
        texts = list(req.get("texts", []))
        name = req["method"]
        opts = dict(req.get("options") or {})
        steps = int(req["steps"])
        parent = self.current  # the version being served when learning starts
        parent_row = self.store.version(parent.version)
        method = make_method(name, **opts)
        batches = [teaching_batch(self.tok, f, int(req["batch_size"]), bool(req.get("questions", True)))
                   for f in facts]
        batches += [text_batch(self.tok, [t + "\n"]) for t in texts]
        total = steps * len(batches)
        delay = float(os.environ.get("FORGETLESS_SERVE_STEP_DELAY", "0") or 0)
        kind = delta_kind(name)
        adapters: dict[str, torch.Tensor] = {}

        def after(trained: nn.Module, step: int) -> None:  # after every step, on the model being trained
            if step == 1:
                _fault("train")
            if delay:
                time.sleep(delay)
            if step == total and kind == "lora":
                adapters.update(lora_delta(trained))  # the adapters, before export merges them

        torch.manual_seed(self.cfg.seed)
        experience = Experience(name=f"update {u['id']}", train_batch=lambda s: batches[s // steps], steps=total)
        fit = fit_experience(method, copy.deepcopy(parent.model), self.ctx, experience, on_eval=after,
                             eval_every=1, progress=False)
        train_s = fit.train_seconds
        parent_state = model_state(parent.model)
        trained = model_state(fit.model)
        if kind == "lora":
            delta = lora_with_rest(adapters, parent_state, trained)
        else:
            delta = row_delta(parent_state, trained) if kind == "rows" else full_delta(trained)
        del fit, trained
        cand_state = apply_delta(parent_state, delta, kind)
        cand = self._model_from_state(cand_state)
        weights_hash = tensors_hash(cand_state)
        figures = self.retention.measure(cand, facts)
        gate = decide(figures, parent_row["figures"] or {}, GateThresholds(**req["gate"]), bool(facts))
        figures.update(train_seconds=train_s, steps=steps * len(batches))
        blob, nbytes = self.store.write_blob(delta, {"kind": kind, "parent_hash": parent.weights_hash})
        vid = self.store.next_version_id()
        status = "rejected" if not gate["passed"] else ("promoted" if req.get("promote", "auto") == "auto" else "candidate")
        row = {"id": vid, "parent": parent.version, "update_id": u["id"], "method": name, "kind": kind,
               "weights_hash": weights_hash, "blob": blob, "bytes": nbytes,
               "taught": {"facts": [asdict(f) for f in facts], "texts": texts, "options": opts, "steps": steps},
               "figures": figures, "gate": gate, "status": status, "who": u["who"], "created": time.time()}
        done = ("UPDATE updates SET state = 'done', version = ?, finished = ? WHERE id = ?", (vid, time.time(), u["id"]))
        stmts = [self.store.version_insert(row), done]
        if status == "promoted":
            with self._promote_lock:
                self._serve(vid, "promote", u["who"], model=cand, extra=stmts)
            self.metrics.update("promoted")
        else:
            self.store.tx(stmts)
            if status == "rejected":
                self.metrics.update("rejected")

    # ------------------------------------------------------------------ gauges
    def _refresh_gauges(self) -> None:
        self.metrics.queued.set(self.store.pending())
        self.metrics.storage.set(self.store.storage_bytes())
        self.metrics.served.set(self.current.version if hasattr(self, "current") else 0)
