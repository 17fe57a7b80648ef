"""The landing page: a chart of the ready example at once, and every view described."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from backend.analyses import AnalysisRequest
from pages.examples import DEFAULT_EXAMPLE, EXAMPLES
from pages.shared import PAGES
from tests.pages.test_pages import app


def test_cold_open_draws_the_examples_attention(service):
    aid = service.run(AnalysisRequest.make("attention", *EXAMPLES[DEFAULT_EXAMPLE]), timeout=300)
    at = app()
    assert not at.exception
    charts = at.get("vega_lite_chart")
    assert len(charts) == 1
    meta = service.analysis(aid).meta
    assert any(f"Layer {meta['n_layers'] // 2}, mean of its heads" in m.value
               for m in at.markdown)
    [dataset] = charts[0].proto.datasets
    cells = pa.ipc.open_stream(dataset.data.data).read_all()
    n = len(meta["tokens"])
    assert cells.num_rows == n * n                    # one cell per (query, key) pair
    weights = np.array(cells.column("weight")).reshape(n, n)
    expected = service.attention_matrix(aid, meta["n_layers"] // 2, None)
    np.testing.assert_allclose(weights, expected, atol=6e-5)  # drawn as stored, 4 decimals


def test_every_view_is_listed_with_what_it_shows():
    at = app()
    table = next(m.value for m in at.markdown if "| View | What it shows |" in m.value)
    rows = {line.split("|")[1].strip().strip("*"): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| **")}
    views = [title for name, (title, _) in PAGES.items() if name != "overview"]
    assert sorted(rows) == sorted(views)
    assert all(len(text) > 40 for text in rows.values())
