"""The bad-input list through the real app (AppTest runs app.py with the session's service):
every text field, malformed and wrong-kind links on every page. Each case must show a clear
message and no exception element, and user markup must never reach the page as HTML."""

from __future__ import annotations

import html
import re
import time

import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses import AnalysisRequest
from pages.shared import PAGES
from tests.conftest import REPO_ROOT
from tests.reliability.inputs import BAD_TEXTS, MARKUP, published_files

LAUNCHER = "from app import main\nmain()"
SOLUTION = "First, 3 pencils cost $1. So 27 pencils cost 9 dollars. The answer is \\boxed{9}."
ATTENTION_PAGES = [p for p in PAGES if p not in ("compare", "thought_anchors", "lessons")]
ID_PARAM = {**{p: "a" for p in ATTENTION_PAGES}, "compare": "b", "thought_anchors": "t",
            "lessons": "lesson"}
MALFORMED_IDS = ["xyz", "0" * 23, "g" * 24, "A" * 24, "'; DROP TABLE analyses; --",
                 "<script>alert(1)</script>", "\u202e" + "a" * 23, "a" * 10_000, "%00", " "]
UNKNOWN_ID = "0123456789abcdef01234567"


def app(page: str | None = None, **params) -> AppTest:
    at = AppTest.from_string(LAUNCHER, default_timeout=180)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    if page:
        at.switch_page(str(REPO_ROOT / "pages" / f"{page}.py")).run()
    return at


def messages(at: AppTest) -> str:
    """The messages as a reader sees them (markdown escapes and entities resolved)."""
    said = " ".join(e.value for kind in (at.error, at.warning, at.info) for e in kind)
    return html.unescape(re.sub(r"\\(.)", r"\1", said))


def assert_no_live_markup(at: AppTest) -> None:
    """Markdown-rendered elements hold user markup only escaped (st.text and code are inert)."""
    for kind in (at.markdown, at.caption, at.error, at.warning, at.info, at.success,
                 at.metric):
        for element in kind:
            value = str(getattr(element, "value", ""))
            assert "<script" not in value and "<img" not in value, value


@pytest.fixture(scope="module")
def ids(service):
    """One analysis of each shape a link can carry."""
    text = "The cat sat on the mat."
    found = {"attention": service.run(AnalysisRequest.make("attention", "smollm2", text),
                                      timeout=300),
             "gradient_rollout": service.run(AnalysisRequest.make(
                 "gradient_rollout", "smollm2", text, target=2), timeout=300),
             "ta_trace": service.run(AnalysisRequest.make("ta_trace", "smollm2", SOLUTION,
                                                          problem="p", answer="9"), timeout=300)}
    if published_files():
        found["ta_published"] = service.import_published_trace(published_files(), MARKUP)
    return found


@pytest.mark.parametrize("page", list(PAGES))
@pytest.mark.parametrize("value", [MALFORMED_IDS[4], UNKNOWN_ID])
def test_malformed_and_unknown_ids_on_every_page(service, ids, page, value):
    side_a = {"a": ids["attention"]} if page == "compare" else {}
    at = app(page, **side_a, **{ID_PARAM[page]: value})
    assert not at.exception, at.exception
    said = messages(at)
    if page == "lessons":
        assert "no lesson" in said
    elif value == UNKNOWN_ID:
        assert "No analysis" in said
    else:
        assert "malformed" in said
    assert_no_live_markup(at)


@pytest.mark.parametrize("value", [v for v in MALFORMED_IDS if v != MALFORMED_IDS[4]])
def test_every_malformed_id_shape_on_explore(service, ids, value):
    at = app("explore", a=value)
    assert not at.exception
    assert "malformed" in messages(at)


def _page_links(at: AppTest) -> list[tuple[str, str]]:
    return [(p.proto.page, p.proto.query_string) for p in at.get("page_link")]


@pytest.mark.parametrize("page", ATTENTION_PAGES)
def test_a_trace_link_on_an_attention_view_says_where_it_can_be_seen(ids, page):
    at = app(page, a=ids["ta_trace"])
    assert not at.exception, at.exception
    assert "Thought Anchors trace, which this view cannot show" in messages(at)
    assert ("thought_anchors", f"t={ids['ta_trace']}") in _page_links(at)


def test_an_attention_link_on_thought_anchors_links_to_explore(ids):
    at = app("thought_anchors", t=ids["attention"])
    assert not at.exception
    assert "attention analysis, which this view cannot show" in messages(at)
    assert ("explore", f"a={ids['attention']}") in _page_links(at)


def test_a_derived_result_links_to_the_analysis_it_came_from(ids):
    at = app("explore", a=ids["gradient_rollout"])
    assert not at.exception
    assert "gradient-weighted rollout result" in messages(at)
    assert ("rollout", f"a={ids['attention']}") in _page_links(at)


def test_a_trace_as_side_b_of_compare_is_refused(ids):
    at = app("compare", a=ids["attention"], b=ids["ta_trace"])
    assert not at.exception
    assert "cannot show" in messages(at)


def test_a_published_trace_with_markup_in_its_label_opens_as_text(ids):
    if "ta_published" not in ids:
        pytest.skip("published fixtures absent")
    at = app("thought_anchors", t=ids["ta_published"])
    assert not at.exception
    assert_no_live_markup(at)
    for block in at.get("html"):
        assert "<script>alert(1)" not in block.proto.body


# Garbage for the widget-bound parameters of each view: Streamlit's widgets must fall back to
# their defaults, never raise.
WIDGET_GARBAGE = {
    "explore": dict(layer="abc", head="99", window=["9", "1", "x"], token="zzz"),
    "head_grid": dict(layer="-1"),
    "rollout": dict(target="-3", fusion="median", depth="1e9", no_sink="maybe"),
    "bertviz_views": dict(view="nope", bv_layers=["abc", "999"]),
    "head_importance": dict(hi_score="saliency", hi_norm="x", hi_head="L99H99",
                            hi_prune="nope", hi_recompute="2"),
    "overview": dict(layer="\0"),
    "compare": dict(cmp_linked="perhaps", cmp_align="letters", cmp_importance="x"),
}


@pytest.mark.parametrize("page", sorted(WIDGET_GARBAGE))
def test_garbage_widget_values_in_links_fall_back_to_defaults(ids, page):
    at = app(page, a=ids["attention"], **WIDGET_GARBAGE[page])
    assert not at.exception, at.exception


@pytest.mark.parametrize("params", [
    dict(t="<script>", ta_s="-1", ta_metric="nope", ta_links="999", ta_r="-5",
         ta_resample="true"),
    dict(ta_source="Import a published trace", t=UNKNOWN_ID),
])
def test_garbage_thought_anchors_links(ids, params):
    at = app("thought_anchors", **params)
    assert not at.exception, at.exception


@pytest.mark.parametrize("step", ["0", "-1", "9" * 5000, "\u0663", "two", "", "1.5"])
def test_lesson_steps_of_any_shape_open_a_step(step):
    at = app("lessons", lesson="01-what-attention-is", step=step)
    assert not at.exception, at.exception


# A browser cannot send a lone surrogate (UTF-8 has none; it arrives as U+FFFD), and neither can
# AppTest: those are refused by the API tests.
TYPABLE = sorted(name for name in BAD_TEXTS if "surrogate" not in name)


@pytest.mark.parametrize("name", TYPABLE)
def test_bad_texts_in_the_sidebar_give_a_clear_message(ids, name):
    text, reason = BAD_TEXTS[name]
    at = app("explore", a=ids["attention"])
    at.text_area(key="text").set_value(text).run()
    next(b for b in at.sidebar.button if b.label == "Analyse").click().run()
    assert not at.exception, at.exception
    assert reason in messages(at)


@pytest.mark.parametrize("ref, reason", [("org/\0model", "NUL byte"),
                                         ("../../etc/passwd", "ATLAS_MODEL_DIRS"),
                                         ("https://example.com/model.gguf", "model folders"),
                                         (MARKUP, "model folders")])
def test_bad_model_references_in_the_sidebar(ids, ref, reason):
    at = app("explore", a=ids["attention"])
    at.selectbox(key="model_choice").set_value("other").run()
    at.text_input(key="other_model").set_value(ref).run()
    next(b for b in at.sidebar.button if b.label == "Analyse").click().run()
    assert not at.exception, at.exception
    assert reason in messages(at)
    assert_no_live_markup(at)


def test_markup_in_the_sidebar_text_is_shown_as_text(service):
    at = app()
    at.text_area(key="text").set_value(MARKUP).run()
    next(b for b in at.sidebar.button if b.label == "Analyse").click().run()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the job's progress opens the result when it is done
        if any(t.value == MARKUP for t in at.text):
            break
        time.sleep(0.3)
        at.run()
    assert not at.exception
    assert any(t.value == MARKUP for t in at.text)  # st.text: shown exactly, never rendered
    assert_no_live_markup(at)
    for page in ("explore", "head_grid", "rollout", "bertviz_views"):
        at.switch_page(str(REPO_ROOT / "pages" / f"{page}.py")).run()
        assert not at.exception, (page, at.exception)
        assert_no_live_markup(at)


@pytest.mark.parametrize("field, value, reason", [
    ("ta_problem", "a\0b", "NUL byte"),
    ("ta_answer", "\x1b[2J", "control character"),
    ("ta_own", "x" * 100_001, "100,001"),
    ("ta_own", "bell \x07", "control character"),
])
def test_bad_thought_anchors_fields_give_a_clear_message(field, value, reason):
    at = app("thought_anchors", ta_source="Your problem")
    at.text_area(key="ta_problem").set_value("How many?").run()
    at.text_area(key="ta_own").set_value("It is \\boxed{9}.").run()
    widget = at.text_input(key=field) if field == "ta_answer" else at.text_area(key=field)
    widget.set_value(value).run()
    next(b for b in at.button if b.label == "Analyse this problem").click().run()
    assert not at.exception, at.exception
    assert reason in messages(at)


@pytest.mark.parametrize("text_b, reason", [("", "empty"), ("a\0b", "NUL byte")])
def test_bad_compare_texts_give_a_clear_message(ids, text_b, reason):
    at = app("compare", a=ids["attention"])
    at.text_area(key="cmp_text_b").set_value(text_b).run()
    at.button(key="cmp_go_texts").click().run()
    for _ in range(3):
        at.run()
    assert not at.exception, at.exception
    assert reason in messages(at)


@pytest.mark.parametrize("params, named", [
    (dict(lc_lengths="abc"), "'lengths' must be comma-separated numbers"),
    (dict(lc_passkey="1e9x"), "'passkey_length' must be a whole number"),
    (dict(lc_depths="0.5,2"), "'depths' must be between 0 and 1"),
])
def test_malformed_probe_settings_in_a_link_are_refused_naming_the_parameter(ids, params,
                                                                             named):
    at = app("long_context_heads", a=ids["attention"], **params)
    assert not at.exception, at.exception
    said = messages(at)
    assert "long_context_heads" in said and named in said, said
