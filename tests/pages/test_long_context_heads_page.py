"""The long-context heads page driven headless with AppTest on a probe computed beforehand."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses import AnalysisRequest
from backend.analyses.long_context import probe_request
from tests.conftest import REPO_ROOT

TEXT = "The cat sat on the mat because it was warm."
SMALL = {"lengths": [300], "depths": [0.5], "max_new_tokens": 8, "bins": 64,
         "passkey_length": 300, "sink": 8, "recent": 32}  # as in the analyses test: one probe
PAGE = str(REPO_ROOT / "pages/long_context_heads.py")
LAUNCHER = "from app import main\nmain()"


def app(**params) -> AppTest:
    at = AppTest.from_string(LAUNCHER, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    return at.switch_page(PAGE).run()


@pytest.fixture(scope="module")
def ids(service) -> dict[str, str]:
    return {"a": service.run(AnalysisRequest.make("attention", "smollm2", TEXT), timeout=600),
            "lc": service.run(probe_request("smollm2", **SMALL), timeout=600)}


def test_page_shows_shares_grid_scatter_and_a_trial_from_the_cache(service, ids):
    at = app(a=ids["a"], lc=ids["lc"], lc_head="L3H2", lc_eps="0.2")
    assert not at.exception and not at.error
    alpha = service.array(ids["lc"], "sink_alpha")
    streaming = service.array(ids["lc"], "streaming")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["sink heads"] == f"{(alpha > 0.2).mean():.0%}"      # the link's epsilon
    assert metrics["streaming heads"] == f"{(streaming > 0.9).mean():.0%}"
    assert at.selectbox(key="lc_head").value == "L3H2"
    assert any("Layer 3, head 2" in h.value for h in at.subheader)
    table = at.dataframe[-1].value                     # the chosen head's top-1 keys per step
    top = service.array(ids["lc"], "top_keys")[0, :len(table), 3, 2]
    np.testing.assert_array_equal(table["top-1 token position"].to_numpy(), top)
    link = at.code[-1].value
    assert f"lc={ids['lc']}" in link and "lc_head=L3H2" in link and "lc_eps=0.2" in link
    assert at.get("download_button")


def test_picking_another_head_and_score_updates_the_view(ids):
    at = app(a=ids["a"], lc=ids["lc"])
    at.selectbox(key="lc_head").set_value("L10H4").run()
    at.radio(key="lc_score").set_value("sink_alpha").run()
    assert not at.exception and not at.error
    assert any("Layer 10, head 4" in h.value for h in at.subheader)
    assert "lc_score=sink_alpha" in at.code[-1].value


def test_a_malformed_probe_link_says_so(ids):
    at = app(a=ids["a"], lc="not-an-id")
    assert not at.exception
    assert any("malformed" in e.value for e in at.error)
