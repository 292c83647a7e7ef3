"""Clean plain-text entries from GCIDE (the Collaborative International Dictionary of English).

Debian's ``dict-gcide`` package ships the dictionary in dictd format: ``gcide.dict.dz`` (a
gzip-compatible file holding every article one after another) and ``gcide.index`` (one line per
headword: ``headword<TAB>base64 offset<TAB>base64 length``). Each article looks like::

    Abacus \\Ab"a*cus\\ ([a^]b"[.a]*k[u^]s), n.; E. pl. {Abacuses}; L.
       pl. {Abaci} (-s[imac]). [L. abacus, abax, Gr. 'a`bax]
       1. A table or tray strewn with sand, anciently used for
          drawing, calculating, etc. [Obs.]
          [1913 Webster]

and :func:`gcide_entries` turns it into one line such as
``Abacus (n.): 1. A table or tray strewn with sand, anciently used for drawing, calculating,
etc. (Obs.) 2. A calculating table ...``: the pronunciation, inflections and etymology are
dropped, field labels such as ``(Arch.)`` are kept, quotations become ``"..." (Author)``.
"""

from __future__ import annotations

import gzip
import os
import re
import unicodedata
from pathlib import Path

from forgetless.errors import DataSourceError

DEFAULT_PATH = "/usr/share/dictd/gcide.dict.dz"

_INSTALL_HINT = "install it with: apt-get install dict-gcide"
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

# --- character entities such as [a^], ['e], [ae], [imac] -------------------------------------

_COMBINING = {  # GCIDE accent mark -> Unicode combining character
    "^": "\u0306",  # [a^] breve (postfix)
    "=": "\u0304",  # [=a] macron
    ".": "\u0307",  # [.a] dot above
    "'": "\u0301",  # ['e] acute
    "`": "\u0300",  # [`e] grave
    '"': "\u0308",  # ["o] diaeresis
    "~": "\u0303",  # [~e] tilde
    "^p": "\u0302",  # [^o] circumflex (prefix form)
    ",": "\u0327",  # [,c] cedilla
}
_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "=ae": "ǣ", "=oe": "œ", "=oo": "oo", "oo^": "oo",
    "imac": "ī", "aum": "ä", "add": "a", "asl": "a", "udd": "u", "eth": "ð", "thorn": "þ",
    "ng": "ŋ", "yogh": "ȝ", "th": "th", "root": "√", "cuberoot": "∛", "deg": "°", "min": "′",
    "sec": "″", "bprime": "″", "sect": "§", "para": "¶", "pounds": "£", "times": "×", "divby": "÷",
    "middot": "·", "nbsp": " ", "ldqo": "“", "rdqo": "”", "dagger": "†", "dag": "†", "rarr": "→",
    "hand": "☞", "flat": "♭", "sharp": "♯", "natural": "♮", "crescent": "☾", "filig": "fi",
    "ffllig": "ffl", "break": "", "asper": "ʽ", "dsdot": "ḍ", "lsdot": "ḷ", "zdot": "ż", "mdot": "ṁ",
    "tsdo": "ṭ", "sb": "", "colret": "", "lbrace2": "{", "rbrace2": "}", "?": "?",
    "alpha": "α", "beta": "β", "gamma": "γ", "Gamma": "Γ", "delta": "δ", "Delta": "Δ",
    "epsilon": "ε", "digamma": "ϝ", "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ",
    "lambda": "λ", "Lambda": "Λ", "mu": "μ", "nu": "ν", "xi": "ξ", "omicron": "ο", "pi": "π",
    "Pi": "Π", "rho": "ρ", "sigma": "σ", "sigmat": "ς", "tau": "τ", "upsilon": "υ", "Upsilon": "Υ",
    "phi": "φ", "chi": "χ", "Chi": "Χ", "psi": "ψ", "omega": "ω",
}
_ENTITY = re.compile(r"\[([^\[\]\s]{1,9})\]")


def _entity(match: re.Match[str]) -> str:
    """Replace one ``[..]`` entity with its character; leave anything else (``[Obs.]``) as is."""
    code = match.group(1)
    if code in _NAMED:
        return _NAMED[code]
    if len(code) == 2 and code[0] in "=.'`\"~,-*" and code[1].isalpha():  # [=a] ['e] [-o] [*a]
        base, mark = code[1], code[0]
    elif len(code) == 2 and code[0] == "^" and code[1].isalpha():  # [^o]
        base, mark = code[1], "^p"
    elif len(code) == 2 and code[1] == "^" and code[0].isalpha():  # [a^]
        base, mark = code[0], "^"
    else:
        return match.group(0)
    accent = _COMBINING.get(mark, "")
    return unicodedata.normalize("NFC", base + accent)


# --- article structure ------------------------------------------------------------------------

_TAG_NAMES = (  # tags may wrap across lines: "[1913\n        Webster]"
    r"1913\s+Webster|Webster\s+1913\s+Suppl\.|WordNet\s+1\.[56]|WordNet\s+sense\s+\d[\d\s,&+]*|"
    r"PJC\.?|Century\s+Dict(?:ionary)?\.?,?\s*(?:1906)?\.?"
)
_SOURCE_TAG = re.compile(  # [1913 Webster], [WordNet 1.5 +PJC], [AS], ...
    rf"\[\s*\+?(?:(?:{_TAG_NAMES}|AS|RDH|RHUD|RP|GG|JG|CM|PC|MW10|MI11|WE1)\s*\+?\s*)+\]"
)
_BROKEN_TAG = re.compile(  # "... slavery. WordNet 1.5]", "[WordNet 1.5" at a line end, "  WordNet 1.5"
    rf"(?:\[[ \t]*)?(?:(?:{_TAG_NAMES})\s*\+?\s*)+(?:#here\s*)?\]"
    rf"|\[[ \t]*(?:(?:{_TAG_NAMES})[\s+-]*)+$"
    rf"|^[ \t]*(?:(?:{_TAG_NAMES})[ \t+]*)+$"
    rf"|(?<![\w+])\+[ \t]*PJC\b|(?<=\])[ \t]+PJC[ \t]*$",
    re.MULTILINE,
)
_WORDS = r"[\w'-]+(?: [\w'-]+)*"
_WORDS_LINE = re.compile(rf"[ \t]*{_WORDS}[ \t]*")
_JUNK_TAIL = re.compile(rf"(?<=[.\])])[ \t]+{_WORDS}[ \t]*$")
_HEADWORD = re.compile(r"[ \t]*([^\s\\{}\[\]][^\\{}\[\]]*?)\s*\\[^\\]*\\")
# A second headword ("Abannation \\..\\,\nAbannition \\..\\, n."), on the same line or the next.
_NEXT_HEADWORD = re.compile(r"[ \t]*(?:,[ \t]*\n?|\n)[ \t]*(?=[^\W_][^\\\n,;{}\[\]()]*\n?[ \t]*\\)")
_RESPELLING = re.compile(r"[`\"*'\-\u00C0-\u024F]")
_LABEL = re.compile(r"\([A-Z][A-Za-z\u00C0-\u024F., &]*\)")
_POS_WORDS = frozenset(
    "n a v t i pl adv adj prop p pr sing prep interj conj pron imp vb superl compar pref suff "
    "prefix suffix prenom pred fem masc pers pres dim poss impers inf abbr abbrev obs sym pp pret "
    "imperf dat acc E L".split()
)
_USAGE_LABELS = frozenset(
    "Obs. R. Colloq. Archaic Archaic. Poetic Slang Rare Informal informal slang archaic Obsoles. "
    "Cant Scot. Vulgar Humorous Jocose Recent Brit. U.S.".split()
)
_HEADER_GAP = re.compile(r"[ \t,;&:.]*(\n\s*)?")
_ABBREV = re.compile(r"([A-Za-z]+)\.")
# "--Milton." at a line end, possibly wrapped: "--Sir W.\n   Raleigh." at the paragraph end.
_CITATION = re.compile(
    r"(?<=\s)--(?=[A-Z])([^\n]*?)[ \t]*(?:\n[ \t]*([A-Z][\w.'& ]{0,30}?)[ \t]*(?=\s*\Z)|$)",
    re.MULTILINE,
)
_SYLLABLE_MARK = re.compile(r"(\w)[\"*`^]+(?=\w)")
_SENSE_START = re.compile(r"\s*(?:\d+\.|\([a-z]\)|Note:|Syn:)")
_RESP_OPEN = re.compile(r"\s*\(")
_QUOTE_SOURCE = re.compile(r"\s--(?=[A-Z])(.*)$")
_QUOTE_SOURCE_SPACED = re.compile(r"\s--\s(?=[A-Z])(.{1,40})$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_PRONUNCIATION = re.compile(r"\\[^\\]*\\")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,;:.!?)])")
_LETTER = re.compile(r"[A-Za-z]")


def _strip_trailing_junk(article: str) -> str:
    """Drop the index words dictd appended after an article's end ("[1913 Webster] Tergeminal").

    The junk starts on the last line with real text, right after a ``.``, ``]`` or ``)``, and may
    continue on following lines that hold nothing but words.
    """
    lines = article.rstrip().split("\n")
    last = len(lines) - 1
    while last > 0 and _WORDS_LINE.fullmatch(lines[last]):
        last -= 1
    m = _JUNK_TAIL.search(lines[last])
    if not m:
        return "\n".join(lines)
    return "\n".join(lines[:last] + [lines[last][: m.start()]])


def _balanced(text: str, pos: int, open_: str, close: str) -> int:
    """Return the index just past the bracket group starting at ``text[pos]`` (or -1)."""
    depth = 0
    for i in range(pos, min(len(text), pos + 2000)):
        ch = text[i]
        if ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _parse_header(article: str) -> tuple[list[str], str, list[str], int] | None:
    """Split off the header: (headwords, part of speech, field labels, index where the body starts).

    Returns None for articles that do not open with ``Headword \\pron\\`` (a handful of stray
    fragments in the dictd file).
    """
    headwords: list[str] = []
    pos = 0
    while True:
        m = _HEADWORD.match(article, pos)
        if not m:
            break
        headwords.append(" ".join(m.group(1).split()))
        pos = m.end()
        resp = _RESP_OPEN.match(article, pos)
        if resp:  # the respelled pronunciation right after \pron\, unless it is a label
            start = resp.end() - 1
            end = _balanced(article, start, "(", ")")
            group = article[start:end]
            same_line = "\n" not in article[pos:start]
            if end > 0 and not _LABEL.fullmatch(group) and (same_line or _RESPELLING.search(group)):
                pos = end
        nxt = _NEXT_HEADWORD.match(article, pos)
        if not nxt:
            break
        pos = nxt.end()
    if not headwords:
        return None

    pos_words: list[str] = []
    labels: list[str] = []
    pos_open = True  # still reading the part of speech ("v. t.")
    while pos < len(article):
        m = _HEADER_GAP.match(article, pos)
        at_line_start = bool(m.group(1)) if m else False
        if m and m.end() > pos:
            if ";" in m.group(0) or (pos_words and "," in m.group(0)):
                pos_open = False
            pos = m.end()
        if pos >= len(article):
            break
        ch = article[pos]
        if ch in "[{":
            end = _balanced(article, pos, ch, "]" if ch == "[" else "}")
            if end < 0:
                break
            inner = article[pos + 1 : end - 1].strip()
            if ch == "[" and inner in _USAGE_LABELS:  # [Obs.], [R.], [Colloq.]
                labels.append(f"({inner})")
            pos_open = False
            pos = end
            continue
        if ch == "(":
            end = _balanced(article, pos, "(", ")")
            if end < 0:
                break
            group = article[pos:end]
            if _LABEL.fullmatch(group):
                labels.append(group)
            elif at_line_start:  # "(a) The uppermost ..." starts the body
                break
            pos_open = False
            pos = end
            continue
        m = _ABBREV.match(article, pos)
        if m and m.group(1) in _POS_WORDS:
            if pos_open:
                pos_words.append(m.group(0))
            pos = m.end()
            continue
        break
    return headwords, " ".join(pos_words), labels, pos


def _quote_paragraph(paragraph: str) -> str:
    """Render an indented quotation block as ``"text" (Author)``."""
    text = " " + " ".join(paragraph.split())
    m = _QUOTE_SOURCE.search(text) or _QUOTE_SOURCE_SPACED.search(text)
    quote, source = (text[: m.start()], m.group(1).rstrip(". ")) if m else (text, "")
    quote = quote.strip()
    if not quote.startswith('"'):  # some quotations carry their own quotation marks
        quote = f'"{quote}"'
    return f"{quote} ({source})" if source else quote


def _citation(match: re.Match[str]) -> str:
    """Render a ``--Author.`` citation as ``(Author)``."""
    author = " ".join(part for part in match.groups() if part)
    return f"({author.rstrip('. ')})"


def _clean_body(body: str) -> str:
    """Turn the body of an article (definitions, notes, quotations) into one plain-text line."""
    paragraphs = _PARAGRAPH_BREAK.split(body)
    parts: list[str] = []
    for paragraph in paragraphs:
        if not paragraph.strip():
            continue
        first = paragraph.lstrip("\n")
        indent = len(first) - len(first.lstrip(" "))
        if indent >= 8 and not _SENSE_START.match(first):
            parts.append(_quote_paragraph(paragraph))
        else:
            parts.append(_CITATION.sub(_citation, paragraph))
    text = " ".join(parts)
    text = _PRONUNCIATION.sub("", text)  # pronunciations of run-on entries
    text = text.replace("\\", "").replace("{", "").replace("}", "")
    text = _BRACKETED.sub(r"(\1)", text)  # [Obs.] -> (Obs.), [Written also x.]
    text = text.replace("[", "(").replace("]", ")")
    text = _SYLLABLE_MARK.sub(r"\1", text)  # syllable marks: Ter"mi*na*ble*ness
    return _tidy(text)


def _tidy(text: str) -> str:
    """Collapse whitespace and fix spacing around punctuation."""
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text).replace("( ", "(").replace("()", "")
    return " ".join(text.split())


def clean_article(article: str) -> str | None:
    """Clean one raw dictd article into ``"Headword (pos.): definitions"``; None if unusable."""
    article = article.replace("\ufffd", "'")  # three stray cp1252 apostrophes in the file
    article = _ENTITY.sub(_entity, article)
    article = _strip_trailing_junk(article)
    article = _SOURCE_TAG.sub("", article)
    if "Webster" in article or "WordNet" in article or "PJC" in article or "Century" in article:
        article = _BROKEN_TAG.sub("", article)  # slow, so only where a tag name is left
    header = _parse_header(article)
    if header is None:
        return None
    headwords, pos, labels, body_start = header
    body = _clean_body(article[body_start:]).lstrip(" .,;:")
    if labels:
        body = _tidy(" ".join(labels) + " " + body)
    if not _LETTER.search(body):
        return None
    name = ", ".join(dict.fromkeys(headwords))
    return f"{name} ({pos}): {body}" if pos else f"{name}: {body}"


def _b64(value: str) -> int:
    """Decode a dictd base64 number (most significant digit first)."""
    number = 0
    for ch in value:
        number = number * 64 + _B64[ch]
    return number


def _article_spans(index_path: Path) -> list[tuple[int, int]]:
    """Unique (offset, length) pairs from the .index file in file order, minus 00-* headers."""
    spans: set[tuple[int, int]] = set()
    skipped: set[tuple[int, int]] = set()
    with open(index_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                continue
            span = (_b64(fields[1]), _b64(fields[2]))
            (skipped if fields[0].startswith("00-") else spans).add(span)
    return sorted(spans - skipped)


def gcide_entries(path: str | os.PathLike = DEFAULT_PATH, limit: int | None = None) -> list[str]:
    """Return one clean plain-text string per GCIDE dictionary article, in dictionary order.

    ``path`` is the dictd ``gcide.dict.dz`` file (``gcide.index`` must lie beside it); ``limit``
    stops after that many entries. Raises DataSourceError when the files are missing or empty.
    """
    dict_path = Path(path)
    index_path = dict_path.with_name(dict_path.name.split(".dict")[0] + ".index")
    if not dict_path.is_file() or not index_path.is_file():
        missing = dict_path if not dict_path.is_file() else index_path
        raise DataSourceError(f"GCIDE dictionary file {missing} not found; {_INSTALL_HINT}")
    try:
        data = dict_path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # .dict.dz is gzip-compatible; a plain .dict is read as is
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"GCIDE file {dict_path} is unreadable ({exc}); {_INSTALL_HINT}") from exc

    entries: list[str] = []
    for offset, length in _article_spans(index_path):
        if limit is not None and len(entries) >= limit:
            break
        entry = clean_article(data[offset : offset + length].decode("utf-8", errors="replace"))
        if entry:
            entries.append(entry)
    if not entries:
        raise DataSourceError(f"GCIDE file {dict_path} holds no entries; {_INSTALL_HINT}")
    return entries
