"""Nothing cut off at 1,280 px: the sidebar's model labels, the head-importance pruning curve and
ranking table, and the bertviz views, whose frames take their drawing's height."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import running_app, wait_idle
from tests.e2e.test_browser_explore import TEXT, analyse

# About 60 tokens: more lines than the head view's old fixed frame could show.
LONG = ("The committee met on Tuesday to review the budget. After a long debate about the new "
        "library, the members agreed that the roof must be repaired first, because the rain had "
        "already damaged several shelves of old maps and letters.")
CHARTS = "[data-testid='stVegaLiteChart']"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app on its own fresh cache: these views need no prepared lessons."""
    with running_app(tmp_path_factory.mktemp("layout-cache")) as url:
        yield url


@pytest.fixture
def wide(page):
    page.set_viewport_size({"width": 1280, "height": 1000})
    return page


def clipped_text(locator) -> list[str]:
    """Texts inside `locator` that are wider than the box showing them (cut off or ellipsised)."""
    return locator.evaluate("""root => [...root.querySelectorAll('*')]
        .filter(e => e.children.length === 0 && e.textContent.trim()
                && e.scrollWidth > e.clientWidth + 1)
        .map(e => e.textContent.trim())""")


def overflow(locator) -> int:
    """How many pixels of an element's content (an input's value too) are out of its box."""
    return locator.evaluate("e => e.scrollWidth - e.clientWidth")


def test_the_sidebar_shows_whole_model_labels(wide, app_url):
    wide.goto(app_url)
    wait_idle(wide)
    sidebar = wide.locator("[data-testid='stSidebar']")
    model = sidebar.get_by_role("combobox", name="Model", exact=True)
    expect(model).to_have_value("SmolLM2-135M-Instruct (offline)")
    assert overflow(model) <= 1
    model.click()
    options = wide.get_by_role("option")
    assert options.count() >= 4
    for option in options.all():                        # each option's label fits its row
        assert clipped_text(option) == [], option.inner_text()
    wide.get_by_role("option", name="Other model…").click()
    wait_idle(wide)
    expect(model).to_have_value("Other model…")
    assert overflow(model) <= 1
    expect(sidebar.get_by_label("Hub id, model folder or .gguf file")).to_be_visible()


def test_the_pruning_curve_and_ranking_fit(wide, app_url):
    aid = analyse(wide, app_url, TEXT)
    wide.goto(f"{app_url}/head_importance?a={aid}")
    wait_idle(wide)
    curve = wide.locator(CHARTS).filter(has_text="fraction of heads masked")
    expect(curve).to_have_count(1)
    lines = curve.locator("g.mark-line").first.bounding_box()
    assert lines["height"] >= 200                       # the plot, not just its legend
    table = wide.locator("[data-testid='stDataFrame']").filter(has=wide.locator(
        "[data-testid='stDataFrameResizable']")).last
    scroller = table.locator(".dvn-scroller").first
    hidden = overflow(scroller)
    assert hidden <= 1, f"the ranking table is {hidden} px wider than its frame"


@pytest.mark.parametrize("view", ["head view", "model view"])
def test_bertviz_frames_take_their_drawings_height(wide, app_url, view):
    aid = analyse(wide, app_url, LONG)
    wide.goto(f"{app_url}/bertviz_views?a={aid}&view={view.replace(' ', '+')}")
    wait_idle(wide)
    frame = wide.locator("iframe").first
    expect(frame).to_be_visible()
    wide.wait_for_timeout(1500)                         # bertviz draws after the page loads
    drawing = frame.content_frame.locator("#vis").first
    sizes = frame.evaluate("""f => ({frame: f.clientHeight, width: f.clientWidth,
        content: f.contentDocument.documentElement.scrollHeight,
        contentWidth: f.contentDocument.documentElement.scrollWidth})""")
    assert sizes["content"] <= sizes["frame"] + 2, sizes   # nothing below the frame's edge
    assert sizes["contentWidth"] <= sizes["width"] + 2, sizes  # nor right of it
    assert drawing.bounding_box()["height"] > 300


def _reruns_asked(frames: list) -> list[str]:
    """The fragment id of every rerun the browser asked for ("" for the whole page)."""
    from streamlit.proto.BackMsg_pb2 import BackMsg

    ids = []
    for payload in frames:
        if isinstance(payload, (bytes, bytearray)):
            message = BackMsg()
            message.ParseFromString(bytes(payload))
            if message.HasField("rerun_script"):
                ids.append(message.rerun_script.fragment_id)
    return ids


def test_the_pruning_controls_rerun_only_the_pruning_curve(wide, app_url):
    aid = analyse(wide, app_url, TEXT)
    frames: list = []
    wide.on("websocket", lambda ws: ws.on("framesent", lambda payload: frames.append(payload)))
    wide.goto(f"{app_url}/head_importance?a={aid}")
    wait_idle(wide)
    # The default curve first: while its job runs, the progress fragment redraws the page.
    expect(wide.get_by_text(re.compile("Heads masked by"))).to_be_visible(timeout=240_000)
    wait_idle(wide)
    frames.clear()
    box = wide.get_by_role("combobox", name="Mask heads in order of")
    box.click()
    box.press_sequentially("confidence")  # typed: the list may not open on a focused box
    wide.get_by_role("option", name="confidence", exact=True).click()
    wait_idle(wide)
    expect(wide).to_have_url(re.compile(r"hi_prune=confidence"))
    expect(wide.get_by_text("Heads masked by confidence")).to_be_visible()
    asked = _reruns_asked(frames)
    assert asked and asked[0] != "", asked              # the first rerun is the fragment's
    link = wide.locator("[data-testid='stCode'] code").last.inner_text()
    assert "hi_prune=confidence" in link                # the link, in the fragment, follows
