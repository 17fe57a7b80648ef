"""What a user can download: the shown matrix as CSV, charts as PNG or SVG."""

from __future__ import annotations

import io

import altair as alt
import numpy as np
import pandas as pd
import vl_convert as vlc


def matrix_csv(matrix: np.ndarray, query_labels: list[str], key_labels: list[str],
               corner: str = "query \\ key") -> str:
    """CSV with one row per query token and one column per key token (labels are unique);
    `corner` names the axes in the header's first cell."""
    frame = pd.DataFrame(np.asarray(matrix, dtype=np.float32), index=query_labels,
                         columns=key_labels)
    frame.index.name = corner
    buffer = io.StringIO()
    frame.to_csv(buffer, float_format="%.6f")
    return buffer.getvalue()


def chart_svg(chart: alt.TopLevelMixin) -> str:
    return vlc.vegalite_to_svg(chart.to_dict())


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    return vlc.vegalite_to_png(chart.to_dict(), scale=scale)
