"""Retrieval baseline on the shipped base: can the base read its context, and what retrieval costs.

1. Context use: greedy exact match on the *new* facts' held-out question probes (a fixed sample),
   with the fact's statement put before the question in several formats, vs without. The
   "wrapper" format is the one ``methods.retrieval.RetrievalLM`` uses.
2. The fact stream (``--facts`` new facts, their teaching sentences indexed as the method does):
   learned (probe EM of those facts through the wrapper), retained (known-fact probe EM through
   the wrapper), latency added per query (greedy answer, batch 1, ms; wrapper vs bare base, same
   process) and the time of the search alone, index size (bytes) and passage count, for BM25
   and dense.

3. Robustness to irrelevant context (``--robustness``, which replaces parts 1 and 2): exact
   match on ``--sample`` new facts with their own statement in context, with an *irrelevant*
   statement in context (another new fact of the same relation: other subject, other answer),
   and with no context; and on all known facts with no context and through the BM25 wrapper
   over the index of a fact stream of 20 / 40 new facts (the passage it retrieves is about
   another subject: the situation of a fact-stream run), with the learned score of those new
   facts through the same wrapper, for each ``--min-scores`` threshold (none = keep every hit).

With ``--reader-steps N`` the parts are repeated after the method's reader fine-tune
(N steps on known facts and invented names only; ``--reader-irrelevant`` is the fraction of
irrelevant-context examples, 0 = the first recipe; see ``methods/retrieval.py``).

    OMP_NUM_THREADS=1 python benchmarks/retrieval.py --facts 20 --reader-steps 200
    OMP_NUM_THREADS=1 python benchmarks/retrieval.py --robustness --reader-steps 200 --reader-irrelevant 0.25
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from forgetless.data.facts import read_builtin_facts
from forgetless.evaluate.answers import greedy_answers, heldout_nll, score_answers
from forgetless.experiments.streams import StreamConfig, fact_stream
from forgetless.methods import MethodContext
from forgetless.methods.retrieval.method import Retrieval, train_reader
from forgetless.models.folder import default_model_dir, load_heldout_ids, open_model
from forgetless.models.memory import freeze_query_stats


def em(model, tok, prompts, facts) -> float:
    return score_answers(greedy_answers(model, tok, prompts), [f.answer for f in facts])["exact_match"]


def context_use(model, tok, new, known, sample: int, seed: int) -> None:
    rng = random.Random(seed)
    facts, other = rng.sample(new, sample), rng.sample(new, sample)
    formats = {
        "no context": lambda f, o: f.question,
        "wrapper: Context: S\\nQ": lambda f, o: f"Context: {f.statement}\n{f.question}",
        "pretraining: Context: S Q": lambda f, o: f"Context: {f.statement} {f.question}",
        "bare: S\\nQ": lambda f, o: f"{f.statement}\n{f.question}",
        "paraphrase: Context: P\\nQ": lambda f, o: f"Context: {f.paraphrases[-1]}\n{f.question}",
        "distractor after: Context: S O\\nQ": lambda f, o: f"Context: {f.statement} {o.statement}\n{f.question}",
        "distractor before: Context: O S\\nQ": lambda f, o: f"Context: {o.statement} {f.statement}\n{f.question}",
        "wrong fact only: Context: O\\nQ": lambda f, o: f"Context: {o.statement}\n{f.question}",
    }
    print(f"  context use, {sample} new facts (exact match of the probe answer):")
    for name, fn in formats.items():
        print(f"    {name:40s} {em(model, tok, [fn(f, o) for f, o in zip(facts, other)], facts):.3f}")
    print(f"    known facts, no context (all {len(known)}):   {em(model, tok, [f.question for f in known], known):.3f}")


def per_query_ms(model, tok, prompts) -> float:
    greedy_answers(model, tok, prompts[:2], batch_size=1)  # warm-up
    t0 = time.perf_counter()
    greedy_answers(model, tok, prompts, batch_size=1)
    return (time.perf_counter() - t0) * 1000 / len(prompts)


def fact_stream_costs(model, tok, model_dir, n_facts: int, seed: int, reader_steps: int) -> None:
    stream = fact_stream(model_dir, tok, StreamConfig(kind="facts", experiences=1, facts_per_experience=n_facts,
                                                      steps_per_fact=1, batch_size=16), seed)
    exp = stream.experiences[0]
    known = read_builtin_facts(model_dir / "facts_known.jsonl")
    known = random.Random(seed + 17).sample(known, 100)
    qs = [f.question for f in exp.test]
    for kind in ("bm25", "dense"):
        method = Retrieval(index=kind, top_k=1)
        method.reader_done = reader_steps > 0  # the model given here is already tuned
        base = method.setup(model, MethodContext(model_dir=model_dir, tokenizer=tok, experience=exp))
        wrapped = method.export(base).eval()
        ix = method.index
        ix.search("warm up", 1)
        t0 = time.perf_counter()
        for q in qs:
            ix.search(q, 1)
        search_ms = (time.perf_counter() - t0) * 1000 / len(qs)
        bare_ms, wrap_ms = per_query_ms(base, tok, qs), per_query_ms(wrapped, tok, qs)
        print(f"  {kind:5s}: {len(ix)} passages, index {ix.nbytes:,} bytes | learned {em(wrapped, tok, qs, exp.test):.3f}"
              f" (base {em(base, tok, qs, exp.test):.3f}) | retained {em(wrapped, tok, [f.question for f in known], known):.3f}"
              f" (base {em(base, tok, [f.question for f in known], known):.3f}) | per query: base {bare_ms:.1f} ms,"
              f" with retrieval {wrap_ms:.1f} ms (+{wrap_ms - bare_ms:.1f}), search alone {search_ms:.2f} ms")


def robustness(model, tok, model_dir, new, known, sample: int, seed: int, stream_sizes: list[int],
               min_scores: list[float | None]) -> None:
    rng = random.Random(seed)
    facts = rng.sample(new, sample)
    other = []
    for f in facts:  # an irrelevant statement: another new fact of the same relation
        pool = [g for g in new if g.relation == f.relation and g.subject != f.subject and g.answer != f.answer]
        other.append(rng.choice(pool))
    print(f"  {sample} new facts (exact match):"
          f" right statement {em(model, tok, [f'Context: {f.statement}' + chr(10) + f.question for f in facts], facts):.3f}"
          f" | irrelevant statement {em(model, tok, [f'Context: {o.statement}' + chr(10) + f.question for f, o in zip(facts, other)], facts):.3f}"
          f" | no context {em(model, tok, [f.question for f in facts], facts):.3f}")
    kq = [f.question for f in known]
    print(f"  {len(known)} known facts, no context: {em(model, tok, kq, known):.3f}")
    for n in stream_sizes:
        stream = fact_stream(model_dir, tok, StreamConfig(kind="facts", experiences=1, facts_per_experience=n,
                                                          steps_per_fact=1, batch_size=16), seed)
        exp = stream.experiences[0]
        for ms in min_scores:
            method = Retrieval(index="bm25", top_k=1, min_score=ms)
            method.reader_done = True  # never tune here
            base = method.setup(model, MethodContext(model_dir=model_dir, tokenizer=tok, experience=exp))
            wrapped = method.export(base).eval()
            kept = sum(1 for h in method.index.search_batch(kq, 1) if ms is None or h[0][1] >= ms) / len(kq)
            print(f"    stream of {n} new facts ({len(method.index)} passages), min_score {ms}: known facts through the"
                  f" wrapper {em(wrapped, tok, kq, known):.3f} (context kept for {kept:.2f} of them) | learned"
                  f" {em(wrapped, tok, [f.question for f in exp.test], exp.test):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--reader-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reader-irrelevant", type=float, default=0.25)
    ap.add_argument("--robustness", action="store_true")
    ap.add_argument("--stream-sizes", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--min-scores", type=float, nargs="*", default=[])
    ap.add_argument("--save-tuned", default="", help="save the tuned model's state dict to this file")
    ap.add_argument("--load-tuned", default="", help="load a state dict saved by --save-tuned instead of tuning")
    ap.add_argument("--skip-base", action="store_true", help="measure only the tuned model")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model_dir = default_model_dir()
    model, tok = open_model(model_dir)
    freeze_query_stats(model)
    model.eval()
    new = read_builtin_facts(model_dir / "facts_new.jsonl")
    known = read_builtin_facts(model_dir / "facts_known.jsonl")
    heldout = load_heldout_ids(model_dir, tok, 8192)
    stages = [] if args.skip_base else [("shipped base", 0)]
    stages += [("after the reader fine-tune", args.reader_steps)] if args.reader_steps else []
    for title, steps in stages:
        if steps and args.load_tuned:
            model.load_state_dict(torch.load(args.load_tuned))
            print(f"loaded the tuned model {args.load_tuned}")
        elif steps:
            t0 = time.time()
            torch.manual_seed(args.seed)
            train_reader(model, tok, known, steps, seed=args.seed, irrelevant=args.reader_irrelevant)
            print(f"reader fine-tune: {steps} steps, reader_irrelevant {args.reader_irrelevant},"
                  f" in {time.time() - t0:.0f} s")
            if args.save_tuned:
                torch.save(model.state_dict(), args.save_tuned)
        nll = heldout_nll(model, heldout, seq_len=128, batch_size=32)["nll"]
        print(f"== {title} (held-out NLL {nll:.3f})")
        if args.robustness:
            robustness(model, tok, model_dir, new, known, args.sample, args.seed, args.stream_sizes,
                       [None] + args.min_scores)
            continue
        context_use(model, tok, new, known, args.sample, args.seed)
        fact_stream_costs(model, tok, model_dir, args.facts, args.seed, steps)


if __name__ == "__main__":
    main()
