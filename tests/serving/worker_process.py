"""The real worker service as a subprocess (`python -m backend.serving`), for tests that talk to
it over HTTP: started on a free port and a given cache folder, killed or stopped at will."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """One worker service on `cache`; `start()` waits until /ready answers (a restart keeps the
    port, as a supervisor restarting it would)."""

    def __init__(self, cache: Path, token: str | None = None, port: int | None = None):
        self.cache, self.token = cache, token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = cache / f"worker-{self.port}.log"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "ATLAS_CACHE_DIR": str(self.cache), "HF_HUB_OFFLINE": "1"}
        env.pop("ATLAS_WORKER_TOKEN", None)
        if self.token:
            env["ATLAS_WORKER_TOKEN"] = self.token
        return env

    def start(self, timeout: float = 180) -> "WorkerProcess":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend.serving", "--port", str(self.port)],
                cwd=REPO_ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The worker ended (exit {self.process.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            try:
                request = urllib.request.Request(f"{self.url}/ready", headers=headers)
                if urllib.request.urlopen(request, timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError("The worker did not get ready:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, as a crash or the OOM killer would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
