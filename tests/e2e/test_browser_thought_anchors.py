"""Thought Anchors in a real browser: import a published trace, explore it, share it."""

from __future__ import annotations

import re
from urllib.parse import quote

from playwright.sync_api import expect

from tests.conftest import REPO_ROOT, SHARED_FIXTURES
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


SHIPPED = (REPO_ROOT / "backend" / "data" / "thought_anchors" / "deepseek-r1-distill-qwen-14b"
           / "problem_2238")


def test_the_page_opens_on_published_anchors_with_math(page, app_url, dialogs):
    import json

    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{app_url}/thought_anchors")
    wait_idle(page)
    expect(page).to_have_url(re.compile(r"[?&]t=[0-9a-f]{24}"))
    labeled = json.loads((SHIPPED / "chunks_labeled.json").read_text())
    anchor = max(labeled, key=lambda c: c["counterfactual_importance_kl"])
    sentences = page.locator("[data-testid='stMarkdownContainer']").filter(
        has_text=f"{anchor['counterfactual_importance_kl']:+.3f}")
    expect(sentences).to_have_count(1)
    # LaTeX is typeset by KaTeX, not shown raw: \boxed{120} and \(a^2b^2\) become math.
    assert sentences.locator(".katex").count() > 20
    expect(sentences.locator("annotation", has_text="\\boxed{120}")).to_have_count(1)
    outside_math = sentences.evaluate(
        "e => { const c = e.cloneNode(true); c.querySelectorAll('.katex').forEach(k => k.remove());"
        " return c.textContent; }")
    assert "\\boxed" not in outside_math and "\\(" not in outside_math
    assert "Okay, so I have this problem" in outside_math
    # Nothing of the list is cut off at 1,280 px: it fits the page's width.
    box, body = sentences.bounding_box(), page.viewport_size
    assert box["x"] >= 0 and box["x"] + box["width"] <= body["width"]
    assert dialogs == []


def test_the_sentence_score_csv_names_its_axes(page, app_url):
    page.goto(f"{app_url}/thought_anchors")
    wait_idle(page)
    with page.expect_download() as download:
        page.get_by_role("button", name="CSV of the sentence scores").click()
    header = open(download.value.path(), encoding="utf-8").readline().strip().split(",")
    assert header[0] == "sentence" and "counterfactual_importance_kl" in header
    assert "query" not in header[0]


def test_your_problem_opens_its_trace_with_one_click(page, app_url, dialogs):
    page.goto(f"{app_url}/thought_anchors?ta_source={quote('Your problem')}")
    wait_idle(page)
    page.get_by_label("Problem").fill("What is 20 + 54?")
    page.get_by_label("Reference answer (optional)").fill("9")
    page.get_by_label("Your trace (optional: leave empty to let the model write one)").fill(
        "I add 20 and 54. Twenty plus fifty-four is seventy-four. So the answer is \\boxed{74}.")
    page.get_by_role("button", name="Analyse this problem").click()
    wait_idle(page)  # the job's progress bar runs, then the trace opens: no second click
    expect(page).to_have_url(re.compile(r"[?&]t=[0-9a-f]{24}"))
    shown = page.locator("[data-testid='stMarkdownContainer']")
    expect(shown.filter(has_text="Twenty plus fifty-four is seventy-four.")).to_have_count(1)
    expect(shown.filter(has_text="Answer in the trace: 74 · Reference answer: 9 (they differ)")
           ).to_have_count(1)
    assert dialogs == []
