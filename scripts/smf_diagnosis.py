"""Why sparse memory finetuning does or does not learn: the figures of issue 12 on a small stream.

    PYTHONPATH=src python scripts/smf_diagnosis.py                       # 20 facts, SMF defaults
    PYTHONPATH=src python scripts/smf_diagnosis.py --facts 20 --lr 10 --top-t 500 --material statements
    PYTHONPATH=src python scripts/smf_diagnosis.py --curves 0            # skip the per-fact curves

Prints, for one SMF run over the first ``--facts`` facts of the bench stream (same seed and
order as ``forgetless bench facts``):

1. the union of memory rows SMF selected and the rows whose values changed, against all slots;
2. the rows that carry half (and 90%) of the lookup weight of the known-fact probes, how many
   of them changed, and the share of each known probe's lookup weight on changed rows for the
   facts kept vs the facts lost (how the retained drop tracks the overlap);
3. the selected rows' share of the lookup weight at the taught facts' answer tokens (in the
   training lines, and at the probe positions that predict the answer);
4. how much the memory layer's output moves the answer token: log-prob of the first answer
   token with and without the memory output (ablate-and-compare), before and after, and the
   memory output's direct logit (logit lens through the final norm and unembedding);
5. per-fact learning against steps, batch size and number of distinct lines per step
   (``--curves`` facts taught one at a time from the base, up to ``--max-steps`` steps each).

The figures come from ``forgetless.evaluate.smf_diagnosis`` (pure functions, tested on a
hand-made access log). Known-fact probes: a fixed sample of ``--known`` facts.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from forgetless.data.batches import fact_batch
from forgetless.data.factfile import load_fact_file
from forgetless.data.facts import teaching_sentences
from forgetless.evaluate import smf_diagnosis as D
from forgetless.evaluate.answers import exact_match, greedy_answers
from forgetless.experiments.facts import FactEvaluator, StreamConfig, learn_facts
from forgetless.methods import make_method
from forgetless.data.facts import load_known_facts
from forgetless.models.folder import default_model_dir, load_heldout_ids, open_model
from forgetless.training.lifecycle import MethodContext
from forgetless.models.memory import AccessLog, freeze_query_stats, named_memory_layers


@torch.no_grad()
def lookups(model, tok, texts: list[str], spans: list[tuple[int, int]] | None = None, batch_size: int = 64):
    """Per text: (indices, weights) of the memory layer at its tokens, restricted to the
    character span when given (tokens overlapping [start, end))."""
    (name, mem), = named_memory_layers(model).items()
    mem.access_log = AccessLog(mem.n_slots, keep_last=True)
    out = []
    model.eval()
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, return_offsets_mapping=True)
            off = enc.pop("offset_mapping")
            model(**enc)
            idx, w = mem.access_log.last_full
            for b in range(len(chunk)):
                keep = enc["attention_mask"][b].bool()
                if spans is not None:
                    s, e = spans[i + b]
                    keep &= (off[b, :, 0] < e) & (off[b, :, 1] > s)
                out.append((idx[b][keep], w[b][keep]))
    finally:
        tok.padding_side = "left"
        mem.access_log = None
    return out


@torch.no_grad()
def answer_logit_figures(model, tok, prompts: list[str], answers: list[str]):
    """First-answer-token log-prob with / without the memory output, and the memory output's
    direct logit at the predicting position."""
    (name, mem), = named_memory_layers(model).items()
    captured: dict[str, torch.Tensor] = {}
    ablate = {"on": False}

    def mem_hook(module, args, output):
        captured["mem"] = output
        return torch.zeros_like(output) if ablate["on"] else output

    def norm_hook(module, args):
        captured["resid"] = args[0]

    h1 = mem.register_forward_hook(mem_hook)
    h2 = model.model.norm.register_forward_pre_hook(norm_hook)
    model.eval()
    lp_with, lp_without, direct = [], [], []
    try:
        for p, a in zip(prompts, answers):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            first = tok(p + " " + a, add_special_tokens=False)["input_ids"][len(ids)]
            x = torch.tensor([ids])
            for flag, store in ((False, lp_with), (True, lp_without)):
                ablate["on"] = flag
                logits = model(input_ids=x).logits[0, -1].float()
                store.append(float(logits.log_softmax(-1)[first]))
                if not flag:
                    direct.append(float(D.direct_logit(captured["mem"][0, -1:], captured["resid"][0, -1:],
                                                       model.model.norm.weight, model.lm_head.weight[first][None])[0]))
    finally:
        ablate["on"] = False
        h1.remove()
        h2.remove()
    return torch.tensor(lp_with), torch.tensor(lp_without), torch.tensor(direct)


def probe_text(f) -> tuple[str, tuple[int, int]]:
    """The probe followed by the gold answer, and the span of the positions that predict the
    answer (the last prompt token and the answer tokens)."""
    text = f"{f.question} {f.answer}"
    return text, (len(f.question) - 1, len(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--facts-file", default=None, help="fact JSONL (default: the model's new facts)")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--known", type=int, default=200, help="known facts probed (a fixed sample)")
    ap.add_argument("--lr", type=float, default=3.0)
    ap.add_argument("--top-t", type=int, default=500)
    ap.add_argument("--ranking", default="tfidf")
    ap.add_argument("--protect", type=float, default=0.9, help="smf protect (0: off)")
    ap.add_argument("--steps-per-fact", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--material", default="augmented")
    ap.add_argument("--curves", type=int, default=5, help="facts for the per-fact learning curves (0: skip)")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    t0 = time.time()
    base_dir = Path(args.model) if args.model else default_model_dir()
    facts = load_fact_file(args.facts_file or base_dir / "facts_new.jsonl")
    random.Random(args.seed).shuffle(facts)
    facts = facts[: args.facts]
    model, tok = open_model(base_dir)
    ctx = MethodContext.for_folder(base_dir, tok)
    freeze_query_stats(model)
    (name, mem), = named_memory_layers(model).items()
    n_slots = mem.n_slots
    known = random.Random(args.seed + 17).sample(load_known_facts(base_dir), args.known)
    figs: dict = {"settings": vars(args)}

    # ---- before: known-probe lookups, answers, taught-fact lookups, answer logits
    k_texts = [probe_text(f) for f in known]
    k_lookups = lookups(model, tok, [t for t, _ in k_texts])
    k_pred = lookups(model, tok, [t for t, _ in k_texts], [sp for _, sp in k_texts])  # positions predicting the answer
    k_before = [exact_match(p, f.answer) > 0 for p, f in zip(greedy_answers(model, tok, [f.question for f in known]), known)]
    k_weight = D.weight_per_row(torch.cat([i for i, _ in k_lookups]), torch.cat([w for _, w in k_lookups]), n_slots)
    heavy50, heavy90 = D.heavy_rows(k_weight, 0.5), D.heavy_rows(k_weight, 0.9)
    p_texts = [probe_text(f) for f in facts]
    p_lookups = lookups(model, tok, [t for t, _ in p_texts], [s for _, s in p_texts])
    cfg = StreamConfig(batch_size=args.batch_size, steps_per_fact=args.steps_per_fact, eval_every=0,
                       material=args.material, retained_sample=args.known, final_all_known=False,
                       heldout_tokens=8192, seed=args.seed)
    train_lines = [[s for k in range(cfg.steps_per_fact) for s in
                    teaching_sentences(f, cfg.batch_size, material=cfg.material, step=k, seed=cfg.seed)] for f in facts]
    ans_spans = [[(s.rfind(f.answer), s.rfind(f.answer) + len(f.answer)) for s in lines] for f, lines in zip(facts, train_lines)]
    t_lookups = [lookups(model, tok, lines, spans) for lines, spans in zip(train_lines, ans_spans)]
    lp_b, lp_b_abl, dl_b = answer_logit_figures(model, tok, [f.question for f in facts], [f.answer for f in facts])
    values_before = mem.values.detach().clone()

    # ---- the SMF run, recording the rows selected at every step
    method = make_method("smf", lr=args.lr, top_t=args.top_t, ranking=args.ranking,
                         protect=args.protect)
    selected: list[torch.Tensor] = []
    orig = method.after_backward

    def record(m, step):
        orig(m, step)
        selected.append(next(iter(method.last_selected.values())).clone())

    method.after_backward = record
    evaluator = FactEvaluator(tok, known, load_heldout_ids(base_dir, tok, 8192), cfg)
    model, res = learn_facts(model, tok, facts, method, evaluator, cfg, ctx, progress=False, log=lambda s: None)
    s = res.summary()
    figs["run"] = {k: s[k] for k in ("learned", "statement_acc", "retained", "retained_base", "retained_drop",
                                     "heldout_nll_delta", "train_seconds", "eval_seconds")}
    changed = D.changed_rows(values_before, mem.values.detach())
    union = D.union_rows(selected)
    figs["rows"] = {"slots": n_slots, "selected_union": int(union.numel()), "changed": int(changed.numel()),
                    "changed_share_of_slots": changed.numel() / n_slots,
                    "selected_per_step": sum(r.numel() for r in selected) / max(len(selected), 1)}

    # ---- known-fact rows vs changed rows, and forgetting
    k_after = [exact_match(p, f.answer) > 0 for p, f in zip(greedy_answers(model, tok, [f.question for f in known]), known)]
    figs["known"] = {"heavy50": D.row_overlap(changed, heavy50), "heavy90": D.row_overlap(changed, heavy90),
                     "weight_share_on_changed": D.weight_share_on(torch.cat([i for i, _ in k_lookups]),
                                                                  torch.cat([w for _, w in k_lookups]), changed),
                     "by_outcome": D.overlap_vs_forgetting(k_lookups, k_before, k_after, changed),
                     "by_outcome_answer_positions": D.overlap_vs_forgetting(k_pred, k_before, k_after, changed)}
    lost_preds = [p for p, f, b, a in zip(greedy_answers(model, tok, [f.question for f in known]), known, k_before, k_after)
                  if b and not a]
    taught_answers = {f.answer for f in facts}
    figs["known"]["lost_answered_with_a_taught_answer"] = (sum(p in taught_answers for p in lost_preds) / len(lost_preds)
                                                         if lost_preds else 0.0)
    figs["known"]["lost_examples"] = lost_preds[:8]

    # ---- selected rows' share of the lookup weight at the taught answer tokens
    per_fact = [torch.unique(torch.cat(selected[i * cfg.steps_per_fact:(i + 1) * cfg.steps_per_fact])) for i in range(len(facts))]
    tr = [D.weight_share_on(torch.cat([a for a, _ in L]), torch.cat([b for _, b in L]), rows)
          for L, rows in zip(t_lookups, per_fact)]
    pr = [D.weight_share_on(i, w, rows) for (i, w), rows in zip(p_lookups, per_fact)]
    figs["answer_tokens"] = {"selected_share_train_lines": sum(tr) / len(tr), "selected_share_probe": sum(pr) / len(pr),
                             "changed_share_probe": sum(D.weight_share_on(i, w, changed) for i, w in p_lookups) / len(p_lookups)}

    # ---- memory output and the answer logit
    lp_a, lp_a_abl, dl_a = answer_logit_figures(model, tok, [f.question for f in facts], [f.answer for f in facts])
    figs["answer_logit"] = {"before": D.ablation_effect(lp_b, lp_b_abl), "after": D.ablation_effect(lp_a, lp_a_abl),
                            "logprob_gain": float((lp_a - lp_b).mean()),
                            "direct_logit_before": float(dl_b.mean()), "direct_logit_after": float(dl_a.mean())}

    # ---- per-fact learning vs steps / batch size / distinct lines
    if args.curves:
        curves = {}
        for label, bs, material, distinct in (("batch 16, augmented", 16, "augmented", None),
                                              ("batch 4, augmented", 4, "augmented", None),
                                              ("batch 64, augmented", 64, "augmented", None),
                                              ("batch 16, 1 distinct line", 16, "augmented", 1),
                                              ("batch 16, statements", 16, "statements", None)):
            outcome = []
            for f in facts[: args.curves]:
                m2, _ = open_model(base_dir)
                freeze_query_stats(m2)
                meth = make_method("smf", lr=args.lr, top_t=args.top_t, ranking=args.ranking, protect=0.0)  # one fact alone
                m2 = meth.setup(m2, ctx)
                opt = meth.optimizers()[0]
                row = []
                for k in range(args.max_steps):
                    batch = fact_batch(tok, f, bs, "all", torch.device("cpu"), material=material,
                                       step=0 if distinct == 1 else k, seed=args.seed)
                    if distinct == 1:
                        for key in batch:
                            batch[key] = batch[key][:1].expand(bs, -1).contiguous()
                    m2.train()
                    meth.loss(m2, batch).backward()
                    meth.after_backward(m2, k)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    row.append(exact_match(greedy_answers(m2, tok, [f.question])[0], f.answer) > 0)
                outcome.append(row)
            curves[label] = D.steps_to_learn(outcome)
        figs["curves"] = curves
    figs["seconds"] = time.time() - t0
    print(json.dumps(figs, indent=1, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=1, default=float))


if __name__ == "__main__":
    main()
