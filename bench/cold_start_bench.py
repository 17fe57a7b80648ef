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
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench.running_app import CHROMIUM, CHROMIUM_ARGS, RunningApp, prepare

CHART = "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg"


def one_run(browser, cache: Path) -> tuple[float, float]:
    """(seconds until the server answers, seconds from that answer to the first chart)."""
    with RunningApp(cache) as app:
        answered = time.monotonic()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app.url)
        page.locator(CHART).first.wait_for(state="visible", timeout=300_000)
        charted = time.monotonic()
        page.close()
        return app.answered_s, charted - answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start_bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--unprepared", action="store_true",
                        help="also time fresh caches that set-up has not filled (the baseline)")
    args = parser.parse_args(argv)
    print(f"cold start, {os.cpu_count()} CPU cores, {args.runs} runs per case")
    results = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
