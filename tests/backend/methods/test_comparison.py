"""Jensen-Shannon divergence and the divergence grids, against hand computations."""

import numpy as np
from scipy.spatial.distance import jensenshannon

from backend.methods.comparison import (jensen_shannon, matching_layer, mean_row_divergence,
                                        spearman)


def test_jensen_shannon_by_hand():
    assert jensen_shannon(np.array([1.0, 0]), np.array([0, 1.0])) == 1.0
    assert jensen_shannon(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0
    # m = (0.75, 0.25); KL(p|m) = 0.5 log2(2/3) + 0.5 log2(2); KL(q|m) = log2(4/3)
    by_hand = (0.5 * np.log2(2 / 3) + 0.5 + np.log2(4 / 3)) / 2
    assert np.isclose(jensen_shannon(np.array([0.5, 0.5]), np.array([1.0, 0])), by_hand)


def test_jensen_shannon_matches_scipy_and_renormalises():
    rng = np.random.default_rng(1)
    p, q = rng.random((5, 9)), rng.random((5, 9))
    expected = [jensenshannon(p[i], q[i], base=2) ** 2 for i in range(5)]
    assert np.allclose(jensen_shannon(p, q), expected)  # rows need not sum to one


def test_mean_row_divergence_points_at_the_changed_head():
    rng = np.random.default_rng(2)
    a = rng.random((3, 4, 6, 6))  # (layer, head, query, key)
    a /= a.sum(-1, keepdims=True)
    b = a.copy()
    b[1, 2] = np.eye(6)[::-1]  # one head now attends elsewhere
    grid = mean_row_divergence(a, b)
    assert grid.shape == (3, 4)
    assert np.unravel_index(grid.argmax(), grid.shape) == (1, 2)
    hand = np.mean([jensenshannon(a[1, 2, q], b[1, 2, q], base=2) ** 2 for q in range(6)])
    assert np.isclose(grid[1, 2], hand)
    assert np.count_nonzero(grid) == 1


def test_rows_without_attention_are_left_out_of_the_mean():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [0.5, 0.5]])
    assert mean_row_divergence(a, b) == 1.0


def test_matching_layer_and_spearman():
    assert [matching_layer(l, 30, 18) for l in (0, 15, 29)] == [0, 9, 17]
    assert spearman(np.arange(6), np.arange(6) ** 2) == 1.0
    assert spearman(np.arange(6), -np.arange(6)) == -1.0
