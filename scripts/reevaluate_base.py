"""Re-run the evaluation of a pretrained base folder in place (evaluation.json and the model card).

Use after a change to the evaluation code: the weights, the background statistics and the
training record (time, device, probe history) are kept; held-out perplexity, probe accuracy
and memory health are measured again on the saved weights.

    python scripts/reevaluate_base.py src/forgetless/assets/forgetless-tiny --data runs/data-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from forgetless.config import from_dict
from forgetless.experiments.pretrain import PretrainConfig, evaluate_base
from forgetless.models.checkpoint import load_memory_stats, load_model, write_json
from forgetless.models.tokenizer import load_tokenizer
from forgetless.report.modelcard import write_model_card

KEEP = ("train_seconds", "device", "device_name", "train_tokens", "history", "history_note")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--data", default=None, help="data folder with heldout.npy (default: the model folder)")
    args = ap.parse_args()
    d = Path(args.model_dir)
    data = Path(args.data) if args.data else d
    cfg = from_dict(PretrainConfig, json.loads((d / "pretrain_config.json").read_text()))
    old = json.loads((d / "evaluation.json").read_text())
    model, tok, stats = load_model(d), load_tokenizer(d), load_memory_stats(d)
    ev = evaluate_base(model, tok, data, stats, cfg.train.seq_len)
    ev.update({k: old[k] for k in KEEP if k in old})
    ev["probe_sample"] = cfg.train.probe_sample
    write_json(d / "evaluation.json", ev)
    (d / "README.md").write_text(write_model_card(cfg, ev, json.loads((d / "data_split.json").read_text())))
    print(f"known question probes {ev['known_probes']['exact_match']:.1%}, new {ev['new_probes']['exact_match']:.1%}, "
          f"held-out ppl {ev['heldout']['ppl']:.2f}, slots read {ev['memory_health']['read_share']:.1%}, "
          f"specific weight on fact tokens {ev['memory_health']['fact_token_specific_share']:.1%}")


if __name__ == "__main__":
    main()
