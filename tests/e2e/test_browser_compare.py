"""Compare in a real browser: the classic pair opens, B is unlinked and moved, and the link
restores both sides and the controls in a fresh context."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle


def test_compare_unlink_and_share(page, app_url, browser, dialogs):
    page.goto(f"{app_url}/compare")
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"[?&]b=[0-9a-f]{24}"), timeout=120_000)
    expect(page.get_by_role("heading", name="Difference B − A, aligned by tokens")).to_be_visible()
    expect(page.get_by_test_id("stMarkdown").filter(has_text="too small.”")).to_be_visible()

    page.get_by_text("Link B to A").click()  # unlink: B gets its own controls
    wait_idle(page)
    slider_b = page.get_by_role("slider").nth(1)
    slider_b.focus()
    for _ in range(2):
        slider_b.press("ArrowLeft")
    wait_idle(page)
    page.get_by_role("combobox", name="Head (B)").click()
    page.get_by_role("option", name="3", exact=True).click()
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"cmp_head_b=3"))

    link = page.locator("[data-testid='stCode'] code").last.inner_text().strip()
    params = parse_qs(urlparse(link).query)
    assert params["cmp_linked"] == ["false"] and params["cmp_layer_b"] == ["13"]
    assert params["cmp_head_b"] == ["3"]

    fresh = browser.new_context()
    other = fresh.new_page()
    other.goto(link)
    wait_idle(other)
    expect(other.get_by_role("heading", name="Difference B − A, aligned by tokens")).to_be_visible()
    expect(other.get_by_role("slider").nth(1)).to_have_value("13")
    expect(other.get_by_role("combobox", name="Head (B)")).to_have_value("3")
    expect(other.get_by_role("switch", name="Link B to A")).not_to_be_checked()
    expect(other.locator("[data-testid='stProgress']")).to_have_count(0)
    fresh.close()
    assert dialogs == []
