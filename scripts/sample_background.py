"""Write a sample of a base's *pretraining* text next to it (``background_text.jsonl``), for
replay of background text during continual learning (``replay`` with ``source: background``).

The corpus is rebuilt from the same offline sources and split as the base's pretraining
(its ``pretrain_config.json``); the sample is drawn, with a fixed seed, from the *train* side
only (never the held-out text that scores general NLL, never the held-out topics, never a
new fact), in the pretraining mixture: general documents plus a ``fact_share`` of known-fact
lines.

    python scripts/sample_background.py src/forgetless/assets/forgetless-tiny --docs 2000
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from forgetless.config import from_dict
from forgetless.data.corpus import build_corpus
from forgetless.experiments.pretrain import PretrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--docs", type=int, default=2000, help="general documents to sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = Path(args.model_dir)
    cfg = from_dict(PretrainConfig, json.loads((d / "pretrain_config.json").read_text()))
    corpus = build_corpus(cfg.data)
    rng = random.Random(args.seed)
    docs = rng.sample(corpus.train, min(args.docs, len(corpus.train)))
    n_fact = round(len(docs) * cfg.data.fact_share / (1 - cfg.data.fact_share))
    lines = rng.sample(corpus.fact_lines, min(n_fact, len(corpus.fact_lines)))
    rows = [{"source": "general", "text": t} for t in docs] + [{"source": "facts", "text": t} for t in lines]
    rng.shuffle(rows)
    out = d / "background_text.jsonl"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    print(f"wrote {out}: {len(docs)} general documents + {len(lines)} fact lines, "
          f"{sum(len(r['text']) for r in rows)} characters")


if __name__ == "__main__":
    main()
