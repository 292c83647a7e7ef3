"""Self-contained HTML reports: inline CSS, plots embedded as base64 PNGs, no JavaScript.

Generic helpers (reused by every report):

* :func:`fig_to_data_uri` -- a matplotlib figure as a ``data:image/png;base64,...`` URI;
* :func:`html_table` -- rows of dicts as an HTML table whose numeric cells carry the
  full-precision value in ``data-value`` (so tests and scripts can parse the page back);
* :func:`page` / :func:`section` -- the page skeleton;
* :func:`method_color` -- a fixed, colour-blind-friendly colour per method name;
* :func:`pareto_front` -- indices of the non-dominated points of a 2-D "higher is better" set.

Fact-injection benchmark (the ``results.json`` of ``forgetless bench facts``):
:func:`frontier_plot`, :func:`curves_plot`, :func:`write_csv` (the page is the run report:
``report.runs.write_run_report`` adds them for every run with fact scores).

Figures are built with the object-oriented :class:`matplotlib.figure.Figure` API (rendered by
Agg), never through ``pyplot``: no global backend switch, no figure registry to leak into.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# --------------------------------------------------------------------------- generic helpers

# Okabe-Ito palette (colour-blind safe) for the methods we know, then a fallback cycle.
METHOD_COLORS: dict[str, str] = {
    "full": "#D55E00",  # vermillion
    "lora": "#0072B2",  # blue
    "smf": "#009E73",  # bluish green
    "smf-tf": "#CC79A7",  # reddish purple
    "smf-all": "#E69F00",  # orange
}
_FALLBACK_COLORS = ["#56B4E9", "#000000", "#8C564B", "#7F7F7F", "#BCBD22", "#9467BD", "#17BECF"]
_LINESTYLES = ["-", "--", ":", "-."]
BASE_COLOR = "#444444"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1150px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
code, .mono { font-family: "SFMono-Regular", Consolas, Menlo, monospace; font-size: .92em; }
pre { background: #f6f8fa; padding: .6em .8em; border-radius: 4px; overflow-x: auto; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
th, td { padding: .3em .65em; border-bottom: 1px solid #e3e3e3; text-align: left; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:hover td { background: #fafafa; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: .5em 0; }
dl.kv dt { color: #666; } dl.kv dd { margin: 0; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px;
          margin-right: .35em; vertical-align: -.05em; }
img.plot { max-width: 100%; height: auto; display: block; margin: .6em 0; }
p.note { color: #444; max-width: 60em; }
"""


def method_color(method: str) -> str:
    """A fixed colour for ``method``; unknown names get a stable colour from a fallback list."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    # stable across runs and processes (no hash randomisation): sum of code points
    return _FALLBACK_COLORS[sum(map(ord, method)) % len(_FALLBACK_COLORS)]


def fig_to_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render ``fig`` to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(fig: Figure, alt: str) -> str:
    """An ``<img>`` tag embedding ``fig``."""
    return f'<img class="plot" alt="{html.escape(alt)}" src="{fig_to_data_uri(fig)}">'


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _format(v: Any, fmt: str | Callable[[Any], str] | None) -> str:
    if v is None:
        return "–"
    if _is_number(v) and isinstance(v, float) and math.isnan(v):
        return "nan"
    if callable(fmt):
        return fmt(v)
    if fmt and _is_number(v):
        return format(v, fmt)
    return str(v)


Column = tuple[str, str, "str | Callable[[Any], str] | None"]


def html_table(rows: list[dict], columns: list[Column], row_attrs: Iterable[dict] | None = None) -> str:
    """Rows of dicts as an HTML table.

    ``columns`` is a list of ``(key, header, fmt)``: ``key`` looks up ``row.get(key)``; ``fmt`` is
    a format spec (``".3f"``), a callable ``value -> str``, or ``None`` for ``str``. Every cell
    carries ``data-col="key"``; a numeric cell also carries ``data-value`` with the
    full-precision ``repr`` of the value, whatever its display format. Missing values show "–"
    and carry no ``data-value``. ``row_attrs`` optionally gives extra attributes per ``<tr>``.
    Display strings are HTML-escaped (a callable ``fmt`` returns plain text, not markup).
    """
    attrs_list = list(row_attrs) if row_attrs is not None else [{} for _ in rows]
    head = "".join(f'<th data-col="{html.escape(k)}">{html.escape(h)}</th>' for k, h, _ in columns)
    body = []
    for row, attrs in zip(rows, attrs_list, strict=True):
        tr_attrs = "".join(f' {html.escape(a)}="{html.escape(str(v))}"' for a, v in attrs.items())
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            text = html.escape(_format(v, fmt))
            if _is_number(v):
                cells.append(f'<td class="num" data-col="{html.escape(key)}" data-value="{v!r}">{text}</td>')
            else:
                cells.append(f'<td data-col="{html.escape(key)}">{text}</td>')
        body.append(f"<tr{tr_attrs}>{''.join(cells)}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def kv_list(items: dict) -> str:
    """A small definition list ``key: value`` (values HTML-escaped)."""
    inner = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    return f'<dl class="kv">{inner}</dl>'


def section(heading: str, body: str) -> str:
    """A ``<section>`` with an ``<h2>``; ``body`` is raw HTML."""
    return f"<section>\n<h2>{html.escape(heading)}</h2>\n{body}\n</section>"


def page(title: str, sections: list[str]) -> str:
    """A complete HTML document: ``<h1>title</h1>`` followed by ``sections`` (raw HTML)."""
    t = html.escape(title)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{t}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{t}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and :func:`os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points that no other point beats on *both* coordinates.

    Both coordinates are "higher is better". A point is dropped only if some other point is
    strictly higher in x *and* strictly higher in y, so ties are kept: of (0.5, 0.8) and
    (0.5, 0.9) both stay, and duplicate points both stay.
    """
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox > x and oy > y for j, (ox, oy) in enumerate(points) if j != i)
    ]


# --------------------------------------------------------------------------- fact benchmark


def _num(v: Any) -> float | None:
    return float(v) if _is_number(v) and not math.isnan(float(v)) else None


def _fmt_lr(lr: Any) -> str:
    return format(lr, "g") if _is_number(lr) else str(lr)


def short_label(run: dict) -> str:
    """The per-point label: ``lr=2 t=500`` / ``lr=0.0001 r=8``."""
    hp = run.get("hparams") or {}
    parts = [f"lr={_fmt_lr(run.get('lr'))}"]
    if "rank" in hp:
        parts.append(f"r={hp['rank']}")
    if "top_t" in hp:
        parts.append(f"t={hp['top_t']}")
    return " ".join(parts)


def _human_count(n: Any) -> str:
    if not _is_number(n):
        return str(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


def _methods_in_order(runs: list[dict]) -> list[str]:
    """Known methods in palette order first, then the others in order of appearance."""
    seen = list(dict.fromkeys(r.get("method", "?") for r in runs))
    return [m for m in METHOD_COLORS if m in seen] + [m for m in seen if m not in METHOD_COLORS]


def marker_area(params: Any) -> float:
    """Scatter marker area (pt^2) growing with log10 of trainable params/step (1e3 -> 45, 1e7 -> 245)."""
    if not _is_number(params) or params <= 0:
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

    base_ret, base_learned = _num(base.get("retained")), _num(base.get("learned"))
    if base_ret is not None:
        ax.axhline(base_ret, color=BASE_COLOR, ls="--", lw=1, alpha=0.8, zorder=1)

    handles = []
    for method in _methods_in_order(runs):
        color = method_color(method)
        mruns = [
            r for r in runs
            if r.get("method", "?") == method and _num(r.get("learned")) is not None
            and _num(r.get("retained")) is not None
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
            ax.annotate(short_label(r), (x, y), xytext=(5, 4), textcoords="offset points",
                        fontsize=7, color=color, zorder=4)
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
    params = [p for p in (r.get("trainable_params_per_step") for r in runs) if _is_number(p) and p > 0]
    if params:
        lo, hi = round(math.log10(min(params))), round(math.log10(max(params)))
        refs = sorted({lo, (lo + hi) // 2, hi}) if hi - lo >= 2 else sorted({lo, hi})
        size_handles = [
            Line2D([], [], marker="o", ls="", color="#999999", markeredgecolor="white",
                   markersize=math.sqrt(marker_area(10**k)), label=_human_count(10**k))
            for k in refs
        ]
        fig.legend(handles=size_handles, title="trainable\nparams/step", loc="outside right lower",
                   fontsize=9, labelspacing=1.3, borderpad=0.9)
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
        style = dict(color=method_color(method), ls=_LINESTYLES[k % len(_LINESTYLES)], lw=1.6,
                     marker="o", markersize=3, label=run.get("label") or f"{method} {short_label(run)}")
        for ax, key in ((ax_l, "learned"), (ax_r, "retained")):
            pts = [(p["facts_seen"], p[key]) for p in curve if _num(p.get(key)) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], **style)
    for ax, key, title in ((ax_l, "learned", "learned (taught facts answered)"),
                           (ax_r, "retained", "retained (known facts still answered)")):
        b = _num(base.get(key))
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
    ("trainable_params_per_step", "trainable params/step", _human_count),
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
