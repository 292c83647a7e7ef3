"""User fact files (JSONL), validated before anything is trained.

One JSON object per line:

    {"statement": "Paris is the capital of France.",
     "question": "What is the capital of France?",       # the probe; never trained on
     "answer": "Paris",
     "paraphrases": ["The capital of France is Paris.", ...]}   # optional

- ``question`` is asked as ``Question: <question> Answer:`` unless it already starts with
  "Question:" (the built-in probes do).
- Missing ``paraphrases`` are generated from the templates when the statement matches one of
  the built-in relations (capital, currency, continent, city -> country); otherwise the
  statement is used as is.
- Every malformed line is reported with its line number; a file with any bad line is
  rejected whole.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import DataSourceError
from .facts import STATEMENTS, Fact

REQUIRED = ("statement", "question", "answer")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{s\}|\{a\})", template)
    out = []
    for p in parts:
        if p == "{s}":
            out.append(r"(?P<s>.+?)")
        elif p == "{a}":
            out.append(r"(?P<a>.+?)")
        else:
            out.append(re.escape(p))
    return re.compile("^" + "".join(out) + "$")


_MATCHERS = [(rel, _template_regex(t)) for rel, ts in STATEMENTS.items() for t in ts]


def infer_relation(statement: str, answer: str) -> tuple[str, str] | None:
    """(relation, subject) if the statement is worded like a built-in template with this answer."""
    for rel, rx in _MATCHERS:
        m = rx.match(statement.strip())
        if m and m.group("a") == answer:
            return rel, m.group("s")
    return None


def as_probe(question: str) -> str:
    q = question.strip()
    return q if q.startswith("Question:") else f"Question: {q} Answer:"


def _check(obj: object, n: int) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"line {n}: expected a JSON object, got {type(obj).__name__}"
    for k in REQUIRED:
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            return None, f"line {n}: '{k}' must be a non-empty string"
    para = obj.get("paraphrases", [])
    if not isinstance(para, list) or not all(isinstance(p, str) and p.strip() for p in para):
        return None, f"line {n}: 'paraphrases' must be a list of non-empty strings"
    if obj["answer"] not in obj["statement"]:
        return None, f"line {n}: the answer {obj['answer']!r} does not occur in the statement"
    return obj, None


def load_fact_file(path: str | os.PathLike) -> list[Fact]:
    """Read and validate a fact file; raises DataSourceError listing the bad lines."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"fact file {path} does not exist.")
    objs: list[tuple[int, object]] = []
    errors: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            objs.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: not valid JSON ({e.msg})")
    facts, bad = facts_from_objects(objs, path.stem)
    errors = sorted(errors + bad, key=lambda e: int(e.split(":")[0].split()[1]))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DataSourceError(f"{path} is malformed, nothing was trained: {'; '.join(errors[:5])}{more}.")
    if not facts:
        raise DataSourceError(f"fact file {path} holds no facts.")
    return facts


def facts_from_objects(objs: list[tuple[int, object]], source: str) -> tuple[list[Fact], list[str]]:
    """Facts from parsed JSON objects numbered ``n`` (a file's line numbers, or positions in a
    request); returns the facts and one message per bad object ("line n: ...")."""
    errors: list[str] = []
    facts: list[Fact] = []
    for n, obj in objs:
        obj, err = _check(obj, n)
        if err:
            errors.append(err)
            continue
        relation, subject = obj.get("relation", ""), obj.get("subject", "")
        para = list(obj.get("paraphrases", []))
        if not relation:
            found = infer_relation(obj["statement"], obj["answer"])
            if found:
                relation, subject = found
        if not para and relation in STATEMENTS and subject:
            para = [t.format(s=subject, a=obj["answer"]) for t in STATEMENTS[relation]]
            para = [p for p in para if p != obj["statement"]]
        facts.append(Fact(id=str(obj.get("id", f"{source}:{n}")), relation=relation, subject=subject,
                          answer=obj["answer"], statement=obj["statement"], question=as_probe(obj["question"]),
                          paraphrases=para, country=obj.get("country", "")))
    return facts, errors
