"""`forgetless run`: streams on the shipped base, resume after interruption, bad configs, the report."""

import base64
import json
import re

import pytest

from forgetless.errors import ConfigError
from forgetless.evaluate.metrics import summarize
from forgetless.experiments.runner import load_run_config, run

pytestmark = pytest.mark.e2e  # every test here trains, pretrains, probes the shipped base or loads a full source

TINY = """
name: tiny
seed: 3
experiments:
  - name: domain
    stream: {kind: domain, experiences: 3, steps_per_experience: 2, batch_size: 4, seq_len: 64, test_docs: 4,
             eval_every: 1, general_tokens: 512}
    methods:
      - {name: naive, lr: 1.0e-4}
      - {name: joint, lr: 1.0e-4}
"""


def _cfg(tmp_path, text=TINY):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load_run_config(p)


def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupt_run):
    full = run(_cfg(tmp_path), tmp_path / "full", progress=False, log=lambda s: None)["domain"]
    interrupt_run(lambda n, state_dir: n == 2)  # Ctrl-C right after the second experience of the naive method
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    logs = []
    resumed = run(_cfg(tmp_path), tmp_path / "resumed", progress=False, log=logs.append)["domain"]
    assert any("resuming after experience 2 of 3" in line for line in logs)
    for method in ("naive", "joint"):
        assert resumed["methods"][method]["R"] == full["methods"][method]["R"]
        assert resumed["methods"][method]["b"] == full["methods"][method]["b"]
    naive = full["methods"]["naive"]
    assert len(naive["R"]) == 3 and all(len(r) == 3 for r in naive["R"])
    # metrics are the pure functions of the recorded matrices (NLL: lower is better)
    want = summarize(naive["R"], naive["b"], full["methods"]["joint"]["R"], higher_is_better=False)
    for k, v in want.items():
        assert naive["metrics"][k] == pytest.approx(v)
    assert full["stream"]["experiences"] == resumed["stream"]["experiences"]  # order fixed by the seed
    assert naive["boundaries"] == [2, 4, 6] and [c["step"] for c in naive["curve"]][:3] == [0, 1, 2]


def test_report_contains_plots_and_the_numbers_of_results_json(tmp_path):
    res = run(_cfg(tmp_path), tmp_path / "r", progress=False, log=lambda s: None)["domain"]
    html = (tmp_path / "r" / "domain" / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) >= 3
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in imgs)
    on_disk = json.loads((tmp_path / "r" / "domain" / "results.json").read_text())
    for method, m in on_disk["methods"].items():
        row = re.search(rf'<tr[^>]*data-method="{method}"[^>]*>(.*?)</tr>', html, re.S).group(1)
        acc = float(re.search(r'data-col="acc"[^>]*data-value="([^"]+)"|data-value="([^"]+)"[^>]*data-col="acc"',
                              row).group(1) or 0)
        assert acc == pytest.approx(m["metrics"]["acc"])
    assert (tmp_path / "r" / "domain" / "metrics.csv").read_text().count("\n") == 3
    assert res["stream"]["splits"]


@pytest.mark.parametrize("text,needle", [
    (TINY.replace("kind: domain", "kindd: domain"), "experiments[0].stream.kindd"),
    (TINY.replace("{name: naive, lr: 1.0e-4}", "{name: naive, lrr: 1.0e-4}"), "experiments[0].methods[0]"),
    (TINY.replace("{name: joint, lr: 1.0e-4}", "{name: ewc9}"), "unknown method 'ewc9'"),
    (TINY.replace("kind: domain", "kind: vision"), "stream.kind"),
    ("name: x\nexperiments: []\n", "'experiments' is empty"),
])
def test_bad_run_config_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _cfg(tmp_path, text)


def test_label_logprobs_match_a_direct_computation():
    import torch

    from forgetless.experiments.streams import label_logprobs
    from forgetless.models.checkpoint import load_model
    from forgetless.models.folder import default_model_dir
    from forgetless.models.tokenizer import load_tokenizer

    base = default_model_dir()
    model, tok = load_model(base), load_tokenizer(base)
    prompts = ["Text: Algebra is a branch of mathematics. Topic:", "Text: A painter made a picture. Topic:"]
    labels = ["Mathematics", "Arts", "Philosophy and religion"]
    got = label_logprobs(model, tok, prompts, labels, batch_size=4)
    for i, p in enumerate(prompts):
        for j, label in enumerate(labels):
            ids = tok(p + " " + label, return_tensors="pt")["input_ids"]
            n = len(tok(p, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                lp = model(input_ids=ids).logits.log_softmax(-1)[0]
            want = sum(lp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))
            assert got[i, j].item() == pytest.approx(want, abs=1e-3)


def test_task_and_class_incremental_streams(tmp_path):
    text = """
name: cls
seed: 0
experiments:
  - name: task_il
    stream: {kind: task_il, steps_per_experience: 2, batch_size: 4, test_docs: 4, eval_every: 0, general_tokens: 256}
    methods: [{name: naive, lr: 1.0e-4}]
  - name: class_il
    stream: {kind: class_il, steps_per_experience: 2, batch_size: 4, test_docs: 4, eval_every: 0, general_tokens: 256}
    methods: [{name: naive, lr: 1.0e-4}]
"""
    res = run(_cfg(tmp_path, text), tmp_path / "cls", progress=False, log=lambda s: None)
    for name in ("task_il", "class_il"):
        r = res[name]
        groups = r["stream"]["groups"]
        assert len(groups) == 2 and all(len(g) == 2 for g in groups) and len({t for g in groups for t in g}) == 4
        R = r["methods"]["naive"]["R"]
        assert len(R) == 2 and all(x in {k / 8 for k in range(9)} for row in R for x in row)  # 8 test docs each
    assert (tmp_path / "cls" / "compare.html").is_file()


@pytest.mark.e2e
def test_a_rerun_with_another_config_is_refused(tmp_path):
    text = ("name: tiny\nseed: 0\nexperiments:\n  - name: d\n    stream: {kind: domain, experiences: 1, "
            "steps_per_experience: 1, batch_size: 2, seq_len: 32, test_docs: 2, eval_every: 0, general_tokens: 64}\n"
            "    methods: [{name: naive, lr: LR}]\n")
    (tmp_path / "a.yaml").write_text(text.replace("LR", "0.00001"))
    (tmp_path / "b.yaml").write_text(text.replace("LR", "0.00003"))
    out = tmp_path / "out"
    first = run(load_run_config(tmp_path / "a.yaml"), out, progress=False, log=lambda s: None)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"different config \(experiments\[0\]\.methods\[0\]\.lr: 1e-05 -> 3e-05\)"):
        run(load_run_config(tmp_path / "b.yaml"), out, progress=False, log=lambda s: None)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    again = run(load_run_config(tmp_path / "a.yaml"), out, progress=False, log=lambda s: None)  # same config: resumes
    assert again["d"]["methods"]["naive"]["R"] == first["d"]["methods"]["naive"]["R"]
