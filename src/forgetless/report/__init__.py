"""Self-contained HTML reports (inline CSS, base64-embedded PNG plots)."""

from .html import (
    curves_plot,
    fig_to_data_uri,
    frontier_plot,
    html_table,
    page,
    pareto_front,
    write_csv,
)

__all__ = [
    "curves_plot",
    "fig_to_data_uri",
    "frontier_plot",
    "html_table",
    "page",
    "pareto_front",
    "write_csv",
]
