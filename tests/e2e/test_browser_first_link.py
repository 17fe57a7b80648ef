"""A shared link that is the very first page a freshly started server is asked for opens the
whole app on that view: the navigation, the sidebar, and the view's chart at the link's
settings (not the page file alone, as Streamlit's pages-folder mode would run it)."""

from __future__ import annotations

import os
import subprocess
import sys

from playwright.sync_api import expect

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import running_app, wait_idle

TEXT = "The first visitor of the day opens a link a colleague sent."
COMPUTE = """
from backend.analyses import AnalysisRequest
from backend.service import AtlasService
service = AtlasService()
print(service.run(AnalysisRequest.make("attention", "smollm2", {text!r}), timeout=300))
service.worker.shutdown()
"""


def test_a_link_as_the_first_request_of_a_fresh_server_opens_the_app(page, tmp_path):
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    # Computed before the server starts, as for a link shared earlier (one process per cache).
    computed = subprocess.run([sys.executable, "-c", COMPUTE.format(text=TEXT)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, check=True)
    aid = computed.stdout.strip().splitlines()[-1]
    with running_app(tmp_path) as url:
        page.goto(f"{url}/explore?a={aid}&layer=3&head=2")
        wait_idle(page)
        navigation = page.get_by_test_id("stSidebarNav")
        for view in ("Overview", "Explore", "Head grid", "Compare", "Lessons"):
            expect(navigation.get_by_role("link", name=view, exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Analyse")).to_be_visible()  # the sidebar
        expect(page.get_by_role("heading", name="Explore attention")).to_be_visible()
        expect(page.get_by_role("textbox", name="Text")).to_have_value(TEXT)  # its text
        expect(page.get_by_role("slider").first).to_have_value("3")
        expect(page.get_by_role("combobox", name="Head")).to_have_value("2")
        expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
        assert "/explore" in page.url and f"a={aid}" in page.url
