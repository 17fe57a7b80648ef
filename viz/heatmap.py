"""Attention heatmaps as Altair charts: full detail for a token window, binned overviews beyond.

Rows are queries (the attending token), columns keys (the attended token). Token labels are user
text: Vega draws them as text, never as HTML.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from viz.selection import clicked_points

COLOR = alt.Scale(scheme="blues", domain=[0, 1], clamp=True)
QUERY_SELECTION = "cell"


def _color_scale(values: np.ndarray) -> alt.Scale:
    # Most weights are tiny next to a sink token; a data-driven domain keeps the pattern visible.
    top = float(np.nanmax(values)) if values.size else 1.0
    return alt.Scale(scheme="blues", domain=[0, max(top, 1e-6)])


def axis_labels(labels: list[str], offset: int) -> list[str]:
    """Unique axis labels: position and token ("12 ·cat")."""
    return [f"{offset + i} {t}" for i, t in enumerate(labels)]


def attention_heatmap(matrix: np.ndarray, query_labels: list[str], key_labels: list[str],
                      query_offset: int = 0, key_offset: int = 0, title: str = "",
                      size: int = 520) -> alt.Chart:
    """Full-detail heatmap of a (query, key) window. Clicking a cell selects its query token."""
    n_q, n_k = matrix.shape
    q_axis, k_axis = axis_labels(query_labels, query_offset), axis_labels(key_labels, key_offset)
    qi, ki = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
    frame = pd.DataFrame({
        "query": (qi + query_offset).ravel(), "key": (ki + key_offset).ravel(),
        "q": np.asarray(q_axis)[qi.ravel()], "k": np.asarray(k_axis)[ki.ravel()],
        "weight": np.round(matrix.ravel().astype(float), 4),
    })
    pick = alt.selection_point(name=QUERY_SELECTION, fields=["query"], on="click")
    return alt.Chart(frame, title=title).mark_rect().encode(
        x=alt.X("k:N", sort=k_axis, title="key (attended to)",
                axis=alt.Axis(labelAngle=-60, labelLimit=90)),
        y=alt.Y("q:N", sort=q_axis, title="query (attending)", axis=alt.Axis(labelLimit=90)),
        color=alt.Color("weight:Q", scale=_color_scale(matrix), title="attention"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=[alt.Tooltip("q:N", title="query"), alt.Tooltip("k:N", title="key"),
                 alt.Tooltip("weight:Q", format=".4f")],
    ).add_params(pick).properties(width=size, height=size)


def binned_heatmap(values: np.ndarray, query_edges: np.ndarray, key_edges: np.ndarray,
                   labels: list[str], title: str = "", size: int = 520) -> alt.Chart:
    """Overview of a long input: each cell is the mean attention of a block of tokens.
    Clicking a cell selects its query block (the page zooms into it)."""
    rows = []
    for qb in range(len(query_edges) - 1):
        for kb in range(len(key_edges) - 1):
            q0, q1, k0, k1 = query_edges[qb], query_edges[qb + 1], key_edges[kb], key_edges[kb + 1]
            rows.append((q0, q1, k0, k1, round(float(values[qb, kb]), 5),
                         f"{q0}–{q1 - 1} {labels[q0]}…", f"{k0}–{k1 - 1} {labels[k0]}…"))
    frame = pd.DataFrame(rows, columns=["q0", "q1", "k0", "k1", "weight", "queries", "keys"])
    pick = alt.selection_point(name=QUERY_SELECTION, fields=["q0", "q1"], on="click")
    n = int(query_edges[-1])
    return alt.Chart(frame, title=title).mark_rect().encode(
        x=alt.X("k0:Q", title="key position", scale=alt.Scale(domain=[0, n])), x2="k1:Q",
        y=alt.Y("q0:Q", title="query position", scale=alt.Scale(domain=[n, 0])), y2="q1:Q",
        color=alt.Color("weight:Q", scale=_color_scale(values), title="mean attention"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.6)),
        tooltip=[alt.Tooltip("queries:N"), alt.Tooltip("keys:N"),
                 alt.Tooltip("weight:Q", title="mean attention", format=".5f")],
    ).add_params(pick).properties(width=size, height=size)


def selected_values(event, field: str) -> list:
    """Values of `field` in a heatmap's click selection."""
    return [p[field] for p in clicked_points(event, QUERY_SELECTION) if field in p]
