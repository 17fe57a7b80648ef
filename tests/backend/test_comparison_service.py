"""Comparisons through the service on real models: alignment, divergence grids, rollout."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from backend.analyses import AnalysisRequest
from backend.errors import InputError
from pages.examples import COMPARISON_EXAMPLE

BIG, SMALL = COMPARISON_EXAMPLE


@pytest.fixture(scope="module")
def pair(service):
    return tuple(service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=300)
                 for text in (BIG, SMALL))


@pytest.fixture(scope="module")
def encoder(service):
    return service.run(AnalysisRequest.make("attention", "minilm", BIG), timeout=300)


def test_two_texts_on_one_tokenizer_align_token_by_token(service, pair):
    assert service.alignment_levels(*pair) == ["tokens", "words"]
    alignment = service.alignment(*pair, "tokens")
    assert (alignment.a.sum(1) == 1).all() and (alignment.b.sum(1) == 1).all()
    assert alignment.unmatched() == (0, 0) and alignment.changed.sum() == 1
    assert "·big→·small" in alignment.labels


def test_head_divergence_matches_a_hand_computation(service, pair):
    grid = service.head_divergence(*pair, "tokens")
    a, b = service.attention(pair[0]), service.attention(pair[1])  # (layer, head, query, key)
    assert grid.shape == a.shape[:2]
    for layer, head in [(0, 0), (13, 8), (29, 4)]:
        rows = [jensenshannon(a[layer, head, q], b[layer, head, q], base=2) ** 2
                for q in range(a.shape[2])]
        assert grid[layer, head] == pytest.approx(np.mean(rows), abs=1e-6)
    # Causal attention: rows before the changed word are identical, so they add nothing.
    changed = service.alignment(*pair, "tokens").labels.index("·big→·small")
    assert np.allclose(a[:, :, :changed], b[:, :, :changed])


def test_one_analysis_against_itself_diverges_nowhere(service, pair):
    assert np.allclose(service.head_divergence(pair[0], pair[0], "tokens"), 0, atol=1e-7)
    similarity = service.head_similarity(pair[0], 13, 8)
    assert similarity[13, 8] == pytest.approx(0, abs=1e-7)
    assert similarity.max() > 0.1


def test_two_tokenizers_align_by_spans_and_compare_layers(service, pair, encoder):
    assert service.alignment_levels(pair[0], encoder) == ["spans", "words"]
    alignment = service.alignment(pair[0], encoder, "spans")
    assert {"trophy", "suitcase", "it", "big"} <= set(alignment.labels)
    assert alignment.unmatched()[1] >= 1  # [SEP] has no counterpart in SmolLM2
    aligned = service.aligned_matrix(encoder, 2, None, alignment.b)
    assert aligned.shape == (len(alignment.labels),) * 2
    assert (aligned.sum(-1) <= 1 + 1e-5).all()
    layers = service.layer_divergence(pair[0], encoder, "spans")
    assert layers.shape == (30, 6) and (layers >= 0).all() and (layers <= 1).all()
    with pytest.raises(InputError, match="same layers"):
        service.head_divergence(pair[0], encoder, "spans")


def test_aligned_rollout_keeps_rows_stochastic(service, pair):
    alignment = service.alignment(*pair, "words")
    rollout = service.aligned_rollout(pair[0], alignment.a)
    assert np.allclose(rollout.sum(-1), 1, atol=1e-4)  # every SmolLM2 token is in a word
