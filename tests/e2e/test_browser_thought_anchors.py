"""Thought Anchors in a real browser: import a published trace, explore it, share it."""

from __future__ import annotations

import re
from urllib.parse import quote

from playwright.sync_api import expect

from tests.conftest import SHARED_FIXTURES
from tests.e2e.conftest import wait_idle

TRACE = (SHARED_FIXTURES / "thought_anchors" / "deepseek-r1-distill-llama-8b"
         / "incorrect_base_solution" / "problem_2189")


def test_import_a_published_trace_and_open_its_link_elsewhere(page, app_url, browser, dialogs):
    import pytest

    if not TRACE.is_dir():
        pytest.skip(f"published fixtures not found at {TRACE}")
    page.goto(f"{app_url}/thought_anchors?ta_source={quote('Import a published trace')}")
    wait_idle(page)
    page.locator("input[type=file]").set_input_files(sorted(str(p) for p in TRACE.glob("*.json")))
    wait_idle(page)
    label = page.get_by_label("Label (e.g. the model that wrote it)")
    label.fill("DeepSeek-R1-Distill-Llama-8B")
    label.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Import", exact=True).click()
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"[?&]t=[0-9a-f]{24}"))
    first_chunk = __import__("json").loads((TRACE / "chunks_labeled.json").read_text())[0]["chunk"]
    expect(page.get_by_text(first_chunk, exact=True).first).to_be_visible(timeout=60_000)
    expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible(timeout=60_000)

    link = page.locator("[data-testid='stCode'] code").last.inner_text().strip()
    assert re.search(r"[?&]t=[0-9a-f]{24}", link)

    other = browser.new_context().new_page()
    other.goto(link)
    wait_idle(other)
    expect(other.get_by_text(first_chunk, exact=True).first).to_be_visible(timeout=60_000)
    assert dialogs == []
