"""The app as `make app` starts it (`python -m backend.serving.run_app`: the worker service, then
Streamlit as its client), on a cache folder of its own, for the browser benchmarks.

The launcher runs in a process group of its own: stopping it (SIGTERM) stops the worker and the
app; if that hangs, the group is killed, so a benchmark leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from backend.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(cache: Path) -> dict[str, str]:
    """A fresh cache folder, with the machine's converted models (set-up converts them once per
    machine into the default cache's folder, not into each cache)."""
    converted = Settings.from_env().converted_models_dir
    return {**os.environ, "ATLAS_CACHE_DIR": str(cache), "ATLAS_CONVERTED_DIR": str(converted),
            "HF_HUB_OFFLINE": "1"}


def prepare(cache: Path) -> float:
    """Run set-up (`python -m backend.prepare`) on `cache`; its seconds."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "backend.prepare"], cwd=REPO_ROOT, check=True,
                   env=environment(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


class RunningApp:
    """`with RunningApp(cache) as app:` the app answering at `app.url`, its worker at
    `app.worker_url`; `app.answered_s`: seconds from the start to the app's first answer."""

    def __init__(self, cache: Path, timeout_s: float = 300):
        self.cache, self.timeout_s = cache, timeout_s
        self.port, self.worker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.process: subprocess.Popen | None = None
        self.answered_s = float("nan")

    def __enter__(self) -> "RunningApp":
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backend.serving.run_app", "--port", str(self.port),
             "--worker-port", str(self.worker_port), "--server.headless", "true",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=REPO_ROOT, env={**environment(self.cache), "ATLAS_WORKER_URL": ""},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while not self._answers():
                if self.process.poll() is not None:
                    raise RuntimeError(f"the app ended (exit {self.process.returncode})")
                if time.monotonic() - started > self.timeout_s:
                    raise RuntimeError(f"the app did not answer within {self.timeout_s:.0f} s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.answered_s = time.monotonic() - started
        return self

    def _answers(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).read() == b"ok"
        except OSError:
            return False

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # the launcher stops the app, then the worker
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is still there (the launcher's children included)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
