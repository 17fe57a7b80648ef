"""One token's attention: where it looks (its row) and who looks at it (its column).

`attention_lines` draws the bertviz-style view: tokens in two columns, a line from each query to
each key with opacity equal to the weight.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


def attention_bars(weights: np.ndarray, labels: list[str], offset: int, title: str,
                   highlight: int | None = None) -> alt.Chart:
    """Bar per token of a (tokens,) weight vector; token positions start at `offset`."""
    positions = np.arange(len(weights)) + offset
    frame = pd.DataFrame({"position": positions, "token": labels,
                          "label": [f"{p} {t}" for p, t in zip(positions, labels)],
                          "weight": np.round(weights.astype(float), 4),
                          "selected": positions == highlight})
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X("label:N", sort=list(frame["label"]), title=None,
                axis=alt.Axis(labelAngle=-60, labelLimit=90)),
        y=alt.Y("weight:Q", title="attention"),
        color=alt.condition("datum.selected", alt.value("#d62728"), alt.value("#1f77b4")),
        tooltip=["position:Q", "token:N", alt.Tooltip("weight:Q", format=".4f")],
    ).properties(height=220)


def attention_lines(matrix: np.ndarray, query_labels: list[str], key_labels: list[str],
                    query_offset: int = 0, key_offset: int = 0, selected: int | None = None,
                    min_weight: float = 0.02) -> alt.Chart:
    """bertviz-style lines for a (query, key) window: queries left, keys right.
    With a selected query only its lines are drawn, otherwise all lines above `min_weight`."""
    n_q, n_k = matrix.shape
    rows = [(q, k, float(matrix[q, k])) for q, k in zip(*np.nonzero(matrix >= min_weight))
            if selected is None or q + query_offset == selected]
    lines = pd.DataFrame(
        [(i, side, pos, w) for i, (q, k, w) in enumerate(rows)
         for side, pos in ((0, q), (1, k))], columns=["edge", "side", "pos", "weight"])
    tokens = pd.DataFrame({"side": [0] * n_q + [1] * n_k,
                           "pos": list(range(n_q)) + list(range(n_k)),
                           "label": [f"{p + query_offset} {t}" for p, t in enumerate(query_labels)]
                           + [f"{p + key_offset} {t}" for p, t in enumerate(key_labels)]})
    n = max(n_q, n_k)
    y = alt.Y("pos:Q", scale=alt.Scale(domain=[n - 0.5, -0.5]), axis=None)
    x = alt.X("side:Q", scale=alt.Scale(domain=[-0.6, 1.6]), axis=None)
    edges = alt.Chart(lines).mark_line(color="#1f77b4").encode(
        x=x, y=y, detail="edge:N", opacity=alt.Opacity("weight:Q", legend=None,
                                                        scale=alt.Scale(domain=[0, 1])))
    base = alt.Chart(tokens).encode(x=x, y=y, text="label:N")
    left = base.transform_filter("datum.side == 0").mark_text(align="right", dx=-6, fontSize=11)
    right = base.transform_filter("datum.side == 1").mark_text(align="left", dx=6, fontSize=11)
    return (edges + left + right).properties(width=360, height=max(200, 14 * n))
