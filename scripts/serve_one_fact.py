"""Which method settings make the shipped base answer ONE taught new fact (the serve defaults).

For each setting (method, lr, steps), teaches each of the first ``--facts`` built-in new facts
that the base does not already answer, one at a time, each on a fresh copy of the base, exactly
as ``forgetless serve`` does (a batch of 16 statements and question/answer lines in the training
templates, never the probe; ``serve.service.teaching_batch``), then measures with the serve
gate's own ``RetentionSet``: the held-out question probe of the fact (learned), the retention set
(20 known facts the base answers; the base scores 1.0) and the held-out NLL change.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/serve_one_fact.py
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from forgetless.data.facts import load_known_facts, read_builtin_facts
from forgetless.evaluate.answers import greedy_answers
from forgetless.methods import make_method
from forgetless.models.folder import load_heldout_ids, open_model
from forgetless.models.memory import freeze_query_stats
from forgetless.training.lifecycle import Experience, MethodContext, fit_experience
from forgetless.serve.gate import RetentionSet
from forgetless.serve.service import teaching_batch

SETTINGS = [("smf", 10.0, 8), ("smf", 5.0, 8), ("smf", 3.0, 16), ("lora", 3e-4, 8), ("lora", 1e-3, 8),
            ("full", 3e-5, 8), ("full", 1e-4, 4), ("full", 1e-3, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--settings", default=None, help='JSON list of [method, lr, steps]')
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(__file__).resolve().parents[1] / "src" / "forgetless" / "assets" / "forgetless-tiny"
    base, tok = open_model(d)
    ctx = MethodContext.for_folder(d, tok)
    freeze_query_stats(base)
    rs = RetentionSet(base, tok, load_known_facts(d), load_heldout_ids(d, tok, 4096), 20)
    b0 = rs.measure(base, [])
    new = read_builtin_facts(d / "facts_new.jsonl")[:8 * args.facts]
    answers = greedy_answers(base, tok, [f.question for f in new])
    facts = [f for f, a in zip(new, answers) if a != f.answer][:args.facts]
    print(f"base: retained {b0['retained']:.2f}, held-out NLL {b0['heldout_nll']:.3f}; {len(facts)} facts")
    print("| method | lr | steps | learned | retention drop (each fact) | NLL change (mean) | train s/fact |")
    print("|---|---|---|---|---|---|---|")
    for m, lr, steps in (json.loads(args.settings) if args.settings else SETTINGS):
        ok, drops, dnll, secs = 0.0, [], [], 0.0
        for f in facts:
            batch = teaching_batch(tok, f, 16, True)
            fit = fit_experience(make_method(m, lr=lr), copy.deepcopy(base), ctx,
                                 Experience(name=f.id, train_batch=lambda s: batch, steps=steps), progress=False)
            secs += fit.train_seconds
            r = rs.measure(fit.model, [f])
            ok += r["learned"]
            drops.append(b0["retained"] - r["retained"])
            dnll.append(r["heldout_nll"] - b0["heldout_nll"])
        print(f"| {m} | {lr:g} | {steps} | {ok:.0f}/{len(facts)} | {', '.join(f'{x:.2f}' for x in drops)} | "
              f"{sum(dnll) / len(dnll):+.4f} | {secs / len(facts):.1f} |", flush=True)


if __name__ == "__main__":
    main()
