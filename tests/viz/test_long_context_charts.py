"""Long-context charts: user text stays text, the needle's shading follows the head's weights."""

import numpy as np

from viz.long_context_heads import heads_frame, needle_html


def test_needle_html_escapes_tokens_and_shades_only_the_span():
    labels = ["·a", "<script>", "·b", "·c"]
    page = needle_html(labels, 10, (11, 13), (12, 13), np.array([0.5]))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("rgba(214, 39, 40, 0.90)") == 1    # the largest weight, darkest
    assert page.count("border-bottom") == 2              # the needle: tokens 11 and 12


def test_heads_frame_has_one_row_per_head_in_order():
    frame = heads_frame({"s": np.arange(6.0).reshape(2, 3)})
    assert list(frame["label"]) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert list(frame["s"]) == [0, 1, 2, 3, 4, 5]
