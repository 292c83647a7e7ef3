"""Shared report helpers (forgetless.report.common): values, and label placement without overlap."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from forgetless.report.common import (
    as_matrix,
    boxes_overlap,
    human_count,
    num,
    place_labels,
)
from forgetless.report.html import frontier_plot
from forgetless.report.runs import frontier_figure

ROOT = Path(__file__).resolve().parents[1]


def _assert_no_overlap(boxes, tol=0.0):
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        shrunk = (a[0] + tol, a[1] + tol, a[2] - tol, a[3] - tol)
        assert not boxes_overlap(shrunk, b), (i, j, a, b)


def _inside(box, bounds):
    return box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def test_values():
    assert num(3) == 3.0 and num(2.5) == 2.5
    assert num(True) is None and num("1") is None and num(float("nan")) is None and num(math.inf) is None
    assert human_count(22_677_760) == "22.7M" and human_count(157_696) == "158k" and human_count(512) == "512"
    assert human_count("n/a") == "n/a"
    m = as_matrix([[1.0, None], [2.0, 3.0]])
    assert m.shape == (2, 2) and math.isnan(m[0, 1]) and m[1, 1] == 3.0
    assert as_matrix([]).shape == (0, 0)


def test_boxes_overlap():
    assert boxes_overlap((0, 0, 2, 2), (1, 1, 3, 3))
    assert not boxes_overlap((0, 0, 1, 1), (1, 0, 2, 1))  # touching edges is not overlapping
    assert not boxes_overlap((0, 0, 1, 1), (5, 5, 6, 6))


def test_coincident_points_get_separate_labels():
    # six methods with exactly the same (learning, forgetting), as naive / ewc / agem on the fact stream
    anchors = [(200.0, 150.0)] * 6
    sizes = [(60.0, 10.0), (30.0, 10.0), (45.0, 10.0), (80.0, 10.0), (20.0, 10.0), (55.0, 10.0)]
    bounds = (0.0, 0.0, 400.0, 300.0)
    boxes = place_labels(anchors, sizes, bounds)
    _assert_no_overlap(boxes)
    assert all(_inside(b, bounds) for b in boxes)
    for (w, h), b in zip(sizes, boxes):
        assert b[2] - b[0] == pytest.approx(w) and b[3] - b[1] == pytest.approx(h)
        # each label stays near its point: within a few rings
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        assert math.hypot(cx - 200.0, cy - 150.0) < 120.0


def test_dense_cluster_and_edges():
    rng = np.random.default_rng(0)
    anchors = [tuple(p) for p in rng.uniform([150, 100], [250, 160], size=(25, 2))]
    anchors += [(2.0, 2.0), (398.0, 298.0), (398.0, 2.0)]  # corners: labels must turn inwards
    sizes = [(float(rng.integers(20, 90)), 9.0) for _ in anchors]
    bounds = (0.0, 0.0, 400.0, 300.0)
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in anchors]
    boxes = place_labels(anchors, sizes, bounds, obstacles=markers)
    _assert_no_overlap(boxes)
    assert all(_inside(b, bounds) for b in boxes)
    # a lone point keeps its label next to it, up and to the right
    (box,) = place_labels([(50.0, 50.0)], [(30.0, 8.0)], bounds, gap=5.0)
    assert box[0] > 50.0 and box[1] > 50.0 and box[0] - 50.0 < 6.0


def test_place_labels_checks_lengths():
    with pytest.raises(ValueError, match="2 sizes for 1 anchors"):
        place_labels([(0.0, 0.0)], [(1.0, 1.0), (1.0, 1.0)])


def _label_boxes(fig, labels):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text() in labels]
    assert sorted(t.get_text() for t in texts) == sorted(labels)
    # the text's own box (an Annotation's extent also covers its leader line)
    boxes = [tuple(Text.get_window_extent(t, renderer).extents) for t in texts]
    axbox = tuple(ax.get_window_extent(renderer).extents)
    return boxes, axbox


@pytest.mark.e2e  # renders the full 30-method figure (about a second)
def test_shipped_fact_stream_frontier_labels_do_not_overlap():
    """The plot that was unreadable (docs/img/fact_methods_frontier.png): 30 methods, several on
    the very same point; drawn, no two label boxes overlap and all stay inside the axes."""
    results = json.loads((ROOT / "docs" / "fact-methods" / "results.json").read_text())
    fig = frontier_figure(results)
    boxes, axbox = _label_boxes(fig, list(results["methods"]))
    _assert_no_overlap(boxes, tol=0.5)
    assert all(_inside(b, (axbox[0] - 0.5, axbox[1] - 0.5, axbox[2] + 0.5, axbox[3] + 0.5)) for b in boxes)


@pytest.mark.e2e  # renders the figure (about half a second)
def test_fact_bench_frontier_labels_do_not_overlap():
    results = json.loads((ROOT / "docs" / "bench-facts" / "results.json").read_text())
    fig = frontier_plot(results)
    from forgetless.report.html import short_label

    boxes, _ = _label_boxes(fig, [short_label(r) for r in results["runs"]])
    _assert_no_overlap(boxes, tol=0.5)
