"""Lesson files: the format, its errors, the shipped lessons, and the precompute command."""

from __future__ import annotations

import textwrap

import pytest

from backend.errors import InputError
from pages.lesson_files import VIEW_PAGES, parse_view, read_lesson, read_lessons, step_requests
from pages import view_requests
from pages.shared import PAGES
from tests.conftest import REPO_ROOT

LESSONS = REPO_ROOT / "lessons"

LESSON = """\
---
title: A <b>test</b> lesson
summary: Two steps.
order: 3
model: smollm2
text: The cat sat on the mat.
---
Intro text.

## First step
view: explore?layer=2&head=mean&a=0123456789abcdef01234567
Narrative line one.
Look: the diagonal,
which continues here.

Question: why?
Caveat: attention is not explanation.

## Second step
view: http://host:8501/rollout?depth=3&no_sink=true
Only narrative.
"""


def write(tmp_path, name: str, source: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_a_lesson_file_is_read_into_steps(tmp_path):
    lesson = read_lesson(write(tmp_path, "my-lesson.md", LESSON))
    assert (lesson.slug, lesson.title, lesson.order, lesson.model) == (
        "my-lesson", "A <b>test</b> lesson", 3, "smollm2")
    assert lesson.intro == "Intro text."
    first, second = lesson.steps
    assert (first.title, first.page, first.params) == ("First step", "explore",
                                                        {"layer": "2", "head": "mean"})
    assert first.look == "the diagonal, which continues here."
    assert (first.question, first.caveat) == ("why?", "attention is not explanation.")
    assert first.narrative == "Narrative line one."
    assert (second.page, second.params) == ("rollout", {"depth": "3", "no_sink": "true"})
    assert all(lesson.requests(step)[1] is None for step in lesson.steps)


@pytest.mark.parametrize("source, message", [
    ("no header\n## Step\nview: explore\n", "no header"),
    ("---\ntitle: [unclosed\n---\n## Step\nview: explore\n", "not valid YAML"),
    ("---\ntitle: T\nmodel: smollm2\n---\n## Step\nview: explore\n", "needs text"),
    ("---\ntitle: T\nmodel: m\ntext: t\n---\nNo steps.\n", "no steps"),
    ("---\ntitle: T\nmodel: m\ntext: t\n---\n## Step\nJust words.\n", "no 'view:' line"),
    ("---\ntitle: T\nmodel: m\ntext: t\n---\n## Step\nview: ../../etc/passwd\n", "shows 'passwd'"),
    ("---\njust a sentence\n---\n## Step\nview: explore\n", "'name: value' lines"),
    ("---\ntitle: T\nmodel: m\ntext: t\norder: first\n---\n## S\nview: explore\n", "whole number"),
])
def test_bad_lesson_files_say_why_and_do_not_hide_the_others(tmp_path, source, message):
    write(tmp_path, "bad.md", source)
    write(tmp_path, "good.md", LESSON)
    found = read_lessons(tmp_path)
    assert [lesson.slug for lesson in found.lessons] == ["good"]
    assert message in found.errors["bad.md"]
    with pytest.raises(InputError, match="bad.md"):
        read_lesson(tmp_path / "bad.md")


def test_a_file_that_is_not_text_is_reported(tmp_path):
    (tmp_path / "binary.md").write_bytes(b"---\ntitle: \xff\xfe\n---\n")
    assert "not UTF-8" in read_lessons(tmp_path).errors["binary.md"]


def test_lessons_name_only_pages_the_app_has():
    assert set(VIEW_PAGES) <= set(PAGES)


def test_parse_view_accepts_a_copied_link_and_drops_analysis_ids():
    assert parse_view("https://atlas.example/compare?a=x&b=y&cmp_layer=3") == (
        "compare", {"cmp_layer": "3"})
    assert parse_view("head_grid") == ("head_grid", {})


def test_the_shipped_lessons_cover_the_classroom_topics():
    found = read_lessons(LESSONS)
    assert found.errors == {}
    assert len(found.lessons) >= 6
    pages = {step.page for lesson in found.lessons for step in lesson.steps}
    assert {"explore", "head_grid", "head_importance", "rollout", "thought_anchors",
            "compare"} <= pages
    scores = {step.params.get("hi_score") for lesson in found.lessons for step in lesson.steps}
    assert {"previous_token", "induction", "first_token", "gradient"} <= scores
    caveats = " ".join(step.caveat for lesson in found.lessons for step in lesson.steps)
    for caveat in ("not explanations", "residual stream", "sink token absorbs attention"):
        assert caveat in caveats
    for lesson in found.lessons:
        assert lesson.summary and all(step.narrative for step in lesson.steps)
        assert any(step.question for step in lesson.steps)
        assert any(step.caveat for step in lesson.steps)


def test_step_requests_follow_the_pages_defaults(service):
    lesson = read_lessons(LESSONS).get("03-raw-rollout-flow")
    main = lesson.requests(lesson.steps[0])[0]
    n_tokens = len(service.analysis(service.run(main, timeout=300)).meta["tokens"])
    requests = [(r.kind, dict(r.params)) for r in step_requests(lesson, lesson.steps[0], service)]
    assert requests == [("attention", {}), ("attention_flow", {"head_fusion": "mean"}),
                        ("gradient_rollout", {"target": n_tokens - 1})]  # last token: causal


def test_step_requests_use_the_page_defaults_for_values_its_widgets_refuse(service):
    lesson = read_lessons(LESSONS).get("03-raw-rollout-flow")
    step = lesson.steps[0]
    odd = type(step)(step.title, "rollout", {"target": "5", "fusion": "median"}, "")
    main = lesson.requests(step)[0]
    n_tokens = len(service.analysis(service.run(main, timeout=300)).meta["tokens"])
    requests = {r.kind: dict(r.params) for r in step_requests(lesson, odd, service)}
    # "5" is not how the target widget spells a token ("5 ·the"): the page uses its default.
    assert requests["gradient_rollout"] == {"target": n_tokens - 1}
    assert requests["attention_flow"] == {"head_fusion": "mean"}


def test_every_view_but_the_lessons_has_a_requests_function():
    assert set(view_requests.REQUESTS) == set(PAGES) - {"lessons"}


def test_head_importance_step_requests_follow_the_pages_defaults(service):
    lesson = read_lessons(LESSONS).get("04-which-heads-matter")
    step = lesson.steps[0]
    service.run(lesson.requests(step)[0], timeout=300)

    def requested(**params):
        odd = type(step)(step.title, "head_importance", params, "")
        return [(r.kind, dict(r.params)) for r in step_requests(lesson, odd, service)][1:]

    # A role colours the grid from head_roles: no importance job; pruning by the first method.
    assert requested(hi_score="induction") == [
        ("head_roles", {}), ("pruning_curve", {"method": "gradient", "recompute": False})]
    # A score the selectbox does not offer falls back to its first entry, as on the page.
    assert requested(hi_score="bogus", hi_prune="ablation", hi_recompute="true") == [
        ("head_importance", {"method": "gradient"}), ("head_roles", {}),
        ("pruning_curve", {"method": "ablation", "recompute": True})]
