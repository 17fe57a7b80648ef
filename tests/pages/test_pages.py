"""The pages driven headless with AppTest, on the session's real service and cache."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from pages.examples import DEFAULT_EXAMPLE, EXAMPLES
from backend.analyses import AnalysisRequest
from tests.conftest import REPO_ROOT

XSS = "<script>alert(1)</script> **bold** [link](http://x)"


@pytest.fixture(scope="module")
def default_id(service):
    return service.run(AnalysisRequest.make("attention", *EXAMPLES[DEFAULT_EXAMPLE]), timeout=300)


# Run app.py from a script outside the repository: next to a `pages/` folder AppTest falls back
# to Streamlit's legacy pages-folder mode and reruns page files without app.py.
LAUNCHER = "from app import main\nmain()"


def app(page: str | None = None, **params) -> AppTest:
    at = AppTest.from_string(LAUNCHER, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    if page:
        at.switch_page(str(REPO_ROOT / page)).run()
    return at


def analyse_button(at: AppTest):
    return next(b for b in at.sidebar.button if b.label == "Analyse")


def test_cold_open_shows_the_default_example(default_id):
    at = app()
    assert not at.exception
    assert at.query_params["a"] == [default_id] or at.query_params["a"] == default_id
    assert at.text[0].value == EXAMPLES[DEFAULT_EXAMPLE][1]
    assert [m.label for m in at.metric][:1] == ["Tokens"]
    assert any(m.value == "**Model:** SmolLM2\\-135M\\-Instruct" for m in at.markdown)


def test_explore_layer_and_head_controls(service, default_id):
    at = app("pages/explore.py", a=default_id)
    assert not at.exception
    meta = service.analysis(default_id).meta
    layer = at.slider(key="layer")
    assert layer.max == meta["n_layers"] - 1
    layer.set_value(3).run()
    at.selectbox(key="head").set_value("2").run()
    assert not at.exception
    assert at.slider(key="layer").value == 3 and at.selectbox(key="head").value == "2"
    link = at.code[-1].value
    assert f"a={default_id}" in link and "layer=3" in link and "head=2" in link


def test_explore_token_view(default_id):
    at = app("pages/explore.py", a=default_id)
    at.selectbox(key="token").set_value(4).run()
    assert not at.exception
    assert "token=4" in at.code[-1].value


def test_head_grid_and_bertviz_pages_render(default_id):
    for page in ("pages/head_grid.py", "pages/bertviz_views.py"):
        at = app(page, a=default_id)
        assert not at.exception, page
        assert not at.error, page


def test_malformed_link_gives_a_clear_message():
    at = app("pages/explore.py", a="../../etc/passwd")
    assert any("malformed" in e.value for e in at.error)


def test_unknown_analysis_gives_a_clear_message():
    at = app("pages/explore.py", a="0" * 24)
    assert any("No analysis" in w.value for w in at.warning)


def test_bad_model_and_empty_text_are_reported_in_the_ui(default_id):
    at = app(a=default_id)
    at.selectbox(key="model_choice").set_value("other").run()
    at.text_input(key="other_model").input("/etc").run()
    analyse_button(at).click().run()
    assert any("not a hub id" in e.value or "model folders" in e.value for e in at.error)
    at.selectbox(key="model_choice").set_value("smollm2").run()
    at.text_area(key="text").input("   ").run()
    analyse_button(at).click().run()
    assert any("empty" in e.value for e in at.error)


def test_user_markup_renders_as_text(service):
    aid = service.run(AnalysisRequest.make("attention", "smollm2", XSS), timeout=300)
    at = app(a=aid)
    assert any(t.value == XSS for t in at.text)  # st.text: shown verbatim, never interpreted
    assert not at.exception


def test_rollout_page_shows_the_four_methods(service, default_id):
    record = service.analysis(default_id)
    last = len(record.meta["tokens"]) - 1
    for kind, params in (("attention_flow", {"head_fusion": "mean"}),
                         ("gradient_rollout", {"target": last})):
        service.run(AnalysisRequest.make(kind, record.model, record.text, **params), timeout=300)
    at = app("pages/rollout.py", a=default_id)
    assert not at.exception and not at.error
    assert at.selectbox(key="target").value == last  # causal LM: the last token by default
    shown = " ".join(str(h.proto.body) for h in at.get("html"))
    for title in ("Raw attention (last layer)", "Rollout (after layer 30)", "Flow",
                  "Gradient-weighted rollout"):
        assert title in shown
    at.toggle(key="no_sink").set_value(True).run()
    assert "first token excluded" in at.subheader[0].value
    assert "no_sink=true" in at.code[-1].value


def test_thought_anchors_page_on_an_own_trace(service):
    from tests.backend.test_thought_anchors_analyses import PROBLEM, SOLUTION

    base = dict(problem=PROBLEM, answer="9")
    trace = service.run(AnalysisRequest.make("ta_trace", "smollm2", SOLUTION, **base))
    service.run(AnalysisRequest.make("ta_receivers", "smollm2", SOLUTION, **base))
    at = app("pages/thought_anchors.py", t=trace)
    assert not at.exception and not at.error
    assert at.selectbox(key="ta_metric").value == "receiver_score"
    shown = " ".join(m.value for m in at.markdown)  # markdown, so that its math renders
    assert "Then 27 pencils cost 27/3 = 9 dollars\\." in shown
    assert at.selectbox(key="ta_matrix").value == "Attention (receiver heads)"
    at.selectbox(key="ta_s").set_value(1).run()
    assert at.subheader[0].value == "Sentence 1"
    assert f"t={trace}" in at.code[-1].value and "ta_s=1" in at.code[-1].value


def test_thought_anchors_page_with_an_unknown_trace():
    at = app("pages/thought_anchors.py", t="f" * 24)
    assert any("No analysis" in w.value for w in at.warning)
