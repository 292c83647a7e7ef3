"""Files that survive mistakes and crashes: atomic folders and files, checksums, output-path checks,
folder locks.

- ``atomic_folder(dest, write)``: ``write`` fills a hidden temporary sibling, which is fsync'ed and
  renamed into place. If ``dest`` exists it is first renamed to a hidden ``.NAME.old-PID`` sibling
  and removed after the swap. A kill at any instant leaves, under the final name, either the old
  or the new folder, or nothing but the hidden siblings; ``recover(dest)`` (called by the next
  write and by every reader of a folder) completes the swap from a finished temporary folder, or
  puts the old folder back, and removes what is left.
- ``write_checksums`` / ``verify_checksums``: the sha256 of every weight file, recorded at save
  time in ``checksums.json`` and checked at load.
- ``check_output(path, kind)``: refuses, before any work, an output path that cannot hold the
  result or that holds something that is not a forgetless folder of the same kind.
- ``FolderLock``: one writer per output folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, ForgetlessError

MARKER = ".forgetless.json"  # {"kind": "model" | "run" | "pretrain" | ...} in every output folder
CHECKSUMS = "checksums.json"
_DONE = ".complete"  # written last into a temporary folder: it is finished and may replace the old one


class OutputError(ForgetlessError):
    """An output path cannot be used (exists with other content, not writable, disk full, locked)."""


# --------------------------------------------------------------------------- low level
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        _fsync_dir(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling_pid(name: str) -> int | None:
    """The writer's pid in ``.NAME.tmp-PID-xxxx`` or ``.NAME.old-PID``."""
    tail = name.rsplit(".tmp-", 1)[-1] if ".tmp-" in name else name.rsplit(".old-", 1)[-1]
    head = tail.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _siblings(dest: Path, kind: str) -> list[Path]:
    prefix = f".{dest.name}.{kind}-"
    try:
        return sorted(p for p in dest.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def cache_dir(*parts: str) -> Path:
    """The user's forgetless cache (``$FORGETLESS_CACHE``, default ``~/.cache/forgetless``), joined
    with ``parts``; not created."""
    root = os.environ.get("FORGETLESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "forgetless")
    return Path(root).joinpath(*parts)


def disk_error(e: OSError, what: str) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"the disk is full: {what} could not be written (what was saved before is intact).")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{what} could not be written: {e.strerror.lower()} (what was saved before is intact).")
    return OutputError(f"{what} could not be written ({e.strerror or e}); what was saved before is intact.")


# --------------------------------------------------------------------------- atomic folders and files
def recover(dest: str | os.PathLike) -> None:
    """Finish or undo an atomic replacement of ``dest`` that a crash interrupted, and remove the
    hidden siblings it left (never those of a writer that is still running)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    tmps = [p for p in _siblings(dest, "tmp") if not _pid_alive(_sibling_pid(p.name) or -1)]
    olds = [p for p in _siblings(dest, "old") if not _pid_alive(_sibling_pid(p.name) or -1)]
    if not dest.exists():
        done = [p for p in tmps if (p / _DONE).is_file()]
        if done:  # the new folder was complete: finish the swap
            os.replace(done[-1], dest)
            (dest / _DONE).unlink(missing_ok=True)
            tmps.remove(done[-1])
        elif olds:  # the new one was not finished: the old one comes back
            os.replace(olds[-1], dest)
            olds.pop()
        _fsync_dir(dest.parent)
    for p in tmps + olds:
        shutil.rmtree(p, ignore_errors=True)


def atomic_folder(dest: str | os.PathLike, write: Callable[[Path], None], kind: str | None = None) -> Path:
    """Run ``write(tmpdir)`` and move the result to ``dest`` (replacing it); see the module doc.
    ``kind`` writes the forgetless marker (``.forgetless.json``) into the folder."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        recover(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    except OSError as e:
        raise disk_error(e, str(dest)) from None
    try:
        write(tmp)
        if kind is not None:
            (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _fsync_tree(tmp)
        (tmp / _DONE).write_text("")
        _fsync_dir(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        (dest / _DONE).unlink(missing_ok=True)
        _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(dest)
        raise disk_error(e, str(dest)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(dest)
        raise
    return dest


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, str(path)) from None
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike, names: list[str]) -> None:
    """Record the sha256 of ``names`` (files of ``folder``) in ``checksums.json``, merged with any recorded."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    sums = json.loads(path.read_text()) if path.is_file() else {}
    sums.update({n: sha256_file(folder / n) for n in names if (folder / n).is_file()})
    path.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


def verify_checksums(folder: str | os.PathLike, names: list[str] | None = None) -> None:
    """Check the files recorded in ``checksums.json`` (or only ``names``); a folder without the file
    (e.g. one written by transformers) is not checked."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())
        assert isinstance(sums, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise CheckpointError(f"{path} is corrupt (not a JSON mapping of file checksums).") from None
    for name, want in sums.items():
        if names is not None and name not in names:
            continue
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (its checksum was recorded when the folder was saved).")
        if sha256_file(f) != want:
            raise CheckpointError(f"{f} does not match the checksum recorded when it was saved; the file is corrupt.")


# --------------------------------------------------------------------------- output paths
def folder_kind(path: Path) -> str | None:
    """The kind of a forgetless folder (from its marker, or recognised by its files), else None."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "model"
    try:  # a run folder written before markers existed: its config.json lists experiments
        if "experiments" in json.loads((path / "config.json").read_text()):
            return "run"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        pass
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | os.PathLike, kind: str, overwrite: bool = False, need_bytes: int = 0) -> Path:
    """Refuse an output path before any work: an existing file; a folder that is not empty and not a
    forgetless ``kind`` folder (unless ``overwrite``); a place that cannot be written; too little
    free space for ``need_bytes``."""
    path = Path(path)
    shown = str(path)
    try:
        resolved = path.resolve()
    except OSError:
        resolved = path.absolute()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"--out {shown} is the current folder or one above it; give a new folder for the result.")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"--out {shown} is an existing file, not a folder; give a new folder for the result.")
        recover(path)
        have = folder_kind(path)
        empty = not any(p.name != ".lock" for p in path.iterdir())
        if not empty and have != kind and not overwrite:
            what = f"a forgetless {have} folder" if have else "a folder with other files"
            raise OutputError(f"--out {shown} is {what}, not a {kind} folder; choose another path "
                              f"(or pass --overwrite to replace it).")
    base = _nearest_existing(resolved.parent if not path.exists() else resolved)
    if not base.is_dir():
        raise OutputError(f"--out {shown} cannot be created: {base} is a file, not a folder.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"--out {shown} cannot be written (no write permission in {base}).")
    try:  # a probe file: catches read-only file systems and /proc-like places that os.access misses
        fd, probe = tempfile.mkstemp(prefix=".forgetless-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out {shown} cannot be written ({(e.strerror or str(e)).lower()} in {base}).") from None
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise OutputError(f"--out {shown}: the result needs about {need_bytes / 1e6:.0f} MB and {base} has "
                              f"{free / 1e6:.0f} MB free.")
    return path


# --------------------------------------------------------------------------- locks
class FolderLock:
    """An exclusive lock on ``folder/.lock`` (released when the process ends, even by kill -9)."""

    def __init__(self, folder: str | os.PathLike, what: str = "forgetless"):
        self.path = Path(folder) / ".lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"{self.path.parent} is in use by another {self.what} (pid {holder}); wait for it "
                              f"to finish or choose another --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
