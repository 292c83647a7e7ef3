"""Retrieval baseline: BM25 and dense search, the context-prepending wrapper, and a tiny
`forgetless run` (domain + facts streams) that resumes with the same index."""

import math

import pytest
import torch
from safetensors.torch import load_file

import forgetless.experiments.runner as run_mod
from forgetless.experiments.runner import load_run_config, run
from forgetless.methods import make_method
from forgetless.methods.retrieval.index import PassageIndex, bm25_tokens
from forgetless.methods.retrieval.method import (
    RetrievalLM,
    context_ids,
    context_text,
    experience_passages,
    irrelevant_passage,
    reader_example,
)
from forgetless.models.folder import default_model_dir
from forgetless.models.tokenizer import load_tokenizer
from forgetless.training import Experience

BASE = default_model_dir()

PASSAGES = [
    "The river flows through the old town and the market.",
    "The old town has a market on every day of the week.",
    "Zanzibar exports cloves and nutmeg to the world.",
    "The market of the town sells fish and the bread.",
    "A train leaves the town at noon for the river port.",
]


def test_bm25_ranks_the_passage_with_the_rare_words_first_and_scores_by_the_formula():
    ix = PassageIndex("bm25")
    assert ix.add(PASSAGES + [PASSAGES[0]]) == 5 and len(ix) == 5  # duplicates stored once
    hits = ix.search("Where do cloves and nutmeg come from, the town?", k=3)
    assert hits[0][0] == PASSAGES[2] and hits[0][1] > hits[1][1]
    # Okapi BM25 by hand for a one-word query ("cloves": in 1 of 5 passages), k1 = 1.5, b = 0.75
    docs = [bm25_tokens(p) for p in PASSAGES]
    avgdl = sum(map(len, docs)) / 5
    idf = math.log((5 - 1 + 0.5) / (1 + 0.5))
    tf, dl = 1, len(docs[2])
    want = idf * tf * 2.5 / (tf + 1.5 * (1 - 0.75 + 0.75 * dl / avgdl))
    (best, score), = ix.search("cloves", k=1)
    assert best == PASSAGES[2] and score == pytest.approx(want, rel=1e-9)
    assert ix.nbytes == sum(len(p.encode()) for p in PASSAGES)


@pytest.mark.e2e
def test_dense_search_finds_each_passage_from_its_own_text_and_round_trips(tmp_path):
    ix = PassageIndex("dense")
    ix.add(PASSAGES)
    assert ix.vectors.shape == (5, 384) and torch.allclose(ix.vectors.norm(dim=1), torch.ones(5), atol=1e-5)
    for p, hits in zip(PASSAGES, ix.search_batch(PASSAGES, k=2)):
        assert hits[0][0] == p and hits[0][1] == pytest.approx(1.0, abs=1e-4) and hits[1][1] < 0.99
    assert ix.nbytes == sum(len(p.encode()) for p in PASSAGES) + 5 * 384 * 4
    ix.save(tmp_path / "ix")
    back = PassageIndex.load(tmp_path / "ix")
    assert back.passages == ix.passages and torch.equal(back.vectors, ix.vectors)
    again = PassageIndex.from_tensors("dense", ix.to_tensors())
    assert again.passages == ix.passages and torch.equal(again.vectors, ix.vectors)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer(BASE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def _rows(tok, texts):
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    tok.padding_side = "left"
    return enc


@torch.no_grad()
def test_wrapper_forward_keeps_the_original_positions(tiny):
    model, tok = tiny
    enc = _rows(tok, ["Zanzibar exports many cloves to the world market.", "The old town market sells bread."])
    empty = RetrievalLM(model, tok, PassageIndex("bm25"), top_k=1)
    assert torch.equal(empty(**enc).logits, model(**enc).logits)  # empty index: exactly the base
    ix = PassageIndex("bm25")
    ix.add(PASSAGES)
    whole = RetrievalLM(model, tok, ix, top_k=1, stride=0)
    got = whole(**enc).logits
    assert got.shape == enc["input_ids"].shape + (len(tok),)
    for b in range(2):  # stride 0: one context from the whole row, then the row
        real = enc["input_ids"][b][enc["attention_mask"][b].bool()]
        top = ix.search(tok.decode(real), 1)[0][0]
        ctx = context_ids(tok, [top], 64)
        assert tok.decode(ctx) == f"Context: {top}\n"
        ref = model(input_ids=torch.tensor([ctx + real.tolist()])).logits[0, len(ctx):]
        assert torch.allclose(got[b, :len(real)], ref, atol=1e-5)
    chunked = RetrievalLM(model, tok, ix, top_k=1, stride=4)(**enc).logits
    # the first chunk has no prefix to query with: no context, i.e. the base's own logits
    assert torch.allclose(chunked[:, :4], model(**enc).logits[:, :4], atol=1e-5)
    assert not torch.allclose(chunked[0, 4:8], model(**enc).logits[0, 4:8], atol=1e-3)


@torch.no_grad()
def test_wrapper_generate_returns_the_prompt_and_the_new_tokens(tiny):
    model, tok = tiny
    ix = PassageIndex("bm25")
    ix.add(PASSAGES)
    wrap = RetrievalLM(model, tok, ix, top_k=2)
    tok.padding_side = "left"
    enc = tok(["Question: What does Zanzibar export? Answer:", "Question: Where is the market?"],
              return_tensors="pt", padding=True)
    out = wrap.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                        eos_token_id=None)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5) and torch.equal(out[:, :enc["input_ids"].shape[1]],
                                                                            enc["input_ids"])
    prompt = "Question: What does Zanzibar export? Answer:"
    passages = [p for p, _ in ix.search(prompt, 2)]
    assert passages[0] == PASSAGES[2]
    ids = torch.tensor([context_ids(tok, passages, 64) + tok(prompt)["input_ids"]])
    assert tok.decode(ids[0]).startswith(context_text(passages))
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert torch.equal(out[0, -5:], ref[0, -5:])


def test_experience_passages_are_the_distinct_unpadded_training_sequences():
    tok = load_tokenizer(BASE)
    texts = ["Lima is the capital of Peru.", "Peru has its capital at Lima, a large city."]
    enc = _rows(tok, texts)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    exp = Experience("e", lambda step: batch, steps=3, test=None)  # the same batch at every step
    assert experience_passages(exp, tok) == texts


TINY = """
name: tiny
seed: 3
experiments:
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 64, test_docs: 4,
             eval_every: 0, general_tokens: 512}
    methods:
      - {name: retrieval, index: bm25, top_k: 1, stride: 32}
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 2, steps_per_fact: 1, batch_size: 4,
             eval_every: 0}
    methods:
      - {name: retrieval, index: bm25, top_k: 1, reader_steps: 2}
"""
FACTS_ONLY = "name: tiny\nseed: 3\nexperiments:\n  - name: facts" + TINY.split("  - name: facts", 1)[1]


@pytest.mark.e2e
def test_tiny_run_on_domain_and_facts_streams_resumes_with_the_same_index(tmp_path, quick_runs, interrupt_run):
    p = tmp_path / "run.yaml"
    p.write_text(TINY)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for name in ("domain", "facts"):
        m = full[name]["methods"]["retrieval"]
        assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"]) and m["trainable_params"] == 0
    state = load_file(str(tmp_path / "full" / "facts" / "retrieval" / "state" / run_mod.METHOD_STATE))
    ix = PassageIndex.from_tensors("bm25", {k[6:]: v for k, v in state.items() if k.startswith("index.")})
    assert len(ix) == 4 * 4 and state["reader_done"].item() == 1  # 2 x 2 facts, 4 distinct sentences each
    interrupt_run(lambda n, state_dir: n == 1)  # Ctrl-C after the first experience of the facts stream
    p.write_text(FACTS_ONLY)  # the same facts experiment alone (same seed: same facts, same order)
    with pytest.raises(KeyboardInterrupt):
        run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    logs = []
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=logs.append)
    assert any("resuming after experience 1 of 2" in line for line in logs)
    assert resumed["facts"]["methods"]["retrieval"]["R"] == full["facts"]["methods"]["retrieval"]["R"]
    assert resumed["facts"]["methods"]["retrieval"]["b"] == full["facts"]["methods"]["retrieval"]["b"]
    again = load_file(str(tmp_path / "resumed" / "facts" / "retrieval" / "state" / run_mod.METHOD_STATE))
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def _known_facts():
    from forgetless.data.facts import Fact

    rows = [("capital", "Peru", "Lima"), ("capital", "Kenya", "Nairobi"), ("capital", "Chile", "Santiago"),
            ("capital", "Japan", "Tokyo"), ("currency", "Norway", "krone"), ("currency", "Mexico", "peso")]
    return [Fact(id=f"{r}:{s}", relation=r, subject=s, answer=a, statement=f"{s} {a}.", question=f"{s}?")
            for r, s, a in rows]


def test_reader_examples_with_irrelevant_context_are_labelled_with_the_known_facts_own_answer():
    import random
    import re

    from forgetless.data.facts import STATEMENTS

    tok = load_tokenizer(BASE)
    known = _known_facts()
    rng = random.Random(0)
    for _ in range(50):  # the irrelevant passage: same relation, another subject, another answer
        f = rng.choice(known)
        p = irrelevant_passage(rng, f, known)
        assert f.subject not in p and f.answer not in p
        pats = [re.escape(t).replace(re.escape("{s}"), ".+").replace(re.escape("{a}"), ".+")
                for t in STATEMENTS[f.relation]]
        assert any(re.fullmatch(q, p) for q in pats)
    kinds = {"none": 0, "irrelevant": 0, "relevant": 0}
    for _ in range(400):
        x, y = reader_example(rng, known, tok, irrelevant=0.25)
        assert len(x) == len(y)
        n = sum(1 for v in y if v == -100)
        assert all(v == -100 for v in y[:n]) and y[n:] == x[n:]  # loss on the answer tokens only
        text, label = tok.decode(x[:n]), tok.decode(x[n:]).strip()
        ctx, question = text.split("\n", 1) if text.startswith("Context: ") else ("", text)
        asked = [f for f in known if f.subject in question]
        if not ctx:
            kinds["none"] += 1
            assert len(asked) == 1 and label == asked[0].answer
        elif asked and asked[0].subject not in ctx:  # irrelevant context: answered from memory
            kinds["irrelevant"] += 1
            assert label == asked[0].answer and asked[0].answer not in ctx
        else:  # the context holds the answer (known or invented subject)
            kinds["relevant"] += 1
            assert label in ctx
    assert 70 <= kinds["irrelevant"] <= 130 and 70 <= kinds["none"] <= 130 and kinds["relevant"] >= 160
    old = [reader_example(random.Random(i), known, tok, irrelevant=0.0) for i in range(100)]
    for x, y in old:  # the first recipe: every context holds the question's answer
        n = sum(1 for v in y if v == -100)
        text = tok.decode(x[:n])
        if text.startswith("Context: "):
            assert tok.decode(x[n:]).strip() in text.split("\n", 1)[0]


@torch.no_grad()
def test_min_score_drops_low_scoring_passages(tiny):
    model, tok = tiny
    ix = PassageIndex("bm25")
    ix.add(PASSAGES)
    prompt = "Question: What does Zanzibar export? Answer:"
    (top, score), = ix.search(prompt, 1)
    enc = tok([prompt], return_tensors="pt")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert RetrievalLM(model, tok, ix, min_score=score)._contexts([prompt], [64]) == [context_ids(tok, [top], 64)]
    high = RetrievalLM(model, tok, ix, min_score=score + 1e-6)
    assert high._contexts([prompt], [64]) == [[]]
    assert torch.equal(high.generate(**enc, **kw), model.generate(**enc, **kw))  # no context: the base's tokens


def test_bad_options_fail_with_one_sentence():
    from forgetless.errors import ConfigError

    with pytest.raises(ConfigError, match="retrieval option 'index' must be one of"):
        make_method("retrieval", index="faiss")
    with pytest.raises(ConfigError, match="retrieval option 'top_k' must be an integer >= 1"):
        make_method("retrieval", top_k=0)
    with pytest.raises(ConfigError, match="retrieval option 'reader_irrelevant' must be in \\[0, 0.5\\]"):
        make_method("retrieval", reader_irrelevant=0.6)


def test_reader_qa_contexts_write_relevant_contexts_as_question_answer_lines():
    import random

    from forgetless.methods.retrieval.method import reader_example

    tok = load_tokenizer(BASE)
    known = _known_facts()
    rng = random.Random(3)
    qa, n = 0, 0
    for _ in range(200):
        x, y = reader_example(rng, known, tok, irrelevant=0.0, qa_contexts=1.0)
        text = tok.decode(x)
        if not text.startswith("Context:"):
            continue  # the plain no-context quarter
        n += 1
        context = text.split("\n", 1)[0]
        answer = tok.decode([t for t in y if t != -100]).strip()
        assert answer in context  # relevant: the context holds the label
        qa += context.startswith("Context: Question:") or " Question: " in context
    assert n > 100 and qa == n  # every relevant context is a question/answer line
