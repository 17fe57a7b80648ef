"""Head importance in a real browser: the computation runs with progress, the score grid and the
pruning curve appear, a head is clicked, and the URL (and the share link) holds the view."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle
from tests.e2e.test_browser_explore import TEXT, analyse  # its analysis, cached in a full run
CHARTS = "[data-testid='stVegaLiteChart']"


def head_cell(page, layer: int, head: int):
    """A head's frame in the grid (Vega labels each mark with its fields and its score)."""
    return page.locator(f"{CHARTS} g.mark-rect path[aria-label^='head: {head}; layer: {layer};']")


def test_score_grid_pruning_curve_and_a_clicked_head(page, app_url, browser, dialogs):
    aid = analyse(page, app_url, TEXT)
    page.get_by_role("link", name="Head importance", exact=True).click()
    wait_idle(page)                              # importance, roles and the pruning curve
    expect(page.get_by_role("heading", name="Head importance")).to_be_visible()
    expect(page.get_by_role("heading", name="Pruning curve")).to_be_visible()
    expect(page.locator(CHARTS)).to_have_count(2)            # the grid and the pruning curve
    # hover text: every head's frame carries its score
    expect(head_cell(page, 5, 1)).to_have_attribute(
        "aria-label", re.compile(r"gradient importance, layer-normalised: \d\.\d+"))
    expect(page.locator(f"{CHARTS} g.mark-line path")).to_have_count(2)   # two masking orders

    box = head_cell(page, 5, 1).bounding_box()                # click its thumbnail
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"hi_head=L5H1"))
    expect(page.get_by_role("heading", name="Layer 5, head 1")).to_be_visible()
    expect(page.get_by_text("Top attended token pairs")).to_be_visible()
    expect(page.locator(CHARTS)).to_have_count(3)            # + the head's attention map

    page.get_by_role("combobox", name="Colour heads by").click()
    page.get_by_role("option", name="induction", exact=True).click()
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"hi_score=induction"))
    expect(head_cell(page, 5, 1)).to_have_attribute(
        "aria-label", re.compile(r"induction score: \d\.\d+"))

    link = page.locator("[data-testid='stCode'] code").last.inner_text().strip()
    params = parse_qs(urlparse(link).query)
    assert urlparse(link).path.endswith("/head_importance")
    assert params["a"] == [aid] and params["hi_score"] == ["induction"]
    assert params["hi_head"] == ["L5H1"]

    fresh = browser.new_context()              # a colleague opens the link: same view, cached
    other = fresh.new_page()
    other.goto(link)
    wait_idle(other)
    expect(other.get_by_role("heading", name="Layer 5, head 1")).to_be_visible()
    expect(other.get_by_role("combobox", name="Colour heads by")).to_have_value("induction")
    expect(other.locator("[data-testid='stProgress']")).to_have_count(0)
    fresh.close()
    assert dialogs == []
