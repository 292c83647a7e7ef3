"""Plain-text glosses from the WordNet 3.0 database files (Debian package ``wordnet-base``).

Each line of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` (after the license
header, whose lines start with two spaces) describes one synset::

    02084071 05 n 07 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 ... | a member
    of the genus Canis ...; "the dog barked all night"

that is ``offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt [pointers]
[verb frames] | gloss``. :func:`wordnet_glosses` turns it into one sentence such as
``Dog, domestic dog, Canis familiaris (noun): a member of the genus Canis ...; "the dog barked
all night".``
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from forgetless.errors import DataSourceError

DEFAULT_DIR = "/usr/share/wordnet"

_INSTALL_HINT = "install it with: apt-get install wordnet-base"
_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjective lemmas: galore(ip)


def _lemma(word: str) -> str:
    """``domestic_dog`` -> ``domestic dog``; ``galore(ip)`` -> ``galore``."""
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def parse_synset_line(line: str) -> str | None:
    """Turn one ``data.*`` line into ``"Lemma, lemma (pos): gloss."``; None for header/bad lines."""
    if line.startswith("  ") or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    try:
        ss_type = parts[2]
        word_count = int(parts[3], 16)
    except (IndexError, ValueError):
        return None
    words = [_lemma(parts[4 + 2 * i]) for i in range(word_count) if 4 + 2 * i < len(parts)]
    gloss = " ".join(gloss.split())
    if not words or not gloss:
        return None
    words = list(dict.fromkeys(words))  # a lemma can repeat with different markers
    words[0] = words[0][:1].upper() + words[0][1:]
    if gloss[-1] not in ".!?":
        gloss += "."
    return f"{', '.join(words)} ({_POS_NAMES.get(ss_type, ss_type)}): {gloss}"


def wordnet_glosses(directory: str | os.PathLike = DEFAULT_DIR, limit: int | None = None) -> list[str]:
    """Return one sentence per WordNet synset: nouns, then verbs, adjectives and adverbs.

    ``directory`` holds the ``data.*`` files; ``limit`` stops after that many synsets. Raises
    DataSourceError when the directory or a data file is missing or holds no synsets.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DataSourceError(f"WordNet directory {folder} not found; {_INSTALL_HINT}")
    glosses: list[str] = []
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise DataSourceError(f"WordNet file {path} not found; {_INSTALL_HINT}")
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if limit is not None and len(glosses) >= limit:
                    return glosses
                sentence = parse_synset_line(line)
                if sentence:
                    glosses.append(sentence)
    if not glosses:
        raise DataSourceError(f"WordNet directory {folder} holds no synsets; {_INSTALL_HINT}")
    return glosses
