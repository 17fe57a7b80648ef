"""Comparison charts: signs keep their colours, grids select cells, labels stay data."""

import numpy as np

from viz.comparison import difference_heatmap, paired_bars, picked_cell, score_grid


def test_difference_scale_is_symmetric_so_zero_is_white():
    spec = difference_heatmap(np.array([[0.2, -0.05], [0.0, 0.1]]), ["a", "b"]).to_dict()
    scale = spec["encoding"]["color"]["scale"]
    assert scale["scheme"] == "redblue" and scale["domain"] == [0.2, -0.2]


def test_score_grid_marks_the_picked_cell_and_reads_clicks():
    values = np.arange(6, dtype=float).reshape(2, 3) / 10
    spec = score_grid(values, "layer", "head", "JS", picked=(1, 2)).to_dict()
    rows = next(iter(spec["datasets"].values()))
    assert [r["picked"] for r in rows].count(True) == 1
    assert rows[5] == {"row": 1, "column": 2, "score": 0.5, "picked": True}
    event = {"selection": {"grid_cell": [{"row": 1, "column": 2}]}}
    assert picked_cell(event) == (1, 2) and picked_cell(None) is None


def test_labels_are_data_not_markup():
    label = "<script>alert(1)</script>"
    spec = paired_bars({"A": np.array([0.5, 0.5]), "B": np.array([1.0, 0.0])},
                       [label, "x"]).to_dict()
    rows = next(iter(spec["datasets"].values()))
    assert rows[0]["unit"] == f"0 {label}"  # drawn by Vega as text
