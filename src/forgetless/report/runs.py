"""Self-contained HTML report of a continual-learning *stream* run (``forgetless run``).

Input is the run's ``results.json`` (a dict)::

    {"title", "command", "seed", "config": {...},
     "stream": {"name", "kind", "experiences": [names...], "metric": "nll", "higher_is_better": false},
     "methods": {name: {"R": T x T, "b": [T], "metrics": {...}, "curve": [{"step", "experience",
                 "scores": [T]}, ...], "boundaries": [T global steps], "trainable_params", "seconds"}}}

``R[i][j]`` is the score on experience j after training through experience i (entries above the
first superdiagonal may be null/NaN); ``b`` the scores before training. Metrics follow
:mod:`forgetless.evaluate.metrics`: bwt/fwt "positive = good", forgetting/intransigence
"positive = lost", acc/learning_accuracy in the score's own units.

Figures:

* :func:`heatmap` -- one accuracy matrix; :func:`heatmaps_figure` -- all methods side by side on a
  shared colour scale (this one goes in the report);
* :func:`curves_figure` -- score of every experience over global optimizer steps, one panel per
  method, experience boundaries dashed and each training span shaded in its experience's colour;
* :func:`frontier_figure` -- stability (-forgetting) vs plasticity (learning accuracy), one point
  per method, oriented so that up and right is better whatever the metric direction.

Pages: :func:`write_run_report` (``run_dir/report.html``: heatmaps + curves + frontier when there
are >= 2 methods, i.e. 3 images, 2 with a single method), :func:`write_metrics_csv`,
:func:`compare_runs` (``out_dir/compare.html``: combined table + combined frontier, 1 image).

Built with the object-oriented :class:`matplotlib.figure.Figure` API only (no ``pyplot``).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

from .common import (
    Column,
    as_matrix,
    atomic_write_text,
    html_table,
    human_count,
    img,
    kv_list,
    label_points,
    method_color,
    num,
    page,
    pareto_front,
    section,
)
from .html import FACT_COLUMNS, HOW_TO_READ, curves_plot, fact_rows, frontier_plot

__all__ = [
    "METRIC_KEYS",
    "ROW_KEYS",
    "RUN_COLUMNS",
    "compare_runs",
    "curves_figure",
    "extra_name",
    "fact_runs",
    "frontier_figure",
    "heatmap",
    "heatmaps_figure",
    "metric_rows",
    "metrics_table",
    "row_keys",
    "write_metrics_csv",
    "write_run_report",
]

METRIC_KEYS = ["acc", "bwt", "fwt", "forgetting", "learning_accuracy", "intransigence"]
ROW_KEYS = ["method", *METRIC_KEYS, "trainable_params", "seconds"]
LOWER_IS_BETTER_METRICS = {"nll", "loss", "ppl", "perplexity", "bpb", "bpc"}

# --------------------------------------------------------------------------- small helpers


def _stream(results: dict) -> dict:
    return results.get("stream") or {}


def _metric(results: dict) -> str:
    return str(_stream(results).get("metric") or "score")


def _higher_is_better(results: dict) -> bool:
    s = _stream(results)
    if "higher_is_better" in s:
        return bool(s["higher_is_better"])
    return _metric(results).lower() not in LOWER_IS_BETTER_METRICS


def _direction_text(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def _experiences(results: dict) -> list[str]:
    exps = _stream(results).get("experiences")
    if exps:
        return [str(e) for e in exps]
    for m in (results.get("methods") or {}).values():  # fall back to the matrix size
        if m.get("R"):
            return [f"exp {i + 1}" for i in range(len(m["R"]))]
    return []


def _methods(results: dict) -> dict[str, dict]:
    return results.get("methods") or {}


def _wrap(name: str, width: int = 14) -> str:
    return "\n".join(textwrap.wrap(str(name), width)) or str(name)


def _exp_colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# --------------------------------------------------------------------------- heatmaps


def _draw_heatmap(ax, R, experiences: list[str], title: str, higher_is_better: bool,
                  norm: Normalize, cmap, show_ylabels: bool = True):
    A = as_matrix(R)
    T = A.shape[0]
    names = list(experiences) + [f"exp {i + 1}" for i in range(len(experiences), max(T, A.shape[1] if A.size else 0))]
    ax.set_facecolor("white")
    image = ax.imshow(np.ma.masked_invalid(A), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            v = A[i, j]
            if not math.isfinite(v):
                continue
            ax.text(j, i, format(v, ".3g"), ha="center", va="center", fontsize=8 if T <= 6 else 6.5,
                    color=_text_color(cmap(norm(v))), fontweight="bold" if i == j else "normal")
    for k in range(min(A.shape)):  # outline the diagonal: the score right after training on it
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, ec="black", lw=1.2))
    ax.set_xticks(range(A.shape[1]), [_wrap(n, 12) for n in names[: A.shape[1]]], fontsize=7.5,
                  rotation=30 if A.shape[1] > 3 else 0, ha="right" if A.shape[1] > 3 else "center")
    if show_ylabels:
        ax.set_yticks(range(T), [_wrap(n, 14) for n in names[:T]], fontsize=7.5)
        ax.set_ylabel("after training on")
    else:
        ax.set_yticks(range(T), [""] * T)
    ax.set_xlabel("score on")
    ax.set_title(title, fontsize=10)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _cmap(higher_is_better: bool):
    # viridis: bright yellow = better whichever the direction
    return colormaps["viridis" if higher_is_better else "viridis_r"]


def _norm_for(matrices: list[Any]) -> Normalize:
    vals = np.concatenate([as_matrix(R).ravel() for R in matrices]) if matrices else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(vals.min()), float(vals.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(lo, hi)


def heatmap(R, experiences: list[str], title: str, higher_is_better: bool, metric: str) -> Figure:
    """The accuracy matrix ``R`` as an annotated heatmap: rows "after training on", columns
    "score on", NaN cells blank, values to 3 significant digits, diagonal outlined. The colour map
    is reversed for lower-is-better metrics, so bright = better in both cases."""
    T = len(R or [])
    side = 1.5 + 0.85 * max(T, 2)
    fig = Figure(figsize=(side + 1.6, side), layout="constrained")
    ax = fig.add_subplot()
    image = _draw_heatmap(ax, R, experiences, title, higher_is_better, _norm_for([R]), _cmap(higher_is_better))
    cb = fig.colorbar(image, ax=ax, shrink=0.85)
    cb.set_label(f"{metric} ({_direction_text(higher_is_better)})")
    return fig


def heatmaps_figure(results: dict, methods: list[str] | None = None, ncols: int = 3) -> Figure:
    """One :func:`heatmap` panel per method (up to ``ncols`` per row) on a shared colour scale,
    with one colour bar."""
    all_methods = _methods(results)
    names = [m for m in (methods or list(all_methods)) if all_methods.get(m, {}).get("R")]
    exps = _experiences(results)
    hib, metric = _higher_is_better(results), _metric(results)
    T = max((len(all_methods[m]["R"]) for m in names), default=len(exps))
    n = max(len(names), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    side = 1.3 + 0.8 * max(T, 2)
    fig = Figure(figsize=(ncols * (side + 0.3) + 1.6, nrows * (side + 0.6) + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    norm = _norm_for([all_methods[m]["R"] for m in names])
    cmap = _cmap(hib)
    image = None
    for k, ax in enumerate(axes):
        if k >= len(names):
            ax.set_visible(False)
            continue
        m = names[k]
        image = _draw_heatmap(ax, all_methods[m]["R"], exps, m, hib, norm, cmap, show_ylabels=k % ncols == 0)
        ax.title.set_color(method_color(m))
        ax.title.set_fontweight("bold")
    if image is not None:
        cb = fig.colorbar(image, ax=list(axes[: len(names)]), shrink=0.8)
        cb.set_label(f"{metric} ({_direction_text(hib)})")
    fig.suptitle(f"Accuracy matrix R[i, j]: {metric} on experience j after training through experience i "
                 "(outlined: diagonal)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- curves


def curves_figure(results: dict, methods: list[str] | None = None) -> Figure:
    """One panel per method (shared y axis): the score of each experience over global optimizer
    steps, one line per experience (same colour in every panel), dashed lines at experience
    boundaries, each experience's training span shaded in its colour and labelled."""
    all_methods = _methods(results)
    names = [m for m in (methods or list(all_methods)) if m in all_methods]
    exps = _experiences(results)
    T = len(exps)
    colors = _exp_colors(max(T, 1))
    hib, metric = _higher_is_better(results), _metric(results)
    n = max(len(names), 1)
    fig = Figure(figsize=(max(5.0, 4.6 * n) + 0.4, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False).ravel())
    for ax, m in zip(axes, names):
        run = all_methods[m]
        curve = sorted(run.get("curve") or [], key=lambda p: p.get("step", 0))
        bounds = [b for b in (run.get("boundaries") or []) if num(b) is not None]
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        start = 0.0
        for k, end in enumerate(bounds[:T]):
            ax.axvspan(start, end, color=colors[k], alpha=0.08, lw=0, zorder=0)
            label = f"{k + 1}. {_wrap(exps[k], 12)}" if T <= 5 else f"{k + 1}"
            ax.text((start + end) / 2, 0.985, label, transform=trans, ha="center", va="top",
                    fontsize=7, color=colors[k], fontweight="bold", zorder=5)
            ax.axvline(end, color="#555555", ls="--", lw=0.9, zorder=1)
            start = end
        for j in range(T):
            pts = [(p["step"], num((p.get("scores") or [None] * T)[j]))
                   for p in curve if j < len(p.get("scores") or [])]
            pts = [(x, y) for x, y in pts if y is not None and num(x) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=colors[j], lw=1.6, marker="o",
                        markersize=2.5, zorder=3)
        ax.set_title(m, fontsize=11, color=method_color(m), fontweight="bold")
        ax.set_xlabel("optimizer step (global)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.01, y=0.12)  # headroom for the span labels
    axes[0].set_ylabel(f"{metric} ({_direction_text(hib)})")
    handles = [Line2D([], [], color=colors[j], lw=2, label=f"{j + 1}. {exps[j]}") for j in range(T)]
    handles.append(Line2D([], [], color="#555555", ls="--", lw=1, label="experience boundary"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8,
               title="score on experience (shaded: the span during which it is trained)", title_fontsize=8)
    return fig


# --------------------------------------------------------------------------- frontier


def _frontier_point(run: dict, higher_is_better: bool) -> tuple[float, float] | None:
    mets = run.get("metrics") or {}
    la, f = num(mets.get("learning_accuracy")), num(mets.get("forgetting"))
    if la is None or f is None:
        return None
    return (la if higher_is_better else -la), -f


def _frontier_labels(metric: str, higher_is_better: bool | None) -> tuple[str, str]:
    if higher_is_better is None:  # mixed directions (comparison page)
        x = "plasticity: mean diagonal score, negated for lower-is-better metrics →"
    elif higher_is_better:
        x = f"plasticity: mean diagonal {metric} →"
    else:
        x = f"plasticity: −mean diagonal {metric.upper() if metric.lower() == 'nll' else metric} →"
    return x, "stability: −forgetting →"


def _frontier_size(n_points: int, width: float, height: float) -> tuple[float, float]:
    """A figure that grows with the number of labelled points, so that their labels find room."""
    extra = max(0, n_points - 8)
    return min(width + 0.16 * extra, width + 5.0), min(height + 0.11 * extra, height + 3.5)


def _label_frontier(fig: Figure, ax, points: list[tuple[str, str, float, float, str]]) -> None:
    """Name every point; labels never overlap (:func:`forgetless.report.common.label_points`)."""
    label_points(fig, ax, [(p[2], p[3]) for p in points], [p[0] for p in points],
                 [method_color(p[1]) for p in points], fontsize=8.0, marker_radius=6.0)


def _draw_frontier(ax, points: list[tuple[str, str, float, float, str]], groups: list[int] | None = None):
    """points: (label, method, x, y, marker); ``groups`` (one id per point) draws one Pareto front
    per group (points of different runs/metrics are not comparable). The labels are added by
    :func:`_label_frontier` once the rest of the figure is laid out."""
    ax.axhline(0.0, color="#888888", ls="--", lw=1, zorder=1)
    groups = groups if groups is not None else [0] * len(points)
    drew_front = False
    for g in dict.fromkeys(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        xy = [(points[i][2], points[i][3]) for i in idx]
        front = sorted(pareto_front(xy), key=lambda i: xy[i][0])
        if len(front) > 1:
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="#999999", lw=1.2, ls=":",
                    zorder=2)
            drew_front = True
    for _label, method, x, y, marker in points:
        c = method_color(method)
        ax.scatter([x], [y], s=110, marker=marker, color=c, edgecolors="white", linewidths=0.8, zorder=3)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    handles = [Line2D([], [], color="#888888", ls="--", lw=1, label="no forgetting")]
    if drew_front:
        handles.append(Line2D([], [], color="#999999", ls=":", lw=1.2, label="Pareto front"))
    ax.legend(handles=handles, loc="lower left", fontsize=7.5, framealpha=0.8)


def frontier_figure(results: dict) -> Figure:
    """Stability vs plasticity, one point per method (colour = :func:`method_color`): x = learning
    accuracy (negated for lower-is-better metrics), y = -forgetting; up and right is better. The
    dotted line joins the Pareto-optimal methods."""
    hib, metric = _higher_is_better(results), _metric(results)
    points = []
    for m, run in _methods(results).items():
        p = _frontier_point(run, hib)
        if p is not None:
            points.append((m, m, p[0], p[1], "o"))
    fig = Figure(figsize=_frontier_size(len(points), 7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    _draw_frontier(ax, points)
    xl, yl = _frontier_labels(metric, hib)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title("Stability–plasticity (up and right is better; dotted = Pareto front)", fontsize=10)
    _label_frontier(fig, ax, points)
    return fig


# --------------------------------------------------------------------------- tables / csv


def extra_name(results: dict) -> str | None:
    """The stream's extra measure, scored beside the experiences after each one: ``retained``
    (the base's known facts) on a fact stream, ``general_nll`` (held-out general text) on the
    domain and topic streams; None when the results name none."""
    name = _stream(results).get("extra")
    return str(name) if name else None


def _extra_values(run: dict, name: str) -> tuple[Any, Any]:
    """(final value, value of the base) of the extra measure ``name`` for one method's run."""
    mets = run.get("metrics") or {}
    final = mets.get(name)
    if final is None and run.get("extra"):
        final = run["extra"][-1]
    base = mets.get(f"{name}_base", run.get("b_extra"))
    return final, base


def _extra_higher_is_better(name: str) -> bool:
    low = name.lower()
    return not (low in LOWER_IS_BETTER_METRICS or low.endswith(("_nll", "_loss", "_ppl")))


def _row(method: str, run: dict, extra: str | None = None) -> dict:
    mets = run.get("metrics") or {}
    row: dict[str, Any] = {"method": method}
    for k in METRIC_KEYS:
        row[k] = mets.get(k)
    if extra:
        row[extra], row[f"{extra}_base"] = _extra_values(run, extra)
    row["trainable_params"] = run.get("trainable_params")
    row["seconds"] = run.get("seconds")
    return row


def row_keys(results: dict) -> list[str]:
    """The keys of a metrics row: :data:`ROW_KEYS`, with the stream's extra measure and its base
    value (``retained``, ``retained_base``) after intransigence when the stream has one."""
    extra = extra_name(results)
    if not extra:
        return list(ROW_KEYS)
    i = ROW_KEYS.index("intransigence") + 1
    return [*ROW_KEYS[:i], extra, f"{extra}_base", *ROW_KEYS[i:]]


def metric_rows(results: dict) -> list[dict]:
    """One flat row per method with the :func:`row_keys` keys (raw values)."""
    extra = extra_name(results)
    return [_row(m, run, extra) for m, run in _methods(results).items()]


def run_columns(higher_is_better: bool = True, metric: str = "score", extra: str | None = None) -> list[Column]:
    """The metrics table's columns; ``extra`` adds the stream's extra measure and its base value."""
    arrow = "↑" if higher_is_better else "↓"
    cols: list[Column] = [
        ("method", "method", None),
        ("acc", f"ACC (final {metric}, {arrow})", ".4g"),
        ("bwt", "BWT (+ = good)", "+.4f"),
        ("fwt", "FWT (+ = good)", "+.4f"),
        ("forgetting", "forgetting (+ = forgot)", "+.4f"),
        ("learning_accuracy", f"learning acc (diag {metric}, {arrow})", ".4g"),
        ("intransigence", "intransigence (+ = worse than joint)", "+.4f"),
    ]
    if extra:
        x_arrow = "↑" if _extra_higher_is_better(extra) else "↓"
        cols += [(extra, f"{extra} (final, {x_arrow})", ".4g"), (f"{extra}_base", f"{extra} of the base", ".4g")]
    cols += [("trainable_params", "trainable params", human_count), ("seconds", "seconds", ".1f")]
    return cols


RUN_COLUMNS: list[Column] = run_columns()


def metrics_table(results: dict) -> str:
    """The per-method metrics as an HTML table (one ``<tr data-method=...>`` per method, every
    numeric cell with its full-precision ``data-value``), with the stream's extra measure
    (``retained`` on a fact stream, ``general_nll`` on the domain stream) and its base value."""
    rows = metric_rows(results)
    cols = run_columns(_higher_is_better(results), _metric(results), extra_name(results))
    return html_table(rows, cols, row_attrs=[{"data-method": r["method"]} for r in rows])


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v


def write_metrics_csv(results: dict, path: str | os.PathLike) -> Path:
    """One row per method: ``method, acc, bwt, fwt, forgetting, learning_accuracy, intransigence,
    [<extra>, <extra>_base,] trainable_params, seconds`` (full-precision values, empty when
    missing; the extra pair when the stream has an extra measure); atomic write."""
    keys = row_keys(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for row in metric_rows(results):
        w.writerow({k: _csv_value(row.get(k)) for k in keys})
    return atomic_write_text(path, buf.getvalue(), newline="")


# --------------------------------------------------------------------------- pages


_EXTRA_TEXT = {
    "retained": "exact match of the held-out question probes of facts the base model already knew "
                "(higher is better): what the run did to old knowledge",
    "general_nll": "NLL in nats per token of held-out general text (lower is better): what the run did "
                   "to general language modelling",
}


def _how_to_read(results: dict) -> str:
    hib, metric = _higher_is_better(results), _metric(results)
    flip = "" if hib else (
        f"<p class=\"note\"><b>{html.escape(metric)} is lower-is-better</b>: the scores are negated before "
        "the difference metrics are computed, so the signs keep their meaning: BWT = 1/(T−1) Σ (R[i,i] − R[T,i]) "
        "and FWT = 1/(T−1) Σ (b<sub>i</sub> − R[i−1,i]) are positive when NLL went <i>down</i>, forgetting "
        "f<sub>j</sub> = R[T,j] − min<sub>l&lt;T</sub> R[l,j] is positive when NLL rose from its best value, "
        "and intransigence = method diagonal − joint diagonal is the excess NLL. ACC and learning accuracy stay "
        f"in {html.escape(metric)} units: lower is better for them.</p>"
    )
    extra = extra_name(results)
    extra_note = ""
    if extra:
        what = _EXTRA_TEXT.get(extra, "a measure the stream scores beside its experiences after each one")
        extra_note = (f"<p class=\"note\"><b>{html.escape(extra)}</b>: {what}. The table shows its value after the "
                      f"last experience and the base model's value before any training.</p>\n")
    return extra_note + (
        "<p class=\"note\">The model is trained on the experiences one after the other. "
        "<b>R[i, j]</b> is the score on experience j after training through experience i (1-based below); "
        "row i of the heatmap is the state after experience i, the outlined diagonal is each experience right "
        "after its own training, cells to the right of the diagonal are experiences not trained yet "
        "(blank where not measured). <b>b<sub>j</sub></b> is the score before any training.</p>\n"
        "<ul class=\"note\">"
        "<li><b>ACC</b> = mean of the last row, (1/T) Σ<sub>i</sub> R[T,i].</li>"
        "<li><b>BWT</b> = 1/(T−1) Σ<sub>i&lt;T</sub> (R[T,i] − R[i,i]): positive = later training helped "
        "earlier experiences, negative = it hurt them.</li>"
        "<li><b>FWT</b> = 1/(T−1) Σ<sub>i≥2</sub> (R[i−1,i] − b<sub>i</sub>): positive = earlier experiences "
        "helped a not-yet-seen one.</li>"
        "<li><b>forgetting</b> = mean<sub>j&lt;T</sub> (max<sub>j≤l&lt;T</sub> R[l,j] − R[T,j]): positive = "
        "forgot.</li>"
        "<li><b>learning accuracy</b> = mean of the diagonal (plasticity).</li>"
        "<li><b>intransigence</b> = joint diagonal − method diagonal, averaged: positive = the method learned "
        "each experience less well than joint training on everything seen so far.</li>"
        "</ul>\n" + flip +
        "<p class=\"note\">In the curves, each line is one experience's score over training; the shaded band of "
        "the same colour is when that experience is trained, so a line drifting the wrong way after its band is "
        "forgetting. In the frontier, up (less forgetting) and right (better learning) is better.</p>"
    )


def _stream_info(results: dict) -> dict:
    s = _stream(results)
    hib, metric = _higher_is_better(results), _metric(results)
    info: dict[str, Any] = {}
    if "seed" in results:
        info["seed"] = results["seed"]
    info["stream"] = s.get("name", "?")
    if s.get("kind"):
        info["kind"] = s["kind"]
    info["metric"] = f"{metric} ({_direction_text(hib)})"
    exps = _experiences(results)
    info["experiences"] = " → ".join(f"{i + 1}. {e}" for i, e in enumerate(exps)) + f"  (T = {len(exps)})"
    if extra_name(results):
        info["extra measure"] = f"{extra_name(results)} (scored after each experience; final and base value in the table)"
    info["methods"] = ", ".join(_methods(results))
    info.update(results.get("machine") or {})  # bench facts records the machine
    return info


def fact_runs(results: dict) -> dict:
    """The fact scores of a run (``methods.<label>.facts``) as one row per method entry, the view
    the fact table, frontier and curves read: ``{"base": {...}, "runs": [{"method", "label", "lr",
    "hparams", "learned", ..., "curve"}], ...}``. Empty ``runs`` when the run has no fact scores."""
    base: dict = {}
    rows = []
    for label, m in _methods(results).items():
        facts = m.get("facts")
        if not facts:
            continue
        base = base or dict(facts.get("base") or {})
        spec = m.get("spec") or {}
        final = facts.get("final") or {}
        row = {k: final.get(k) for k in ("learned", "learned_f1", "statement_acc", "retained", "heldout_nll",
                                         "reliability", "portability", "portability_n", "learned_contains",
                                         "retained_contains")}
        row.update(method=label.split(" lr=")[0] if " lr=" in label else label, label=label, lr=spec.get("lr"),
                   hparams={k: v for k, v in spec.items() if k not in ("name", "method", "lr", "label")},
                   retained_base=base.get("retained"), retained_drop=facts.get("retained_drop"),
                   heldout_nll_delta=facts.get("heldout_nll_delta"), steps=facts.get("steps"),
                   trainable_params_per_step=facts.get("trainable_params_per_step"),
                   seconds_per_step=facts.get("seconds_per_step"), curve=facts.get("curve") or [])
        rows.append(row)
    return {k: results[k] for k in ("title", "command", "model", "machine", "stream") if k in results} | \
        {"base": base, "runs": rows}


def _fact_sections(results: dict) -> list[str]:
    """Fact streams: the base and per-method fact scores, the learned-vs-retained frontier and the
    fact curves (the figures ``bench facts`` shows)."""
    view = fact_runs(results)
    if not view["runs"]:
        return []
    base_cols: list[Column] = [("learned", "learned", ".3f"), ("statement_acc", "statement acc", ".3f"),
                               ("retained", "retained", ".3f"), ("heldout_nll", "held-out NLL", ".3f")]
    rows = fact_rows(view)
    return [
        section("Fact scores", HOW_TO_READ
                + html_table([view["base"]], base_cols, row_attrs=[{"data-run": "base"}])
                + html_table(rows, FACT_COLUMNS, row_attrs=[{"data-run": i, "data-method": r["method"]}
                                                            for i, r in enumerate(rows)])),
        section("Learning–forgetting frontier (learned vs retained)", img(frontier_plot(view), "fact frontier plot")),
        section("Learning and retention over the stream", img(curves_plot(view), "fact curves plot")),
    ]


def write_run_report(results: dict, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` for a ``forgetless run`` result and return its path.

    Images: the heatmaps (one figure, a panel per method), the curves, and the stability–
    plasticity frontier when there are >= 2 methods (so 3 images, or 2 with a single method)."""
    run_dir = Path(run_dir)
    methods = _methods(results)
    header = []
    if results.get("command"):
        header.append(f"<pre>{html.escape(str(results['command']))}</pre>")
    header.append(kv_list(_stream_info(results)))
    facts = _fact_sections(results)
    sections = [
        "\n".join(header),
        section("How to read this", _how_to_read(results)),
        section("Metrics", metrics_table(results)),
        *facts,
    ]
    matrices = not (facts and len(_experiences(results)) == 1)  # bench facts: one experience, the fact figures say it
    if matrices and any(m.get("R") for m in methods.values()):
        sections.append(section("Accuracy matrices", img(heatmaps_figure(results), "accuracy matrix heatmaps")))
    if matrices and methods:
        sections.append(section("Scores over training", img(curves_figure(results), "score curves")))
    if matrices and len(methods) >= 2:
        sections.append(section("Stability vs plasticity", img(frontier_figure(results), "frontier plot")))
    if results.get("config"):
        cfg = html.escape(json.dumps(results["config"], indent=2, sort_keys=True, default=str))
        sections.append(section("Configuration", f"<pre>{cfg}</pre>"))
    return atomic_write_text(run_dir / "report.html", page(results.get("title") or "forgetless run", sections))


def _run_names(results_list: list[dict], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(results_list):
            raise ValueError(f"got {len(names)} names for {len(results_list)} runs")
        return [str(n) for n in names]
    raw = [str(r.get("name") or r.get("run_name") or r.get("title") or f"run {i + 1}")
           for i, r in enumerate(results_list)]
    out = []
    for i, n in enumerate(raw):
        out.append(f"{n} #{i + 1}" if raw.count(n) > 1 else n)
    return out


_RUN_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def compare_frontier_figure(results_list: list[dict], names: list[str] | None = None) -> Figure:
    """All runs' methods on one stability–plasticity plot: colour = method, marker = run."""
    run_names = _run_names(results_list, names)
    dirs = {(_metric(r), _higher_is_better(r)) for r in results_list}
    points, groups = [], []
    for k, (res, rn) in enumerate(zip(results_list, run_names)):
        hib = _higher_is_better(res)
        for m, run in _methods(res).items():
            p = _frontier_point(run, hib)
            if p is not None:
                points.append((f"{m} ({rn})", m, p[0], p[1], _RUN_MARKERS[k % len(_RUN_MARKERS)]))
                groups.append(k)
    fig = Figure(figsize=_frontier_size(len(points), 8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    _draw_frontier(ax, points, groups)
    metric, hib = next(iter(dirs)) if len(dirs) == 1 else ("score", None)
    xl, yl = _frontier_labels(metric, hib)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title("Stability–plasticity across runs (up and right is better; marker = run; "
                 "one Pareto front per run)", fontsize=10)
    if len(results_list) > 1:
        handles = [Line2D([], [], marker=_RUN_MARKERS[k % len(_RUN_MARKERS)], ls="", color="#555555",
                          markersize=8, label=rn) for k, rn in enumerate(run_names)]
        fig.legend(handles=handles, title="run", loc="outside right upper", fontsize=8)
    _label_frontier(fig, ax, points)
    return fig


def compare_runs(results_list: list[dict], out_dir: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Write ``out_dir/compare.html``: one table with a row per (run, method) (``<tr data-run
    data-method>``) and a combined frontier (1 image when any point can be placed). Run names come
    from ``names``, else each result's ``name``/``run_name``/``title`` (duplicates get ``#k``)."""
    out_dir = Path(out_dir)
    run_names = _run_names(results_list, names)
    rows, attrs = [], []
    for res, rn in zip(results_list, run_names):
        s = _stream(res)
        extra = extra_name(res)
        for row in metric_rows(res):
            row = {"run": rn, "stream": f"{s.get('name', '?')} ({_metric(res)}, "
                                      f"{'↑' if _higher_is_better(res) else '↓'})", **row}
            if extra:
                row.update(extra_measure=extra, extra_value=row.pop(extra), extra_base=row.pop(f"{extra}_base"))
            rows.append(row)
            attrs.append({"data-run": rn, "data-method": row["method"]})
    cols: list[Column] = [("run", "run", None), ("stream", "stream (metric)", None)]
    relabel = {"acc": "ACC (final score)", "learning_accuracy": "learning acc (diag score)"}
    cols += [(k, relabel.get(k, h), f) for k, h, f in run_columns()]
    if any(extra_name(res) for res in results_list):
        i = next(k for k, c in enumerate(cols) if c[0] == "intransigence") + 1
        cols[i:i] = [("extra_measure", "extra measure", None), ("extra_value", "extra (final)", ".4g"),
                     ("extra_base", "extra of the base", ".4g")]
    table = html_table(rows, cols, row_attrs=attrs)
    runs_info = kv_list({rn: res.get("command") or res.get("title") or "" for res, rn in zip(results_list, run_names)})
    sections = [
        section("Runs", runs_info),
        section("Metrics", "<p class=\"note\">BWT/FWT: positive = good; forgetting and intransigence: positive = "
                           "lost; ACC and learning accuracy are in each stream's own metric (see its arrow).</p>"
                + table),
    ]
    if any(_frontier_point(run, _higher_is_better(res)) is not None
           for res in results_list for run in _methods(res).values()):
        sections.append(section("Stability vs plasticity",
                                img(compare_frontier_figure(results_list, run_names), "combined frontier plot")))
    return atomic_write_text(out_dir / "compare.html", page("Continual-learning runs compared", sections))
