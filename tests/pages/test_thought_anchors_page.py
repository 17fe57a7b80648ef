"""The Thought Anchors page driven headless with AppTest on the session's real service: the
shipped published trace, own problems and traces, both answers, math in traces."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from urllib.parse import parse_qsl, urlsplit

import pytest

from backend.analyses import AnalysisRequest
from pages import view_requests, view_state
from tests.conftest import REPO_ROOT, SHARED_FIXTURES
from tests.pages.test_pages import app

PAGE = "pages/thought_anchors.py"
SHIPPED = REPO_ROOT / "backend" / "data" / "thought_anchors" / "deepseek-r1-distill-qwen-14b" \
    / "problem_2238"
PUBLISHED = SHARED_FIXTURES / "thought_anchors" / "deepseek-r1-distill-qwen-14b" \
    / "correct_base_solution" / "problem_2238"
PROBLEM = "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?"
# A trace whose own answer (74) is not the reference (9).
WRONG = ("Three pencils cost $1, so one pencil costs 1/3 dollar. Then 27 pencils cost 27 + 47 "
         "dollars. So the answer is \\boxed{74}.")


def sentences_shown(at) -> str:
    """The markdown of the sentence list."""
    return next(m.value for m in at.markdown if m.value.startswith('<div style="font-size'))


def as_read(markdown: str) -> str:
    """What a reader sees of inert markdown text: backslash escapes and entities undone."""
    text = re.sub(r"\\(.)", r"\1", markdown)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def own_trace(service, solution: str, answer: str = "9") -> str:
    return service.run(AnalysisRequest.make("ta_trace", "smollm2", solution, problem=PROBLEM,
                                            answer=answer))


def test_the_page_opens_on_the_shipped_published_trace(service):
    at = app(PAGE)
    assert not at.exception and not at.error
    record = service.analysis(at.query_params["t"])
    labeled = json.loads((SHIPPED / "chunks_labeled.json").read_text())
    assert record.kind == "ta_published" and record.meta["chunks"] == [c["chunk"]
                                                                       for c in labeled]
    # Real anchors at once: the published counterfactual importance colours the sentences.
    assert at.selectbox(key="ta_metric").value == "counterfactual_importance_kl"
    anchor = max(labeled, key=lambda c: c["counterfactual_importance_kl"])
    assert anchor["counterfactual_importance_kl"] > 0.5
    assert f"{anchor['counterfactual_importance_kl']:+.3f}" in sentences_shown(at)
    assert set(at.selectbox(key="ta_matrix").options) == {"Counterfactual (published)",
                                                         "Suppression (published)"}
    shown = " ".join(m.value for m in at.markdown)
    assert "coefficient of $a^2b^2$" in shown and "MIT" in shown
    # Both answers of the published files, labelled.
    problem = json.loads((SHIPPED / "problem.json").read_text())
    base = json.loads((SHIPPED / "base_solution.json").read_text())
    assert f"**Answer in the trace:** {base['answer']}" in shown
    assert f"**Reference answer:** {problem['gt_answer']}" in shown
    # The model writing its own trace stays the second option.
    assert at.get("button_group")[0].proto.options[1].content == "Worked example"


def test_the_shipped_trace_is_the_published_one_with_its_licence():
    licence = (SHIPPED.parent.parent / "LICENSE.md").read_text()
    assert licence.startswith("MIT License") and "interp-reasoning" in licence
    readme = (SHIPPED.parent.parent / "README.md").read_text()
    assert "Bogdan" in readme and "arXiv:2506.19143" in readme and "LICENSE.md" in readme
    if not PUBLISHED.is_dir():
        pytest.skip(f"published fixtures not found at {PUBLISHED}")
    for path in PUBLISHED.glob("*.json"):
        assert (SHIPPED / path.name).read_bytes() == path.read_bytes(), path.name


def test_latex_in_a_trace_renders_as_math(service):
    at = app(PAGE)
    shown = sentences_shown(at)
    # \( \) and bare \boxed{} become KaTeX's $...$; no raw delimiter is left.
    assert "$a^2b^2$" in shown and "$\\boxed{120}$" in shown
    assert "\\(a^2b^2\\)" not in shown and "\\boxed{120}." not in shown
    assert "$(a + b)^4 \\left(c + \\dfrac{1}{c}\\right)^6$" in shown


def test_markup_and_html_in_a_trace_stay_text(service):
    trace = own_trace(service, "First <script>alert(1)</script> **bold** [x](http://e) step. "
                               "Then $<img src=x onerror=alert(1)>$ and $2 or $3 cost \\boxed{9}.")
    at = app(PAGE, t=trace)
    assert not at.exception
    shown = sentences_shown(at)
    assert "<script" not in shown and "<img" not in shown and "**bold**" not in shown
    assert "&lt;script&gt;" in shown and "\\lt img" in shown
    assert "First <script>alert(1)</script> **bold** [x](http://e) step." in as_read(shown)
    assert "\\$2 or \\$3" in shown  # prices stay prices


def test_both_answers_are_shown_and_labelled(service):
    at = app(PAGE, t=own_trace(service, WRONG))
    shown = " ".join(m.value for m in at.markdown)
    assert "**Answer in the trace:** 74 · **Reference answer:** 9 (they differ)" in shown
    assert not at.warning  # a trace with an answer is not called too small


def test_a_trace_without_an_answer_says_the_model_may_be_too_small(service):
    at = app(PAGE, t=own_trace(service, "A: A: A: A: A: A. A: A: A: A: A: A. A: A: A: A."))
    assert any("too small to reason" in w.value for w in at.warning)
    assert "**Answer in the trace:** none" in " ".join(m.value for m in at.markdown)


def _your_problem(problem: str, answer: str, own: str = ""):
    at = app(PAGE, ta_source="Your problem")
    at.text_area(key="ta_problem").input(problem)
    at.text_input(key="ta_answer").input(answer)
    at.text_area(key="ta_own").input(own)
    next(b for b in at.button if b.label == "Analyse this problem").click().run()
    return at


def test_one_click_opens_an_own_trace_after_its_job(service):
    at = _your_problem(PROBLEM, "9", WRONG)
    trace = own_trace(service, WRONG)  # waits for the job the click started
    at.run()  # what the progress bar's end does: rerun, without another click
    assert at.query_params.get("t") == trace
    assert any("27 + 47" in as_read(m.value) for m in at.markdown)


def test_one_click_opens_a_trace_the_model_writes(service):
    at = _your_problem("What is 2 + 3?", "5")
    generated = service.run(AnalysisRequest.make("ta_generate", "smollm2", "What is 2 + 3?"))
    at.run()  # the generation finished: the page goes on to split it
    solution = service.analysis(generated).meta["solution"]
    trace = service.run(AnalysisRequest.make("ta_trace", "smollm2", solution,
                                             problem="What is 2 + 3?", answer="5"))
    at.run()
    assert at.query_params.get("t") == trace
    answers = service.trace_answers(trace)
    small = answers["degenerate"] or not answers["trace"]
    assert any("too small to reason" in w.value for w in at.warning) == small


def test_the_lesson_quotes_what_the_page_shows_of_the_trace(service):
    lesson = (REPO_ROOT / "lessons" / "05-reasoning-steps.md").read_text()
    labeled = json.loads((SHIPPED / "chunks_labeled.json").read_text())
    ranked = sorted(range(len(labeled)), key=lambda i: -labeled[i]["counterfactual_importance_kl"])
    quoted = re.findall(r"sentence (\d+) \(([+-]\d\.\d{3})\)", lesson)
    assert [int(i) for i, _ in quoted] == ranked[:2]  # "the strongest anchor", "next"
    for i, value in quoted:
        assert f"{labeled[int(i)]['counterfactual_importance_kl']:+.3f}" == value
    assert f"in {len(labeled)} sentences" in lesson
    at = app(PAGE)
    at.selectbox(key="ta_s").set_value(ranked[0]).run()
    shown = " ".join(m.value for m in at.markdown)
    resampled, kept = (labeled[ranked[0]]["accuracy"], labeled[ranked[0] + 1]["accuracy"])
    assert f"(with the sentence resampled): {resampled:.2f}" in shown
    assert f"(kept): {kept:.2f}" in shown
    assert f"reach the right answer {resampled:.2f} of the time, rollouts that keep it " \
        f"{kept:.2f}" in " ".join(lesson.split())


def _wait_for(at, ready, timeout: float = 600):
    """Rerun the page (as its progress bar does) until `ready(at)` or the timeout."""
    import time

    deadline = time.monotonic() + timeout
    while not ready(at):
        assert time.monotonic() < deadline, "the page's job did not finish"
        time.sleep(2)
        at.run()
    return at


def test_resampling_by_engine_name_with_its_cost_on_chosen_sentences_then_more(service):
    trace = own_trace(service, WRONG)
    at = app(PAGE, t=trace)
    engines = service.rollout_engines()
    assert at.selectbox(key="ta_engine").options == [e["label"] for e in engines]
    assert not any("url" in w.label.lower() for w in at.text_input)  # a name, never a URL
    captions = " ".join(c.value for c in at.caption)
    if engines[0]["noisy"]:
        assert "noisy" in captions
    assert all(f in captions for f in ("100 rollouts", "0.6", "0.95", "16,384"))
    at.number_input(key="ta_r").set_value(1)
    at.number_input(key="ta_tokens").set_value(16)
    at.segmented_control(key="ta_which").set_value("Chosen").run()
    at.multiselect(key="ta_chunks").set_value([0]).run()
    cost = next(m.value for m in at.markdown if m.value.startswith("**Expected cost:**"))
    # Sentence 0's importance compares it with sentence 1: both are resampled.
    assert "1 rollouts × 2 sentences = 2 rollouts" in cost
    at.toggle(key="ta_resample").set_value(True).run()
    more = "Add 1 more rollouts per sentence"
    _wait_for(at, lambda at: any(b.label == more for b in at.button))
    assert "counterfactual_importance_kl" in at.selectbox(key="ta_metric").options
    next(b for b in at.button if b.label == more).click().run()
    assert at.number_input(key="ta_r").value == 2
    cost = next(m.value for m in at.markdown if m.value.startswith("**Expected cost:**"))
    # The saved rollouts are kept: only the new ones are to sample.
    total = int(re.search(r"of these (\d+) saved", cost).group(1))
    assert "2 rollouts × 2 sentences = 4 rollouts" in cost
    assert f"{total // 2} of these {total} saved already, {total // 2} to sample" in cost


def test_a_link_with_chosen_sentences_reopens_that_selection(service):
    trace = own_trace(service, WRONG)
    n = len(service.analysis(trace).meta["chunks"])
    assert n >= 3
    at = app(PAGE, t=trace, ta_which="Chosen", ta_chunks=f"{n - 1},0", ta_r="1")
    assert not at.exception
    assert at.segmented_control(key="ta_which").value == "Chosen"
    assert at.multiselect(key="ta_chunks").value == [0, n - 1]
    cost = next(m.value for m in at.markdown if m.value.startswith("**Expected cost:**"))
    # Sentence 0 is compared with sentence 1, the last with none: three sentences resampled.
    assert "1 rollouts × 3 sentences = 3 rollouts" in cost
    # The page's own link carries the selection again, as the view state reads it.
    query = dict(parse_qsl(urlsplit(at.code[-1].value).query))
    assert query["ta_chunks"] == f"0,{n - 1}"
    state = view_state.parse("thought_anchors", query)
    assert state.ta_chunks == (0, n - 1) and state.ta_which == "Chosen"
    # What the view asks for with the resampling on: those sentences (a lesson's and the
    # precompute command's request too).
    asked = [r for r in view_requests.thought_anchors(replace(state, ta_resample=True), service)
             if r.kind == "ta_resampling"]
    assert [list(r.params["chunks"]) for r in asked] == [[0, n - 1]]
