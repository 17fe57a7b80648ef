"""Views of a reasoning trace: sentences shaded by a score, sentence x sentence matrices, and the
circle graph of the strongest links between sentences."""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd

from viz.math_text import math_markdown
from viz.token_text import shade

# The function tags of the Thought Anchors taxonomy (published and heuristic), as drawn.
TAG_COLORS = {
    "problem_setup": "#4285F4",
    "plan_generation": "#EA4335",
    "fact_retrieval": "#FBBC05",
    "active_computation": "#34A853",
    "uncertainty_management": "#9C27B0",
    "self_checking": "#FF9800",
    "result_consolidation": "#00BCD4",
    "final_answer_emission": "#795548",
    "unknown": "#9E9E9E",
}


def sentence_list(chunks: list[str], scores: np.ndarray | None, tags: list[str],
                  colors: dict[str, str], selected: int | None = None) -> str:
    """Markdown (for st.markdown with unsafe_allow_html: the only HTML is ours, user text is
    inert, its LaTeX renders as math): one line per sentence with its index, tag colour and
    score shading."""
    values = np.zeros(len(chunks)) if scores is None else np.nan_to_num(np.asarray(scores, float))
    top = max(float(np.abs(values).max(initial=0.0)), 1e-12)
    rows = []
    for i, (chunk, tag) in enumerate(zip(chunks, tags)):
        outline = "outline: 2px solid #d62728;" if i == selected else ""
        score = "" if scores is None else f"{values[i]:+.3f}"
        rows.append(
            f'<span style="display:inline-block; width:2.4em; color:#666; vertical-align:top">'
            f'{i}</span><span title="{html.escape(tag)}" style="display:inline-block; '
            f'vertical-align:top; margin-top:0.4em; width:10px; height:10px; margin-right:6px; '
            f'background:{colors.get(tag, "#9E9E9E")}; border-radius:50%"></span><span style="display:inline-block; width:4.5em; '
            f'font-family:monospace; color:#444; vertical-align:top">{score}</span>'
            # The text keeps its own column: wrapped lines stay right of the score.
            f'<span style="display:inline-block; width:calc(100% - 8em - 20px)"><span style="'
            f'{shade(values[i], top)} padding:1px 4px; border-radius:3px; {outline}">'
            f'{math_markdown(chunk)}</span></span>')
    return '<div style="font-size:14px; line-height:1.5">\n\n' + "<br>\n".join(rows) + \
        "\n\n</div>"


def tag_legend(colors: dict[str, str]) -> str:
    """HTML (escaped): a coloured dot and the name of each function tag."""
    return '<div style="font-size:13px; line-height:1.6">' + " ".join(
        f'<span style="white-space:nowrap; margin-right:10px"><span style="display:inline-block; '
        f'width:10px; height:10px; border-radius:50%; background:{html.escape(color)}"></span> '
        f'{html.escape(tag)}</span>' for tag, color in colors.items()) + "</div>"


def sentence_matrix(matrix: np.ndarray, title: str, size: int = 460) -> alt.Chart:
    """Diverging heatmap of a (row sentence, column sentence) matrix; NaN cells are left out."""
    n = matrix.shape[0]
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    frame = pd.DataFrame({"row": rows.ravel(), "col": cols.ravel(), "value": matrix.ravel()})
    frame = frame[np.isfinite(frame["value"])]
    bound = float(np.abs(frame["value"]).max()) if len(frame) else 1.0
    # A title line per part, so that a narrow column does not cut it off.
    lines = [part.strip() for part in title.split(":")]
    return alt.Chart(frame, title=alt.TitleParams(lines, anchor="start")).mark_rect().encode(
        x=alt.X("col:O", title="sentence"), y=alt.Y("row:O", title="sentence"),
        color=alt.Color("value:Q", scale=alt.Scale(scheme="redblue", domain=[-bound, bound],
                                                   reverse=True)),
        tooltip=["row:O", "col:O", alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=size, height=size)


def link_graph(chunks: list[str], links: list[tuple[int, int, float]], importance: np.ndarray,
               tags: list[str], colors: dict[str, str], size: int = 300) -> alt.Chart:
    """Sentences on a circle (clockwise from the top), node size ~ importance, colour = tag;
    a line per link (source, target, weight), wider for stronger links."""
    n = len(chunks)
    angle = np.pi / 2 - 2 * np.pi * np.arange(n) / n
    x, y = np.cos(angle), np.sin(angle)
    spread = np.ptp(importance) if n and np.ptp(importance) > 0 else 1.0
    nodes = pd.DataFrame({"i": np.arange(n), "x": x, "y": y, "tag": tags,
                          "text": [c[:120] for c in chunks],
                          "size": 60 + 500 * (importance - np.min(importance)) / spread})
    edges = pd.DataFrame([{"edge": k, "x": x[p], "y": y[p], "weight": abs(w), "end": end}
                          for k, (s, t, w) in enumerate(links) for end, p in ((0, s), (1, t))],
                         columns=["edge", "x", "y", "weight", "end"])
    scale = alt.Scale(domain=[-1.2, 1.2])
    tag_scale = alt.Scale(domain=list(colors), range=list(colors.values()))
    lines = alt.Chart(edges).mark_line(color="#888").encode(
        x=alt.X("x:Q", scale=scale, axis=None), y=alt.Y("y:Q", scale=scale, axis=None),
        detail="edge:N", strokeWidth=alt.StrokeWidth("weight:Q", legend=None,
                                                     scale=alt.Scale(range=[0.5, 5])),
        order="end:O")
    points = alt.Chart(nodes).mark_circle(opacity=0.9, stroke="white").encode(
        x=alt.X("x:Q", scale=scale, axis=None), y=alt.Y("y:Q", scale=scale, axis=None),
        size=alt.Size("size:Q", legend=None, scale=None),
        # The legend is tag_legend's (a chart legend would squeeze the circle in a column).
        color=alt.Color("tag:N", scale=tag_scale, legend=None),
        tooltip=["i:O", "tag:N", "text:N"])
    labels = alt.Chart(nodes).mark_text(fontSize=10, dy=-12).encode(
        x=alt.X("x:Q", scale=scale, axis=None), y=alt.Y("y:Q", scale=scale, axis=None),
        text="i:O")
    return (lines + points + labels).properties(width=size, height=size)
