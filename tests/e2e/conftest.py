"""Real servers and Debian's chromium for end-to-end tests.

As `make app` runs them: the worker service (`python -m backend.serving`) on a fresh cache, and
`streamlit run app.py` as its client (ATLAS_WORKER_URL). The shipped lessons are precomputed
through the running worker, as a teacher would before class, so every test sees the product, not
a test double.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import REPO_ROOT
from tests.serving.worker_process import WorkerProcess, free_port

CHROMIUM = "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


@contextmanager
def running_worker(cache: Path) -> Iterator[WorkerProcess]:
    """The worker service on the cache folder `cache`, ready; stopped after."""
    worker = WorkerProcess(cache).start()
    try:
        yield worker
    finally:
        worker.stop()


@contextmanager
def running_streamlit(worker: WorkerProcess) -> Iterator[str]:
    """`streamlit run app.py` as a client of `worker`, as `make app` starts it; yields the app's
    URL once it answers, and stops it after."""
    port = free_port()
    env = {**worker.env(), "ATLAS_WORKER_URL": worker.url}
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


@contextmanager
def running_app(cache: Path) -> Iterator[str]:
    """The worker service on `cache` and the app as its client; yields the app's URL."""
    with running_worker(cache) as worker, running_streamlit(worker) as url:
        yield url


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    with running_worker(tmp_path_factory.mktemp("e2e-cache")) as worker:
        # As a teacher would before class, while the worker serves (it owns the cache file).
        prepared = subprocess.run(
            [sys.executable, "-m", "backend.precompute", "lessons"], cwd=REPO_ROOT,
            env={**worker.env(), "ATLAS_WORKER_URL": worker.url}, capture_output=True,
            text=True)
        if prepared.returncode != 0 or "through the worker" not in prepared.stdout:
            pytest.fail("Precomputing the lessons through the worker failed:\n"
                        + prepared.stdout[-1000:] + prepared.stderr[-3000:])
        with running_streamlit(worker) as url:
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
