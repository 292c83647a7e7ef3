"""Helpers shared by every report: HTML pieces, number handling, colours, the Pareto front and a
label placer for scatter plots.

* :func:`fig_to_data_uri` / :func:`img` -- a matplotlib figure as an embedded PNG;
* :func:`html_table` -- rows of dicts as an HTML table whose numeric cells carry the
  full-precision value in ``data-value`` (so tests and scripts can parse the page back);
* :func:`page` / :func:`section` / :func:`kv_list` -- the page skeleton;
* :func:`method_color` -- a fixed, colour-blind-friendly colour per method name;
* :func:`pareto_front` -- indices of the non-dominated points of a 2-D "higher is better" set;
* :func:`is_number`, :func:`num`, :func:`human_count`, :func:`as_matrix` -- value handling;
* :func:`place_labels` -- boxes for point labels such that no two boxes overlap (pure geometry),
  and :func:`label_points`, which uses it to annotate the points of a scatter plot.

Figures are built with the object-oriented :class:`matplotlib.figure.Figure` API (rendered by
Agg), never through ``pyplot``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

__all__ = [
    "BASE_COLOR",
    "CSS",
    "METHOD_COLORS",
    "Column",
    "as_matrix",
    "atomic_write_text",
    "boxes_overlap",
    "fig_to_data_uri",
    "format_value",
    "html_table",
    "human_count",
    "img",
    "is_number",
    "kv_list",
    "label_points",
    "method_color",
    "num",
    "page",
    "pareto_front",
    "place_labels",
    "section",
]


# Okabe-Ito palette (colour-blind safe) for the methods we know, then a fallback cycle.
METHOD_COLORS: dict[str, str] = {
    "full": "#D55E00",  # vermillion
    "lora": "#0072B2",  # blue
    "smf": "#009E73",  # bluish green
    "smf-tf": "#CC79A7",  # reddish purple
    "smf-all": "#E69F00",  # orange
}
_FALLBACK_COLORS = ["#56B4E9", "#000000", "#8C564B", "#7F7F7F", "#BCBD22", "#9467BD", "#17BECF"]
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


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_value(v: Any, fmt: str | Callable[[Any], str] | None) -> str:
    if v is None:
        return "–"
    if is_number(v) and isinstance(v, float) and math.isnan(v):
        return "nan"
    if callable(fmt):
        return fmt(v)
    if fmt and is_number(v):
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
            text = html.escape(format_value(v, fmt))
            if is_number(v):
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


def num(v: Any) -> float | None:
    """``v`` as a finite float, else None (booleans, strings, NaN and infinities give None)."""
    if not is_number(v):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def human_count(n: Any) -> str:
    """``22677760`` -> ``22.7M``, ``157696`` -> ``158k``; non-numbers as ``str``."""
    if not is_number(n):
        return str(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


def as_matrix(R: Any) -> np.ndarray:
    """``R`` (lists with None/NaN allowed) as a float array with NaN for missing entries."""
    rows = [[np.nan if v is None else v for v in row] for row in (R or [])]
    arr = np.array(rows, dtype=float) if rows else np.zeros((0, 0))
    return arr.reshape(len(rows), -1) if rows else arr


# --------------------------------------------------------------------------- label placement

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (y up)


def _overlap(a: Box, b: Box) -> float:
    """Area of the intersection of two boxes (0 when they only touch)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def boxes_overlap(a: Box, b: Box) -> bool:
    """True when the interiors of ``a`` and ``b`` intersect."""
    return _overlap(a, b) > 0.0


def _candidate(anchor: tuple[float, float], size: tuple[float, float], r: float, angle: float) -> Box:
    """The box of a ``size`` label whose side (or corner) nearest the anchor lies ``r`` from it in
    direction ``angle``: to the right of the point it starts there, to the left it ends there,
    straight above/below it is centred."""
    x, y = anchor
    w, h = size
    c, s = math.cos(angle), math.sin(angle)
    px, py = x + r * c, y + r * s
    x0 = px if c > 0.3 else (px - w if c < -0.3 else px - w / 2)
    y0 = py if s > 0.3 else (py - h if s < -0.3 else py - h / 2)
    return (x0, y0, x0 + w, y0 + h)


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]],
                 bounds: Box | None = None, obstacles: Sequence[Box] = (), gap: float = 5.0,
                 step: float = 7.0, rings: int = 12, angles: int = 16, pad: float = 1.0) -> list[Box]:
    """Greedy placement of one label box per anchor so that no two boxes overlap.

    ``anchors`` are the points (any units, y up), ``sizes`` the (width, height) of each label.
    Candidates lie on rings of radius ``gap``, ``gap + step``, ... (``rings`` of them) around the
    anchor, ``angles`` directions each, upper right first; the first one that stays inside
    ``bounds``, overlaps no placed box (each grown by ``pad``) and no ``obstacles`` (the markers)
    wins. Anchors are served from the most crowded first. Where no candidate is free, the one
    with the least overlap is taken, so the result is still a box per anchor; with enough room
    (``bounds`` large enough for the labels) it never comes to that.

    Returns the boxes (x0, y0, x1, y1) in the anchors' order.
    """
    n = len(anchors)
    if len(sizes) != n:
        raise ValueError(f"got {len(sizes)} sizes for {n} anchors")
    dirs = [math.pi / 4 + 2 * math.pi * k / angles for k in range(angles)]
    # prefer right/up, then left, then below: sort the directions by that preference
    dirs.sort(key=lambda a: (-(math.cos(a) * 0.6 + math.sin(a) * 0.4)))
    # crowded anchors first: they have the fewest free spots
    reach = max((max(s) for s in sizes), default=0.0) * 2
    crowd = [sum(1 for q in anchors if abs(q[0] - p[0]) < reach and abs(q[1] - p[1]) < reach) for p in anchors]
    order = sorted(range(n), key=lambda i: (-crowd[i], i))
    placed: dict[int, Box] = {}

    def grown(b: Box) -> Box:
        return (b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad)

    for i in order:
        best, best_cost = None, math.inf
        for ring in range(rings):
            r = gap + ring * step
            for a in dirs:
                box = _candidate(anchors[i], sizes[i], r, a)
                if bounds is not None and (box[0] < bounds[0] or box[1] < bounds[1]
                                           or box[2] > bounds[2] or box[3] > bounds[3]):
                    continue
                cost = sum(_overlap(grown(box), b) for b in placed.values())
                cost += 0.5 * sum(_overlap(box, o) for o in obstacles)
                if cost < best_cost:
                    best, best_cost = box, cost
                if cost == 0.0:
                    break
            if best_cost == 0.0:
                break
        if best is None:  # nothing fits inside the bounds: take the first ring, upper right
            best = _candidate(anchors[i], sizes[i], gap, dirs[0])
        placed[i] = best
    return [placed[i] for i in range(n)]


def label_points(fig: Figure, ax, points: Sequence[tuple[float, float]], labels: Sequence[str],
                 colors: Sequence[str], fontsize: float = 8.0, marker_radius: float = 6.0,
                 fontweight: str = "bold") -> list:
    """Annotate ``points`` (data coordinates of ``ax``) with ``labels`` placed by
    :func:`place_labels`, inside the axes, avoiding each other and the markers; a thin leader
    line joins a label to its point when it had to move away. Fixes the figure's layout first
    (the positions are computed in display space), so call it after everything else is drawn.
    Returns the annotation artists."""
    if not points:
        return []
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # run the layout engine once, then freeze it
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    prop = FontProperties(size=fontsize, weight=fontweight)
    sizes = []
    for s in labels:
        w, h, _ = renderer.get_text_width_height_descent(s, prop, ismath=False)
        sizes.append((w + 4.0, h + 4.0))  # 2 px of air on each side
    px = [tuple(ax.transData.transform(p)) for p in points]
    bb = ax.get_window_extent(renderer)
    bounds = (bb.x0 + 4, bb.y0 + 4, bb.x1 - 4, bb.y1 - 4)
    rad = marker_radius * fig.dpi / 72.0
    obstacles = [(x - rad, y - rad, x + rad, y + rad) for x, y in px]
    to_pt = 72.0 / fig.dpi
    boxes = place_labels(px, sizes, bounds, obstacles, gap=rad * 0.8, step=max(4.0, 0.9 * sizes[0][1]))
    artists = []
    for (x, y), p, box, label, color in zip(px, points, boxes, labels, colors):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        far = math.hypot(cx - x, cy - y) > rad + max(box[2] - box[0], box[3] - box[1]) / 2 + 2
        arrow = {"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7, "shrinkA": 0, "shrinkB": rad * 0.8} if far else None
        artists.append(ax.annotate(
            label, p, xycoords="data",
            xytext=((box[0] + 2.0) * to_pt, (box[1] + 2.0) * to_pt), textcoords="figure points",
            ha="left", va="bottom", fontsize=fontsize, color=color, fontweight=fontweight, zorder=4,
            arrowprops=arrow, annotation_clip=False))
    return artists
