"""Long inputs in a real browser: zooming from an overview, the toolbar and the window sliders,
and a head-grid click that keeps the sidebar's text."""

from __future__ import annotations

import io
import re
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image
from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle
from tests.e2e.test_browser_explore import analyse
from tests.pages.test_long_views import MEDIUM

CHART = "[data-testid='stVegaLiteChart']"
DRAWING = f"{CHART} canvas, {CHART} svg.marks"  # Vega draws on a canvas or as SVG


def params(page) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query)


def plot_area(page) -> dict[str, float]:
    """The first chart's plot area in page pixels: the columns and rows of its canvas that are
    mostly coloured (the blocks), found in a screenshot."""
    canvas = page.locator(DRAWING).first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), dtype=int)
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 12  # blues, not white or grey text
    scale = pixels.shape[1] / box["width"]
    columns = np.flatnonzero(coloured.mean(axis=0) > 0.5)
    rows = np.flatnonzero(coloured[:, columns].mean(axis=1) > 0.5)
    return {"x": box["x"] + columns[0] / scale, "width": (columns[-1] - columns[0]) / scale,
            "y": box["y"] + rows[0] / scale, "height": (rows[-1] - rows[0]) / scale}


def test_zoom_from_an_off_diagonal_block_keeps_its_keys(page, app_url):
    analyse(page, app_url, MEDIUM)
    page.get_by_role("link", name="Explore", exact=True).click()
    wait_idle(page)
    # The thumbs show their values: layer, then the query window's ends (0 and n - 1).
    n = int(page.get_by_test_id("stSliderThumbValue").nth(2).inner_text()) + 1
    plot = plot_area(page)
    # Queries near the end, keys near the start: a block below the diagonal, far from it.
    page.mouse.click(plot["x"] + 0.15 * plot["width"], plot["y"] + 0.85 * plot["height"])
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"split=true"))
    # The view's link holds both windows.
    link = parse_qs(urlparse(page.locator("[data-testid='stCode'] code").last.inner_text()
                             .strip()).query)
    query = [int(v) for v in link["window"]]
    keys = [int(v) for v in link["keys"]]
    assert query[1] - query[0] < 96 and keys[1] - keys[0] < 96
    assert abs((query[0] + query[1]) / 2 - 0.85 * n) < 0.12 * n
    assert abs((keys[0] + keys[1]) / 2 - 0.15 * n) < 0.12 * n
    # The exact heatmap of those windows (cell by cell), not the overview.
    expect(page.get_by_text(re.compile("Rows: the attending token"))).to_be_visible()


def test_chart_toolbar_does_not_cover_the_window_sliders(page, app_url):
    analyse(page, app_url, MEDIUM)
    page.get_by_role("link", name="Explore", exact=True).click()
    wait_idle(page)
    page.locator(CHART).first.hover()
    toolbar = page.locator("[data-testid='stElementToolbar']").first
    expect(toolbar).to_be_visible()
    bar = toolbar.bounding_box()
    for thumb in page.get_by_role("slider").all():
        t = thumb.bounding_box()
        overlap = (min(bar["x"] + bar["width"], t["x"] + t["width"]) > max(bar["x"], t["x"])
                   and min(bar["y"] + bar["height"], t["y"] + t["height"]) > max(bar["y"], t["y"]))
        assert not overlap


def test_head_grid_click_opens_explore_with_the_analysed_text(page, app_url):
    aid = analyse(page, app_url, MEDIUM)
    page.get_by_role("link", name="Head grid", exact=True).click()
    wait_idle(page)
    canvas = page.locator(DRAWING).first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    # 30 layers x 9 heads in cells of 84 px (the page's grid width / 9): the plot ends 5 px
    # (Vega's padding) before the canvas' right and bottom edges. Click layer 1, head 2.
    cell = 84
    left = box["x"] + box["width"] - 5 - 9 * cell
    top = box["y"] + box["height"] - 5 - 30 * cell
    x, y = left + 2.5 * cell, top + 1.5 * cell
    page.mouse.click(x, y)
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"/explore\?"))
    assert params(page)["a"] == [aid]
    assert params(page)["layer"] == ["1"] and params(page)["head"] == ["2"]
    expect(page.get_by_label("Text")).to_have_value(MEDIUM)
