"""Explore, Head grid and Rollout & flow on longer inputs, driven headless with AppTest.

The charts are read back from what Streamlit would ship to the browser (the Vega-Lite spec and
its Arrow data), and checked against invariants of attention (rows sum to one, causal zeros) and
the windows the controls or the link ask for.
"""

from __future__ import annotations

import dataclasses
import json
import re
from html import unescape

import numpy as np
import pyarrow as pa
import pytest

from backend.analyses import AnalysisRequest
from backend.analyses.rollout import AUTO_FLOW_TOKENS, FLOW_MAX_TOKENS
from tests.pages.test_pages import XSS, app

# About 250 tokens: wider than a 96-token cell-by-cell window, short enough for full maps.
MEDIUM = " ".join(f"In year {1900 + 7 * i} the river {['rose', 'fell', 'froze'][i % 3]} and "
                  f"the town {['built', 'sold', 'moved'][i % 3]} a mill." for i in range(18))
# Just over the length at which flow starts by itself, so a cached flow must be looked up.
FLOW_TEXT = ("The committee met on Tuesday to review the budget, and after a long debate "
             "about roads, schools and the new library, it agreed to postpone the vote until "
             "the auditors had checked every figure in the report that the mayor had sent. Nobody "
             "objected, although two members asked for a second meeting in May, "
             "after the harvest.")


def charts(at) -> list:
    return list(at.get("vega_lite_chart"))


def spec(chart) -> dict:
    return json.loads(chart.proto.spec)


def frame(chart):
    """The chart's data as shipped (Arrow IPC)."""
    return pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_pandas()


def reading_text(html: str) -> str:
    """What the reading view reads as: its HTML without tags, unescaped."""
    return unescape(re.sub(r"<[^>]+>", "", html.split('<div class="rv">', 1)[1]))


def chart_by_key(at, key: str):
    return next(c for c in charts(at) if c.proto.id and key in c.proto.id)


@pytest.fixture(scope="module")
def medium(service):
    return service.run(AnalysisRequest.make("attention", "smollm2", MEDIUM), timeout=600)


def test_medium_text_is_longer_than_a_detail_window(service, medium):
    assert len(service.analysis(medium).meta["tokens"]) > 200


def test_a_wide_window_is_shown_binned_not_ignored(service, medium):
    at = app("pages/explore.py", a=medium, window=["10", "150"])
    assert not at.exception
    chart = chart_by_key(at, "heatmap_overview")
    data = frame(chart)
    # Blocks cover exactly the window asked for, on both axes, and nothing outside it.
    assert data["q0"].min() == 10 and data["q1"].max() == 151
    assert data["k0"].min() == 10 and data["k1"].max() == 151
    assert "queries 10–150" in spec(chart)["title"]


def test_separate_key_window_from_a_link(service, medium):
    at = app("pages/explore.py", a=medium, window=["120", "160"], split="true",
             keys=["0", "30"], layer="4", head="2")
    assert not at.exception
    data = frame(chart_by_key(at, "heatmap_detail"))
    assert set(data["query"]) == set(range(120, 161))
    assert set(data["key"]) == set(range(0, 31))
    truth = service.attention_matrix(medium, 4, 2)[120:161, 0:31]
    shown = data.pivot(index="query", columns="key", values="weight").to_numpy()
    np.testing.assert_allclose(shown, truth, atol=6e-5)  # the chart rounds to 4 decimals
    link = at.code[-1].value
    assert "split=true" in link and "keys=0&keys=30" in link


def test_an_old_square_window_link_opens_the_same_view(service, medium):
    at = app("pages/explore.py", a=medium, window=["20", "50"], layer="3", head="1",
             token="25 " + service.analysis(medium).meta["tokens"][25])
    assert not at.exception
    data = frame(chart_by_key(at, "heatmap_detail"))
    assert set(data["query"]) == set(range(20, 51)) == set(data["key"])
    assert at.selectbox(key="token").value == 25


@pytest.mark.parametrize("scale", ["log", "rank"])
def test_colour_scales_for_sink_dominated_heads(medium, scale):
    at = app("pages/explore.py", a=medium, window=["0", "40"], scale=scale)
    assert not at.exception
    chart = chart_by_key(at, "heatmap_detail")
    colour = spec(chart)["encoding"]["color"]
    if scale == "log":
        assert colour["scale"]["type"] == "symlog"
    else:
        data = frame(chart)
        assert colour["field"] == "rank"
        # A rank is the share of cells with a smaller weight: order-preserving.
        order = np.lexsort((data["rank"].to_numpy(), data["weight"].to_numpy()))
        assert np.all(np.diff(data["rank"].to_numpy()[order]) >= 0)
        assert data["rank"].min() == 0 and data["rank"].max() < 1


def test_leaving_out_the_first_token_renormalises_rows(service, medium):
    at = app("pages/explore.py", a=medium, window=["0", "60"], layer="10", head="0",
             no_sink="true")
    assert not at.exception
    data = frame(chart_by_key(at, "heatmap_detail"))
    assert data["key"].min() == 1
    sums = data[data["query"] >= 1].groupby("query")["weight"].sum()
    full = service.attention_matrix(medium, 10, 0)
    # Keys 1..60 of rows 1..60 hold all of each row's mass but key 0's (causal), renormalised.
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=3e-3)
    assert full[5, 0] > 0.05  # the head does put weight on the first token


def test_reading_view_shades_the_text_and_lists_the_strongest_keys(service, medium):
    meta = service.analysis(medium).meta
    token = 200
    at = app("pages/explore.py", a=medium, layer="12", head="3",
             token=f"{token} {meta['tokens'][token]}")
    assert not at.exception
    html = " ".join(str(h.proto.body) for h in at.get("html"))
    assert MEDIUM in reading_text(html)
    assert re.search(rf'class="[^"]*\bsel\b[^"]*" title="{token}: ', html)  # the token, boxed
    row = service.attention_matrix(medium, 12, 3)[token]
    table = at.dataframe[0].value
    assert list(table["position"])[:3] == list(np.argsort(-row, kind="stable")[:3])
    assert np.all(np.asarray(table["position"]) <= token)  # causal: only earlier keys
    at.segmented_control(key="direction").set_value("column").run()
    column_top = at.dataframe[0].value["position"]
    assert np.all(np.asarray(column_top) >= token)  # who looks at it: only later queries
    assert "direction=column" in at.code[-1].value


def test_reading_view_renders_user_markup_as_text(service):
    aid = service.run(AnalysisRequest.make("attention", "smollm2", XSS), timeout=300)
    at = app("pages/explore.py", a=aid, token="1 " + service.analysis(aid).meta["tokens"][1])
    html = " ".join(str(h.proto.body) for h in at.get("html"))
    assert "<script" not in html and "&lt;" in html
    assert XSS in reading_text(html)  # the text reads as typed


def test_head_grid_click_keeps_the_sidebar_text(service, medium):
    at = app("pages/head_grid.py", a=medium)
    assert not at.exception
    at.session_state["open_head"] = (7, 5)  # what a click on layer 7, head 5 records
    at.run()
    assert not at.exception
    assert at.slider(key="layer").value == 7 and at.selectbox(key="head").value == "5"
    assert at.text_area(key="text").value == MEDIUM  # not the default example


def test_head_grid_thumbnails_fill_their_cells(service, medium):
    at = app("pages/head_grid.py", a=medium)
    chart = charts(at)[0]
    layers = spec(chart)["layer"]
    image = next(layer["mark"] for layer in layers if layer["mark"]["type"] == "image")
    width = spec(chart)["width"]
    cell = width / service.analysis(medium).meta["n_heads"]
    assert image["width"] >= 0.85 * cell
    assert not chart.proto.use_container_width  # drawn at its own size, not stretched


def test_rollout_exclude_first_token_changes_the_full_matrices(service, medium):
    short = service.run(AnalysisRequest.make("attention", "smollm2", "Paris is a city."),
                        timeout=300)
    at = app("pages/rollout.py", a=short)
    before = frame(rollout_matrix(at))
    at.toggle(key="no_sink").set_value(True).run()
    assert not at.exception
    after = frame(rollout_matrix(at))
    assert after["key"].min() == 1
    rows = after[after["query"] >= 1].groupby("query")["weight"].sum()
    np.testing.assert_allclose(rows.to_numpy(), 1.0, atol=3e-3)
    assert before["key"].min() == 0


def rollout_matrix(at):
    return next(c for c in charts(at) if "Rollout after layer" in spec(c).get("title", ""))


def test_a_fresh_link_shows_a_cached_flow(service):
    aid = service.run(AnalysisRequest.make("attention", "smollm2", FLOW_TEXT), timeout=300)
    n = len(service.analysis(aid).meta["tokens"])
    assert AUTO_FLOW_TOKENS < n <= FLOW_MAX_TOKENS
    service.run(AnalysisRequest.make("attention_flow", "smollm2", FLOW_TEXT,
                                     head_fusion="mean"), timeout=600)
    at = app("pages/rollout.py", a=aid)
    assert not at.exception
    assert not any("Compute attention flow" in b.label for b in at.button)
    html = " ".join(str(h.proto.body) for h in at.get("html"))
    assert "Flow" in html


def test_rollout_follows_a_target_beyond_the_full_matrix_limit(service, medium, monkeypatch):
    n = len(service.analysis(medium).meta["tokens"])
    monkeypatch.setattr(service, "settings",
                        dataclasses.replace(service.settings, full_matrix_max_tokens=n - 1))
    at = app("pages/rollout.py", a=medium)
    assert not at.exception, at.exception
    html = " ".join(str(h.proto.body) for h in at.get("html"))
    assert MEDIUM in reading_text(html)  # the text itself, shaded
    assert any("offered up to" in i.value for i in at.info)
    assert any(f"Rollout (after layer {service.analysis(medium).meta['n_layers']})" in m.value
               for m in at.markdown)


def long_text(tokens: int) -> str:
    """Varied prose of about `tokens` SmolLM2 tokens (13.4 per sentence)."""
    subjects = ["The river", "A farmer", "The council", "Her brother", "The old mill"]
    verbs = ["carried", "sold", "mended", "painted", "counted"]
    objects = ["the grain", "a boat", "the bridge", "three fences", "the bells"]
    return " ".join(f"{subjects[i % 5]} {verbs[(i // 5) % 5]} {objects[(i // 25) % 5]} in "
                    f"year {1000 + i}." for i in range(tokens // 13))


@pytest.mark.timeout(2400)  # the 6,000-token capture on a 2-core CPU, plus five page runs
def test_a_new_user_explores_a_6000_token_text(service):
    """The journey of issue 11 on the CPU with the default model: overview, zoom, reading
    view, head grid, rollout of the last token."""
    text = long_text(6000)
    aid = service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=1800)
    meta = service.analysis(aid).meta
    n = len(meta["tokens"])
    assert n >= 6000
    at = app("pages/explore.py", a=aid)
    assert not at.exception and not at.error
    overview = frame(chart_by_key(at, "heatmap_overview"))
    assert overview["q1"].max() == n and len(overview) <= 64 * 64
    # Zoom (as a block click sets it), then a token of the zoomed window: its reading view.
    last = n - 1
    at = app("pages/explore.py", a=aid, window=[str(n - 96), str(last)], split="true",
             keys=["0", "95"], token=f"{last} {meta['tokens'][last]}")
    assert not at.exception
    detail = frame(chart_by_key(at, "heatmap_detail"))
    assert set(detail["key"]) == set(range(96)) and detail["query"].min() == n - 96
    html = " ".join(str(h.proto.body) for h in at.get("html"))
    assert "year 1000." in reading_text(html)  # keys 0-95: the start of the text, shaded
    assert len(html) < 1_000_000
    at = app("pages/head_grid.py", a=aid)
    assert not at.exception and charts(at)
    at = app("pages/rollout.py", a=aid)
    assert not at.exception and not at.error
    assert at.selectbox(key="target").value == last
    shown = reading_text(" ".join(str(h.proto.body) for h in at.get("html")))
    assert f"year {1000 + 6000 // 13 - 1}." in shown
