"""Cold start, click latencies and bytes shipped, measured in a real browser on the running app.

    python -m bench.browser_bench [--tokens 1000] [--model smollm2] [--repeats 5] [--shots DIR]
                                  [--cache DIR]

On a fresh cache that set-up (`python -m backend.prepare`) has filled, the app starts as
`make app` starts it (bench/running_app.py) and Debian's chromium (Playwright, 1,280 x 900)
opens it as a user would:

- cold start: the app answering -> the first chart drawn on the landing page;
- a ~1,000-token analysis (SmolLM2 unless --model; past 8,192 tokens a model of a longer
  context, such as gemma3-270m, with ATLAS_MAX_TOKENS raised) is computed through the worker
  (not timed), then, on Explore:
  layer change (a key press on the slider) and head change (a pick in the list) on the overview;
  block zoom (a click on an overview block, to the exact windows around it); cell click (a cell
  of the exact heatmap, to the token's bars, lines and reading view); a layer change in that
  zoomed view; view switch (Explore -> Head grid -> Explore, by the sidebar's links);
- bytes: what the server sent over its websocket for each view.

Each time runs from the user's action to the page at rest with the updated chart drawn: the
later of the end of the script run it caused (page or fragment), the last change to the page's
DOM and the last stroke drawn on a canvas (Vega updates a chart's data in place). Printed as
median and 90th percentile over the repeats, with the machine's load, and beside them the CPU
seconds each process used meanwhile (the browser's, the app's, the worker's): on a shared
machine the wall times grow with the load, the CPU seconds much less. With --shots, full-page
screenshots of every view at 1,280 px wide are saved there. Goals (issue 14, this 2-core
machine): layer/head change and cell click < 1 s, view switch < 2 s, first chart < 10 s after
the server answers. Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import psutil
from playwright.sync_api import sync_playwright

from backend.analyses import AnalysisRequest
from backend.serving.client import WorkerClient
from bench.running_app import CHROMIUM, CHROMIUM_ARGS, RunningApp, prepare
from pages.shared import PAGES
from tests.e2e.test_browser_long_views import plot_area

PARAGRAPH = ("Attention lets every token look back at the tokens before it. Each head learns its "
             "own pattern: some follow the previous word, some jump to the first token, and some "
             "copy what came after an earlier occurrence of the current word. ")
TOKENS_PER_PARAGRAPH = 50  # SmolLM2 tokens of PARAGRAPH with its number
CHART = "[data-testid='stVegaLiteChart']"
DRAWING = f"{CHART} canvas, {CHART} svg.marks"
QUIET_MS = 400  # the page is at rest after this long without a run, a DOM change or a stroke
COLD_START = "cold start: answer -> first chart"
GOALS = {"layer change": 1.0, "head change": 1.0, "cell click": 1.0, "view switch": 2.0,
         COLD_START: 10.0}
PROCESSES = ("browser", "app", "worker")

# In the page, from its first script: the app's script state changes, the DOM's last change
# (outside the header, whose status widget animates while a run lasts) and the last canvas
# stroke, all in performance.now() milliseconds.
PAGE_CLOCK = """
window.__runs = []; window.__changed = 0;
for (const name of ['fill', 'fillRect', 'fillText', 'stroke', 'drawImage', 'clearRect']) {
  const draw = CanvasRenderingContext2D.prototype[name];
  CanvasRenderingContext2D.prototype[name] = function (...args) {
    window.__changed = performance.now();
    return draw.apply(this, args);
  };
}
new MutationObserver(records => {
  if (records.some(r => !(r.target.closest && r.target.closest("[data-testid='stHeader']"))))
    window.__changed = performance.now();
}).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
let last = null;
setInterval(() => {
  const app = document.querySelector("[data-testid='stApp']");
  const state = app && app.getAttribute('data-test-script-state');
  if (state !== last) { window.__runs.push([state, performance.now()]); last = state; }
}, 5);
"""
# After t0: [when the first script run started, when the last one ended, when the page came to
# rest], or null while it has not come to rest.
AT_REST = """([t0, quiet]) => {
  const runs = window.__runs.filter(([s, t]) => t > t0);
  const started = runs.find(([s]) => s === 'running');
  const [state, since] = window.__runs[window.__runs.length - 1];
  if (!started || state !== 'notRunning') return null;
  const rest = Math.max(since, window.__changed);
  return performance.now() - rest >= quiet ? [started[1], since, rest] : null;
}"""


class Timing(NamedTuple):
    """Seconds from a user's action to its first script run starting, its last run ending and
    the page at rest (`total`, what a user waits); CPU seconds each of PROCESSES used until
    then (the at-rest wait included)."""

    started: float
    ended: float
    total: float
    cpu: tuple[float, float, float]


def text_of(tokens: int) -> str:
    """A text of about `tokens` SmolLM2 tokens (numbered paragraphs, so that sentences differ)."""
    return "".join(f"{i}. {PARAGRAPH}" for i in range(max(1, tokens // TOKENS_PER_PARAGRAPH)))


class CpuMeter:
    """CPU seconds used so far by the browser (chromium, this process's descendants), the app
    (Streamlit) and the worker service."""

    def __init__(self, app: RunningApp):
        self.launcher = psutil.Process(app.process.pid)

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {name: [] for name in PROCESSES}
        for process in self.launcher.children(recursive=True):
            command = " ".join(process.cmdline())
            groups["app" if "streamlit" in command else "worker"].append(process)
        groups["browser"] = [p for p in psutil.Process().children(recursive=True)
                             if "chrom" in p.name()]
        return groups

    def read(self) -> tuple[float, ...]:
        used = []
        for name, processes in self._groups().items():
            seconds = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.NoSuchProcess:  # a renderer that ended: its time is lost
                    continue
                seconds += times.user + times.system
            used.append(seconds)
        return tuple(used)


class Session:
    """The browser's page on the app: actions timed to the page at rest, bytes received."""

    def __init__(self, page, meter: CpuMeter):
        self.page, self.meter, self.received = page, meter, 0
        page.add_init_script(PAGE_CLOCK)
        page.on("websocket", lambda ws: ws.on("framereceived", self._add))

    def _add(self, payload) -> None:
        self.received += len(payload)

    def take_bytes(self) -> int:
        """Bytes received over Streamlit's websocket since the last call."""
        received, self.received = self.received, 0
        return received

    def _at_rest(self, t0: float, cpu0: tuple[float, ...]) -> Timing:
        marks = self.page.wait_for_function(AT_REST, arg=[t0, QUIET_MS], polling=50,
                                            timeout=180_000).json_value()
        cpu = tuple(b - a for a, b in zip(cpu0, self.meter.read()))
        return Timing(*((mark - t0) / 1000 for mark in marks), cpu)

    def timed(self, action) -> Timing:
        """From `action` to the page at rest with what it caused drawn."""
        cpu0 = self.meter.read()
        t0 = self.page.evaluate("performance.now()")
        action()
        return self._at_rest(t0, cpu0)

    def load(self, url: str) -> Timing:
        """From the start of loading `url` (the page's clock starts with the navigation)."""
        cpu0 = self.meter.read()
        self.page.goto(url)
        return self._at_rest(0.0, cpu0)

    def settle(self) -> None:
        """Wait until the page loaded last is at rest."""
        self._at_rest(0.0, self.meter.read())

    def click_at(self, fx: float, fy: float):
        """The click at a fraction of the first chart's plot area (its coloured marks), found
        now (from a screenshot: not part of the time the click takes)."""
        plot = plot_area(self.page)
        x, y = plot["x"] + fx * plot["width"], plot["y"] + fy * plot["height"]
        return lambda: self.page.mouse.click(x, y)

    def query_value(self, name: str) -> str | None:
        return self.page.evaluate(f"new URLSearchParams(location.search).get({name!r})")


class Results:
    """Timings by action and bytes by view (the first time each view is drawn: Streamlit sends
    an element the browser already holds as a reference)."""

    def __init__(self, session: Session):
        self.session = session
        self.times: dict[str, list[Timing]] = {}
        self.sizes: dict[str, int] = {}

    def time(self, name: str, timing: Timing) -> None:
        self.times.setdefault(name, []).append(timing)

    def size(self, name: str) -> None:
        self.sizes.setdefault(name, self.session.take_bytes())


def explore(session: Session, url: str, aid: str, repeats: int, results: Results) -> None:
    page = session.page
    session.take_bytes()
    results.time("open Explore (link)", session.load(f"{url}/explore?a={aid}"))
    results.size("Explore, overview")
    layer = page.get_by_role("slider").first
    for _ in range(repeats):
        before = session.query_value("layer")
        layer.focus()
        results.time("layer change", session.timed(lambda: layer.press("ArrowRight")))
        assert session.query_value("layer") != before, "the layer did not change"
    for head in range(repeats):
        page.get_by_role("combobox", name="Head").click()
        option = page.get_by_role("option", name=str(head), exact=True)
        results.time("head change", session.timed(option.click))
        assert session.query_value("head") == str(head), "the head did not change"
    overview = page.url
    for i in range(repeats):
        if i:
            session.load(overview)
        session.take_bytes()
        # Blocks off the diagonal, each time another (queries late, keys early).
        results.time("block zoom", session.timed(session.click_at(0.15 + 0.1 * i,
                                                                  0.6 + 0.07 * i)))
        results.size("Explore, zoomed")
        assert session.query_value("window"), "the click did not zoom"
        results.time("cell click", session.timed(session.click_at(0.3, 0.2 + 0.15 * i)))
        results.size("Explore, zoomed with a token")
        assert session.query_value("token"), "the click picked no token"
        layer.focus()
        results.time("layer change, zoomed with a token",
                     session.timed(lambda: layer.press("ArrowLeft")))
    for _ in range(repeats):
        for name in ("Head grid", "Explore"):
            link = page.get_by_role("link", name=name, exact=True)
            session.take_bytes()
            results.time("view switch", session.timed(link.click))
            results.size(f"{name} (view switch)")


# The height of the page's content: Streamlit scrolls its main column inside the window.
CONTENT_HEIGHT = """() => Math.max(...['stMain', 'stSidebarContent'].map(id =>
    (document.querySelector(`[data-testid='${id}']`) || {scrollHeight: 0}).scrollHeight))"""
SHOT_MAX_HEIGHT = 8000


def screenshots(session: Session, url: str, ids: dict[str, str], folder: Path) -> list[str]:
    """Every view at 1,280 px wide, the window as tall as the view (so the shot holds all of
    it); the views wider than the window."""
    folder.mkdir(parents=True, exist_ok=True)
    page, wide = session.page, []
    for name in PAGES:
        for label, aid in ids.items():
            if name != "explore" and label != "example":
                continue  # the long analysis only where its size changes the drawing
            path = "" if name == next(iter(PAGES)) else name  # the default page is at "/"
            session.load(f"{url}/{path}?a={aid}")
            height = min(SHOT_MAX_HEIGHT, page.evaluate(CONTENT_HEIGHT))
            page.set_viewport_size({"width": 1280, "height": max(900, height)})
            page.wait_for_timeout(1000)  # charts sized to their container redraw
            page.screenshot(path=str(folder / f"{name}-{label}.png"))
            if page.evaluate("document.documentElement.scrollWidth > innerWidth + 1"):
                wide.append(f"{name}-{label}")
            page.set_viewport_size({"width": 1280, "height": 900})
    return wide


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 \
        else values[0]


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def report(results: Results, cold_start: float, model: str, n: int, loads: list[str]) -> None:
    print(f"\n{model}, {n:,} tokens cached; {os.cpu_count()} CPU cores; load average "
          f"(1 / 5 / 15 min) {loads[0]} before the clicks, {loads[1]} after")
    print(f"\n{'seconds from the action':34}{'median':>7}{'p90':>6}{'runs':>5}{'goal':>12}"
          f"{'run start':>10}{'run end':>8}   CPU s: browser  app worker")
    goal = GOALS[COLD_START]
    print(f"{COLD_START:34}{cold_start:7.2f}{'':6}{1:5}"
          f"{'< %g ' % goal:>7}{'ok' if cold_start < goal else 'MISSED':5}")
    for name, timings in results.times.items():
        totals = [t.total for t in timings]
        median = statistics.median(totals)
        goal = GOALS.get(name)
        verdict = (f"{'< %g ' % goal:>7}{'ok' if median < goal else 'MISSED':5}" if goal
                   else " " * 12)
        cpu = "".join(f"{statistics.median(t.cpu[i] for t in timings):>{w}.2f}"
                      for i, w in enumerate((17, 5, 7)))
        print(f"{name:34}{median:7.2f}{p90(totals):6.2f}{len(totals):5}{verdict}"
              f"{statistics.median(t.started for t in timings):10.2f}"
              f"{statistics.median(t.ended for t in timings):8.2f}{cpu}")
    print(f"\n{'bytes over the websocket, per view':34}{'MB':>7}")
    for name, size in results.sizes.items():
        print(f"{name:34}{size / 1e6:7.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.browser_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shots", type=Path, help="save a screenshot of every view here")
    parser.add_argument("--cache", type=Path, help="a cache folder to use and keep (set-up "
                        "and the analysis are then quick on a second run); default: a fresh one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="atlas-browser-bench-") as folder:
        cache = args.cache or Path(folder)
        print(f"Set-up on {'the' if args.cache else 'a fresh'} cache: {prepare(cache):.1f} s",
              flush=True)
        with RunningApp(cache) as app, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            session = Session(browser.new_page(viewport={"width": 1280, "height": 900}),
                              CpuMeter(app))
            results = Results(session)
            answered = time.monotonic()
            session.page.goto(app.url)
            session.page.locator(DRAWING).first.wait_for(state="visible", timeout=300_000)
            cold_start = time.monotonic() - answered
            print(f"The app answered {app.answered_s:.1f} s after its start; the first chart "
                  f"{cold_start:.1f} s after that", flush=True)
            example = session.query_value("a")
            session.settle()
            results.size("Overview (landing)")
            worker = WorkerClient(app.worker_url)
            started = time.monotonic()
            aid = worker.run(AnalysisRequest.make("attention", args.model, text_of(args.tokens)),
                             timeout=3600)
            n = len(worker.analysis(aid).meta["tokens"])
            print(f"Analysed {n:,} tokens through the worker in "
                  f"{time.monotonic() - started:.0f} s; measuring…", flush=True)
            loads = [load_average()]
            explore(session, app.url, aid, args.repeats, results)
            loads.append(load_average())
            wide = screenshots(session, app.url, {"example": example, f"{n}-tokens": aid},
                               args.shots) if args.shots else None
            browser.close()
    report(results, cold_start, args.model, n, loads)
    if wide is not None:
        print(f"\nScreenshots in {args.shots}; wider than 1,280 px: {', '.join(wide) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
