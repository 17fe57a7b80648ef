"""The Compare page in AppTest: cold open, shared links, two heads, bad links, user text."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses import AnalysisRequest
from pages.examples import COMPARISON_EXAMPLE
from tests.conftest import REPO_ROOT

LAUNCHER = "from app import main\nmain()"
PAGE = str(REPO_ROOT / "pages/compare.py")


def open_compare(**params) -> AppTest:
    at = AppTest.from_string(LAUNCHER, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    return at.switch_page(PAGE).run()


@pytest.fixture(scope="module")
def pair(service):
    return tuple(service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=300)
                 for text in COMPARISON_EXAMPLE)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_cold_open_compares_the_classic_pair(service, pair):
    at = open_compare()
    deadline = time.monotonic() + 300
    while "b" not in at.query_params and time.monotonic() < deadline:
        time.sleep(1)  # the two analyses compute (or come from the cache) in the worker
        at.run()
    assert not at.exception
    assert (at.query_params["a"], at.query_params["b"]) in [(pair[0], pair[1]),
                                                            ([pair[0]], [pair[1]])]
    assert "Divergence of these maps" in metrics(at)
    assert at.segmented_control(key="cmp_align").value == "tokens"
    assert f"b={pair[1]}" in at.code[-1].value


def test_a_shared_link_restores_both_sides_and_the_controls(service, pair):
    at = open_compare(a=pair[0], b=pair[1], cmp_linked="false", cmp_layer="4",
                      cmp_layer_b="20", cmp_head_b="3", cmp_align="words")
    assert not at.exception
    assert at.toggle(key="cmp_linked").value is False
    assert at.slider(key="cmp_layer").value == 4
    assert (at.slider(key="cmp_layer_b").value, at.selectbox(key="cmp_head_b").value) == (20,
                                                                                        "3")
    assert at.segmented_control(key="cmp_align").value == "words"
    link = at.code[-1].value
    for part in ("cmp_linked=false", "cmp_layer=4", "cmp_layer_b=20", "cmp_head_b=3",
                 "cmp_align=words", f"a={pair[0]}", f"b={pair[1]}"):
        assert part in link


def test_linked_controls_drive_side_b(service, pair):
    at = open_compare(a=pair[0], b=pair[1])
    at.slider(key="cmp_layer").set_value(7).run()
    at.selectbox(key="cmp_head").set_value("5").run()
    assert not at.exception
    assert any("B: layer **7**, head **5**" in m.value for m in at.markdown)


def test_two_heads_of_one_analysis(service, pair):
    at = open_compare(a=pair[0], b=pair[0])
    assert not at.exception
    assert (at.selectbox(key="cmp_head").value, at.selectbox(key="cmp_head_b").value) == ("0",
                                                                                        "1")
    assert float(metrics(at)["Divergence of these maps"].split()[0]) > 0
    assert "Rank correlation of head importance (Spearman)" not in metrics(at)


@pytest.mark.parametrize("b, message", [("../../etc/passwd", "malformed"),
                                        ("0123456789abcdef01234567", "another server")])
def test_bad_second_side_says_why(service, pair, b, message):
    at = open_compare(a=pair[0], b=b)
    assert not at.exception
    assert any(message in e.value for e in [*at.error, *at.warning])


def test_user_text_is_shown_as_text(service):
    texts = ["<script>alert(1)</script> big", "<script>alert(1)</script> small"]
    ids = [service.run(AnalysisRequest.make("attention", "smollm2", t), timeout=300)
           for t in texts]
    at = open_compare(a=ids[0], b=ids[1])
    assert not at.exception
    sides = [m.value for m in at.markdown if m.value.startswith("**A**") or
             m.value.startswith("**B**")]
    assert len(sides) == 2 and all("&lt;script&gt;" in s and "<script>" not in s for s in sides)


def test_two_models_compare_layers_and_importance(service, pair):
    gemma = service.run(AnalysisRequest.make("attention", "gemma3-270m", COMPARISON_EXAMPLE[0]),
                        timeout=600)
    at = open_compare(a=pair[0], b=gemma, cmp_importance="true")
    deadline = time.monotonic() + 300
    while at.get("progress") and time.monotonic() < deadline:
        time.sleep(1)  # head importance of both models, in the worker
        at.run()
    assert not at.exception
    assert at.segmented_control(key="cmp_align").value == "spans"  # two tokenizers, one text
    assert any("layer of A/layer of B" in c.value for c in at.caption)
    assert "Rollout divergence (mean over queries)" in metrics(at)
    # Side B follows A at the same relative depth: 30 layers -> 18.
    assert any("B: layer **9**, head **mean**" in m.value for m in at.markdown)
    assert sum("most important heads" in m.value for m in at.markdown) == 2


def test_side_b_survives_a_page_switch(service, pair):
    at = open_compare(a=pair[0], b=pair[1])
    at.switch_page(str(REPO_ROOT / "pages/explore.py")).run()
    at.switch_page(PAGE).run()
    assert not at.exception
    assert at.query_params["b"] in (pair[1], [pair[1]])
    assert "Divergence of these maps" in metrics(at)


def test_an_unknown_model_is_reported_and_nothing_waits(service, pair):
    at = open_compare(a=pair[0], b=pair[1])
    at.selectbox(key="cmp_model").set_value("other").run()
    at.text_input(key="cmp_model_other").input("no-such-org/no-such-model").run()
    next(b for b in at.button if b.label == "Compare").click().run()
    deadline = time.monotonic() + 60
    while at.get("progress") and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    at.run()
    assert not at.exception and not at.get("progress")
    assert any("no-such-org/no-such-model" in e.value for e in at.error)
    assert at.query_params["b"] in (pair[1], [pair[1]])  # the comparison shown is kept


def test_a_side_that_is_not_attention_is_refused(service, pair):
    importance = service.run(AnalysisRequest.make("head_importance", "smollm2",
                                                  COMPARISON_EXAMPLE[0], method="gradient"),
                             timeout=300)
    at = open_compare(a=pair[0], b=importance)
    assert not at.exception
    assert any("it shows an attention analysis" in w.value for w in at.warning)


def test_unrelated_texts_are_flagged(service):
    ids = [service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=300)
           for text in ("Bananas are yellow.", "The stock market fell sharply on Monday.")]
    at = open_compare(a=ids[0], b=ids[1])
    assert not at.exception
    assert any("share little" in w.value for w in at.warning)
