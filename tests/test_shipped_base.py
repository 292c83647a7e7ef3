"""The shipped base model: loads, generates, knows its known facts, not its new ones, and has a healthy memory."""

import json
import random
import subprocess
import sys

import pytest
import torch

from forgetless.data.facts import read_builtin_facts
from forgetless.experiments.pretrain import probe_facts
from forgetless.models.checkpoint import load_memory_stats, load_model, save_model
from forgetless.models.folder import default_model_dir
from forgetless.models.memory import named_memory_layers
from forgetless.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.e2e  # every test here trains, pretrains, probes the shipped base or loads a full source

BASE = default_model_dir()


@pytest.fixture(scope="module")
def base():
    return load_model(BASE), load_tokenizer(BASE)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "forgetless.cli", *args], capture_output=True, text=True)


def test_shipped_checkpoint_is_small_and_complete():
    size = (BASE / "model.safetensors").stat().st_size
    assert size <= 60 * 2**20
    for name in ("config.json", "tokenizer.json", "memory_stats.safetensors", "facts_known.jsonl", "facts_new.jsonl",
                 "probe_templates.json", "data_split.json", "README.md", "evaluation.json"):
        assert (BASE / name).is_file(), name


def test_info_reports_parameters_memory_and_health():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert "65,536 slots" in r.stdout and "256x256 product keys" in r.stdout
    assert "slot usage" in r.stdout and "known-fact probes" in r.stdout
    info = json.loads(run_cli("info", "--json").stdout)
    assert info["memory_layers"][0]["slots"] == 65_536
    assert info["parameters"]["memory_values"] == 65_536 * 256
    assert info["tokenizer"]["vocab_size"] == 8192


def test_generate_greedy_answers_a_known_fact_and_sampling_is_seeded():
    r = run_cli("generate", "--prompt", "Question: Tell me the capital of France. Answer:", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Question: Tell me the capital of France. Answer: Paris")
    prompt = "Harbor (n.):"
    outs = [run_cli("generate", "--prompt", prompt, "--sample", "--seed", str(s), "--max-new-tokens", "12").stdout
            for s in (0, 0, 1)]
    assert outs[0] == outs[1] and outs[0].startswith(prompt) and len(outs[0]) > len(prompt) + 5
    assert outs[0] != outs[2]


def test_save_load_of_shipped_base_is_exact(base, tmp_path):
    model, tok = base
    ids = tok(["The capital of Peru is Lima."], return_tensors="pt")["input_ids"]
    d = save_model(model, tmp_path / "copy", tokenizer=tok, values_dtype=torch.bfloat16)
    again = load_model(d)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_known_facts_answered_and_new_facts_not(base):
    """Acceptance: >= 80% of held-out question probes on known facts, <= 10% on new facts."""
    model, tok = base
    known = read_builtin_facts(BASE / "facts_known.jsonl")
    new = read_builtin_facts(BASE / "facts_new.jsonl")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    k = probe_facts(model, tok, known, kinds=("question",))
    n = probe_facts(model, tok, new, kinds=("question",))
    assert k["exact_match"] >= 0.80, k["exact_match"]
    assert n["exact_match"] <= 0.10, n["exact_match"]
    stored = json.loads((BASE / "evaluation.json").read_text())
    assert abs(stored["known_probes"]["exact_match"] - k["exact_match"]) < 1e-9  # the card's number is reproducible


def test_memory_is_healthy(base):
    """Acceptance: >= 80% of slots read over >= 1,000 background batches; >= half of the lookup weight on
    fact tokens falls on slots read in fewer than half of the background sequences."""
    from forgetless.report.modelcard import memory_health

    model, tok = base
    stats = load_memory_stats(BASE)
    name = next(iter(named_memory_layers(model)))
    assert int(stats[f"{name}.n_batches"]) >= 1000
    facts = read_builtin_facts(BASE / "facts_known.jsonl") + read_builtin_facts(BASE / "facts_new.jsonl")
    facts = random.Random(0).sample(facts, 300)
    h = memory_health(model, tok, stats, facts)
    assert h["read_share"] >= 0.80
    assert h["fact_token_specific_share"] >= 0.50
    assert h["uniform_doc_rate"] < 0.5  # the IDF document is small enough to tell specific from general slots
