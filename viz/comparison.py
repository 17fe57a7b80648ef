"""Charts of a comparison: a signed difference heatmap, a divergence grid, paired bars.

Labels are user text: Vega draws them as text, never as HTML.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from viz.heatmap import axis_labels
from viz.selection import clicked_cell

GRID_SELECTION = "grid_cell"


def difference_heatmap(difference: np.ndarray, labels: list[str], title: str = "",
                       size: int = 460) -> alt.Chart:
    """(unit, unit) B − A attention: red where B attends more, blue where A does."""
    n = len(labels)
    axis = axis_labels(labels, 0)
    qi, ki = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    frame = pd.DataFrame({"q": np.asarray(axis)[qi.ravel()], "k": np.asarray(axis)[ki.ravel()],
                          "difference": np.round(difference.ravel().astype(float), 4)})
    bound = max(float(np.abs(difference).max()) if difference.size else 0.0, 1e-6)
    return alt.Chart(frame, title=title).mark_rect().encode(
        x=alt.X("k:N", sort=axis, title="key (attended to)",
                axis=alt.Axis(labelAngle=-60, labelLimit=90)),
        y=alt.Y("q:N", sort=axis, title="query (attending)", axis=alt.Axis(labelLimit=90)),
        color=alt.Color("difference:Q", title="B − A",
                        scale=alt.Scale(scheme="redblue", domain=[bound, -bound])),
        tooltip=[alt.Tooltip("q:N", title="query"), alt.Tooltip("k:N", title="key"),
                 alt.Tooltip("difference:Q", title="B − A", format="+.4f")],
    ).properties(width=size, height=size)


def score_grid(values: np.ndarray, row_title: str, column_title: str, score_title: str,
               title: str = "", cell: int = 22, picked: tuple[int, int] | None = None,
               signed: bool = False) -> alt.Chart:
    """(row, column) scores, e.g. (layer, head) divergences (darker = more different) or, when
    `signed`, differences (red above zero, blue below). Clicking a cell selects its
    {row, column}; `picked` gets a red frame."""
    rows, columns = values.shape
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    frame = pd.DataFrame({"row": r.ravel(), "column": c.ravel(),
                          "score": np.round(values.ravel().astype(float), 4),
                          "picked": [(int(i), int(j)) == picked for i, j in
                                     zip(r.ravel(), c.ravel())]})
    pick = alt.selection_point(name=GRID_SELECTION, fields=["row", "column"], on="click",
                               empty=False)
    top = max(float(np.abs(values).max()) if values.size else 0.0, 1e-6)
    scale = (alt.Scale(scheme="redblue", domain=[top, -top]) if signed
             else alt.Scale(scheme="purples", domain=[0, top]))
    return alt.Chart(frame, title=title).mark_rect(strokeWidth=2).encode(
        x=alt.X("column:O", title=column_title, axis=alt.Axis(orient="top", labelAngle=0)),
        y=alt.Y("row:O", title=row_title),
        color=alt.Color("score:Q", title=score_title, scale=scale),
        stroke=alt.condition("datum.picked", alt.value("#d62728"), alt.value(None)),
        tooltip=[alt.Tooltip("row:O", title=row_title),
                 alt.Tooltip("column:O", title=column_title),
                 alt.Tooltip("score:Q", title=score_title, format=".4f")],
    ).add_params(pick).properties(width=cell * columns, height=cell * rows)


def picked_cell(event) -> tuple[int, int] | None:
    """The (row, column) clicked in a score grid."""
    return clicked_cell(event, GRID_SELECTION, ("row", "column"))


def paired_bars(rows: dict[str, np.ndarray], labels: list[str], title: str = "") -> alt.Chart:
    """One bar per unit and side: rows maps a side's name to its (unit,) values."""
    axis = axis_labels(labels, 0)
    frame = pd.DataFrame([{"unit": axis[i], "side": name, "value": round(float(v), 4)}
                          for name, values in rows.items() for i, v in enumerate(values)])
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X("unit:N", sort=axis, title=None, axis=alt.Axis(labelAngle=-60, labelLimit=90)),
        xOffset="side:N",
        y=alt.Y("value:Q", title="attention"),
        color=alt.Color("side:N", title=None, scale=alt.Scale(range=["#1f77b4", "#ff7f0e"])),
        tooltip=["side:N", "unit:N", alt.Tooltip("value:Q", format=".4f")],
    ).properties(height=220)
