"""Long inputs in a real browser: zooming from an overview, the toolbar and the window sliders,
and a head-grid click that keeps the sidebar's text."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle
from tests.e2e.test_browser_explore import analyse
from tests.pages.test_long_views import MEDIUM

CHART = "[data-testid='stVegaLiteChart']"


def params(page) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query)


def plot_point(page, fx: float, fy: float, size: int = 520) -> tuple[float, float]:
    """A point at fractions of the first chart's plot area: the plot is `size` pixels square,
    left of the colour legend and below the title."""
    box = page.locator(f"{CHART} canvas").first.bounding_box()
    legend = box["width"] - size
    left = box["x"] + legend * 0.42  # y axis on the left, legend on the right
    top = box["y"] + 24  # below the title
    return left + fx * size, top + fy * size


def test_zoom_from_an_off_diagonal_block_keeps_its_keys(page, app_url):
    analyse(page, app_url, MEDIUM)
    page.get_by_role("link", name="Explore", exact=True).click()
    wait_idle(page)
    n = int(page.get_by_role("slider").nth(1).get_attribute("aria-valuemax")) + 1
    page.locator(CHART).first.scroll_into_view_if_needed()
    x, y = plot_point(page, 0.15, 0.85)  # queries near the end, keys near the start
    page.mouse.click(x, y)
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"split=true"))
    query = [int(v) for v in params(page)["window"]]
    keys = [int(v) for v in params(page)["keys"]]
    assert query[1] - query[0] < 96 and keys[1] - keys[0] < 96
    assert abs((query[0] + query[1]) / 2 - 0.85 * n) < 0.12 * n
    assert abs((keys[0] + keys[1]) / 2 - 0.15 * n) < 0.12 * n
    # The exact heatmap of those windows: keys stay where the block was.
    expect(page.get_by_text(re.compile("Only keys inside the window"))).to_be_visible()


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
    canvas = page.locator(f"{CHART} canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    # 9 heads in cells of 96 px (the grid's width): the plot ends at the canvas' right edge.
    cell = 96
    x = box["x"] + box["width"] - 9 * cell + 2.5 * cell - 6
    y = box["y"] + 60 + 1.5 * cell
    page.mouse.click(x, y)
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"/explore\?"))
    assert params(page)["a"] == [aid] and "layer" in params(page) and "head" in params(page)
    expect(page.get_by_label("Text")).to_have_value(MEDIUM)
