"""Rollout & flow in a real browser: pick a target token, see the four methods."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.e2e.conftest import wait_idle
from tests.e2e.test_browser_explore import analyse


def test_select_target_token_and_see_four_methods(page, app_url, dialogs):
    analyse(page, app_url, "Paris is the capital of <b>France</b>.")
    page.get_by_role("link", name="Rollout & flow", exact=True).click()
    wait_idle(page)
    page.get_by_role("combobox", name="Target token").click()
    page.get_by_role("option", name="2 ·the").click()
    wait_idle(page)
    expect(page).to_have_url(__import__("re").compile(r"target=2"))
    for title in ("Raw attention (last layer)", "Flow", "Gradient-weighted rollout"):
        expect(page.get_by_text(title, exact=True).first).to_be_visible()
    expect(page.get_by_role("heading", name="Where 2 ·the draws from")).to_be_visible()
    # The user's markup is shown as tokens, not rendered.
    expect(page.get_by_text("<b", exact=False).first).to_be_visible()
    assert dialogs == []
