"""The service's views of the long-context format against eager attention of the packaged SmolLM2,
and analyses of the format written before it (a cache file made by the previous code) staying
readable through the same views after the schema migration.

The service here treats inputs over 64 tokens as long (settings.full_matrix_max_tokens), so the
paths long inputs take run on a 300-token text in seconds.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.analyses import AnalysisRequest
from backend.errors import InputError
from backend.memory import BoundedCache
from backend.methods.binning import bin_matrix
from backend.methods.heads import roles
from backend.methods.rollout import attention_rollout, exclude_first_token
from backend.service import AtlasService
from backend.store import blob_tables

OLD_CACHE = Path(__file__).parent / "data" / "cache_schema2.duckdb"
OLD_SMOLLM2 = "53d357ca05832553ccc1069f"  # "The cat sat on the mat. It was warm."
OLD_MINILM = "c4c48bf18ec6e6242633813c"  # "The cat sat on the mat."
BUDGET = 48 << 20


def _text(n_words: int) -> str:
    words = ("the keeper of the lighthouse wrote down every ship that passed and every storm "
             "that came, and years later the notebooks told the story of the coast").split()
    return " ".join(words[i % len(words)] for i in range(n_words)) + "."


@pytest.fixture(scope="module")
def long_service(tmp_path_factory, settings):
    cache = tmp_path_factory.mktemp("long-cache")
    svc = AtlasService(replace(settings, cache_dir=cache, full_matrix_max_tokens=64,
                               memory_budget_bytes=BUDGET))
    yield svc
    svc.worker.shutdown()
    svc.store.close()


@pytest.fixture(scope="module")
def long_run(long_service, smollm2):
    text = _text(260)
    aid = long_service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=600)
    ids = torch.tensor([long_service.analysis(aid).meta["token_ids"]])
    with torch.no_grad():
        eager = smollm2.model(ids, output_attentions=True).attentions
    return aid, np.stack([a[0].numpy() for a in eager])  # (layer, head, query, key)


def test_the_analysis_stores_query_and_key_not_maps(long_service, long_run):
    aid, eager = long_run
    meta = long_service.analysis(aid).meta
    n_layers, n_heads, n, _ = eager.shape
    assert n > 64 and meta["format"] == "qk" and (meta["n_heads"], meta["n_kv_heads"]) == (9, 3)
    names = long_service.array_names(aid)
    assert not any(name.startswith("attention/") for name in names)
    assert long_service.array(aid, "key/000").shape == (3, n, 64)  # key heads once, not 9
    # About 4 bytes x layers x (9 + 3 heads) x T x 64 for float32 query and key, far below maps.
    stored = long_service.store.stored_bytes(aid)
    qk = 4 * n_layers * (9 + 3) * n * 64
    assert qk <= stored < 1.2 * qk < n_layers * n_heads * n * n * 2


def test_windows_rows_columns_and_strongest_keys_equal_eager(long_service, long_run):
    aid, eager = long_run
    n = eager.shape[-1]
    for layer, head in [(0, 0), (17, 4), (29, 8)]:
        np.testing.assert_allclose(
            long_service.attention_matrix(aid, layer, head, slice(100, 228), slice(20, 148)),
            eager[layer, head, 100:228, 20:148], atol=1e-5)
        np.testing.assert_allclose(long_service.attention_row(aid, layer, head, n - 1),
                                   eager[layer, head, n - 1], atol=1e-5)
        np.testing.assert_allclose(long_service.attention_column(aid, layer, head, 7),
                                   eager[layer, head, :, 7], atol=1e-5)
        strongest = long_service.strongest_keys(aid, layer, head, 150, k=5)
        expected = np.argsort(-eager[layer, head, 150], kind="stable")[:5]
        assert [k for k, _ in strongest][:3] == list(expected[:3])
        assert strongest[0][1] == pytest.approx(eager[layer, head, 150].max(), abs=1e-5)
    np.testing.assert_allclose(long_service.attention_row(aid, 12, None, 200),
                               eager[12, :, 200].mean(0), atol=1e-5)


@pytest.mark.parametrize("bins", [64, 24, 128, 200])
def test_overviews_are_block_means_of_eager(long_service, long_run, bins):
    aid, eager = long_run
    for layer, head in [(3, 2), (20, None)]:
        full = eager[layer].mean(0) if head is None else eager[layer, head]
        got = long_service.attention_overview(aid, layer, head, bins)
        qe, ke = got.query_edges, got.key_edges
        assert got.values.shape == (len(qe) - 1, len(ke) - 1) and len(qe) - 1 <= bins
        expected = np.array([[full[qe[i]:qe[i + 1], ke[j]:ke[j + 1]].mean()
                              for j in range(len(ke) - 1)] for i in range(len(qe) - 1)])
        np.testing.assert_allclose(got.values, expected, atol=1e-6)
    window = long_service.attention_overview(aid, 5, 1, 16, slice(150, 290), slice(0, 120))
    assert window.query_edges[0] == 150 and window.key_edges[-1] == 120
    np.testing.assert_allclose(window.values, bin_matrix(eager[5, 1, 150:290, :120], 16).values,
                               atol=1e-6)


def test_thumbnails_and_statistics_come_from_the_capture(long_service, long_run):
    aid, eager = long_run
    thumbnails = long_service.head_thumbnails(aid, 32)
    assert thumbnails.shape == (30, 9, 32, 32)
    stats = long_service.head_statistics(aid)
    np.testing.assert_allclose(stats["entropy"], roles.attention_entropy(eager), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(stats["sink"], roles.first_token_scores(eager), atol=1e-5)
    np.testing.assert_allclose(stats["previous_token"], roles.previous_token_scores(eager),
                               atol=1e-5)
    np.testing.assert_allclose(stats["diagonal"], roles.self_scores(eager), atol=1e-5)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_target_rollout_is_the_row_of_the_full_rollout(long_service, long_run, fusion):
    aid, eager = long_run
    full = attention_rollout(eager, fusion)  # (layer, query, key), the O(T^3) product
    for target in (eager.shape[-1] - 1, 40):
        rows = long_service.target_rollout(aid, target, fusion)
        np.testing.assert_allclose(rows, full[:, target], atol=1e-5)
    np.testing.assert_allclose(long_service.target_rollout(aid, 40, fusion, exclude_first=True),
                               exclude_first_token(full[:, 40]), atol=1e-4)


def test_full_matrices_are_refused_over_the_setting(long_service, long_run):
    aid, _ = long_run
    with pytest.raises(InputError, match="64 tokens.*target_rollout"):
        long_service.rollout(aid)
    with pytest.raises(InputError, match="ATLAS_FULL_MATRIX_TOKENS"):
        long_service.attention_layer(aid, 0)
    with pytest.raises(InputError, match="outside"):
        long_service.attention_row(aid, 0, 0, 10_000)


def test_the_service_stays_within_its_memory_budget(long_service, long_run):
    aid, _ = long_run
    for layer in range(30):
        long_service.attention_row(aid, layer, None, 5)
        assert long_service.memory.bytes_held <= BUDGET


def test_inputs_over_the_limit_say_the_limit_and_how_to_raise_it(long_service, tmp_path,
                                                                 settings):
    svc = AtlasService(replace(settings, cache_dir=tmp_path, max_tokens=50),
                       worker=long_service.worker.__class__(replace(settings, max_tokens=50)))
    try:
        with pytest.raises(InputError, match=r"at most 50\b.*ATLAS_MAX_TOKENS=\d+"):
            svc.run(AnalysisRequest.make("attention", "smollm2", _text(80)), timeout=300)
    finally:
        svc.worker.shutdown()
        svc.store.close()


def test_bounded_cache_evicts_least_recently_used():
    cache = BoundedCache(3000)
    cache.get("a", lambda: np.zeros(1000, np.uint8))
    cache.get("b", lambda: np.zeros(1000, np.uint8))
    cache.get("a", lambda: pytest.fail("a is cached"))
    cache.get("c", lambda: np.zeros(1500, np.uint8))  # evicts b, the least recently used
    assert cache.bytes_held == 2500
    loads = []
    cache.get("b", lambda: loads.append(1) or np.zeros(10, np.uint8))
    assert loads == [1]
    big = cache.get("d", lambda: np.zeros(5000, np.uint8))  # larger than the budget: not kept
    assert big.nbytes == 5000 and cache.bytes_held <= 3000


# --- analyses written before the long-context format ---------------------------------------


@pytest.fixture
def old_cache(tmp_path, settings):
    shutil.copy(OLD_CACHE, tmp_path / "atlas.duckdb")
    svc = AtlasService(replace(settings, cache_dir=tmp_path))
    yield svc
    svc.worker.shutdown()
    svc.store.close()


def test_old_cache_is_migrated_and_its_analyses_read_through_every_view(old_cache):
    assert old_cache.store.schema_version == 4
    with old_cache.store._cursor() as cur:  # every catalogued array has its BLOB, of its size
        for aid, name, nbytes, part in cur.execute("SELECT analysis_id, name, nbytes, part "
                                                   "FROM arrays").fetchall():
            assert cur.execute(f"SELECT octet_length(data) FROM {blob_tables(aid)}_{part} "
                               "WHERE name = ?", [name]).fetchone()[0] == nbytes
    for aid, n_layers, n_heads in [(OLD_SMOLLM2, 30, 9), (OLD_MINILM, 6, 12)]:
        record = old_cache.analysis(aid)
        assert "format" not in record.meta  # written by the previous code
        maps = np.stack([old_cache.store.load_array(aid, f"attention/{layer:03d}")
                         for layer in range(n_layers)]).astype(np.float32)
        n = maps.shape[-1]
        assert maps.shape == (n_layers, n_heads, n, n)
        np.testing.assert_array_equal(old_cache.attention_matrix(aid, 2, 1, slice(1, 6)),
                                      maps[2, 1, 1:6])
        np.testing.assert_array_equal(old_cache.attention_column(aid, 4, 3, 2), maps[4, 3, :, 2])
        np.testing.assert_allclose(old_cache.attention_overview(aid, 1, None, 4).values,
                                   bin_matrix(maps[1].mean(0), 4).values, rtol=1e-5)
        np.testing.assert_allclose(old_cache.head_statistics(aid)["entropy"],
                                   roles.attention_entropy(maps), rtol=1e-4)
        np.testing.assert_allclose(old_cache.target_rollout(aid, n - 1),
                                   attention_rollout(maps)[:, n - 1], atol=1e-6)
        assert old_cache.head_thumbnails(aid, 4).shape == (n_layers, n_heads, 4, 4)


def test_a_new_request_for_an_old_text_is_recomputed_in_the_new_format(old_cache, smollm2):
    aid = old_cache.run(AnalysisRequest.make("attention", "smollm2",
                                             "The cat sat on the mat. It was warm."), timeout=300)
    assert aid != OLD_SMOLLM2 and old_cache.analysis(aid).meta["format"] == "qk"
    ids = torch.tensor([old_cache.analysis(aid).meta["token_ids"]])
    with torch.no_grad():
        eager = smollm2.model(ids, output_attentions=True).attentions
    np.testing.assert_allclose(old_cache.attention_matrix(aid, 9, 2), eager[9][0, 2].numpy(),
                               atol=1e-5)
