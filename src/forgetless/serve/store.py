"""The version store: a SQLite database (WAL mode) beside content-addressed safetensors delta blobs.

Tables

- ``versions``: one row per version (0 is the base): parent, method, delta kind, weights hash,
  delta blob (its sha256), bytes, what was taught, figures, gate decision, status
  (``base``, ``candidate``, ``promoted``, ``rejected``), who, when.
- ``updates``: every accepted ``POST /learn``: its request, state (``queued``, ``running``,
  ``done``, ``failed``), the version it produced, attempts.
- ``events``: promotions and rollbacks in order; the served version is the last event's.

Crash safety: a blob is written to a temporary name, fsynced and renamed before the database
row that names it is committed; the version row, the update's ``done`` and (on auto-promotion)
the promotion event are one transaction. At start-up, ``running`` updates go back to
``queued`` and blobs no row names are deleted. So kill -9 at any moment leaves either the old
state or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .deltas import tensors_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
  id INTEGER PRIMARY KEY, parent INTEGER, update_id TEXT UNIQUE, method TEXT, kind TEXT,
  weights_hash TEXT NOT NULL, blob TEXT, bytes INTEGER, taught TEXT, figures TEXT, gate TEXT,
  status TEXT NOT NULL, who TEXT, created REAL);
CREATE TABLE IF NOT EXISTS updates (
  id TEXT PRIMARY KEY, seq INTEGER, state TEXT NOT NULL, request TEXT, version INTEGER, error TEXT,
  attempts INTEGER DEFAULT 0, who TEXT, created REAL, started REAL, finished REAL);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, version INTEGER, who TEXT, at REAL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""

VERSION_COLS = ("id", "parent", "update_id", "method", "kind", "weights_hash", "blob", "bytes", "taught",
                "figures", "gate", "status", "who", "created")
UPDATE_COLS = ("id", "seq", "state", "request", "version", "error", "attempts", "who", "created", "started",
               "finished")
JSON_COLS = ("taught", "figures", "gate", "request")


def _row(cols: tuple[str, ...], r: tuple | None) -> dict | None:
    if r is None:
        return None
    d = dict(zip(cols, r))
    for c in JSON_COLS:
        if c in d and d[c] is not None:
            d[c] = json.loads(d[c])
    return d


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(self.root / "versions.db"), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    # ------------------------------------------------------------------ transactions
    def tx(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements as one transaction (all or nothing)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ base and recovery
    def init_base(self, weights_hash: str, model_dir: str) -> None:
        """Version 0 on first start; on a later start, the store must belong to the same base."""
        row = self.version(0)
        if row is None:
            now = time.time()
            self.tx([("INSERT INTO versions (id, parent, method, kind, weights_hash, bytes, status, who, created, taught,"
                      " figures, gate) VALUES (0, NULL, 'base', NULL, ?, 0, 'base', 'server', ?, '[]', '{}', 'null')",
                      (weights_hash, now)),
                     ("INSERT INTO events (kind, version, who, at) VALUES ('base', 0, 'server', ?)", (now,)),
                     ("INSERT OR REPLACE INTO meta VALUES ('model_dir', ?)", (model_dir,))])
        elif row["weights_hash"] != weights_hash:
            raise CheckpointError(f"the store {self.root} belongs to another base model (hash "
                                  f"{row['weights_hash'][:12]}, this one {weights_hash[:12]}); use another --store.")

    def recover(self) -> int:
        """Re-queue updates a crash left running; drop blobs no version names. Returns re-queued count."""
        n = len(self.q("SELECT id FROM updates WHERE state = 'running'"))
        self.tx([("UPDATE updates SET state = 'queued', started = NULL WHERE state = 'running'", ())])
        named = {r[0] for r in self.q("SELECT blob FROM versions WHERE blob IS NOT NULL")}
        for p in self.blobs.iterdir():
            if p.name.startswith(".") or p.stem not in named:
                p.unlink(missing_ok=True)
        return n

    # ------------------------------------------------------------------ blobs
    def write_blob(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int]:
        """Write a delta atomically under its content hash; returns (hash, bytes)."""
        digest = tensors_hash(tensors)
        final = self.blobs / f"{digest}.safetensors"
        if not final.exists():
            tmp = self.blobs / f".{digest}.{os.getpid()}.tmp"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            dfd = os.open(self.blobs, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return digest, final.stat().st_size

    def read_blob(self, digest: str) -> dict[str, torch.Tensor]:
        path = self.blobs / f"{digest}.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any read failure means a corrupt store
            raise CheckpointError(f"delta {path} cannot be read ({e}); the store is corrupt.") from None
        if tensors_hash(tensors) != digest:
            raise CheckpointError(f"delta {path} does not match its hash; the store is corrupt.")
        return tensors

    def storage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # ------------------------------------------------------------------ versions
    def version(self, vid: int) -> dict | None:
        return _row(VERSION_COLS, next(iter(self.q(f"SELECT {', '.join(VERSION_COLS)} FROM versions WHERE id = ?",
                                                   (vid,))), None))

    def versions(self) -> list[dict]:
        return [_row(VERSION_COLS, r) for r in self.q(f"SELECT {', '.join(VERSION_COLS)} FROM versions ORDER BY id")]

    def chain(self, vid: int) -> list[dict]:
        """Versions from the base to ``vid`` (inclusive), root first."""
        out = []
        v = self.version(vid)
        while v is not None:
            out.append(v)
            v = self.version(v["parent"]) if v["parent"] is not None else None
        return out[::-1]

    def served(self) -> int:
        return int(self.q("SELECT version FROM events ORDER BY id DESC LIMIT 1")[0][0])

    def events(self) -> list[dict]:
        return [dict(zip(("id", "kind", "version", "who", "at"), r))
                for r in self.q("SELECT id, kind, version, who, at FROM events ORDER BY id")]

    def next_version_id(self) -> int:
        return int(self.q("SELECT COALESCE(MAX(id), 0) + 1 FROM versions")[0][0])

    def version_insert(self, v: dict[str, Any]) -> tuple[str, tuple]:
        cols = [c for c in VERSION_COLS if c in v]
        vals = tuple(json.dumps(v[c]) if c in JSON_COLS else v[c] for c in cols)
        return f"INSERT INTO versions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals

    # ------------------------------------------------------------------ updates
    def add_update(self, uid: str, request: dict, who: str) -> None:
        seq = int(self.q("SELECT COALESCE(MAX(seq), 0) + 1 FROM updates")[0][0])
        self.tx([("INSERT INTO updates (id, seq, state, request, who, created) VALUES (?, ?, 'queued', ?, ?, ?)",
                  (uid, seq, json.dumps(request), who, time.time()))])

    def update(self, uid: str) -> dict | None:
        return _row(UPDATE_COLS, next(iter(self.q(f"SELECT {', '.join(UPDATE_COLS)} FROM updates WHERE id = ?",
                                                  (uid,))), None))

    def next_queued(self) -> dict | None:
        return _row(UPDATE_COLS, next(iter(self.q(
            f"SELECT {', '.join(UPDATE_COLS)} FROM updates WHERE state = 'queued' ORDER BY seq LIMIT 1")), None))

    def pending(self) -> int:
        return int(self.q("SELECT COUNT(*) FROM updates WHERE state IN ('queued', 'running')")[0][0])

    def close(self) -> None:
        with self._lock:
            self.db.close()
