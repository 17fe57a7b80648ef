"""A real server and Debian's chromium for end-to-end tests.

The server runs `streamlit run app.py` as a user would, on its own fresh cache with the shipped
lessons precomputed into it, so every test sees the product, not a test double.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(cache: Path) -> Iterator[str]:
    """`streamlit run app.py` on the cache folder `cache`, as a user would start it; yields the
    app's URL once it answers, and stops it after."""
    port = _free_port()
    env = {**os.environ, "ATLAS_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("The app did not start:\n" + server.stdout.read().decode()[-3000:])
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    cache = tmp_path_factory.mktemp("e2e-cache")
    env = {**os.environ, "ATLAS_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    # As a teacher would before class (DuckDB lets one process use the cache: before the app).
    prepared = subprocess.run([sys.executable, "-m", "backend.precompute", "lessons"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if prepared.returncode != 0:
        pytest.fail("Precomputing the lessons failed:\n" + prepared.stderr[-3000:])
    with running_app(cache) as url:
        yield url


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    # Playwright cannot download its own browser here: drive Debian's chromium instead.
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run"]}


@pytest.fixture
def dialogs(page):
    """Every JavaScript dialog the page opens (an injected alert() would land here)."""
    seen: list[str] = []
    page.on("dialog", lambda d: (seen.append(d.message), d.dismiss()))
    return seen


def wait_idle(page, timeout: float = 300_000) -> None:
    """Wait until Streamlit has finished running the script and any analysis job it started
    (a running job shows a progress bar that polls)."""
    deadline = time.monotonic() + timeout / 1000
    quiet_checks = 0
    while quiet_checks < 3:  # idle and without progress bar for three checks in a row
        if time.monotonic() > deadline:
            raise TimeoutError("The app stayed busy.")
        page.wait_for_timeout(400)
        busy = (page.locator(IDLE).count() == 0
                or page.locator("[data-testid='stProgress']").count() > 0
                or page.get_by_role("button", name="Cancel").count() > 0)
        quiet_checks = 0 if busy else quiet_checks + 1
