"""Rebuild the figures under docs/img/ and the fact-benchmark reports under docs/ from the
results.json files shipped in docs/ (no training; about a minute on two CPU cores).

    python scripts/docs_figures.py

The run reports themselves (docs/<run>/report.html, metrics.csv) are rebuilt by
``forgetless report``; see docs/runs.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.experiments.results import load_results
from forgetless.report.html import frontier_plot, write_csv
from forgetless.report.runs import curves_figure, fact_runs, frontier_figure, heatmaps_figure, write_run_report

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
IMG = DOCS / "img"
DPI = 110  # the resolution of the images embedded in the HTML reports

SMALL_DPI = 70  # the many-panel figures of the all-methods runs (26-30 panels)

# results.json of a `forgetless run` experiment -> prefix, {figure: (keyword arguments, dpi)}
RUN_FIGURES = {
    "quickstart/domain": ("quickstart_domain", {"heatmap": ({}, DPI), "curves": ({}, DPI), "frontier": ({}, DPI)}),
    "quickstart/facts": ("quickstart_facts", {"heatmap": ({}, DPI), "curves": ({}, DPI), "frontier": ({}, DPI)}),
    "domain-methods": ("domain_methods", {"heatmap": ({"ncols": 7}, SMALL_DPI), "curves": ({}, SMALL_DPI),
                                          "frontier": ({}, DPI)}),
    "fact-methods": ("fact_methods", {"heatmap": ({"ncols": 6}, SMALL_DPI), "frontier": ({}, DPI)}),
}
FIGURES = {"heatmap": heatmaps_figure, "curves": curves_figure, "frontier": frontier_figure}


def _save(fig, path: Path, dpi: int = DPI) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    for run, (prefix, kinds) in RUN_FIGURES.items():
        results = json.loads((DOCS / run / "results.json").read_text())
        for kind, (kwargs, dpi) in kinds.items():
            _save(FIGURES[kind](results, **kwargs), IMG / f"{prefix}_{kind}.png", dpi)
    for bench in ("bench-facts", "bench-facts-questions"):
        results = load_results(DOCS / bench / "results.json").to_dict()  # the older bench schema, read as a run
        print(f"wrote {write_run_report(results, DOCS / bench).relative_to(ROOT)}")
        write_csv(fact_runs(results), DOCS / bench / "runs.csv")
        if bench == "bench-facts":
            _save(frontier_plot(fact_runs(results)), IMG / "facts_frontier.png")


if __name__ == "__main__":
    main()
