"""Click latencies and bytes shipped, measured in a real browser on the running app.

For each length (SmolLM2, default 1,000 and 4,000 tokens; 16,000 if asked and within the
server's limit) the analysis is computed first into a fresh cache, then `streamlit run app.py`
serves it and Debian's chromium (Playwright) opens Explore on it, as a user would:

- open: the Explore link to the first chart;
- layer / head change: a key press on the layer slider, a pick in the head list;
- block zoom: a click on an overview block (to the exact windows around it);
- cell click: a click on a cell of the exact heatmap (to the token's views);
- view switch: Explore -> Head grid and back;
- bytes: what the server sent over its websocket for each Explore view (overview, zoom).

Each time runs from the user's action to the app being idle again with the chart drawn.
Goals (issue 14, cached 1,000-token analysis): layer/head change and cell click < 1 s, view
switch < 2 s; bytes per Explore view < 1 MB at any length (bertviz's head view: 123 MB at 128
tokens). Also printed, as the baseline of the same browser and server: a rerun that changes
nothing on screen (the "Separate key window" toggle on and off: it only adds a slider), and each latency's ratio to it.

    python -m bench.browser_bench [--lengths 1000 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.e2e.conftest import CHROMIUM, wait_idle
from tests.serving.worker_process import free_port

REPO = Path(__file__).resolve().parent.parent
PARAGRAPH = ("Attention lets every token look back at the tokens before it. Each head learns its "
             "own pattern: some follow the previous word, some jump to the first token, and some "
             "copy what came after an earlier occurrence of the current word. ")


def text_of(tokens: int) -> str:
    """A text of about `tokens` SmolLM2 tokens (numbered so that sentences differ)."""
    words_per_paragraph = 44  # ~ tokens of PARAGRAPH with its number
    return "".join(f"{i}. {PARAGRAPH}" for i in range(max(1, tokens // words_per_paragraph)))


def prepare(cache: str, lengths: list[int]) -> dict[int, str]:
    """Analyse each text into the cache (before the server: one process per DuckDB file)."""
    code = ("import json, sys\nfrom backend.analyses import AnalysisRequest\n"
            "from backend.service import AtlasService\ns = AtlasService()\nout = {}\n"
            "for n, text in json.loads(sys.argv[1]).items():\n"
            "    aid = s.run(AnalysisRequest.make('attention', 'smollm2', text), timeout=3600)\n"
            "    out[n] = [aid, len(s.analysis(aid).meta['tokens'])]\n"
            "print(json.dumps(out))\ns.worker.shutdown(); s.store.close()\n")
    import json
    env = {**os.environ, "ATLAS_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code,
                           json.dumps({n: text_of(n) for n in lengths})],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return {int(n): tuple(v) for n, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


class Server:
    def __init__(self, cache: str):
        self.port = free_port()
        env = {**os.environ, "ATLAS_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(self.port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        import urllib.request
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).read() == b"ok":
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the app did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


class Received:
    """Bytes the page received over Streamlit's websocket since the last reset."""

    def __init__(self, page):
        self.total = 0
        page.on("websocket", lambda ws: ws.on("framereceived", self._add))

    def _add(self, payload):
        self.total += len(payload)

    def take(self) -> int:
        total, self.total = self.total, 0
        return total


# Every change of the app's script state, sampled every 5 ms in the page (performance.now()).
RUN_LOG = """
window.__runs = [];
let last = null;
setInterval(() => {
  const app = document.querySelector("[data-testid='stApp']");
  const state = app && app.getAttribute('data-test-script-state');
  if (state !== last) { window.__runs.push([state, performance.now()]); last = state; }
}, 5);
"""
FIRST_RUN_DONE = """t0 => { const runs = window.__runs.filter(([s, t]) => t > t0);
  const start = runs.findIndex(([s]) => s === 'running');
  const end = runs.findIndex(([s], i) => i > start && s === 'notRunning');
  return start >= 0 && end > start ? runs[end][1] : null; }"""


def timed(page, action) -> float:
    """Seconds from the action to the end of the run it caused (page or fragment), as the
    page saw it; then waits for the app to settle (jobs, follow-up reruns)."""
    t0 = page.evaluate("performance.now()")
    action()
    t1 = page.wait_for_function(FIRST_RUN_DONE, arg=t0, timeout=120_000).json_value()
    wait_idle(page)
    return (t1 - t0) / 1000


def click_in_plot(page, fx: float, fy: float) -> None:
    """Click at a fraction of the first chart's plot area (the marks, not the axes)."""
    plot = page.locator("[data-testid='stVegaLiteChart'] canvas, "
                        "[data-testid='stVegaLiteChart'] svg.marks").first
    box = plot.bounding_box()
    # The plot area starts after the y axis and title: about 90 px in, 40 px down.
    x = box["x"] + 90 + fx * (box["width"] - 180)
    y = box["y"] + 40 + fy * (box["height"] - 120)
    page.mouse.click(x, y)


def measure(url: str, aid: str, repeats: int) -> dict[str, float]:
    results: dict[str, list[float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.add_init_script(RUN_LOG)
        received = Received(page)
        start = time.perf_counter()
        page.goto(f"{url}/explore?a={aid}")
        wait_idle(page)
        page.locator("[data-testid='stVegaLiteChart']").first.wait_for()
        results["open Explore (s)"] = [time.perf_counter() - start - 1.2]
        results["bytes: overview view"] = [received.take()]
        for _ in range(repeats):
            split = page.get_by_text("Separate key window")
            results.setdefault("baseline: rerun, nothing new (s)", []).append(
                timed(page, split.click))
            timed(page, split.click)
            slider = page.get_by_role("slider").first
            slider.focus()
            results.setdefault("layer change (s)", []).append(
                timed(page, lambda: slider.press("ArrowRight")))
            page.get_by_role("combobox", name="Head").click()
            option = page.get_by_role("option", name=str(len(results["layer change (s)"])),
                                      exact=True)
            results.setdefault("head change (s)", []).append(timed(page, option.click))
        received.take()
        results["block zoom (s)"] = [timed(page, lambda: click_in_plot(page, 0.5, 0.7))]
        results["bytes: zoomed view"] = [received.take()]
        if page.locator("[data-testid='stVegaLiteChart']").count():
            results["cell click (s)"] = [timed(page, lambda: click_in_plot(page, 0.3, 0.6))]
        for _ in range(repeats):
            results.setdefault("view switch (s)", []).append(timed(
                page, lambda: page.get_by_role("link", name="Head grid", exact=True).click()))
            results["view switch (s)"].append(timed(
                page, lambda: page.get_by_role("link", name="Explore", exact=True).click()))
        browser.close()
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="atlas-browser-bench-")
    print(f"Preparing {args.lengths} tokens (SmolLM2) into {cache}…", flush=True)
    analyses = prepare(cache, args.lengths)
    server = Server(cache)
    try:
        rows = {}
        for length, (aid, n) in analyses.items():
            print(f"measuring {n} tokens…", flush=True)
            rows[n] = measure(server.url, aid, args.repeats)
    finally:
        server.stop()
    names = list(next(iter(rows.values())))
    print(f"\n{'':36}" + "".join(f"{n:>12,} tok" for n in rows))
    for name in names:
        cells = []
        for n in rows:
            value = rows[n].get(name)
            cells.append(f"{value / 1e6:>13.3f} MB" if name.startswith("bytes") and value
                         is not None else f"{value:>16.2f}" if value is not None else " " * 16)
        print(f"{name:36}" + "".join(cells))
    for n, row in rows.items():
        base = row["baseline: rerun, nothing new (s)"]
        ratios = ", ".join(f"{k.split(' (')[0]} {v / base:.1f}x" for k, v in row.items()
                           if k.endswith("(s)") and not k.startswith("baseline"))
        print(f"{n:,} tokens, ratio to the baseline rerun ({base:.2f} s): {ratios}")
    print("Goals: layer/head change and cell click < 1 s, view switch < 2 s (1,000 tokens); "
          "< 1 MB per Explore view.")


if __name__ == "__main__":
    main()
