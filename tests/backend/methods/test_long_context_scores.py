"""Long-context head scores against hand computations on tiny inputs with known answers."""

import numpy as np
import pytest
import torch

from backend.errors import InputError
from backend.methods.exact import AttentionRule
from backend.methods.heads.long_context import (FirstKeyMass, first_key_mass, retrieval_scores,
                                                rouge1_recall, sink_shares, streaming_errors,
                                                streaming_scores, trial_retrieval_scores)

PROMPT = np.array([5, 6, 7, 8, 9, 10, 11])
SPAN = (2, 5)  # tokens 7, 8, 9
GENERATED = np.array([7, 8, 9])


def _top(per_head: dict[tuple[int, int], list[int]]) -> np.ndarray:
    top = np.zeros((3, 2, 2), dtype=int)  # (step, layer, head), default: key 0 (outside)
    for (layer, head), keys in per_head.items():
        top[:, layer, head] = keys
    return top


def test_a_head_that_copies_the_needle_scores_one_and_one_that_never_does_zero():
    top = _top({(0, 0): [2, 3, 4],        # copies every needle token
                (1, 0): [3, 4, 2],        # inside the needle, never the generated token
                (1, 1): [2, 3, 6]})       # two of three, then outside the needle
    scores = trial_retrieval_scores(top, GENERATED, PROMPT, SPAN)
    np.testing.assert_allclose(scores, [[1.0, 0.0], [0.0, 2 / 3]])


def test_a_position_copied_twice_counts_twice_as_in_the_papers_code():
    top = _top({(0, 0): [2, 2, 2]})
    generated = np.array([7, 7, 7])
    assert trial_retrieval_scores(top, generated, PROMPT, SPAN)[0, 0] == pytest.approx(1.0)


def test_retrieval_averages_only_trials_that_retrieved_the_needle():
    trials = np.array([[[1.0]], [[0.0]], [[0.5]]])
    assert retrieval_scores(trials, np.array([0.9, 0.2, 0.6]))[0, 0] == pytest.approx(0.75)
    assert np.isnan(retrieval_scores(trials, np.array([0.5, 0.1, 0.0]))).all()  # > 0.5 needed


def test_rouge1_recall_counts_stemmed_reference_words():
    # reference words: the cats ate smoked fish -> "cat" matches "cats" after stemming
    assert rouge1_recall("The cats ate smoked fish", "a cat and fish") == pytest.approx(2 / 5)
    assert rouge1_recall("smoked paprika", "smoked paprika and honey") == pytest.approx(1.0)


def test_streaming_error_is_zero_for_a_sink_head_and_the_hand_value_for_a_far_reader():
    n, sink, recent = 12, 1, 2
    key = torch.eye(n)[None]                       # key j = e_j: logits pick keys
    value = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(0))
    query = torch.zeros(2, n, n)
    query[0, -1, 0] = 60.0                         # head 0 reads the first token
    query[1, -1, 5] = 60.0                         # head 1 reads key 5, 6 tokens back
    rule = AttentionRule(1.0, True)
    errors = streaming_errors(query, key.expand(1, n, n), value, rule, slice(n - 1, n),
                              sink, recent)
    v = value[0].numpy()
    stream = (v[0] + v[10] + v[11]) / 3            # equal logits on the kept keys 0, 10, 11
    expected = np.linalg.norm(stream - v[5]) / np.linalg.norm(v[5])
    assert errors[0] == pytest.approx(0.0, abs=1e-6)
    assert errors[1] == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(streaming_scores([0.0, 0.25, 3.0]), [1.0, 0.75, 0.0])


def test_first_key_mass_by_chunks_equals_the_mean_of_the_first_column():
    rng = np.random.default_rng(1)
    n = 9
    logits = rng.normal(size=(3, n, n))
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    reducer = FirstKeyMass(3, n, "cpu")
    for q0 in range(0, n, 4):  # chunks of 4 queries, every key
        reducer.update(q0, 0, torch.tensor(weights[:, q0:q0 + 4], dtype=torch.float32))
    hand = np.array([sum(weights[h, t, 0] for t in range(n)) / n for h in range(3)])
    np.testing.assert_allclose(reducer.result(), hand, rtol=1e-5)
    np.testing.assert_allclose(first_key_mass(weights), hand, rtol=1e-12)


def test_sink_shares_per_layer_and_model_at_the_chosen_epsilon():
    alpha = np.array([[0.5, 0.1], [0.31, 0.29]])
    per_layer, total = sink_shares(alpha, 0.3)
    np.testing.assert_allclose(per_layer, [0.5, 0.5])
    assert total == 0.5
    assert sink_shares(alpha, 0.05)[1] == 1.0
    assert sink_shares(alpha, 0.6)[1] == 0.0
    with pytest.raises(InputError):
        sink_shares(alpha, 1.5)
