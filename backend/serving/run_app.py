"""`make app`: the worker service and the Streamlit app, started and stopped together.

    python -m backend.serving.run_app [--port 8501] [--worker-port 8600] [streamlit options]

The worker starts first, on 127.0.0.1 (its own process: the only one that opens the cache file),
and the app once the worker is ready, with ATLAS_WORKER_URL pointing at it. A worker that dies
(killed, out of memory) is started again; meanwhile the app's pages say that the worker is
unavailable and recover by themselves. Ctrl-C or SIGTERM stops both. With ATLAS_WORKER_URL
already set, only the app starts, as a client of that worker. Other options (e.g.
`--server.headless true`) go to `streamlit run`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from backend.config import REPO_ROOT
from backend.serving import DEFAULT_PORT
from backend.serving.client import WorkerClient

READY_TIMEOUT_S = 600  # the first start may load torch and open a large cache
STOP_TIMEOUT_S = 20


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Launcher:
    """The two processes, and what to do when one of them ends."""

    def __init__(self, port: int, worker_port: int, streamlit_args: list[str]):
        self.port, self.worker_port, self.streamlit_args = port, worker_port, streamlit_args
        self.worker_url = os.environ.get("ATLAS_WORKER_URL", "").strip() or None
        self.own_worker = self.worker_url is None
        self.worker: subprocess.Popen | None = None
        self.app: subprocess.Popen | None = None
        self.stopping = threading.Event()

    def start_worker(self) -> bool:
        """Start the worker and wait until it is ready; False if it ended before that."""
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "backend.serving", "--port", str(self.worker_port)],
            cwd=REPO_ROOT)
        client = WorkerClient(self.worker_url)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if self.worker.poll() is not None:
                return False
            if client.ready():
                return True
            time.sleep(0.3)
        return False

    def start_app(self) -> None:
        env = {**os.environ, "ATLAS_WORKER_URL": self.worker_url}
        self.app = subprocess.Popen(
            [sys.executable, "-m", "app", "--server.port", str(self.port),
             *self.streamlit_args], cwd=REPO_ROOT, env=env)

    def run(self) -> int:
        if self.own_worker:
            if not _port_free(self.worker_port):
                print(f"Port {self.worker_port} is in use (another worker?). Stop it, or choose "
                      "another port (make app WORKER_PORT=...), or point the app at it with "
                      "ATLAS_WORKER_URL.", file=sys.stderr)
                return 2
            self.worker_url = f"http://127.0.0.1:{self.worker_port}"
            print(f"Starting the worker service on {self.worker_url}…", flush=True)
            if not self.start_worker():
                return self._worker_failed()
        self.start_app()
        return self.supervise()

    def supervise(self) -> int:
        """Until a signal or the app's end: a worker that ended after it was ready is started
        again (one that does not get ready ends both)."""
        while not self.stopping.wait(0.5):
            if self.app.poll() is not None:
                self.stop()
                return self.app.returncode
            if self.own_worker and self.worker.poll() is not None:
                print(f"The worker stopped (exit {self.worker.returncode}); starting it again.",
                      file=sys.stderr, flush=True)
                if not self.start_worker():
                    return self._worker_failed()
        self.stop()
        return 0

    def _worker_failed(self) -> int:
        stopped = self.stopping.is_set()  # by a signal while it started
        self.stop()
        if stopped:
            return 0
        print(f"The worker service did not start (exit {self.worker.returncode}); see its "
              "message above.", file=sys.stderr)
        return 1

    def stop(self) -> None:
        """Stop the app, then the worker (it finishes writing what it writes)."""
        self.stopping.set()
        for process in (self.app, self.worker):
            if process is not None and process.poll() is None:
                process.terminate()
        for process in (self.app, self.worker):
            if process is not None:
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.serving.run_app",
                                     description="The worker service and the app together.")
    parser.add_argument("--port", type=int, default=8501, help="the app's port")
    parser.add_argument("--worker-port", type=int, default=DEFAULT_PORT)
    args, streamlit_args = parser.parse_known_args(argv)
    launcher = Launcher(args.port, args.worker_port, streamlit_args)
    stop = lambda *_: launcher.stopping.set()  # noqa: E731 - the loop stops both processes
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
