"""Lessons in a real browser: every step opens from the precomputed cache, presenter mode hides
the controls, and every step's link restores it in a fresh browser context."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from pages.lesson_files import read_lessons
from tests.conftest import REPO_ROOT
from tests.e2e.conftest import wait_idle

LESSONS = read_lessons(REPO_ROOT / "lessons").lessons


def open_gallery(page, app_url: str) -> None:
    page.goto(f"{app_url}/lessons")
    wait_idle(page)
    expect(page.get_by_role("heading", name="Lessons")).to_be_visible()


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.slug for lesson in LESSONS])
def test_every_lesson_steps_through_from_the_cache(page, app_url, dialogs, lesson):
    open_gallery(page, app_url)
    page.get_by_role("link", name=f"Open {lesson.title}", exact=True).click()
    for number, step in enumerate(lesson.steps, 1):
        wait_idle(page)
        expect(page).to_have_url(re.compile(rf"lesson={lesson.slug}&step={number}"))
        expect(page.get_by_role("heading", name=step.title)).to_be_visible()
        expect(page.locator("[data-testid='stProgress']")).to_have_count(0)  # from the cache
        expect(page.locator("[data-testid='stException']")).to_have_count(0)
        if number < len(lesson.steps):
            page.get_by_role("link", name="Next step").click()
    assert dialogs == []


def test_presenter_step_links_restore_the_step_in_a_fresh_context(page, app_url, browser):
    open_gallery(page, app_url)
    page.get_by_role("link", name="Present What attention is", exact=True).click()
    wait_idle(page)
    expect(page.locator("[data-testid='stSidebar']")).to_be_hidden()
    expect(page.get_by_role("slider")).to_have_count(0)  # controls hidden
    size = page.get_by_text("Each row is one token").evaluate(
        "e => parseFloat(getComputedStyle(e).fontSize)")
    assert size >= 22  # large type
    page.get_by_role("link", name="Next step").click()
    wait_idle(page)
    expect(page.get_by_role("heading", name="One head, one row")).to_be_visible()
    link = page.url
    assert "present=true" in link and "layer=13" in link and "head=8" in link

    fresh = browser.new_context()  # the projector's browser: nothing shared
    other = fresh.new_page()
    other.goto(link)
    wait_idle(other)
    expect(other.get_by_role("heading", name="One head, one row")).to_be_visible()
    expect(other.locator("[data-testid='stSidebar']")).to_be_hidden()
    expect(other.get_by_role("slider", include_hidden=True).first).to_have_value("13")
    expect(other.get_by_role("combobox", name="Head", include_hidden=True)).to_have_value("8")
    expect(other.locator("[data-testid='stProgress']")).to_have_count(0)
    other.get_by_role("link", name="Leave presenter mode").click()
    wait_idle(other)
    expect(other.get_by_role("slider").first).to_be_visible()  # the controls are back
    expect(other.get_by_role("slider").first).to_have_value("13")
    fresh.close()
