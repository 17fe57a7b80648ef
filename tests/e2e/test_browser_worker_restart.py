"""The worker service killed while a page is open: the page says the worker is unavailable and
retries (no traceback), and recovers by itself once the worker is back."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from pages.shared import UNAVAILABLE
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
