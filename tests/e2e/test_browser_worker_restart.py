"""The worker service killed while a page is open: the page says the worker is unavailable and
retries (no traceback), and recovers by itself once the worker is back; a job the worker was
running is reported as interrupted and started again."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import expect

from pages.shared import INTERRUPTED, UNAVAILABLE
from tests.e2e.conftest import running_streamlit, wait_idle
from tests.serving.worker_process import WorkerProcess

CHART = "[data-testid='stVegaLiteChart']"


@pytest.fixture(scope="module")
def service_and_app(tmp_path_factory):
    worker = WorkerProcess(tmp_path_factory.mktemp("restart-cache")).start()
    try:
        with running_streamlit(worker) as url:
            yield worker, url
    finally:
        worker.stop()


def test_a_killed_worker_shows_retrying_then_the_page_recovers(page, service_and_app):
    worker, url = service_and_app
    page.goto(url)
    wait_idle(page)
    expect(page.locator(CHART).first).to_be_visible(timeout=120_000)  # the landing chart
    worker.kill()
    page.get_by_role("link", name="Explore", exact=True).click()
    expect(page.get_by_text(UNAVAILABLE)).to_be_visible(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0
    worker.start()
    expect(page.get_by_text(UNAVAILABLE)).to_have_count(0, timeout=60_000)
    expect(page.get_by_role("slider").first).to_be_visible(timeout=60_000)
    expect(page.locator(CHART).first).to_be_visible(timeout=60_000)
    assert page.locator("[data-testid='stException']").count() == 0


def test_a_job_running_when_the_worker_dies_is_started_again(page, service_and_app):
    worker, url = service_and_app
    page.goto(url)
    wait_idle(page)
    shown = _analysis_id(page)
    area = page.get_by_label("Text")
    area.fill(" ".join(f"Sentence {i} of a job cut short at {time.time_ns()}." for i in range(20)))
    area.press("Control+Enter")
    page.get_by_role("button", name="Analyse").click()
    expect(page.get_by_role("button", name="Cancel")).to_be_visible(timeout=60_000)
    worker.kill()
    worker.start()
    expect(page.get_by_text(INTERRUPTED.split(".")[0])).to_be_visible(timeout=60_000)
    deadline = time.monotonic() + 180
    while _analysis_id(page) in (shown, None):  # the job started again opens its analysis
        assert time.monotonic() < deadline, "the interrupted analysis never opened"
        page.wait_for_timeout(500)
    assert page.locator("[data-testid='stException']").count() == 0


def _analysis_id(page) -> str | None:
    return parse_qs(urlparse(page.url).query).get("a", [None])[0]
