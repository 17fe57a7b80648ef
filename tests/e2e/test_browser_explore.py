"""End to end in a real browser: analyse, explore, share, and user text stays text."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle

TEXT = "Alice gave Bob the book because she had finished reading it."


def analyse(page, app_url: str, text: str) -> str:
    """Type a text in the sidebar, analyse it, and return the analysis id from the URL."""
    page.goto(app_url)
    wait_idle(page)
    area = page.get_by_label("Text")
    area.fill(text)
    area.press("Control+Enter")  # commit the text area's value
    page.get_by_role("button", name="Analyse").click()
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"[?&]a=[0-9a-f]{24}"), timeout=120_000)
    return parse_qs(urlparse(page.url).query)["a"][0]


def test_cold_open_shows_an_analysis(page, app_url):
    page.goto(app_url)
    wait_idle(page)
    expect(page.get_by_text("Text analysed")).to_be_visible()
    expect(page).to_have_url(re.compile(r"a=[0-9a-f]{24}"))


def test_explore_change_layer_and_head_then_share(page, app_url, browser):
    aid = analyse(page, app_url, TEXT)
    page.get_by_role("link", name="Explore", exact=True).click()
    wait_idle(page)
    expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()

    slider = page.get_by_role("slider").first  # the layer slider
    slider.focus()
    for _ in range(3):
        slider.press("ArrowRight")
    wait_idle(page)
    page.get_by_role("combobox", name="Head").click()
    page.get_by_role("option", name="4", exact=True).click()
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"head=4"))
    expect(page).to_have_url(re.compile(r"layer=18"))  # default 15 (middle) + 3

    link = page.locator("[data-testid='stCode'] code").last.inner_text().strip()
    params = parse_qs(urlparse(link).query)
    assert params["a"] == [aid] and params["layer"] == ["18"] and params["head"] == ["4"]

    fresh = browser.new_context()  # a colleague's browser: no shared session state
    other = fresh.new_page()
    other.goto(link)
    wait_idle(other)
    expect(other.get_by_role("slider").first).to_have_value("18")
    expect(other.get_by_role("combobox", name="Head")).to_have_value("4")
    expect(other.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
    expect(other.locator("[data-testid='stProgress']")).to_have_count(0)  # served from cache
    fresh.close()


def test_script_in_user_text_renders_as_text(page, app_url, dialogs):
    payload = "<script>alert(1)</script> and <img src=x onerror=alert(2)>"
    analyse(page, app_url, payload)
    expect(page.get_by_test_id("stText").filter(has_text=payload)).to_have_text(payload)
    # The recent-analyses link label shows it literally too (markdown and HTML inert).
    expect(page.get_by_role("link").filter(has_text="<script>alert(1)</script>")).to_be_visible()
    for view in ("Explore", "Head grid", "bertviz views"):
        page.get_by_role("link", name=view, exact=True).click()
        wait_idle(page)
        page.wait_for_timeout(1500)  # give any injected script time to run
    assert dialogs == []
