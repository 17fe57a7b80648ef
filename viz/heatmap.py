"""Attention heatmaps as Altair charts: full detail for a token window, binned overviews beyond.

Rows are queries (the attending token), columns keys (the attended token). Token labels are user
text: Vega draws them as text, never as HTML.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from viz.selection import clicked_points

QUERY_SELECTION = "cell"
BRUSH = "brush"
SCALES = ("linear", "log", "rank")
# Width and height are the plot's own (axes and legend come on top), so cells keep their size.
PLOT_SIZE = alt.AutoSizeParams(type="pad", contains="padding")
CELL_PX = 11  # smallest row height at which every token label fits (none are thinned)
MAX_WIDTH = 560  # plot width that fits the main column at 1,280 px wide
# The one rule of the views: up to DETAIL_MAX tokens per side a matrix is drawn cell by cell,
# wider ones as a binned overview.
DETAIL_MAX = 96
# Thousands of cells, each encoded in the browser by Vega's expression interpreter: no encoding
# depends on the click selection (dimming the other cells re-encoded every cell on each click
# and each redraw: a third or more of the browser's CPU per click at 96 x 96; the page shows the
# picked token instead), and no ARIA description per cell (a string built per cell, which no
# screen reader can use at this count).
CELL_MARK = {"aria": False}


def _colour(values: np.ndarray, scale: str, title: str) -> alt.Color:
    """The colour encoding. Most weights are tiny next to a sink token, so
    every scale's domain follows the data: linear up to the largest weight; log (symmetric, so
    zeros stay white) resolves three decades below it; rank colours by the share of shown cells
    with a smaller weight, which shows the order of weights whatever their spread."""
    top = max(float(np.nanmax(values)) if values.size else 1.0, 1e-6)
    if scale == "rank":
        return alt.Color("rank:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]),
                                 title="rank (share below)")
    kind = alt.Scale(scheme="blues", domain=[0, top], type="symlog", constant=top / 1000) \
        if scale == "log" else alt.Scale(scheme="blues", domain=[0, top])
    return alt.Color("weight:Q", scale=kind, title=title)


def ranks(values: np.ndarray) -> np.ndarray:
    """Share of the values strictly smaller than each (ties share a rank), in [0, 1)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    return (np.searchsorted(np.sort(flat), flat, side="left") / max(flat.size, 1)).reshape(
        np.shape(values))


def axis_labels(labels: list[str], offset: int) -> list[str]:
    """Unique axis labels: position and token ("12 ·cat")."""
    return [f"{offset + i} {t}" for i, t in enumerate(labels)]


def detail_size(n_query: int, n_key: int, size: int = 520) -> tuple[int, int]:
    """(width, height) in pixels: at least CELL_PX per query so every row label is drawn; keys
    get CELL_PX each up to MAX_WIDTH. Drawn at this size (width="content"), the browser lays out
    labels exactly as the exported PNG does."""
    return max(size, min(CELL_PX * n_key, MAX_WIDTH)), max(size, CELL_PX * n_query)


def attention_heatmap(matrix: np.ndarray, query_labels: list[str], key_labels: list[str],
                      query_offset: int = 0, key_offset: int = 0, title: str = "",
                      size: int = 520, scale: str = "linear") -> alt.Chart:
    """Full-detail heatmap of a (query, key) window. Clicking a cell selects its query token.
    Every row label is drawn (the chart grows with the window instead), and every column label
    up to MAX_WIDTH / CELL_PX keys."""
    n_q, n_k = matrix.shape
    q_axis, k_axis = axis_labels(query_labels, query_offset), axis_labels(key_labels, key_offset)
    qi, ki = np.meshgrid(np.arange(n_q), np.arange(n_k), indexing="ij")
    frame = pd.DataFrame({
        "query": (qi + query_offset).ravel(), "key": (ki + key_offset).ravel(),
        "q": np.asarray(q_axis)[qi.ravel()], "k": np.asarray(k_axis)[ki.ravel()],
        "weight": np.round(matrix.ravel().astype(float), 4),
    })
    if scale == "rank":
        frame["rank"] = np.round(ranks(matrix).ravel(), 3)
    colour = _colour(matrix, scale, "attention")
    pick = alt.selection_point(name=QUERY_SELECTION, fields=["query", "key"], on="click")
    width, height = detail_size(n_q, n_k, size)
    per_key = width / n_k
    # Crowded keys: upright labels in a font that fits the column; beyond about 80 keys every
    # other label is left out ("parity"), in the browser and the PNG alike.
    key_axis = (alt.Axis(labelAngle=-60, labelLimit=90, labelOverlap="parity")
                if per_key >= CELL_PX else
                alt.Axis(labelAngle=-90, labelLimit=90, labelOverlap="parity",
                         labelFontSize=max(7, min(10, int(per_key) - 1))))
    # Axes in token order by the numeric position: a list of labels as the sort would make Vega
    # look each cell's label up in that list (a chain of comparisons per cell, interpreted in
    # the browser: a large part of each redraw at 96 x 96). See CELL_MARK for the rest.
    return alt.Chart(frame, title=title).mark_rect(**CELL_MARK).encode(
        x=alt.X("k:N", sort=alt.EncodingSortField("key", op="min"), title="key (attended to)",
                axis=key_axis),
        y=alt.Y("q:N", sort=alt.EncodingSortField("query", op="min"), title="query (attending)",
                axis=alt.Axis(labelLimit=90, labelOverlap=False)),
        color=colour,
        tooltip=[alt.Tooltip("q:N", title="query"), alt.Tooltip("k:N", title="key"),
                 alt.Tooltip("weight:Q", format=".4f")],
    ).add_params(pick).properties(width=width, height=height, autosize=PLOT_SIZE)


def binned_heatmap(values: np.ndarray, query_edges: np.ndarray, key_edges: np.ndarray,
                   labels: list[str], title: str = "", size: int = 520,
                   scale: str = "linear", drag: bool = False) -> alt.Chart:
    """Overview of a long input or a wide window: each cell is the mean attention of a block of
    tokens; edges are token positions (block b covers [edges[b], edges[b + 1])). Clicking a
    block selects it ({q0, q1, k0, k1}); with `drag`, dragging selects a range (BRUSH)."""
    qb, kb = np.meshgrid(np.arange(len(query_edges) - 1), np.arange(len(key_edges) - 1),
                         indexing="ij")
    q0, q1 = query_edges[qb.ravel()], query_edges[qb.ravel() + 1]
    k0, k1 = key_edges[kb.ravel()], key_edges[kb.ravel() + 1]
    frame = pd.DataFrame({
        "q0": q0, "q1": q1, "k0": k0, "k1": k1,
        "weight": np.round(np.asarray(values, dtype=float).ravel(), 5),
        "queries": [f"{a}–{b - 1} {labels[a]}…" for a, b in zip(q0, q1)],
        "keys": [f"{a}–{b - 1} {labels[a]}…" for a, b in zip(k0, k1)],
    })
    if scale == "rank":
        frame["rank"] = np.round(ranks(values).ravel(), 3)
    colour = _colour(np.asarray(values), scale, "mean attention")
    pick = alt.selection_point(name=QUERY_SELECTION, fields=["q0", "q1", "k0", "k1"],
                               on="click")
    q_domain = [int(query_edges[-1]), int(query_edges[0])]
    k_domain = [int(key_edges[0]), int(key_edges[-1])]
    return alt.Chart(frame, title=title).mark_rect(**CELL_MARK).encode(
        x=alt.X("k0:Q", title="key position", scale=alt.Scale(domain=k_domain, nice=False)),
        x2="k1:Q",
        y=alt.Y("q0:Q", title="query position", scale=alt.Scale(domain=q_domain, nice=False)),
        y2="q1:Q",
        color=colour,
        tooltip=[alt.Tooltip("queries:N"), alt.Tooltip("keys:N"),
                 alt.Tooltip("weight:Q", title="mean attention", format=".5f")],
    ).add_params(pick, *([alt.selection_interval(name=BRUSH, encodings=["x", "y"])]
                         if drag else [])).properties(width=size, height=size,
                                                      autosize=PLOT_SIZE)


def block_labels(edges: np.ndarray) -> list[str]:
    """CSV labels of binned rows or columns: the token range of each block ("16-31")."""
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]


def selected_values(event, field: str) -> list:
    """Values of `field` in a heatmap's click selection."""
    return [p[field] for p in clicked_points(event, QUERY_SELECTION) if field in p]


def brushed_range(event) -> dict[str, tuple[float, float]] | None:
    """The dragged rectangle of an overview, {"k0": (lo, hi), "q0": (lo, hi)} in token
    positions, or None without a drag."""
    brush = (event or {}).get("selection", {}).get(BRUSH) or {}
    if "k0" in brush and "q0" in brush:
        return {f: (min(brush[f]), max(brush[f])) for f in ("k0", "q0")}
    return None
