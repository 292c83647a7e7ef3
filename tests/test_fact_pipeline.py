"""One fact pipeline: `learn`, `bench facts` and the fact stream of `run` share the stream config
(eval_every in optimizer steps), the run pipeline, the typed results schema and the run report."""

import json
from pathlib import Path

import pytest

from forgetless.cli import _stream_config, build_parser, main
from forgetless.errors import ConfigError
from forgetless.evaluate.facts import FactScores
from forgetless.experiments.bench import bench_grid, parse_lrs
from forgetless.experiments.results import FactRecord, RunResult, load_results
from forgetless.experiments.streams import FactTrack, StreamConfig
from forgetless.report.runs import fact_runs, write_run_report
from forgetless.training.lifecycle import Experience

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_eval_every_counts_optimizer_steps_and_the_cli_converts_facts():
    args = build_parser().parse_args(["bench", "facts", "--eval-every", "25", "--steps-per-fact", "4"])
    cfg = _stream_config(args)
    assert cfg.kind == "facts" and cfg.eval_every == 100 and cfg.steps_per_fact == 4
    args = build_parser().parse_args(["learn", "--facts", "f.jsonl", "--eval-every", "3", "--steps-per-fact", "2"])
    assert _stream_config(args).eval_every == 6
    assert _stream_config(build_parser().parse_args(["learn", "--facts", "f", "--eval-every", "0"])).eval_every == 0
    src = (Path(__file__).resolve().parents[1] / "src/forgetless/experiments/streams.py").read_text()
    assert "in OPTIMIZER STEPS for every kind" in src
    with pytest.raises(ConfigError, match="optimizer steps"):
        StreamConfig(kind="facts", eval_every=-1)


def test_learn_teaches_one_pass_by_default_and_skips_learned_facts_when_given_passes():
    def cfg(*argv):
        return _stream_config(build_parser().parse_args(list(argv)))

    learn = cfg("learn", "--facts", "f.jsonl")
    assert (learn.passes, learn.skip_learned) == (1, False)  # nothing to skip with one pass: off, not an error
    args = build_parser().parse_args(["learn", "--facts", "f.jsonl"])
    assert args.top_t is None  # SMF keeps the method's own defaults
    many = cfg("learn", "--facts", "f.jsonl", "--passes", "10")
    assert (many.passes, many.skip_learned) == (10, True)  # learn skips learned facts once there are passes
    assert not cfg("learn", "--facts", "f.jsonl", "--passes", "10", "--no-skip-learned").skip_learned
    bench = cfg("bench", "facts", "--passes", "3")
    assert (bench.passes, bench.skip_learned) == (3, False)  # bench facts keeps the paper's protocol unless asked
    assert cfg("bench", "facts", "--passes", "3", "--skip-learned").skip_learned


def test_fact_track_counts_taught_facts_across_experiences_by_step():
    exps = [Experience("a", lambda s: {}, 6, test=["f1", "f2", "f3"]), Experience("b", lambda s: {}, 6, test=["f4", "f5", "f6"])]
    track = FactTrack(facts=["f1", "f2", "f3", "f4", "f5", "f6"], evaluator=None, steps_per_fact=2)
    assert track.taught(exps, 0, 0) == []
    assert track.taught(exps, 0, 3) == ["f1"]  # the second fact is half taught
    assert track.taught(exps, 0, 6) == ["f1", "f2", "f3"]
    assert track.taught(exps, 1, 4) == ["f1", "f2", "f3", "f4", "f5"]


def test_bench_grid_is_labelled_method_entries_of_a_run_config():
    lrs = parse_lrs(None, ["full", "lora", "smf", "smf-tf"])
    assert lrs == {"full": [5e-6, 1e-5, 3e-5], "lora": [3e-5, 1e-4, 3e-4], "smf": [1.0, 3.0, 10.0], "smf-tf": [3.0]}
    grid = bench_grid(["full", "lora", "smf", "smf-tf"], lrs, [8, 32])
    assert len(grid) == 3 + 6 + 3 + 1
    assert grid[3] == {"name": "lora", "label": "lora lr=3e-05 rank=8", "lr": 3e-5, "rank": 8}
    assert grid[-1] == {"name": "smf", "label": "smf-tf lr=3 top_t=500", "lr": 3.0, "top_t": 500, "ranking": "tf"}
    assert parse_lrs(None, ["retrieval", "ewc"]) == {"retrieval": [0.0], "ewc": [1e-5]}  # the run's defaults
    assert bench_grid(["ewc-base"], parse_lrs(None, ["ewc-base"]), [8]) == \
        [{"name": "ewc", "label": "ewc-base lr=1e-05 anchor=base", "lr": 1e-5, "anchor": "base"}]
    with pytest.raises(ConfigError, match="several experiences|upper bound"):
        bench_grid(["joint"], {"joint": [1e-5]}, [8])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_lrs(None, ["nope"])


def test_fact_record_retained_drop_is_relative_to_the_base():
    rec = FactRecord(base=FactScores(learned=0.1, retained=0.8, heldout_nll=3.0),
                     final=FactScores(learned=0.6, retained=0.6, heldout_nll=3.2), steps=40)
    assert rec.retained_drop == pytest.approx(0.25) and rec.heldout_nll_delta == pytest.approx(0.2)
    back = FactRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec and back.summary()["retained_base"] == 0.8


def test_old_bench_schema_is_read_as_a_run_with_the_same_figures():
    old = json.loads((DOCS / "bench-facts" / "results.json").read_text())
    res = load_results(DOCS / "bench-facts" / "results.json")
    assert isinstance(res, RunResult) and res.stream["kind"] == "facts" and len(res.methods) == len(old["runs"])
    for row, (label, m) in zip(old["runs"], res.methods.items()):
        assert label == row["label"] and m.R == [[row["learned"]]] and m.facts.final.retained == row["retained"]
        assert m.facts.retained_drop == pytest.approx(row["retained_drop"], abs=1e-12)
        assert m.facts.base.retained == old["base"]["retained"]
    again = RunResult.from_dict(json.loads(json.dumps(res.to_dict())))  # the new schema round-trips
    assert again.to_dict() == res.to_dict()
    view = fact_runs(res.to_dict())
    assert [r["learned"] for r in view["runs"]] == [r["learned"] for r in old["runs"]]
    assert [r["method"] for r in view["runs"]] == [r["method"] for r in old["runs"]]


@pytest.mark.e2e  # renders the report of a 15-entry bench (seconds)
def test_report_rebuilds_an_old_bench_folder_with_the_run_report(tmp_path):
    d = tmp_path / "bench-facts"
    d.mkdir()
    (d / "results.json").write_text((DOCS / "bench-facts" / "results.json").read_text())
    assert main(["report", str(d)]) == 0
    html = (d / "report.html").read_text()
    assert "Fact scores" in html and "Learning–forgetting frontier" in html
    assert "Accuracy matrices" not in html  # one experience: a 1x1 matrix per entry says nothing
    assert len((d / "runs.csv").read_text().strip().splitlines()) == 1 + len(json.loads((d / "results.json").read_text())["runs"])


def test_report_rejects_a_results_file_of_neither_schema(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"title": "x"}))
    assert main(["report", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err


@pytest.mark.e2e  # renders figures
def test_run_report_of_a_non_fact_run_has_no_fact_sections(tmp_path):
    res = {"title": "t", "stream": {"name": "domain", "kind": "domain", "metric": "nll", "higher_is_better": False,
                                    "experiences": ["a"]},
           "methods": {"naive": {"R": [[3.0]], "b": [3.2], "metrics": {"acc": 3.0}, "curve": [], "boundaries": [4]}}}
    html = write_run_report(res, tmp_path).read_text()
    assert "Fact scores" not in html and fact_runs(res)["runs"] == []


@pytest.mark.e2e
def test_bench_facts_ewc_computes_its_fisher(tmp_path):
    out = tmp_path / "ewc"
    assert main(["bench", "facts", "--methods", "ewc", "--quick", "--facts", "1", "--steps-per-fact", "1",
                 "--out", str(out)]) == 0
    (m,) = json.loads((out / "results.json").read_text())["methods"].values()
    assert m["method"]["method"] == "ewc" and m["method"]["importance_terms"] == 1
    assert m["method"]["importance_sum"] > 0  # the Fisher of the one experience (no penalty applied yet)


@pytest.mark.e2e
def test_bench_facts_retrieval_indexes_and_answers_three_facts(tmp_path):
    out = tmp_path / "retrieval"
    assert main(["bench", "facts", "--methods", "retrieval", "--quick", "--facts", "3", "--steps-per-fact", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (m,) = res["methods"].values()
    assert m["spec"]["method"] == "retrieval" and m["facts"]["final"]["facts_seen"] == 3
    assert m["facts"]["trainable_params_per_step"] == 0 and m["facts"]["steps"] == 0  # indexes, trains nothing
    assert len(m["R"]) == 1 and 0 <= m["facts"]["final"]["learned"] <= 1 and 0 < m["facts"]["final"]["retained"] <= 1
    assert (out / "report.html").is_file() and (out / "runs.csv").is_file()


@pytest.mark.e2e
def test_fact_stream_run_carries_fact_scores_consistent_with_its_matrix(tmp_path):
    cfg = tmp_path / "facts.yaml"
    cfg.write_text("name: tiny\nseed: 0\nexperiments:\n  - name: facts\n    stream: {kind: facts, experiences: 2, "
                   "facts_per_experience: 2, steps_per_fact: 1, eval_every: 1, batch_size: 4, retained_sample: 10, "
                   "heldout_tokens: 256}\n    methods:\n      - {name: full, lr: 1.0e-4}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    res = load_results(tmp_path / "run" / "facts" / "results.json")
    (m,) = res.methods.values()
    f = m.facts
    assert [p.facts_seen for p in f.curve] == [0, 1, 2, 3, 4] and [p.step for p in f.curve] == [0, 1, 2, 3, 4]
    assert f.final.learned == pytest.approx(sum(m.R[-1]) / 2)  # two groups of two facts
    assert f.base.learned == pytest.approx(sum(m.b) / 2) and f.steps == 4
    assert m.metrics["retained"] == m.extra[-1] == f.curve[-1].retained  # the known-fact sample, both ways


def test_sentence_answers_score_under_contains_beside_exact_match(monkeypatch):
    """A chat model answers in sentences: learned/retained by exact match stay 0, by contains they count,
    and `bench facts`' table shows the contains figures only when they differ."""
    import torch

    import forgetless.evaluate.facts as facts_mod
    from forgetless.data.facts import Fact
    from forgetless.experiments.bench import format_table

    def answers(model, tok, prompts, **kw):
        return [f"The answer is {p.split('|')[1]}." if "|" in p else "no idea" for p in prompts]

    monkeypatch.setattr(facts_mod, "greedy_answers", answers)
    monkeypatch.setattr(facts_mod, "heldout_nll", lambda model, ids, **kw: {"nll": 3.0})
    taught = [Fact(id="t1", relation="capital", subject="Zembla", statement="Zembla's capital is Onhava.", question="Q|Onhava|", answer="Onhava")]
    known = [Fact(id="k1", relation="capital", subject="France", statement="France's capital is Paris.", question="Q|Paris|", answer="Paris"),
             Fact(id="k2", relation="capital", subject="Peru", statement="Peru's capital is Lima.", question="Q", answer="Lima")]
    cfg = StreamConfig(kind="facts", retained_sample=10, heldout_tokens=128, final_all_known=False)
    ev = facts_mod.FactEvaluator(None, known, torch.zeros(300, dtype=torch.long), cfg)
    s = ev(None, taught, 1)
    assert (s.learned, s.learned_contains, s.retained, s.retained_contains) == (0.0, 1.0, 0.0, 0.5)
    rec = FactRecord(base=FactScores(), final=s, curve=[], steps=1, seconds_per_step=0.1)
    results = {"methods": {"full lr=1e-05": {"spec": {"name": "full", "lr": 1e-5}, "facts": rec.to_dict()}}}
    table = format_table(results)
    assert "| full lr=1e-05 | 100.0% | 50.0% |" in table
    same = FactRecord(base=FactScores(), final=FactScores(learned=0.5, learned_contains=0.5), curve=[], steps=1)
    assert "Contains" not in format_table({"methods": {"x": {"spec": {"name": "full"}, "facts": same.to_dict()}}})


def test_pick_lever_learns_the_most_within_the_drop_and_breaks_ties_by_drop_then_order():
    from forgetless.experiments.facts import LeverTrial, pick_lever

    t = [LeverTrial({"top_t": 500}, 0.00, 0.05), LeverTrial({"top_t": 2000}, 0.20, 0.26),
         LeverTrial({"top_t": 8000}, 0.20, 0.18), LeverTrial({"top_t": 9000}, 0.20, 0.18),
         LeverTrial({"top_t": 100}, 0.10, 0.01)]
    assert pick_lever(t, 0.25).options == {"top_t": 8000}  # 2000 learned as much but forgot too much
    assert pick_lever(t, 0.30).options == {"top_t": 8000}  # same learning: the smaller drop, then the first
    assert pick_lever(t, 0.10).options == {"top_t": 100}
    assert pick_lever(t, 0.0) is None


@pytest.mark.e2e
def test_choose_levers_tries_each_setting_on_a_copy_and_returns_the_picked_one():
    import torch

    from forgetless.data.factfile import load_fact_file
    from forgetless.evaluate.known import known_facts
    from forgetless.experiments.facts import FactEvaluator, choose_levers, pick_lever
    from forgetless.models.folder import default_model_dir, load_heldout_ids, open_model
    from forgetless.training import MethodContext

    base_dir = default_model_dir()
    src = Path(__file__).resolve().parents[1] / "src/forgetless/assets/facts/subdivision_country.jsonl"
    facts = load_fact_file(src)[:3]
    model, tok = open_model(base_dir)
    cfg = StreamConfig(kind="facts", steps_per_fact=1, retained_sample=20, heldout_tokens=2048, final_all_known=False)
    known = known_facts(model, tok, base_dir, log=lambda _: None, exclude={f.id for f in facts})
    evaluator = FactEvaluator(tok, known, load_heldout_ids(base_dir, tok, 4 * cfg.heldout_tokens), cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = ({"top_t": 500, "protect": 0.9}, {"top_t": 8000, "protect": 0.0})
    opts, trials = choose_levers(model, tok, facts, "smf", {"lr": 30.0}, evaluator, cfg,
                                 MethodContext.for_folder(base_dir, tok), n_facts=2, max_drop=0.5, grid=grid,
                                 log=lambda _: None)
    assert [t.options for t in trials] == list(grid)
    assert all(0.0 <= t.learned <= 1.0 and t.retained_drop <= 1.0 for t in trials)
    best = pick_lever(trials, 0.5)
    assert opts == ({"lr": 30.0, **best.options} if best else {"lr": 30.0})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the trials ran on copies


def test_passes_teach_the_facts_again_in_order_on_new_lines():
    import torch

    from forgetless.data.factfile import load_fact_file
    from forgetless.evaluate.facts import FactEvaluator
    from forgetless.experiments.streams import facts_to_stream
    from forgetless.models.folder import default_model_dir
    from forgetless.models.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir())
    src = Path(__file__).resolve().parents[1] / "src/forgetless/assets/facts/subdivision_country.jsonl"
    facts = load_fact_file(src)[:2]
    texts = {}
    for passes in (1, 2):
        cfg = StreamConfig(kind="facts", steps_per_fact=2, passes=passes, batch_size=4)
        exp = facts_to_stream(tok, [facts], cfg, FactEvaluator(tok, [], torch.zeros(0, dtype=torch.long), cfg),
                              0).experiences[0]
        assert exp.steps == 2 * 2 * passes
        texts[passes] = [tok.batch_decode(exp.train_batch(i)["input_ids"], skip_special_tokens=True)
                         for i in range(exp.steps)]
    one, two = texts[1], texts[2]
    assert two[:4] == one  # the first pass is the stream without passes
    for i, fact in ((4, facts[0]), (5, facts[0]), (6, facts[1]), (7, facts[1])):  # then the facts again, in order
        assert all(fact.answer in line for line in two[i])
        assert two[i] not in two[:4]  # on lines the first pass did not show in that batch
    with pytest.raises(ConfigError, match="passes"):
        StreamConfig(kind="facts", passes=0)


def test_skip_learned_leaves_out_facts_the_model_answers_in_later_passes(monkeypatch):
    """With --skip-learned a fact is taught again in a later pass only while the model does not
    answer every one of its taught prompts (checked once, at the fact's first step of that pass); the first
    pass always teaches everything, and the loop makes no update on a skipped step."""
    import torch

    import forgetless.experiments.streams as streams
    from forgetless.data.factfile import load_fact_file
    from forgetless.methods import make_method
    from forgetless.models.checkpoint import load_model
    from forgetless.models.folder import default_model_dir
    from forgetless.models.tokenizer import load_tokenizer
    from forgetless.training import MethodContext
    from forgetless.training.lifecycle import fit_experience

    tok = load_tokenizer(default_model_dir())
    src = Path(__file__).resolve().parents[1] / "src/forgetless/assets/facts/subdivision_country.jsonl"
    facts = load_fact_file(src)[:2]
    asked = []

    known = streams.taught_prompts(facts[0])
    assert len(known) >= 2 and all(facts[0].answer not in p for p in known)

    def fake_answers(model, tokenizer, prompts, **kw):  # the model answers fact 0's prompts but one of fact 1's
        asked.extend(prompts)
        return [facts[0].answer if p in known else facts[1].answer if i == 0 else "nowhere"
                for i, p in enumerate(prompts)]

    monkeypatch.setattr(streams, "greedy_answers", fake_answers)
    cfg = StreamConfig(kind="facts", steps_per_fact=2, passes=3, batch_size=4, skip_learned=True)
    exp = facts_to_stream_of(tok, facts, cfg)
    assert exp.steps == 2 * 2 * 3
    model = load_model(default_model_dir())
    trained = []
    method = make_method("full", lr=1e-4)
    real_loss = method.loss
    monkeypatch.setattr(method, "loss", lambda m, b: trained.append(b["input_ids"]) or real_loss(m, b))
    fit = fit_experience(method, model, MethodContext(), exp, progress=False)
    # pass 1: 4 steps; passes 2 and 3: fact 0 skipped (2 steps each), fact 1 taught (2 steps each)
    assert fit.loop.skipped == 4 and fit.steps == 8 and len(trained) == 8
    expected = [exp.train_batch(i)["input_ids"] for i in (0, 1, 2, 3, 6, 7, 10, 11)]
    assert all(torch.equal(a, b) for a, b in zip(trained, expected))
    n = len(known) + len(streams.taught_prompts(facts[1]))
    assert len(asked) == 2 * n  # one check per fact and later pass, never the held-out probe
    assert all(p != f.question for p in asked for f in facts)
    # the same experience taught again (e.g. the next method of a bench grid) decides afresh: now
    # fact 1 answers its prompts and fact 0 does not
    monkeypatch.setattr(streams, "greedy_answers", lambda model, tokenizer, prompts, **kw:
                        [facts[1].answer if p not in known else "nowhere" for p in prompts])
    trained.clear()
    method = make_method("full", lr=1e-4)
    real_loss = method.loss
    monkeypatch.setattr(method, "loss", lambda m, b: trained.append(b["input_ids"]) or real_loss(m, b))
    again = fit_experience(method, load_model(default_model_dir()), MethodContext(), exp, progress=False)
    assert again.loop.skipped == 4 and again.steps == 8
    expected = [exp.train_batch(i)["input_ids"] for i in (0, 1, 2, 3, 4, 5, 8, 9)]
    assert all(torch.equal(a, b) for a, b in zip(trained, expected))
    with pytest.raises(ConfigError, match="passes"):
        StreamConfig(kind="facts", skip_learned=True)


def test_skip_learned_stops_the_passes_when_a_pass_makes_no_progress(monkeypatch):
    """The passes stop when the checks of the last pass found no more facts answering their taught
    prompts than the checks before (none before the first checks): a stream the model does not learn
    is taught twice, not N times; one that learns goes on while the count rises."""
    import forgetless.experiments.streams as streams
    from forgetless.data.factfile import load_fact_file
    from forgetless.models.folder import default_model_dir
    from forgetless.models.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir())
    src = Path(__file__).resolve().parents[1] / "src/forgetless/assets/facts/subdivision_country.jsonl"
    facts = load_fact_file(src)[:3]
    asked = []
    learned = {"n": 0}  # how many of the facts (in order) the fake model answers

    def fake_answers(model, tokenizer, prompts, **kw):
        asked.append(prompts[0])
        i = next(k for k, f in enumerate(facts) if prompts == streams.taught_prompts(f))
        return [facts[i].answer if i < learned["n"] else "nowhere"] * len(prompts)

    monkeypatch.setattr(streams, "greedy_answers", fake_answers)
    skip = streams.skip_learned(tok, facts, 1)  # 1 step per fact: step = pass * 3 + fact

    def run(passes):
        asked.clear()
        return [skip(None, s) for s in range(3 * passes)]

    # nothing learned: pass 0 and pass 1 (checked, nothing passes) are taught, then the passes stop
    assert run(5) == [False] * 6 + [True] * 9 and skip.stopped_at == [2] and len(asked) == 3
    # a fact learned per pass: the count rises (1, 2, 3) and every later pass runs its checks
    out = []
    asked.clear()
    for s in range(3 * 5):
        learned["n"] = s // 3  # after pass p the model answers the first p facts
        out.append(skip(None, s))
    assert out[:3] == [False] * 3 and out[3:6] == [True, False, False] and out[6:9] == [True, True, False]
    assert out[9:] == [True] * 6 and skip.stopped_at == []  # passes 3 and 4: all three answer (checked)
    assert len(asked) == 3 * 4
    # a sixth pass would stop: the count at pass 4 (3) did not rise above pass 3's (3)
    assert skip(None, 15) is True and skip.stopped_at == [5] and len(asked) == 12


def facts_to_stream_of(tok, facts, cfg):
    import torch

    from forgetless.evaluate.facts import FactEvaluator
    from forgetless.experiments.streams import facts_to_stream

    return facts_to_stream(tok, [facts], cfg, FactEvaluator(tok, [], torch.zeros(0, dtype=torch.long), cfg),
                           0).experiences[0]
