"""Heatmaps as the browser's Vega draws them: token order on the axes, and cells whose encoding
does not depend on the click selection (what each click and redraw costs in the browser)."""

from __future__ import annotations

import json
import re

import numpy as np
import vl_convert as vlc

from viz.heatmap import QUERY_SELECTION, attention_heatmap, binned_heatmap


def axis_labels_drawn(svg: str) -> list[list[str]]:
    """The label texts of each axis in the drawn SVG, in drawing order (x axis first)."""
    groups = re.findall(r'<g class="mark-text role-axis-label"[^>]*>(.*?)</g>', svg)
    return [re.findall(r"<text[^>]*>([^<]*)</text>", group) for group in groups]


def cell_marks(spec: dict) -> list[dict]:
    """The compiled Vega marks drawing the cells (rect marks), searched through groups."""
    found = []
    for mark in spec.get("marks", []):
        if mark.get("type") == "rect" and mark.get("from", {}).get("data"):
            found.append(mark)
        found += cell_marks(mark)
    return found


def test_axes_follow_token_positions_not_label_text():
    # Positions 8..11 and 98..100: as text, "10 y" sorts before "8 w" and "100 c" before "98 a".
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    chart = attention_heatmap(weights, ["a", "b", "c"], ["w", "x", "y", "z"], 98, 8)
    keys, queries = axis_labels_drawn(vlc.vegalite_to_svg(chart.to_dict()))
    assert keys == ["8 w", "9 x", "10 y", "11 z"]
    assert queries == ["98 a", "99 b", "100 c"]


def test_cells_are_encoded_without_per_cell_lookups_or_selection():
    weights = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    labels = [f"t{i}" for i in range(96)]
    overview = binned_heatmap(weights[:64, :64], np.arange(0, 65) * 4, np.arange(0, 65) * 4,
                              [f"t{i}" for i in range(256)], drag=True)
    for chart in (attention_heatmap(weights, labels, labels, 100, 0), overview):
        spec = vlc.vegalite_to_vega(chart.to_dict())
        # The click selection stays (pages react to it) ...
        assert any(s["name"] == QUERY_SELECTION + "_tuple" for s in spec["signals"])
        # ... but no cell is re-encoded when it changes, no cell looks its label up in a list
        # to sort the axes, and none builds an ARIA description.
        for data in spec["data"]:
            assert all(t["type"] != "formula" for t in data.get("transform", []))
        (cells,) = cell_marks(spec)
        encoding = json.dumps(cells["encode"])
        assert QUERY_SELECTION + "_store" not in encoding
        assert "description" not in cells["encode"]["update"]
