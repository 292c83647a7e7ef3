"""The HTML report of a continual-learning stream run (forgetless.report.runs)."""

from __future__ import annotations

import base64
import csv
import math
import re
from html.parser import HTMLParser

import pytest

from forgetless.evaluate.metrics import summarize
from forgetless.report.runs import (
    compare_runs,
    curves_figure,
    frontier_figure,
    heatmap,
    metrics_table,
    write_metrics_csv,
    write_run_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIENCES = ["Arts", "Technology", "Philosophy and religion"]
METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "intransigence")


def _or(v, default):
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _method(R, b, joint_diag, hib, params, seconds):
    """A run entry with a curve consistent with R: scores drift between evaluations."""
    T = len(R)
    boundaries = [40 * (k + 1) for k in range(T)]
    curve = [{"step": 0, "experience": 0, "scores": list(b)}]
    for k in range(T):
        for step in (boundaries[k] - 20, boundaries[k]):
            f = 0.5 if step < boundaries[k] else 1.0
            prev = [_or(v, b[j]) for j, v in enumerate(R[k - 1] if k else b)]
            scores = [p + f * (_or(r, b[j]) - p) for j, (p, r) in enumerate(zip(prev, R[k]))]
            curve.append({"step": step, "experience": k, "scores": scores})
    metrics = summarize(R, b, None if joint_diag is None else joint_diag, higher_is_better=hib)
    return {"R": R, "b": b, "metrics": metrics, "curve": curve, "boundaries": boundaries,
            "trainable_params": params, "seconds": seconds}


def sample_results(higher_is_better: bool = False) -> dict:
    """T = 3, methods naive / joint / smf; NLL (lower is better) or accuracy (higher is better)."""
    nan = float("nan")
    if not higher_is_better:
        b = [3.40, 3.55, 3.62]
        naive = [[2.90, 3.41, 3.58], [3.21, 2.95, 3.49], [3.35, 3.18, 2.88]]
        joint = [[2.91, 3.42, nan], [2.93, 2.99, 3.50], [2.94, 3.00, 2.97]]
        smf = [[2.98, 3.44, None], [3.02, 3.01, 3.52], [3.05, 3.04, 2.99]]
    else:
        b = [0.21, 0.18, 0.15]
        naive = [[0.71, 0.22, 0.16], [0.45, 0.69, 0.19], [0.33, 0.41, 0.74]]
        joint = [[0.70, 0.21, nan], [0.69, 0.66, 0.18], [0.68, 0.65, 0.67]]
        smf = [[0.66, 0.22, None], [0.62, 0.64, 0.17], [0.60, 0.61, 0.63]]
    jd = [joint[k][k] for k in range(3)]
    return {
        "title": "Domain stream: naive vs joint vs smf",
        "command": "forgetless run configs/quickstart.yaml",
        "seed": 0,
        "config": {"model": "tiny", "steps_per_experience": 40, "lr": 3e-4},
        "stream": {"name": "domain", "kind": "domain", "experiences": EXPERIENCES,
                   "metric": "acc" if higher_is_better else "nll", "higher_is_better": higher_is_better},
        "methods": {
            "naive": _method(naive, b, jd, higher_is_better, 22_677_760, 93.1),
            "joint": _method(joint, b, None, higher_is_better, 22_677_760, 181.4),
            "smf": _method(smf, b, jd, higher_is_better, 65_536, 71.25),
        },
    }


class _Page(HTMLParser):
    """<img src>s and, per <tr data-method> (keyed by (data-run, data-method)), data-col -> data-value."""

    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self._row = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "tr":
            self._row = (a.get("data-run"), a["data-method"]) if "data-method" in a else None
            if self._row is not None:
                self.rows[self._row] = {}
        elif tag == "td" and self._row is not None and "data-value" in a:
            self.rows[self._row][a["data-col"]] = float(a["data-value"])


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    return p


@pytest.mark.parametrize("hib", [False, True])
def test_run_report(tmp_path, hib):
    results = sample_results(hib)
    path = write_run_report(results, tmp_path / "run")
    assert path == tmp_path / "run" / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "forgetless run configs/quickstart.yaml" in text
    assert "<script" not in text and 'href="http' not in text  # self-contained
    assert "Philosophy and religion" in text and "BWT" in text and "intransigence" in text
    assert ("lower is better" in text) is (not hib)
    # heatmaps (one figure, a panel per method) + curves + frontier
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 3
    p = _parse(text)
    assert len(p.imgs) == 3
    assert set(p.rows) == {(None, m) for m in results["methods"]}
    for m, run in results["methods"].items():
        row = p.rows[(None, m)]
        for key in METRICS:
            if key in run["metrics"]:
                assert row[key] == run["metrics"][key], (m, key)
            else:  # joint has no intransigence: shown as "–", no data-value
                assert key not in row
        assert row["trainable_params"] == run["trainable_params"] and row["seconds"] == run["seconds"]
    assert "intransigence" not in p.rows[(None, "joint")]
    assert not list(path.parent.glob("*.tmp"))


def test_single_method_has_no_frontier(tmp_path):
    results = sample_results()
    results["methods"] = {"naive": results["methods"]["naive"]}
    text = write_run_report(results, tmp_path).read_text(encoding="utf-8")
    assert len(_parse(text).imgs) == 2  # heatmaps + curves


def test_metrics_table_rows():
    results = sample_results()
    t = metrics_table(results)
    assert t.count("<tr data-method=") == 3
    assert f'data-col="acc" data-value="{results["methods"]["smf"]["metrics"]["acc"]!r}"' in t


def test_csv(tmp_path):
    results = sample_results()
    path = write_metrics_csv(results, tmp_path / "metrics.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(results["methods"])
    for row in rows:
        run = results["methods"][row["method"]]
        for key in METRICS:
            if key in run["metrics"]:
                assert float(row[key]) == run["metrics"][key], key
            else:
                assert row[key] == ""
        assert int(row["trainable_params"]) == run["trainable_params"]
        assert float(row["seconds"]) == run["seconds"]


def test_compare(tmp_path):
    a, b = sample_results(False), sample_results(True)
    a["name"], b["name"] = "nll-run", "acc-run"
    a["stream"]["extra"] = "general_nll"  # each run's extra measure shows by name, with its base value
    for m in a["methods"].values():
        m["metrics"].update(general_nll=3.05, general_nll_base=3.0)
    path = compare_runs([a, b], tmp_path / "cmp")
    assert path == tmp_path / "cmp" / "compare.html"
    text = path.read_text(encoding="utf-8")
    assert "nll-run" in text and "acc-run" in text
    p = _parse(text)
    assert len(p.imgs) == 1
    assert len(p.rows) == 6
    for res in (a, b):
        for m, run in res["methods"].items():
            assert p.rows[(res["name"], m)]["forgetting"] == run["metrics"]["forgetting"]
    assert p.rows[("nll-run", "naive")]["extra_value"] == 3.05 and p.rows[("nll-run", "smf")]["extra_base"] == 3.0
    assert "extra_value" not in p.rows[("acc-run", "naive")] and "general_nll" in text
    # same titles: names get de-duplicated
    text = compare_runs([sample_results(), sample_results()], tmp_path / "dup").read_text(encoding="utf-8")
    assert "#1" in text and "#2" in text


def test_figures_standalone():
    results = sample_results()
    R = results["methods"]["joint"]["R"]
    fig = heatmap(R, EXPERIENCES, "joint", False, "nll")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "2.91" in texts and "nan" not in texts and len(texts) == 8  # the NaN cell is blank
    assert len(curves_figure(results).axes) == 3
    assert len(curves_figure(results, ["naive", "joint"]).axes) == 2
    ax = frontier_figure(results).axes[0]
    assert "−mean diagonal NLL" in ax.get_xlabel()
    # lower-is-better: x is the negated learning accuracy
    offsets = [c.get_offsets()[0] for c in ax.collections if len(c.get_offsets())]
    la = [-results["methods"][m]["metrics"]["learning_accuracy"] for m in results["methods"]]
    assert sorted(round(float(o[0]), 9) for o in offsets) == sorted(round(x, 9) for x in la)
    assert all(math.isfinite(float(o[1])) for o in offsets)


def _shipped(name: str) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "docs" / name / "results.json").read_text())


@pytest.mark.parametrize("run, extra", [("fact-methods", "retained"), ("domain-methods", "general_nll")])
def test_extra_measure_column_equals_results(run, extra):
    """The stream's extra measure (retained on the fact stream, general NLL on the domain stream)
    is a column of the run report's metrics table, with the base's value, equal to results.json."""
    results = _shipped(run)
    assert results["stream"]["extra"] == extra
    text = metrics_table(results)
    assert f'data-col="{extra}"' in text and f'data-col="{extra}_base"' in text
    p = _parse(text)
    assert set(p.rows) == {(None, m) for m in results["methods"]}
    for m, r in results["methods"].items():
        row = p.rows[(None, m)]
        assert row[extra] == r["metrics"][extra] == r["extra"][-1], m
        assert row[f"{extra}_base"] == r["metrics"][f"{extra}_base"] == r["b_extra"], m
    if extra == "retained":  # the values the fact-stream table in docs/results/fact-methods.md shows
        assert p.rows[(None, "smf")]["retained"] == 0.72 and p.rows[(None, "naive")]["retained"] == 0.05
        assert p.rows[(None, "smf")]["retained_base"] == 0.85


def test_extra_measure_in_report_and_csv(tmp_path):
    results = sample_results(True)
    results["stream"]["extra"] = "retained"
    for k, m in enumerate(results["methods"].values()):
        m["b_extra"], m["extra"] = 0.85, [0.8 - 0.1 * k, 0.7 - 0.1 * k, 0.6 - 0.1 * k]
        m["metrics"].update(retained=m["extra"][-1], retained_base=0.85)
    text = metrics_table(results)  # the table write_run_report puts in report.html
    assert "retained (final, ↑)" in text and "retained of the base" in text
    p = _parse(text)
    for m, run in results["methods"].items():
        assert p.rows[(None, m)]["retained"] == run["metrics"]["retained"]
        assert p.rows[(None, m)]["retained_base"] == 0.85
    with write_metrics_csv(results, tmp_path / "metrics.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[7:9] == ["retained", "retained_base"]
    assert [float(r["retained"]) for r in rows] == [run["metrics"]["retained"] for run in results["methods"].values()]
    # a stream without an extra measure keeps the plain columns
    plain = sample_results(True)
    assert "retained" not in metrics_table(plain) and "general_nll" not in metrics_table(plain)
