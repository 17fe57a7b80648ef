"""Cold start: from the server answering to the first chart in a real browser.

    python -m bench.cold_start_bench [--runs N] [--unprepared]

Each run starts the worker service and the app as `make app` does (`python -m
backend.serving.run_app`), on a fresh cache that set-up (`python -m backend.prepare`) has filled,
then opens the app in Debian's chromium (Playwright) and times: start -> the app's
/_stcore/health answers (the worker is ready before the app starts), and that answer -> the
first chart drawn on the landing page. With --unprepared the same is measured on a fresh cache
set-up has not filled (the packaged models stay converted: they are shared), the baseline the
set-up step removes.
Prints seconds per run and the median; not a timed test.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHART = "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "ATLAS_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}


def prepare(cache: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "backend.prepare"], cwd=REPO_ROOT, check=True,
                   env=_environment(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def one_run(browser, cache: Path) -> tuple[float, float]:
    """(seconds until the server answers, seconds from that answer to the first chart)."""
    port, worker_port = _free_port(), _free_port()
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "backend.serving.run_app", "--port", str(port), "--worker-port",
         str(worker_port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO_ROOT, env=_environment(cache), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.05)
            if time.monotonic() - started > 300:
                raise RuntimeError("the app did not answer within 300 s")
        answered = time.monotonic()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator(CHART).first.wait_for(state="visible", timeout=300_000)
        charted = time.monotonic()
        page.close()
        return answered - started, charted - answered
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start_bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--unprepared", action="store_true",
                        help="also time fresh caches that set-up has not filled (the baseline)")
    args = parser.parse_args(argv)
    print(f"cold start, {os.cpu_count()} CPU cores, {args.runs} runs per case")
    results = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        cases = [("prepared", True)] + ([("unprepared", False)] if args.unprepared else [])
        for name, prepared in cases:
            firsts = []
            for run in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="atlas-cold-") as folder:
                    setup = f", set-up {prepare(Path(folder)):.1f} s" if prepared else ""
                    answer, chart = one_run(browser, Path(folder))
                firsts.append(chart)
                print(f"{name} run {run + 1}: server answered after {answer:.1f} s, "
                      f"first chart {chart:.1f} s after that{setup}", flush=True)
            results[name] = statistics.median(firsts)
            print(f"{name}: median server answer -> first chart {results[name]:.1f} s")
        browser.close()
    if "unprepared" in results:
        print(f"set-up makes the first chart {results['unprepared'] / results['prepared']:.1f}x "
              "sooner")
    return 0


if __name__ == "__main__":
    sys.exit(main())
