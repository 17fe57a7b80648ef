"""A hand-written lesson link (only `lesson` and `step`) opens the step with its own settings."""

from __future__ import annotations

from pages.lesson_files import read_lessons
from tests.conftest import REPO_ROOT
from tests.pages.test_lessons_page import open_lessons, shown

LESSONS = read_lessons(REPO_ROOT / "lessons")


def _step_with_settings():
    """The first step of the shipped lessons that sets Explore's layer and head."""
    for lesson in LESSONS.lessons:
        for index, step in enumerate(lesson.steps):
            if step.page == "explore" and {"layer", "head"} <= set(step.params):
                return lesson, index
    raise AssertionError("no shipped lesson step sets Explore's layer and head")


def test_a_link_with_only_lesson_and_step_applies_the_steps_settings(service):
    lesson, index = _step_with_settings()
    main, _ = lesson.requests(lesson.steps[index])
    service.run(main, timeout=300)                      # cached, as after preparing the class
    params = lesson.steps[index].params
    at = open_lessons({"lesson": lesson.slug, "step": str(index + 1)})
    assert not at.exception
    assert shown(at, "layer") == params["layer"] and shown(at, "head") == params["head"]
    assert at.query_params["layer"] in (params["layer"], [params["layer"]])


def test_settings_the_link_carries_win_over_the_steps(service):
    lesson, index = _step_with_settings()
    main, _ = lesson.requests(lesson.steps[index])
    service.run(main, timeout=300)
    other = "1" if lesson.steps[index].params["layer"] != "1" else "2"
    at = open_lessons({"lesson": lesson.slug, "step": str(index + 1), "layer": other})
    assert not at.exception
    assert shown(at, "layer") == other
    assert shown(at, "head") == lesson.steps[index].params["head"]
