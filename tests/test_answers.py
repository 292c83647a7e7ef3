"""Greedy answers with a KV cache and early stopping: the same answers as ``model.generate``."""

import random
from pathlib import Path

import pytest
import torch

import forgetless.models.checkpoint as checkpoint
from forgetless.evaluate.answers import answer_is_final, cut_answer, greedy_answers
from forgetless.models.memory import MemoryConfig, add_memory_layers
from forgetless.models.tokenizer import load_tokenizer

BASE = Path(checkpoint.__file__).resolve().parents[1] / "assets" / "forgetless-tiny"


def generate_answers(model, tok, prompts, max_new_tokens=10, batch_size=64):
    """The reference: transformers' greedy generate on each whole batch, then ``cut_answer``."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        out += [cut_answer(t) for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def test_a_final_answer_does_not_change_whatever_follows():
    rng = random.Random(0)
    pieces = ["Paris", " St", ".", ". ", " ", "\n", " Question:", " Answer:", "J", "r", "e", "A", " Mt", ","]
    finals = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        if not answer_is_final(text):
            continue
        finals += 1
        for _ in range(5):
            more = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
            assert cut_answer(text + more) == cut_answer(text), (text, more)
    assert finals > 500
    assert not answer_is_final("Abu Dhabi") and not answer_is_final("St.")  # "St." may go on ("St. John's")
    assert answer_is_final("Abu Dhabi\n") and answer_is_final("Asia. The")


def test_cached_early_stopping_answers_equal_generate_on_a_small_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(BASE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = add_memory_layers(LlamaForCausalLM(cfg), [1], config=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8)).eval()
    prompts = ["Question: What is the capital of France? Answer:", "The river", "A", "Question: Who wrote it?",
               "Paris is the capital of", "x y z", "Answer: the"]
    # make rows stop at different steps: EOS (id 0) gets the output weights of the token the first
    # row generates third, so it wins that tie (argmax takes the lowest id) wherever that token would come
    tok.padding_side = "left"
    enc = tok(prompts[:4], return_tensors="pt", padding=True)
    first = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[int(first[0, enc["input_ids"].shape[1] + 2])]
    want = generate_answers(model, tok, prompts, batch_size=4)
    assert greedy_answers(model, tok, prompts, batch_size=4) == want
    assert len(want[0].split()) <= 2  # the first row did stop early
    assert greedy_answers(model, tok, prompts[:1], max_new_tokens=1) == generate_answers(model, tok, prompts[:1], 1)


@pytest.mark.e2e
def test_greedy_answers_equal_generate_on_the_shipped_base():
    from forgetless.data.facts import probe_prompts, read_builtin_facts
    from forgetless.models.checkpoint import load_model

    model, tok = load_model(BASE).eval(), load_tokenizer(BASE)
    facts = read_builtin_facts(BASE / "facts_known.jsonl")[:24]
    prompts = [f.question for f in facts] + [probe_prompts(f)["cloze"] for f in facts[:12]]
    got = greedy_answers(model, tok, prompts, batch_size=16)
    assert got == generate_answers(model, tok, prompts)
    learned = sum(a == f.answer for a, f in zip(got, facts))
    assert learned >= 12  # the base knows most of its known facts


def test_heldout_nll_keeps_the_logits_of_one_forward_within_the_budget(monkeypatch):
    """A large vocabulary gets fewer windows per forward; the NLL is the same."""
    import forgetless.evaluate.answers as answers
    from helpers import tiny_llama

    model = tiny_llama(vocab=32, positions=16)
    ids = torch.randint(0, 32, (8 * 16 + 1,), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.register_forward_hook(lambda m, args, kw, out: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    whole = answers.heldout_nll(model, ids, seq_len=16, batch_size=8)
    assert seen == [8]
    seen.clear()
    monkeypatch.setattr(answers, "LOGITS_BUDGET", 3 * 16 * 32 * 4)  # room for 3 windows of fp32 logits
    split = answers.heldout_nll(model, ids, seq_len=16, batch_size=8)
    hook.remove()
    assert seen == [3, 3, 2] and split["tokens"] == whole["tokens"] == 8 * 16
    assert abs(split["nll"] - whole["nll"]) < 1e-6
