"""The fact sections of the run report (forgetless.report.html figures and tables, shown by
forgetless.report.runs.write_run_report for every run with fact scores), fed the schema older
`bench facts` runs wrote, read through forgetless.experiments.results."""

from __future__ import annotations

import base64
import csv
import json
import re
from html.parser import HTMLParser

import pytest

from forgetless.experiments.results import RunResult
from forgetless.report.html import (
    fig_to_data_uri,
    frontier_plot,
    html_table,
    pareto_front,
    write_csv,
)
from forgetless.report.runs import write_run_report


def write_facts_report(results: dict, out_dir):
    """The one run report of a bench result in the old schema."""
    return write_run_report(RunResult.from_dict(results).to_dict(), out_dir)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_RETAINED = 0.88


def _run(method, lr, hparams, learned, retained, params, sps):
    curve = [
        {"facts_seen": n, "learned": learned * f, "retained": BASE_RETAINED - (BASE_RETAINED - retained) * f,
         "heldout_nll": 3.03 + 0.05 * f}
        for n, f in ((25, 0.4), (50, 0.7), (75, 0.9), (100, 1.0))
    ]
    tag = " ".join(f"{'r' if k == 'rank' else 't'}={v}" for k, v in hparams.items())
    return {
        "method": method, "lr": lr, "hparams": hparams, "label": f"{method} lr={lr:g} {tag}".strip(),
        "learned": learned, "learned_f1": min(1.0, learned + 0.071), "statement_acc": min(1.0, learned + 0.23),
        "retained": retained, "retained_drop": (BASE_RETAINED - retained) / BASE_RETAINED,
        "heldout_nll": 3.03 + 0.1 * (1 - retained), "heldout_nll_delta": 0.1 * (1 - retained) - 0.0123,
        "trainable_params_per_step": params, "seconds_per_step": sps, "curve": curve,
    }


def sample_results() -> dict:
    """3 methods x 2 runs with real-looking numbers."""
    return {
        "title": "Fact injection: learning vs forgetting",
        "command": "forgetless bench facts --quick",
        "machine": {"cpu": "Test CPU", "threads": 2, "torch": "2.13.0", "device": "cpu"},
        "model": "path/to/model",
        "stream": {"n_facts": 100, "steps_per_fact": 2, "batch_size": 16, "seed": 0, "eval_every": 25},
        "base": {"learned": 0.05, "statement_acc": 0.04, "retained": BASE_RETAINED, "heldout_nll": 3.03},
        "runs": [
            _run("full", 1e-5, {}, 0.41, 0.7123456789, 12_345_678, 0.31),
            _run("full", 3e-5, {}, 0.74, 0.5512, 12_345_678, 0.30),
            _run("lora", 1e-4, {"rank": 8}, 0.2237, 0.8611, 98_304, 0.12),
            _run("lora", 3e-4, {"rank": 32}, 0.5333333333333333, 0.8044, 393_216, 0.13),
            _run("smf", 2.0, {"top_t": 500}, 0.62, 0.85, 128_000, 0.08),
            _run("smf", 4.0, {"top_t": 2000}, 0.81, 0.8312, 1_024, 0.09),
        ],
    }


@pytest.fixture
def results():
    return sample_results()


class _Cells(HTMLParser):
    """Collects <img src> and the (data-col -> data-value) of the cells of each <tr data-run>."""

    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self._row = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "tr":
            self._row = a.get("data-run")
            if self._row is not None:
                self.rows[self._row] = {}
        elif tag == "td" and self._row is not None and "data-value" in a:
            self.rows[self._row][a["data-col"]] = float(a["data-value"])


def test_html_report(results, tmp_path):
    path = write_facts_report(results, tmp_path / "out")
    assert path == tmp_path / "out" / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "forgetless bench facts --quick" in text and "Test CPU" in text
    assert "<script" not in text and 'href="http' not in text  # self-contained
    assert text.count('<img class="plot" alt=') == 2
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 2

    p = _Cells()
    p.feed(text)
    assert len(p.imgs) == 2
    for src in p.imgs:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    for i, run in enumerate(results["runs"]):
        row = p.rows[str(i)]
        for key in ("learned", "retained", "retained_drop", "trainable_params_per_step", "lr"):
            assert row[key] == run[key], (i, key)
    assert p.rows["base"]["retained"] == BASE_RETAINED
    assert not list(path.parent.glob("*.tmp"))  # atomic write left nothing behind


def test_csv(results, tmp_path):
    path = write_csv(results, tmp_path / "runs.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["runs"])
    for row, run in zip(rows, results["runs"]):
        assert row["method"] == run["method"] and row["label"] == run["label"]
        assert json.loads(row["hparams"]) == run["hparams"]
        for key in ("learned", "retained", "retained_drop", "heldout_nll_delta", "lr"):
            assert float(row[key]) == run[key], key
        assert int(row["trainable_params_per_step"]) == run["trainable_params_per_step"]


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], []),
        ([(0.3, 0.5)], [0]),
        # 1 is dominated by 0; 3 dominated by 2; 0, 2, 4 trade off
        ([(0.2, 0.9), (0.1, 0.8), (0.5, 0.7), (0.4, 0.6), (0.9, 0.3)], [0, 2, 4]),
        # ties: equal x (or equal y) is not "both higher", so neither point drops the other
        ([(0.5, 0.8), (0.5, 0.9), (0.4, 0.9), (0.3, 0.7)], [0, 1, 2]),
        # exact duplicates both stay; a point beaten on both coordinates goes
        ([(0.6, 0.6), (0.6, 0.6), (0.5, 0.5)], [0, 1]),
    ],
)
def test_pareto_front(points, expected):
    assert pareto_front(points) == expected


def test_helpers(results):
    t = html_table([{"a": 0.123456789, "b": "x<y", "c": None}], [("a", "A", ".2f"), ("b", "B", None), ("c", "C", "g")])
    assert 'data-value="0.123456789">0.12<' in t and "x&lt;y" in t and "–" in t
    uri = fig_to_data_uri(frontier_plot(results))
    assert base64.b64decode(uri.removeprefix("data:image/png;base64,")).startswith(PNG_SIGNATURE)


def test_empty_runs(tmp_path):
    path = write_facts_report({"title": "empty", "base": {"retained": 0.9}, "runs": []}, tmp_path)
    assert "<img" not in path.read_text(encoding="utf-8")
