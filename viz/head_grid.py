"""All layers x heads on one screen: each head a small attention image, clickable.

Thumbnails travel as tiny PNG data URLs (a few hundred bytes each), not as one chart cell per
value, so even 30 x 9 heads stay well under a megabyte.
"""

from __future__ import annotations

import base64
import io

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from viz.heatmap import PLOT_SIZE
from viz.selection import clicked_cell

HEAD_SELECTION = "head"


def thumbnail_png(matrix: np.ndarray) -> str:
    """A (query, key) matrix as a data-URL PNG, one pixel per cell (the browser scales it up
    without smoothing), dark = high attention, per-image contrast."""
    m = np.asarray(matrix, dtype=np.float32)
    m = m / max(float(m.max()), 1e-6)
    pixels = (255 * (1 - m) ** 2).astype(np.uint8)  # squared: small weights stay visible
    image = Image.fromarray(pixels, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def head_grid(thumbnails: np.ndarray, scores: np.ndarray | None = None,
              score_name: str = "", cell: int = 44) -> alt.Chart:
    """thumbnails: (layer, head, s, s). scores: optional (layer, head) values shown in the hover
    and as a coloured frame. Clicking a head selects {layer, head}."""
    n_layers, n_heads = thumbnails.shape[:2]
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            row = {"layer": layer, "head": head, "img": thumbnail_png(thumbnails[layer, head])}
            if scores is not None:
                row["score"] = round(float(scores[layer, head]), 4)
            rows.append(row)
    frame = pd.DataFrame(rows)
    pick = alt.selection_point(name=HEAD_SELECTION, fields=["layer", "head"], on="click",
                              empty=False)
    x = alt.X("head:O", title="head", axis=alt.Axis(orient="top", labelAngle=0))
    y = alt.Y("layer:O", title="layer")
    tooltip = ["layer:O", "head:O"] + ([alt.Tooltip("score:Q", title=score_name)]
                                       if scores is not None else [])
    frame_mark = alt.Chart(frame).mark_rect(filled=scores is not None, strokeWidth=2).encode(
        x=x, y=y, tooltip=tooltip,
        color=(alt.Color("score:Q", title=score_name, scale=alt.Scale(scheme="oranges"))
               if scores is not None else alt.value("#ffffff")),
        stroke=alt.condition(pick, alt.value("#d62728"), alt.value("#dddddd")),
    ).add_params(pick)
    # Drawn at `cell` pixels per head (render with width="content"): the image fills the cell.
    images = alt.Chart(frame).mark_image(width=cell - 6, height=cell - 6, smooth=False).encode(
        x=x, y=y, url="img:N", tooltip=tooltip)
    return (frame_mark + images).properties(width=cell * n_heads, height=cell * n_layers,
                                            autosize=PLOT_SIZE)


def selected_head(event) -> tuple[int, int] | None:
    """The (layer, head) clicked in the grid."""
    return clicked_cell(event, HEAD_SELECTION, ("layer", "head"))
