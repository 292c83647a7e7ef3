"""Teaching material for a fact of any relation, from its statement and answer alone.

A fact file gives one statement, one question and one answer. Teaching the statement
repeated makes a model complete that sentence, not answer a question about it. This module
turns the fact into varied lines by rule, with no template of its relation:

- the statement itself and rewordings of it ("Kabul is the capital of Afghanistan." ->
  "The capital of Afghanistan is Kabul."), by swapping the two sides of its copula;
- cloze lines that end in the answer (the statement cut just after the answer, or a
  reworded statement whose last words are the answer);
- question/answer lines in several formats ("Question: ... Answer: ...", "Q: ... A: ...",
  "... The answer is ..."), whose questions are made from the statement by rule
  (wh-fronting: "X is a subdivision of Y." -> "What is X a subdivision of?").

The fact's own question is the evaluation probe: it is used only to leave it out. No line
contains the question's wording (compared after lower-casing and dropping punctuation), and
no line uses the probe framings of the shipped benchmark ("Tell me ..."), so the probe is
always a wording the model was never taught. The fact's paraphrases (when it has any) are
reworded the same way.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# framings that the shipped probes use: never produced here
PROBE_FRAMINGS = ("tell me",)

_COPULAS = (" is ", " are ", " was ", " were ")
_ARTICLES = ("the ", "a ", "an ")

# question/answer formats; {q} is a question ending in "?" or ".", {a} the answer
QA_FORMATS = (
    "Question: {q} Answer: {a}",
    "Q: {q} A: {a}",
    "{q} {a}.",
    "Question: {q}\nAnswer: {a}",
    "{q} The answer is {a}.",
    "Quiz: {q} Reply: {a}",
)
# statement framings (the statement is lower-cased at its start when framed)
STATEMENT_FRAMES = (
    "{s}",
    "Fact: {s}",
    "Remember that {sl}",
    "It is true that {sl}",
    "Note: {s}",
    "As is well known, {sl}",
)


def norm(text: str) -> str:
    """Lower case, letters/digits/spaces only, single spaces: the form used to compare wordings."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def question_text(question: str) -> str:
    """A probe prompt ("Question: ... Answer:") reduced to its question."""
    q = question.strip()
    q = re.sub(r"^question:\s*", "", q, flags=re.I)
    q = re.sub(r"\s*answer:\s*$", "", q, flags=re.I)
    return q.strip()


_FUNCTION_WORDS = {"The", "A", "An", "In", "On", "Of", "At", "As", "To", "For", "Among", "From", "By", "With",
                   "This", "That", "These", "Those", "Its", "Their", "There", "It"}


def _lower_first(s: str) -> str:
    """Lower-case the first word when it is a function word ("The capital ..."), never a name."""
    first = s.split(" ", 1)[0]
    return s[0].lower() + s[1:] if first in _FUNCTION_WORDS else s


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _core(statement: str) -> str:
    return statement.strip().rstrip(".!").strip()


def _strip_article(phrase: str) -> str:
    low = phrase.lower()
    for a in _ARTICLES:
        if low.startswith(a):
            return phrase[len(a):]
    return phrase


def _np_lower(phrase: str) -> str:
    """A noun phrase moved from the start of a sentence: lower-case a leading article only."""
    for a in ("The ", "A ", "An "):
        if phrase.startswith(a):
            return a.lower() + phrase[len(a):]
    return phrase


@dataclass(frozen=True)
class Split:
    left: str
    copula: str
    right: str


def split_copula(core: str) -> Split | None:
    """The first copula that splits the sentence into two non-empty sides."""
    for m in re.finditer(r" (is|are|was|were) ", core):
        left, right = core[: m.start()], core[m.end():]
        if left.strip() and right.strip():
            return Split(left.strip(), m.group(1), right.strip())
    return None


def _drop_trailing_article(head: str) -> str:
    words = head.split()
    while words and words[-1].lower() in ("the", "a", "an"):
        words = words[:-1]
    return " ".join(words)


def rewordings(statement: str, answer: str) -> list[str]:
    """Statements reworded by rule, each still containing the answer: the two sides of the
    copula swapped ("A is B" -> "B is A"), and "<words before the answer>: <answer>."."""
    core = _core(statement)
    out = []
    sp = split_copula(core)
    if sp and (answer in sp.left or answer in sp.right):
        out.append(f"{_cap(_np_lower(sp.right))} {sp.copula} {_np_lower(sp.left)}.")
    if core.endswith(answer) and core != answer:
        head = _drop_trailing_article(core[: -len(answer)].rstrip())
        if head:
            out.append(f"{head}: {answer}.")
    return [s for s in out if answer in s]


def cloze_lines(statement: str, answer: str) -> list[str]:
    """Lines that end in the answer: the statement cut just after the answer (when the answer
    is inside it, with at least two words that are not articles before it), and the rewordings
    that end in the answer."""
    out = []
    core = _core(statement)
    i = core.find(answer)
    before = [w for w in core[:max(i, 0)].split() if w.lower() not in ("the", "a", "an")]
    if i > 0 and len(before) >= 2:
        out.append(core[: i + len(answer)] + ".")
    out += [r for r in rewordings(statement, answer) if _core(r).endswith(answer)]
    return out


def echo_question(statement: str, answer: str) -> str | None:
    """The statement with its answer (and the article before it) replaced by "what"."""
    core = _core(statement)
    m = re.search(r"(?:\b(?:the|a|an) )?" + re.escape(answer), core, flags=re.I)
    if not m or m.group(0).lower().endswith(answer.lower()) is False:
        return None
    q = core[: m.start()] + "what" + core[m.end():]
    q = _cap(q) if m.start() == 0 else q
    return q.rstrip(",;: ") + "?"


def questions_from(statement: str, answer: str) -> list[str]:
    """Questions whose answer is ``answer``, made from the statement by rule."""
    core = _core(statement)
    qs: list[str] = []
    echo = echo_question(statement, answer)
    if echo and norm(echo) != "what":
        qs.append(echo)
    sp = split_copula(core)
    if sp:
        for side, other in ((sp.left, sp.right), (sp.right, sp.left)):
            if _strip_article(side).strip() == answer:
                # the answer is one whole side: "What is <the other side>?"
                o = _np_lower(other)
                qs += [f"What {sp.copula} {o}?", f"Which {sp.copula} {o}?"]
                if o.lower().startswith(_ARTICLES):
                    qs.append(f"Name {o}.")
        if sp.right.endswith(answer) and _strip_article(sp.right).strip() != answer:
            rest = _drop_trailing_article(sp.right[: -len(answer)].rstrip())
            if rest:
                # "X is a subdivision of Y" -> "What is X a subdivision of?"
                qs.append(f"What {sp.copula} {_np_lower(sp.left)} {rest}?")
    elif core.endswith(answer) and core != answer:
        head = _drop_trailing_article(core[: -len(answer)].rstrip())
        if head:
            qs.append(f"Complete the sentence: {head} ...")
    return list(dict.fromkeys(qs))


def is_probe_like(line: str, probe: str) -> bool:
    """Whether a line contains the probe's question wording, or a shipped probe framing."""
    n = norm(line)
    p = norm(question_text(probe))
    return bool(p) and p in n or any(f in n for f in PROBE_FRAMINGS)


def teaching_lines(statement: str, question: str, answer: str, paraphrases: list[str] | tuple = (),
                   seed: int = 0) -> list[str]:
    """Every distinct teaching line of a fact, in a seeded order that interleaves the kinds
    (statement, question/answer, cloze): the first lines of the list already mix all of them."""
    rng = random.Random(f"{seed}|{statement}|{answer}")
    sources = list(dict.fromkeys([statement, *paraphrases]))
    statements, qa, cloze = [], [], []
    for s in sources:
        sl = _lower_first(s)
        statements += [f.format(s=s, sl=sl) for f in STATEMENT_FRAMES[:2]]
        for r in rewordings(s, answer):
            statements.append(r)
        cloze += cloze_lines(s, answer)
        for q in questions_from(s, answer):
            qa += [f.format(q=q, a=answer) for f in QA_FORMATS]
    statements += [f.format(s=statement, sl=_lower_first(statement)) for f in STATEMENT_FRAMES[2:]]
    kinds = []
    for pool in (statements, qa, cloze):
        pool = [x for x in dict.fromkeys(pool) if answer in x and not is_probe_like(x, question)]
        rng.shuffle(pool)
        kinds.append(pool)
    out: list[str] = []
    while any(kinds):
        for pool in kinds:
            if pool:
                out.append(pool.pop())
    return list(dict.fromkeys(out))


def teaching_batch(statement: str, question: str, answer: str, n: int, paraphrases: list[str] | tuple = (),
                   seed: int = 0, step: int = 0) -> list[str]:
    """n teaching lines for one step; later steps (``step``) continue through the pool, so a
    fact taught over several steps sees more of its lines."""
    pool = teaching_lines(statement, question, answer, paraphrases, seed)
    if not pool:  # nothing survived (e.g. the statement is the probe itself): the statement alone
        pool = [statement]
    start = step * n
    return [pool[(start + i) % len(pool)] for i in range(n)]
