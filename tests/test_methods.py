"""Fact-injection methods: TF-IDF slot scores, top-t selection, the sparse-update invariant of SMF,
LoRA leaving base weights untouched, and fact-file validation."""

import json
import math

import pytest
import torch

from forgetless.cli import main
from forgetless.data.batches import fact_batch
from forgetless.data.factfile import load_fact_file
from forgetless.data.facts import read_builtin_facts
from forgetless.errors import DataSourceError
from forgetless.evaluate.facts import FactEvaluator
from forgetless.experiments.facts import learn_facts
from forgetless.experiments.streams import StreamConfig
from forgetless.methods import make_method
from forgetless.methods.smf import (
    keep_rows,
    select_read_slots,
    select_top_slots,
    tfidf_scores,
)
from forgetless.models.folder import default_model_dir, load_heldout_ids, open_model
from forgetless.models.memory import named_memory_layers
from forgetless.training import MethodContext

BASE = default_model_dir()


def test_tfidf_scores_equal_the_formula_on_a_hand_made_table():
    counts = torch.tensor([4, 0, 2, 2, 8])
    doc_freq = torch.tensor([0, 5, 9, 1, 99])
    n_docs = 99
    got = tfidf_scores(counts, doc_freq, n_docs)
    total = 16
    want = [c / total * math.log((n_docs + 1) / (d + 1)) for c, d in zip(counts.tolist(), doc_freq.tolist())]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    assert got[4] == 0.0  # read in every background document: no specific weight
    assert got[0] > got[3] > got[2]  # same tf of 2 and 3, rarer in the background wins


def test_top_t_selection_picks_the_highest_scoring_read_slots():
    counts = torch.tensor([3, 0, 1, 5, 2, 0, 1])
    scores = torch.tensor([0.3, 9.0, 0.1, 0.5, 0.5, 8.0, 0.2], dtype=torch.float64)
    assert select_top_slots(scores, counts, 2).tolist() == [3, 4]  # tie 0.5/0.5 both in; unread slots 1, 5 never
    assert select_top_slots(scores, counts, 3).tolist() == [0, 3, 4]
    assert select_top_slots(scores, counts, 10).tolist() == [0, 2, 3, 4, 6]  # fewer read than t: all read ones


@pytest.mark.parametrize("ranking", ["tfidf", "tf", "all"])
def test_scoring_only_the_read_slots_selects_what_ranking_all_n_selects(ranking):
    torch.manual_seed(7)
    n = 4096
    for trial in range(5):
        reads = torch.randint(0, n, (1500,)) if trial % 2 else torch.randint(0, 300, (2000,))  # many ties
        doc_freq = torch.randint(0, 50, (n,))
        counts = torch.bincount(reads, minlength=n)
        if ranking == "all":
            want = (counts > 0).nonzero().flatten()
        else:
            scores = tfidf_scores(counts, doc_freq, 60) if ranking == "tfidf" else counts.double()
            want = select_top_slots(scores, counts, 100)
        got = select_read_slots(reads, ranking, 100, doc_freq, 60)
        assert torch.equal(got, want)


def test_keep_rows_of_a_coalesced_gradient_stays_coalesced_without_resorting():
    g = torch.sparse_coo_tensor(torch.tensor([[1, 3, 4, 7]]), torch.arange(8.0).view(4, 2), (9, 2)).coalesce()
    out = keep_rows(g, torch.tensor([3, 7, 8]))
    assert out.is_coalesced() and out._indices()[0].tolist() == [3, 7]
    assert out._values().tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert keep_rows(g, torch.tensor([1, 3, 4, 7])) is g  # nothing to drop: the same tensor


def test_keep_rows_masks_sparse_and_dense_gradients():
    dense = torch.arange(12.0).view(6, 2)
    sparse = dense.to_sparse()
    rows = torch.tensor([1, 4])
    for g in (dense, sparse):
        out = keep_rows(g, rows)
        out = out.to_dense() if out.is_sparse else out
        assert out[[1, 4]].equal(dense[[1, 4]]) and out[[0, 2, 3, 5]].abs().sum() == 0


@pytest.fixture(scope="module")
def stream_parts():
    model, tok = open_model(BASE)
    ctx = MethodContext.for_folder(BASE, tok)
    facts = read_builtin_facts(BASE / "facts_new.jsonl")[:3]
    cfg = StreamConfig(kind="facts", batch_size=8, steps_per_fact=2, eval_every=0, retained_sample=10, heldout_tokens=512)
    from forgetless.data.facts import load_known_facts
    ev = FactEvaluator(tok, load_known_facts(BASE)[:10], load_heldout_ids(BASE, tok, 512), cfg)
    return tok, ctx, facts, cfg, ev


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.e2e
def test_smf_changes_only_selected_value_rows(stream_parts):
    tok, ctx, facts, cfg, ev = stream_parts
    model, _ = open_model(BASE)
    before = _snapshot(model)
    method = make_method("smf", lr=50.0, top_t=40)
    selected: set[int] = set()
    orig = method.after_backward

    def record(m, step):
        orig(m, step)
        selected.update(next(iter(method.last_selected.values())).tolist())

    method.after_backward = record
    model, res = learn_facts(model, tok, facts, method, ev, cfg, ctx, progress=False, log=lambda s: None)
    after = model.state_dict()
    name = next(iter(named_memory_layers(model)))
    for k, v in before.items():
        if k == f"{name}.values":
            continue
        assert torch.equal(v, after[k]), f"{k} changed"  # every other parameter and buffer: bit-for-bit
    changed = (after[f"{name}.values"] != before[f"{name}.values"]).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= selected
    assert len(selected) <= 40 * cfg.steps_per_fact * len(facts)
    assert res.trainable_params_per_step == 40 * 256


@pytest.mark.e2e
def test_lora_leaves_base_weights_unchanged(stream_parts):
    tok, ctx, facts, cfg, ev = stream_parts
    model, _ = open_model(BASE)
    before = _snapshot(model)
    method = make_method("lora", lr=1e-3, rank=4)
    peft_model = method.setup(model, ctx)
    batch = fact_batch(tok, facts[0], 8, "all", torch.device("cpu"))
    for _ in range(3):
        method.loss(peft_model, batch).backward()
        method.optimizers()[0].step()
        method.optimizers()[0].zero_grad()
    base_now = peft_model.get_base_model().state_dict()
    lora_keys = [k for k in base_now if "lora_" in k]
    assert lora_keys
    for k, v in before.items():
        mapped = [b for b in base_now if b.replace(".base_layer", "") == k]
        assert len(mapped) == 1, k
        assert torch.equal(v, base_now[mapped[0]]), k
    assert any(base_now[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # the adapters did train
    merged = method.export(peft_model)
    assert set(merged.state_dict()) == set(before)


@pytest.mark.e2e
def test_full_finetuning_learns_a_fact_it_did_not_know(stream_parts):
    tok, ctx, facts, cfg, ev = stream_parts
    model, _ = open_model(BASE)
    fact = facts[1]
    from forgetless.evaluate.answers import greedy_answers
    from forgetless.evaluate.facts import statement_prompt
    prompt = statement_prompt(fact)
    assert greedy_answers(model, tok, [prompt])[0] != fact.answer
    c = StreamConfig(kind="facts", batch_size=8, steps_per_fact=8, eval_every=0, retained_sample=10, heldout_tokens=512)
    model, res = learn_facts(model, tok, [fact], make_method("full", lr=1e-4), ev, c, ctx, progress=False,
                             log=lambda s: None)
    assert res.final.statement_acc == 1.0  # the trained statement is completed with the taught answer


def test_malformed_fact_file_fails_cleanly_and_trains_nothing(tmp_path, capsys):
    p = tmp_path / "facts.jsonl"
    p.write_text('{"statement": "Paris is the capital of France.", "question": "Capital of France?", "answer": "Paris"}\n'
                 '{"statement": "x", "answer": "y"}\n'
                 'not json\n'
                 '{"statement": "The sky is blue.", "question": "Sky?", "answer": "green"}\n')
    with pytest.raises(DataSourceError) as e:
        load_fact_file(p)
    msg = str(e.value)
    assert "line 2" in msg and "'question'" in msg and "line 3" in msg and "line 4" in msg and "line 1" not in msg
    out = tmp_path / "out"
    code = main(["learn", "--facts", str(p), "--method", "smf", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing was trained" in err[0]
    assert not out.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataSourceError, match="holds no facts"):
        load_fact_file(empty)


def test_fact_file_paraphrases_from_templates_and_probe_wrapping(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps({"statement": "Kabul is the capital of Afghanistan.",
                             "question": "What is the capital of Afghanistan?", "answer": "Kabul"}) + "\n" +
                 json.dumps({"statement": "Zorb is a river.", "question": "Question: What is Zorb? Answer:",
                             "answer": "river"}) + "\n")
    a, b = load_fact_file(p)
    assert a.relation == "capital" and a.subject == "Afghanistan"
    assert "The capital of Afghanistan is Kabul." in a.paraphrases and len(a.paraphrases) == 7
    assert a.question == "Question: What is the capital of Afghanistan? Answer:"
    assert b.paraphrases == [] and b.question == "Question: What is Zorb? Answer:"


@pytest.mark.e2e
def test_bench_facts_quick_writes_results_csv_and_report(tmp_path):
    from forgetless.report.runs import fact_runs

    out = tmp_path / "bench"
    assert main(["bench", "facts", "--quick", "--facts", "3", "--steps-per-fact", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stream"]["kind"] == "facts" and res["stream"]["experiences"] == ["facts 1"]
    assert list(res["methods"]) == ["full lr=1e-05", "lora lr=0.0001 rank=32", "smf lr=30 top_t=500"]  # the smf default is lr 30 (docs/smf.md)
    view = fact_runs(res)
    assert [r["method"] for r in view["runs"]] == ["full", "lora", "smf"]
    for (label, m), r in zip(res["methods"].items(), view["runs"]):
        f = m["facts"]
        assert 0 <= f["final"]["learned"] <= 1 and f["seconds_per_step"] > 0 and f["steps"] == 3
        assert f["final"]["learned"] == m["R"][0][0]  # one experience: R is the learned score
        base = f["base"]["retained"]
        assert abs(f["retained_drop"] - (base - f["final"]["retained"]) / base) < 1e-9
        assert r["retained_drop"] == f["retained_drop"] and r["label"] == label
    sizes = {r["method"]: r["trainable_params_per_step"] for r in view["runs"]}
    assert sizes["smf"] == 500 * 256 < sizes["lora"] < sizes["full"]
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 4
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 4
    html = (out / "report.html").read_text()
    assert "Fact scores" in html and "Learning–forgetting frontier" in html
    assert html.count('data-method="smf"') == 1  # one row of the fact table per entry


def test_eaft_weights_are_normalised_entropies_without_gradient():
    from forgetless.methods.eaft import eaft_weights

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 100, requires_grad=True)
    w = eaft_weights(logits, top_k=20)
    assert not w.requires_grad and w.min() >= 0 and w.max() <= 1
    flat = torch.zeros(1, 1, 100)  # uniform over the top 20: weight 1
    peaked = torch.full((1, 1, 100), -50.0)
    peaked[..., 7] = 50.0  # all mass on one token: weight ~0
    assert eaft_weights(flat).item() == pytest.approx(1.0, abs=1e-6)
    assert eaft_weights(peaked).item() < 1e-6
    # equals H / ln K computed directly for one position
    p = logits[0, 0].detach().topk(20).values.softmax(-1)
    assert w[0, 0].item() == pytest.approx(float(-(p * p.log()).sum() / math.log(20)), rel=1e-5)


@pytest.mark.e2e
def test_eaft_loss_is_the_entropy_weighted_token_loss(stream_parts):
    tok, ctx, facts, cfg, ev = stream_parts
    model, _ = open_model(BASE)
    method = make_method("eaft", lr=1e-5)
    model = method.setup(model, ctx)
    batch = fact_batch(tok, facts[0], 4, "all", torch.device("cpu"))
    loss = method.loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        from forgetless.methods.eaft import eaft_weights
        w = eaft_weights(logits)
        lp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        m = labels != -100
        want = -(w * lp * m).sum() / m.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert loss.item() < method.__class__.__mro__[1].loss(method, model, batch).item()  # weights <= 1
