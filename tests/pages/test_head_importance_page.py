"""The head importance page driven headless with AppTest, on results computed beforehand (AppTest
does not wait for jobs: what it sees must be cached)."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses import AnalysisRequest
from tests.conftest import REPO_ROOT

TEXT = "The cat sat on the mat because it was warm."
PAIR = "A man is playing a guitar. Someone plays an instrument on stage."
PAGE = str(REPO_ROOT / "pages/head_importance.py")
LAUNCHER = "from app import main\nmain()"


def app(**params) -> AppTest:
    """The app opened on the head importance page with these query parameters."""
    at = AppTest.from_string(LAUNCHER, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    return at.switch_page(PAGE).run()


def precompute(service, model: str, text: str) -> dict[str, str]:
    """Every analysis the page opens with by default, by kind."""
    requests = {"attention": {}, "head_roles": {}, "head_importance": {"method": "gradient"},
                "pruning_curve": {"method": "gradient", "recompute": False}}
    return {kind: service.run(AnalysisRequest.make(kind, model, text, **params), timeout=600)
            for kind, params in requests.items()}


@pytest.fixture(scope="module")
def ids(service) -> dict[str, str]:
    return precompute(service, "smollm2", TEXT)


def ranking(at: AppTest):
    return next(d.value for d in at.dataframe if "id" in d.value.columns)


def link(at: AppTest) -> str:
    return at.code[-1].value


def label_of_max(scores: np.ndarray) -> str:
    layer, head = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    return f"L{layer}H{head}"


def test_page_shows_scores_ranking_and_pruning_from_the_cache(service, ids):
    at = app(a=ids["attention"])
    assert not at.exception and not at.error
    assert at.selectbox(key="hi_score").value == "gradient"
    assert not at.get("progress")                       # everything was cached
    shown = ranking(at)
    importance = service.array(ids["head_importance"], "layer")
    assert len(shown) == importance.size
    assert shown["id"].iloc[0] == label_of_max(importance)
    assert list(shown.columns[:3]) == ["rank", "id", "gradient importance, layer-normalised"]
    np.testing.assert_allclose(shown.iloc[:, 2], np.sort(importance.ravel())[::-1])
    assert any(s.value == "Pruning curve" for s in at.subheader)
    assert len(at.get("vega_lite_chart")) >= 2            # the grid and the pruning curve
    assert f"a={ids['attention']}" in link(at) and "hi_score=gradient" in link(at)
    assert at.get("download_button")


def test_picking_a_head_shows_its_map_roles_and_top_pairs(service, ids):
    at = app(a=ids["attention"])
    at.selectbox(key="hi_head").set_value("L3H2").run()
    assert not at.exception and not at.error
    assert any(s.value == "Layer 3, head 2" for s in at.subheader)
    roles = next(d.value for d in at.dataframe if "role" in d.value.columns)
    for _, row in roles.iterrows():
        assert row["score"] == pytest.approx(float(service.array(ids["head_roles"],
                                                                 row["role"])[3, 2]), abs=1e-6)
    matrix = service.attention_matrix(ids["attention"], 3, 2)

    def pairs():
        return next(d.value for d in at.dataframe if "weight" in d.value.columns)

    assert len(pairs()) == 10
    assert pairs()["weight"].iloc[0] == pytest.approx(matrix.max(), abs=1e-6)
    at.toggle(key="hi_skip_first").set_value(True).run()
    assert not any(p.startswith("0 ") for p in list(pairs()["query"]) + list(pairs()["key"]))
    assert pairs()["weight"].iloc[0] == pytest.approx(matrix[1:, 1:].max(), abs=1e-6)
    assert "hi_head=L3H2" in link(at) and "hi_skip_first=true" in link(at)


def test_a_role_score_colours_and_ranks_the_heads(service, ids):
    at = app(a=ids["attention"])
    at.selectbox(key="hi_score").set_value("induction").run()
    assert not at.exception and not at.error
    assert at.segmented_control(key="hi_norm").disabled          # roles are not normalised
    induction = service.array(ids["head_roles"], "induction")
    assert ranking(at)["id"].iloc[0] == label_of_max(induction)
    assert "hi_score=induction" in link(at)


def test_a_link_opens_its_view_and_new_work_shows_progress(service, ids):
    at = app(a=ids["attention"], hi_score="entropy", hi_norm="global", hi_head="L5H1")
    assert at.selectbox(key="hi_score").value == "entropy"
    assert at.selectbox(key="hi_head").value == "L5H1"
    assert at.segmented_control(key="hi_norm").value == "global"
    entropy = service.run(AnalysisRequest.make("head_importance", "smollm2", TEXT,
                                               method="entropy"), timeout=600)
    at.run()
    assert not at.exception and not at.error and not at.get("progress")
    assert ranking(at)["id"].iloc[0] == label_of_max(service.array(entropy, "global"))
    assert "hi_norm=global" in link(at) and "hi_head=L5H1" in link(at)


def test_encoder_page_says_what_its_loss_is(service):
    encoder = precompute(service, "minilm", PAIR)
    at = app(a=encoder["attention"])
    assert not at.exception and not at.error
    assert any("cosine similarity of the text's two halves" in i.value for i in at.info)
    assert any("similarity" in c.value for c in at.caption)
