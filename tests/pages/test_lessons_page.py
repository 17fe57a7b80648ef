"""Lessons in AppTest: precompute the shipped lessons, then every step opens from the cache."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses.long_context import LINK_SETTINGS, ProbeParams
from backend.analyses.params import declared
from pages.lesson_files import read_lessons
from pages.lesson_preparation import precompute
from tests.conftest import REPO_ROOT

LESSONS = read_lessons(REPO_ROOT / "lessons")
STEPS = [(lesson.slug, i) for lesson in LESSONS.lessons for i in range(len(lesson.steps))]
LAUNCHER = "from app import main\nmain()"
PAGE = str(REPO_ROOT / "pages/lessons.py")


@pytest.fixture(scope="module")
def precomputed(service):
    report = precompute(LESSONS, service)
    assert report["failed"] == {}
    return report


def step_params(service, slug: str, index: int, present: bool = False) -> dict[str, str]:
    """What a step's link carries: lesson, step, the view's settings and the analysis ids."""
    lesson = LESSONS.get(slug)
    step = lesson.steps[index]
    main, second = lesson.requests(step)
    params = {"lesson": slug, "step": str(index + 1), **step.params, "a": service.cached(main)}
    if second is not None:
        params["b"] = service.cached(second)
    return {**params, **({"present": "true"} if present else {})}


def shown(at: AppTest, key: str) -> str:
    """A widget's value as its link spells it."""
    for kind in ("slider", "selectbox", "toggle", "button_group", "number_input", "radio"):
        for widget in at.get(kind):
            if widget.key == key:
                if kind == "selectbox":
                    return widget.options[widget.index]
                if kind == "toggle":
                    return "true" if widget.value else "false"
                if kind == "button_group":
                    return widget.value if isinstance(widget.value, str) else widget.value[0]
                return str(widget.value)
    raise KeyError(f"no widget '{key}' on the page")


def open_lessons(params: dict[str, str]) -> AppTest:
    at = AppTest.from_string(LAUNCHER, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    return at.switch_page(PAGE).run()


def test_precompute_again_finds_everything_cached(service, precomputed):
    again = precompute(LESSONS, service)
    assert again["computed"] == 0 and again["failed"] == {}
    assert again["cached"] == precomputed["computed"] + precomputed["cached"]


@pytest.mark.parametrize("slug, index", STEPS, ids=[f"{s}-{i + 1}" for s, i in STEPS])
def test_every_step_opens_from_the_cache_with_its_settings(service, precomputed, slug, index):
    params = step_params(service, slug, index)
    stored = len(service.recent(100_000))
    at = open_lessons(params)
    assert not at.exception
    assert len(at.get("progress")) == 0  # no job running...
    assert len(service.recent(100_000)) == stored  # ...and none ran: all from the cache
    step = LESSONS.get(slug).steps[index]
    assert any(step.title in s.value.replace("\\", "") for s in at.subheader)
    for key, value in step.params.items():
        if key in LINK_SETTINGS:  # a probe setting: the probe shown was computed with it
            name = LINK_SETTINGS[key]
            kind = declared(ProbeParams)[name].base
            probe_id = at.query_params["lc"]
            probe = service.analysis(probe_id[0] if isinstance(probe_id, list) else probe_id)
            used = probe.params[name]
            assert (used if isinstance(used, list) else [used]) == \
                [kind(x) for x in value.split(",")], key
            continue
        # A select's link value is its option label, or its raw value where the label differs.
        raw = next((str(w.value) for w in at.get("selectbox") if w.key == key), None)
        assert value in (shown(at, key), raw), key
    assert not at.error


def test_presenter_mode_hides_controls_and_links_every_step(service, precomputed):
    at = open_lessons(step_params(service, "01-what-attention-is", 1, present=True))
    assert not at.exception
    html = " ".join(str(element.proto) for element in at.get("html"))
    assert "stSidebar" in html and "display: none" in html  # the presenter style sheet
    lesson = LESSONS.get("01-what-attention-is")
    for number in range(1, len(lesson.steps) + 1):
        assert f"step={number}" in html
    assert "layer=15" in html and "present=true" in html  # step 3's own settings, still presenting
    link = at.code[-1].value
    assert "lesson=01-what-attention-is" in link and "layer=13" in link and "head=8" in link


def test_the_gallery_lists_every_lesson(service, precomputed):
    at = open_lessons({})
    assert not at.exception
    titles = " ".join(m.value for m in at.markdown)
    for lesson in LESSONS.lessons:
        assert lesson.title in titles.replace("\\", "")


@pytest.mark.parametrize("params, shown", [
    ({"lesson": "../../etc/passwd"}, "There is no lesson"),
    ({"lesson": "01-what-attention-is", "step": "abc"}, "step 1 of 3"),
    ({"lesson": "01-what-attention-is", "step": "99"}, "step 3 of 3"),
])
def test_malformed_lesson_links_explain_or_fall_back(service, precomputed, params, shown):
    at = open_lessons(params)
    assert not at.exception
    texts = [w.value for w in at.warning] + [c.value for c in at.caption]
    assert any(shown in t for t in texts), texts


def test_the_running_app_prepares_every_lesson(service, precomputed):
    at = open_lessons({})
    next(b for b in at.button if b.label == "Prepare every lesson").click().run()
    deadline = time.monotonic() + 120
    while not at.success and time.monotonic() < deadline:
        time.sleep(0.5)  # the preparation runs on a server thread; its fragment polls
        at.run()
    assert not at.exception
    assert "0 analyses computed" in at.success[0].value  # all precomputed already
