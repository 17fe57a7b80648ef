"""The pruning curve (Michel et al. 2019): loss against the fraction of heads masked, one line per
masking order (least important heads first, and a random order for comparison)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


def pruning_chart(fractions: np.ndarray, losses: dict[str, np.ndarray], loss_name: str,
                  title: str = "", width: int = 420, height: int = 280) -> alt.Chart:
    """fractions: (step,) in [0, 1]; losses: order name -> (step,) loss with that fraction
    masked. The first point (nothing masked) is drawn as a dashed reference line."""
    frame = pd.DataFrame([
        {"fraction": float(f), "order": name, "loss": float(value)}
        for name, values in losses.items() for f, value in zip(fractions, values)])
    base = alt.Chart(frame, title=title)
    lines = base.mark_line(point=True).encode(
        x=alt.X("fraction:Q", title="fraction of heads masked",
                axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("loss:Q", title=loss_name, scale=alt.Scale(zero=False)),
        color=alt.Color("order:N", title="masking order",
                        scale=alt.Scale(range=["#d62728", "#7f7f7f"]),
                        legend=alt.Legend(orient="top")),
        tooltip=[alt.Tooltip("order:N", title="order"),
                 alt.Tooltip("fraction:Q", title="masked", format=".0%"),
                 alt.Tooltip("loss:Q", title=loss_name, format=".4f")],
    )
    unmasked = float(next(iter(losses.values()))[0]) if losses else 0.0
    reference = alt.Chart(pd.DataFrame({"loss": [unmasked]})).mark_rule(
        strokeDash=[4, 4], color="#999999").encode(y="loss:Q")
    # "pad": width and height are the plot's own; the legend, title and axes come on top (a
    # chart fitted into `height` kept about 80 px of plot under its legend).
    return (lines + reference).properties(width=width, height=height,
                                          autosize=alt.AutoSizeParams(type="pad"))
