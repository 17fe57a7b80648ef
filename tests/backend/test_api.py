"""The notebook API: the README's example runs, and its weights equal eager attention's."""

from __future__ import annotations

import re
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import torch

from backend.analyses.heads import ROLES, ImportanceResult, RolesResult
from backend.api import Atlas, AttentionResult
from backend.errors import InputError
from backend.methods.hooks import attention_implementation
from backend.store import Store
from tests.conftest import REPO_ROOT

TEXT = "The trophy did not fit in the suitcase because it was too big."


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    with Atlas(cache_dir=tmp_path_factory.mktemp("notebook-cache"), progress=False) as atlas:
        yield atlas


@pytest.fixture(scope="module")
def result(atlas) -> AttentionResult:
    return atlas.attention("smollm2", TEXT)


def _eager_attention(lm, token_ids) -> tuple[torch.Tensor, ...]:
    """Every layer's (head, query, key) weights from transformers' own eager attention."""
    with attention_implementation(lm.model, "eager"), torch.inference_mode():
        out = lm.model(torch.tensor([token_ids]), output_attentions=True)
    return tuple(a[0].float() for a in out.attentions)


def test_matrix_equals_eager_attention(result, smollm2):
    eager = _eager_attention(smollm2, result.meta["token_ids"])
    assert len(result.tokens) == eager[0].shape[-1]
    assert (result.n_layers, result.n_heads) == (len(eager), eager[0].shape[0])
    for layer, head in [(0, 0), (13, 8), (result.n_layers - 1, 3)]:
        np.testing.assert_allclose(result.matrix(layer, head), eager[layer][head].numpy(),
                                   atol=2e-3)
    np.testing.assert_allclose(result.matrix(13), eager[13].mean(0).numpy(), atol=2e-3)


def test_windows_rows_and_columns_are_slices_of_the_map(result):
    whole = result.matrix(5, 2)
    window = result.matrix(5, 2, query=slice(4, 9), key=slice(1, 6))
    # equal up to float32 products of other shapes summing in another order (a few units of the
    # last place of a logit, which exp turns into a relative error of the weight)
    close = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(window, whole[4:9, 1:6], **close)
    np.testing.assert_allclose(result.row(5, 2, 7), whole[7], **close)
    np.testing.assert_allclose(result.column(5, 2, 3), whole[:, 3], **close)
    np.testing.assert_allclose(whole.sum(-1), 1.0, atol=1e-4)  # causal rows are distributions


def test_last_token_rollout_is_a_distribution_per_layer(result):
    rollout = result.rollout()
    assert rollout.shape == (result.n_layers, len(result.tokens))
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-3)


def test_same_request_is_one_cached_analysis(atlas, result):
    assert atlas.attention("smollm2", TEXT).id == result.id
    assert atlas.load(result.id).tokens == result.tokens


def test_link_opens_the_view_with_its_state(atlas, result):
    url = urlparse(atlas.link(result, view="explore", layer=13, head=8))
    assert url.path == "/explore"
    assert parse_qs(url.query) == {"a": [result.id], "layer": ["13"], "head": ["8"]}
    assert "t=" + result.id in atlas.link(result.id, view="thought_anchors")
    with pytest.raises(InputError, match="Unknown view"):
        atlas.link(result, view="nowhere")


def test_other_kinds_return_their_arrays(atlas):
    roles = atlas.head_roles("smollm2", TEXT)
    assert roles.kind == "head_roles"
    scores = roles["previous_token"]
    assert scores.shape == (30, 9) and np.all((scores >= 0) & (scores <= 1 + 1e-6))
    with pytest.raises(KeyError, match="has no array"):
        roles["no_such_array"]
    with pytest.raises(InputError, match="Unknown analysis kind"):
        atlas.analysis("no_such_kind", "smollm2", TEXT)


def test_results_are_typed_per_kind_and_save_and_load_themselves(atlas, tmp_path):
    importance = atlas.head_importance("smollm2", TEXT)
    assert isinstance(importance, ImportanceResult) and importance.meta["method"] == "gradient"
    assert importance.raw.shape == importance.layer.shape == importance.global_.shape == (30, 9)
    # the "layer" normalisation: every layer of unit L2 norm; "global": min-max to [0, 1]
    np.testing.assert_allclose(np.linalg.norm(importance.layer, axis=1), 1.0, rtol=1e-9)
    assert importance.global_.min() == 0.0 and importance.global_.max() == 1.0
    np.testing.assert_array_equal(importance["global"], importance.global_)  # stored name
    roles = atlas.head_roles("smollm2", TEXT)
    assert isinstance(roles, RolesResult) and "induction" in roles.scores
    assert set(roles.scores) <= set(ROLES)
    copy = Store(tmp_path / "copy.duckdb")
    try:
        importance.save(copy)
        again = ImportanceResult.load(copy, importance.id)
        assert replace(again.record, created=None) == replace(importance.record, created=None)
        for name, array in importance.arrays().items():
            np.testing.assert_array_equal(again[name], array)
    finally:
        copy.close()


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Notebook API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))  # not the app's (or the tests') file
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["result"], AttentionResult)
    namespace["atlas"].close()
