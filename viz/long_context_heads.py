"""Charts of long-context head roles: heads on two scores, a head's attention over a haystack
during the copy, the needle's tokens shaded by that attention, per-layer sink shares."""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd

from viz.selection import clicked_cell

SCATTER_SELECTION = "lc_head"


def heads_frame(scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per head: layer, head, label (L3H4) and every (layer, head) score."""
    any_scores = next(iter(scores.values()))
    layer, head = np.meshgrid(*map(np.arange, any_scores.shape), indexing="ij")
    frame = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    frame.insert(2, "label", [f"L{a}H{b}" for a, b in zip(frame["layer"], frame["head"])])
    for name, values in scores.items():
        frame[name] = np.asarray(values, dtype=float).ravel()
    return frame


def score_scatter(frame: pd.DataFrame, x: str, y: str, titles: dict[str, str],
                  picked: tuple[int, int] | None = None) -> alt.Chart:
    """Heads as points on scores x and y, coloured by layer; clicking one selects it."""
    data = frame.assign(picked=[(a, b) == picked for a, b in zip(frame["layer"], frame["head"])])
    pick = alt.selection_point(name=SCATTER_SELECTION, fields=["layer", "head"], on="click",
                               empty=False)
    return alt.Chart(data).mark_circle(size=70, opacity=0.8).encode(
        x=alt.X(f"{x}:Q", title=titles[x]),
        y=alt.Y(f"{y}:Q", title=titles[y]),
        color=alt.Color("layer:Q", scale=alt.Scale(scheme="viridis")),
        stroke=alt.condition("datum.picked", alt.value("#d62728"), alt.value(None)),
        strokeWidth=alt.value(3),
        tooltip=["label:N", alt.Tooltip(f"{x}:Q", format=".3f"),
                 alt.Tooltip(f"{y}:Q", format=".3f")],
    ).add_params(pick).properties(height=320)


def scatter_head(event) -> tuple[int, int] | None:
    return clicked_cell(event, SCATTER_SELECTION, ("layer", "head"))


def haystack_attention(bins: np.ndarray, edges: np.ndarray, needle: tuple[int, int],
                       question_at: int, title: str = "") -> alt.Chart:
    """A head's mean weight per token over the input (bins), the needle shaded in red and the
    question's start marked."""
    frame = pd.DataFrame({"start": edges[:-1], "end": edges[1:],
                          "weight": np.asarray(bins, dtype=float)})
    bars = alt.Chart(frame, title=title).mark_rect(color="#1f77b4").encode(
        x=alt.X("start:Q", title="input token", scale=alt.Scale(domain=[0, int(edges[-1])])),
        x2="end:Q", y=alt.Y("weight:Q", title="mean weight per token"), y2=alt.datum(0),
        tooltip=[alt.Tooltip("start:Q", title="from token"), alt.Tooltip("end:Q", title="to"),
                 alt.Tooltip("weight:Q", format=".4f")])
    marks = pd.DataFrame({"start": [needle[0], question_at], "end": [needle[1], question_at + 1],
                          "what": ["needle", "question"]})
    spans = alt.Chart(marks).mark_rect(opacity=0.35).encode(
        x="start:Q", x2="end:Q",
        color=alt.Color("what:N", title=None,
                        scale=alt.Scale(domain=["needle", "question"],
                                        range=["#d62728", "#7f7f7f"])))
    return (spans + bars).properties(height=200)


def needle_html(labels: list[str], first: int, needle: tuple[int, int], span: tuple[int, int],
                weights: np.ndarray) -> str:
    """The haystack around the needle as text: the needle framed, the tokens to copy shaded by
    the head's weight on each (darkest = its largest). labels start at token `first`."""
    top = max(float(np.max(weights)) if len(weights) else 0.0, 1e-9)
    parts = []
    for i, label in enumerate(labels):
        position = first + i
        text = html.escape(label.replace("·", " ").replace("↵", "\n"))
        style = ""
        if span[0] <= position < span[1]:
            w = float(weights[position - span[0]]) / top
            style = f"background: rgba(214, 39, 40, {0.1 + 0.8 * w:.2f});"
        if needle[0] <= position < needle[1]:
            style += "border-bottom: 2px solid #d62728;"
        parts.append(f'<span style="{style}" title="token {position}">{text}</span>'
                     if style else text)
    return ('<div style="white-space: pre-wrap; font-family: serif; line-height: 1.6">'
            + "".join(parts) + "</div>")


def layer_shares(shares: np.ndarray, title: str = "") -> alt.Chart:
    """(layer,) share of sink-dominated heads per layer."""
    frame = pd.DataFrame({"layer": np.arange(len(shares)), "share": shares})
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X("layer:O"), y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1]),
                                    title="share of heads"),
        tooltip=["layer:O", alt.Tooltip("share:Q", format=".0%")]).properties(height=160)
