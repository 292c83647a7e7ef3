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

import difflib
import json
import os
import re
from pathlib import Path

from ..errors import DataSourceError
from .facts import STATEMENTS, Fact

REQUIRED = ("statement", "question", "answer")
OPTIONAL_STR = ("relation", "subject", "id", "country")
KEYS = (*REQUIRED, "paraphrases", *OPTIONAL_STR)
MAX_CHARS = 2000  # a statement, question or answer longer than this is a mistake, not a fact


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


def answer_in(answer: str, text: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as whole words (not inside another word)."""
    return re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text) is not None


def _check(obj: object, n: int) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"line {n}: expected a JSON object, got {type(obj).__name__}"
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(KEYS)})"
        return None, f"line {n}: unknown key '{unknown[0]}'{hint}"
    for k in REQUIRED:
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            return None, f"line {n}: '{k}' must be a non-empty string"
        if len(obj[k]) > MAX_CHARS:
            return None, f"line {n}: '{k}' is {len(obj[k])} characters long (at most {MAX_CHARS})"
    for k in OPTIONAL_STR:
        if k in obj and not isinstance(obj[k], str):
            return None, f"line {n}: '{k}' must be a string, got {type(obj[k]).__name__}"
    para = obj.get("paraphrases", [])
    if not isinstance(para, list) or not all(isinstance(p, str) and p.strip() for p in para):
        return None, f"line {n}: 'paraphrases' must be a list of non-empty strings"
    if not answer_in(obj["answer"], obj["statement"]):
        return None, f"line {n}: the answer {obj['answer']!r} does not occur in the statement as a word"
    return obj, None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or one sentence saying why it is not."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataSourceError(f"fact file {path} is UTF-16 encoded; save it as UTF-8 (one JSON object per line).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataSourceError(f"fact file {path} is not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); "
                              f"save it as UTF-8.") from None


def load_fact_file(path: str | os.PathLike) -> list[Fact]:
    """Read and validate a fact file; raises DataSourceError listing the bad lines."""
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"fact file {path} does not exist.")
    if path.is_dir():
        raise DataSourceError(f"fact file {path} is a folder; give a JSONL file.")
    if not path.is_file():
        raise DataSourceError(f"fact file {path} is not a regular file; give a JSONL file.")
    objs: list[tuple[int, object]] = []
    errors: list[str] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            objs.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: not valid JSON ({e.msg})")
    facts, bad = facts_from_objects(objs, path.stem)
    errors = sorted(errors + bad, key=lambda e: int(e.split(":", 1)[0].split()[1]))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DataSourceError(f"{path} is malformed, nothing was trained: {'; '.join(errors[:5])}{more}.")
    if not facts:
        raise DataSourceError(f"fact file {path} holds no facts.")
    return facts


def facts_from_objects(objs: list[tuple[int, object]], source: str) -> tuple[list[Fact], list[str]]:
    """Facts from parsed JSON objects numbered ``n`` (a file's line numbers, or positions in a
    request, e.g. ``forgetless serve``'s POST /learn); returns the facts and one message per bad
    object ("line n: ...")."""
    errors: list[str] = []
    facts: list[Fact] = []
    answers: dict[str, tuple[str, int]] = {}  # question -> (answer, line)
    statements: dict[str, int] = {}
    for n, obj in objs:
        obj, err = _check(obj, n)
        if err:
            errors.append(err)
            continue
        q = as_probe(obj["question"])
        if q in answers and answers[q][0] != obj["answer"]:
            errors.append(f"line {n}: the question of line {answers[q][1]} asked again with another answer "
                          f"({answers[q][0]!r} vs {obj['answer']!r})")
            continue
        if obj["statement"] in statements:
            errors.append(f"line {n}: the same statement as line {statements[obj['statement']]}")
            continue
        answers[q], statements[obj["statement"]] = (obj["answer"], n), n
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
