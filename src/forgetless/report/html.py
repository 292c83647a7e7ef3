"""Self-contained HTML report of the fact-injection benchmark: inline CSS, plots embedded as
base64 PNGs, no JavaScript. The generic helpers (tables, page skeleton, colours, Pareto front,
label placement) live in :mod:`forgetless.report.common` and are re-exported here.

Fact-injection benchmark (the ``results.json`` of ``forgetless bench facts``):
:func:`frontier_plot`, :func:`curves_plot`, :func:`write_csv` (the page is the run report:
``report.runs.write_run_report`` adds them for every run with fact scores).

Figures are built with the object-oriented :class:`matplotlib.figure.Figure` API (rendered by
Agg), never through ``pyplot``: no global backend switch, no figure registry to leak into.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .common import (  # noqa: F401  (the generic helpers stay importable from here)
    BASE_COLOR,
    CSS,
    METHOD_COLORS,
    Column,
    atomic_write_text,
    fig_to_data_uri,
    html_table,
    human_count,
    img,
    is_number,
    kv_list,
    label_points,
    method_color,
    num,
    page,
    pareto_front,
    section,
)

_LINESTYLES = ["-", "--", ":", "-."]

# --------------------------------------------------------------------------- fact benchmark


def _fmt_lr(lr: Any) -> str:
    return format(lr, "g") if is_number(lr) else str(lr)


def short_label(run: dict) -> str:
    """The per-point label: ``lr=2 t=500`` / ``lr=0.0001 r=8``."""
    hp = run.get("hparams") or {}
    parts = [f"lr={_fmt_lr(run.get('lr'))}"]
    if "rank" in hp:
        parts.append(f"r={hp['rank']}")
    if "top_t" in hp:
        parts.append(f"t={hp['top_t']}")
    return " ".join(parts)


def _methods_in_order(runs: list[dict]) -> list[str]:
    """Known methods in palette order first, then the others in order of appearance."""
    seen = list(dict.fromkeys(r.get("method", "?") for r in runs))
    return [m for m in METHOD_COLORS if m in seen] + [m for m in seen if m not in METHOD_COLORS]


def marker_area(params: Any) -> float:
    """Scatter marker area (pt^2) growing with log10 of trainable params/step (1e3 -> 45, 1e7 -> 245)."""
    if not is_number(params) or params <= 0:
        return 80.0
    return max(25.0, 45.0 + 50.0 * (math.log10(params) - 3.0))


def frontier_plot(results: dict) -> Figure:
    """Learning (x = learned) vs forgetting (y = retained): one point per run, coloured by method,
    area ~ log(trainable params/step), each method's Pareto front joined by a line, the base
    model as a star with a dashed line at its retained score."""
    runs = results.get("runs", [])
    base = results.get("base", {})
    fig = Figure(figsize=(9.5, 6.0), layout="constrained")
    ax = fig.add_subplot()

    base_ret, base_learned = num(base.get("retained")), num(base.get("learned"))
    if base_ret is not None:
        ax.axhline(base_ret, color=BASE_COLOR, ls="--", lw=1, alpha=0.8, zorder=1)

    handles = []
    labelled: list[tuple[tuple[float, float], str, str]] = []
    for method in _methods_in_order(runs):
        color = method_color(method)
        mruns = [
            r for r in runs
            if r.get("method", "?") == method and num(r.get("learned")) is not None
            and num(r.get("retained")) is not None
        ]
        if not mruns:
            continue
        xs = [float(r["learned"]) for r in mruns]
        ys = [float(r["retained"]) for r in mruns]
        sizes = [marker_area(r.get("trainable_params_per_step")) for r in mruns]
        ax.scatter(xs, ys, s=sizes, color=color, alpha=0.85, edgecolors="white", linewidths=0.8, zorder=3)
        front = sorted(pareto_front(list(zip(xs, ys))), key=lambda i: (xs[i], -ys[i]))
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], color=color, lw=1.4, alpha=0.6, zorder=2)
        for r, x, y in zip(mruns, xs, ys):
            labelled.append(((x, y), short_label(r), color))
        handles.append(Line2D([], [], marker="o", ls="-", color=color, markersize=7, label=method))

    if base_ret is not None and base_learned is not None:
        ax.scatter([base_learned], [base_ret], marker="*", s=260, color="black", zorder=5)
        handles.append(Line2D([], [], marker="*", ls="--", color="black", markersize=11,
                              label=f"base (retained {base_ret:.3f})"))

    ax.set_xlabel("learned: fraction of taught facts answered (exact match) →")
    ax.set_ylabel("retained: fraction of known facts still answered →")
    ax.set_title("Learning–forgetting frontier (up and right is better; line = per-method Pareto front)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.08)
    lo_x, hi_x = ax.get_xlim()
    lo_y, hi_y = ax.get_ylim()
    ax.set_xlim(max(lo_x, -0.03), min(hi_x, 1.03))
    ax.set_ylim(max(lo_y, -0.03), min(hi_y, 1.03))

    leg = fig.legend(handles=handles, title="method", loc="outside right upper", fontsize=9)
    fig.add_artist(leg)
    params = [p for p in (r.get("trainable_params_per_step") for r in runs) if is_number(p) and p > 0]
    if params:
        lo, hi = round(math.log10(min(params))), round(math.log10(max(params)))
        refs = sorted({lo, (lo + hi) // 2, hi}) if hi - lo >= 2 else sorted({lo, hi})
        size_handles = [
            Line2D([], [], marker="o", ls="", color="#999999", markeredgecolor="white",
                   markersize=math.sqrt(marker_area(10**k)), label=human_count(10**k))
            for k in refs
        ]
        fig.legend(handles=size_handles, title="trainable\nparams/step", loc="outside right lower",
                   fontsize=9, labelspacing=1.3, borderpad=0.9)
    # last, once the layout is known: labels that overlap neither each other nor the markers
    label_points(fig, ax, [p for p, _, _ in labelled], [t for _, t, _ in labelled],
                 [c for _, _, c in labelled], fontsize=7, marker_radius=7.0, fontweight="normal")
    return fig


def curves_plot(results: dict) -> Figure:
    """Two panels against facts_seen: learned (left) and retained (right), one line per run
    (colour = method, line style varies within a method), base model as dashed grey lines."""
    runs = results.get("runs", [])
    base = results.get("base", {})
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    ax_l, ax_r = fig.subplots(1, 2, sharex=True)
    per_method: dict[str, int] = {}
    for run in runs:
        method = run.get("method", "?")
        k = per_method.get(method, 0)
        per_method[method] = k + 1
        curve = sorted(run.get("curve") or [], key=lambda p: p.get("facts_seen", 0))
        style = {"color": method_color(method), "ls": _LINESTYLES[k % len(_LINESTYLES)], "lw": 1.6,
                 "marker": "o", "markersize": 3, "label": run.get("label") or f"{method} {short_label(run)}"}
        for ax, key in ((ax_l, "learned"), (ax_r, "retained")):
            pts = [(p["facts_seen"], p[key]) for p in curve if num(p.get(key)) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], **style)
    for ax, key, title in ((ax_l, "learned", "learned (taught facts answered)"),
                           (ax_r, "retained", "retained (known facts still answered)")):
        b = num(base.get(key))
        if b is not None:
            ax.axhline(b, color=BASE_COLOR, ls="--", lw=1.2, label="base model")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("facts seen")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    ax_l.set_ylim(-0.02, 1.02)
    handles, labels = ax_l.get_legend_handles_labels()
    if "base model" not in labels:  # no base learned: take the base line from the right panel
        handles += [h for h, lab in zip(*ax_r.get_legend_handles_labels()) if lab == "base model"]
        labels += ["base model"] * (len(handles) - len(labels))
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8)
    return fig


def _hparams_text(hp: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (hp or {}).items())


FACT_COLUMNS: list[Column] = [
    ("method", "method", None),
    ("label", "run", None),
    ("hparams", "hparams", None),
    ("lr", "lr", "g"),
    ("learned", "learned", ".3f"),
    ("learned_f1", "learned F1", ".3f"),
    ("statement_acc", "statement acc", ".3f"),
    ("retained", "retained", ".3f"),
    ("retained_drop", "retained drop %", lambda v: f"{100 * v:.1f}%"),
    ("heldout_nll_delta", "held-out NLL Δ (nats/tok)", "+.3f"),
    ("trainable_params_per_step", "trainable params/step", human_count),
    ("seconds_per_step", "s/step", ".3f"),
]


def fact_rows(results: dict) -> list[dict]:
    """One flat row per run with the :data:`FACT_COLUMNS` keys (``hparams`` as ``k=v`` text)."""
    rows = []
    for run in results.get("runs", []):
        row = {k: run.get(k) for k, _, _ in FACT_COLUMNS}
        row["hparams"] = _hparams_text(run.get("hparams"))
        row["label"] = run.get("label") or f"{run.get('method', '?')} {short_label(run)}"
        rows.append(row)
    return rows


HOW_TO_READ = """
<p class="note">Each run teaches the same stream of new facts to the same base model.
<b>learned</b>: exact-match accuracy on held-out question probes (questions not used
in training) of the facts taught so far; <b>learned F1</b> is the token-F1 version of the same.
<b>statement acc</b>: a trained statement of each taught fact, cut before its answer, completed
correctly (memorisation rather than retrievable knowledge).
<b>retained</b>: exact match on the held-out question probes of the base model's <i>known</i> facts
(all of them at the start and end; a fixed sample along the curves);
<b>retained drop</b> is relative: (base − run) / base, so 10% means a tenth of the known
facts were forgotten. <b>held-out NLL Δ</b>: change in negative log-likelihood on held-out
text, in nats per token (positive = worse language modelling). <b>trainable params/step</b>:
parameters that receive a gradient update on each step (sparse methods touch far fewer).
In the frontier plot, up and to the right is better; the dashed line is the base model's
retained score, and marker area grows with the log of trainable params/step.</p>
"""


def write_csv(results: dict, path: str | os.PathLike) -> Path:
    """The runs table as CSV: header = the :data:`FACT_COLUMNS` keys, raw full-precision values
    (``retained_drop`` relative 0..1, ``hparams`` as JSON), one row per run."""
    buf = io.StringIO()
    keys = [k for k, _, _ in FACT_COLUMNS]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for run, row in zip(results.get("runs", []), fact_rows(results)):
        row["hparams"] = json.dumps(run.get("hparams") or {}, sort_keys=True)
        w.writerow({k: "" if row[k] is None else (repr(row[k]) if isinstance(row[k], float) else row[k])
                    for k in keys})
    return atomic_write_text(path, buf.getvalue(), newline="")
