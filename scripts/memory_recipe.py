"""Find a pretraining recipe that keeps the product-key memory healthy, then pretrain the base with it.

Runs short pretrainings of the same base that differ only in the memory recipe, measures slot
usage (share of slots read over the background, usage entropy) and the share of lookup weight
that fact tokens put on specific slots (read in < half of the background sequences), picks the
healthiest variant and (with --final-steps) pretrains the full base with it.

    python scripts/memory_recipe.py --config configs/forgetless-tiny.yaml --out runs/recipe \\
        --ablation-steps 400 --final-steps 4000 --budget-s 480

Everything lands in OUT: ``recipe.json`` / ``recipe.md`` (the ablation table), ``chosen.yaml``
(the config of the final run) and ``final/model`` (the pretrained base).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

from forgetless.config import to_dict
from forgetless.experiments.pretrain import (
    PretrainConfig,
    load_pretrain_config,
    prepare_data,
    pretrain,
)

VARIANTS: dict[str, dict] = {
    "learned query, no norm (prototype)": {"query_norm": "none"},
    "learned query + per-token LayerNorm": {"query_norm": "layernorm"},
    "frozen random query + LayerNorm": {"query_norm": "layernorm", "query_trainable": False},
    "learned query + running whitening": {"query_norm": "whiten"},
    "running whitening + cosine keys + learned temperature": {"query_norm": "whiten", "key_norm": True,
                                                              "learn_temperature": True},
}


def with_memory(cfg: PretrainConfig, overrides: dict) -> PretrainConfig:
    c = copy.deepcopy(cfg)
    base = {"query_norm": "whiten", "query_trainable": True, "key_norm": False, "learn_temperature": False}
    for k, v in {**base, **overrides}.items():
        setattr(c.memory, k, v)
    return c


def summarize(model_dir: Path) -> dict:
    ev = json.loads((model_dir / "evaluation.json").read_text())
    h = ev["memory_health"]
    return {"read_share": h["read_share"], "usage_entropy_ratio": h["usage_entropy_ratio"],
            "effective_slots": h["effective_slots"], "slots_read_in_half_of_docs": h["slots_read_in_half_of_docs"],
            "fact_token_specific_share": h["fact_token_specific_share"],
            "answer_token_specific_share": h["answer_token_specific_share"],
            "uniform_doc_rate": h["uniform_doc_rate"],
            "heldout_ppl": ev["heldout"]["ppl"], "known_probe_em": ev["known_probes"]["exact_match"],
            "new_probe_em": ev["new_probes"]["exact_match"], "train_seconds": ev["train_seconds"]}


def healthy_key(r: dict) -> tuple:
    ok = r["read_share"] >= 0.8 and r["fact_token_specific_share"] >= 0.5
    return (ok, r["fact_token_specific_share"] if ok else r["read_share"] + r["fact_token_specific_share"],
            -r["heldout_ppl"])


def table(results: dict[str, dict]) -> str:
    rows = ["| variant | slots read | entropy / log N | effective slots | slots in >= half of docs | "
            "weight on specific slots (fact tokens) | (answer tokens) | held-out ppl | known probes | new probes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['read_share']:.1%} | {r['usage_entropy_ratio']:.3f} | {r['effective_slots']:,.0f} | "
                    f"{r['slots_read_in_half_of_docs']:,} | {r['fact_token_specific_share']:.1%} | "
                    f"{r['answer_token_specific_share']:.1%} | {r['heldout_ppl']:.1f} | {r['known_probe_em']:.1%} | "
                    f"{r['new_probe_em']:.1%} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="prepared data folder to reuse (default OUT/data)")
    ap.add_argument("--ablation-steps", type=int, default=400)
    ap.add_argument("--ablation-background", type=int, default=300, help="background batches per ablation")
    ap.add_argument("--variants", default="all", help="comma-separated indices into the variant list, or all")
    ap.add_argument("--final-steps", type=int, default=0, help="0: ablations only")
    ap.add_argument("--budget-s", type=float, default=0, help="wall-clock budget; the final run is shortened to fit")
    args = ap.parse_args()

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_pretrain_config(args.config)
    data_dir = prepare_data(cfg, Path(args.data) if args.data else out / "data")
    names = list(VARIANTS)
    if args.variants != "all":
        names = [names[int(i)] for i in args.variants.split(",")]
    results: dict[str, dict] = {}
    rate = None
    for i, name in enumerate(names):
        c = with_memory(cfg, VARIANTS[name])
        c.train.steps = args.ablation_steps
        c.train.eval_every = args.ablation_steps
        c.train.checkpoint_every = 0
        c.background.batches = args.ablation_background
        t0 = time.time()
        model_dir = pretrain(c, out / f"variant{i}", resume=False, progress=False, data_dir=data_dir)
        results[name] = {**summarize(model_dir), "memory": VARIANTS[name], "steps": c.train.steps,
                         "wall_seconds": time.time() - t0}
        rate = results[name]["train_seconds"] / c.train.steps
        print(f"[{time.time() - t_start:.0f}s] {name}: {json.dumps(results[name])}", flush=True)
        (out / "recipe.json").write_text(json.dumps(results, indent=2))
        (out / "recipe.md").write_text(table(results) + "\n")
    print(table(results), flush=True)
    best = max(results, key=lambda n: healthy_key(results[n]))
    print(f"chosen: {best}", flush=True)
    if not args.final_steps:
        return 0
    final = with_memory(cfg, VARIANTS[best])
    steps = args.final_steps
    if args.budget_s and rate:
        overhead = 90.0  # final evaluation, background statistics, saving
        fit = int((args.budget_s - (time.time() - t_start) - overhead) / (rate * 1.1))
        steps = max(100, min(steps, fit))
    final.train.steps = steps
    final.train.eval_every = max(steps // 8, 1)
    final.train.checkpoint_every = max(steps // 4, 1)
    (out / "chosen.yaml").write_text(yaml.safe_dump(to_dict(final), sort_keys=False))
    print(f"final pretraining: {steps} steps with '{best}'", flush=True)
    pretrain(final, out / "final", resume=True, progress=False, data_dir=data_dir)
    print(f"[{time.time() - t_start:.0f}s] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
