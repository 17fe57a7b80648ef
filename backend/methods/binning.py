"""Shrink attention matrices for display: mean-pooled bins and head thumbnails."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinnedMatrix:
    """values: (query_bin, key_bin) mean attention. *_edges: token index where each bin starts,
    plus the end, so bin b covers tokens [edges[b], edges[b + 1])."""

    values: np.ndarray
    query_edges: np.ndarray
    key_edges: np.ndarray


def bin_edges(n: int, bins: int) -> np.ndarray:
    """Boundaries of min(n, bins) near-equal contiguous bins over n tokens."""
    return np.linspace(0, n, min(n, bins) + 1).round().astype(int)


def _pool(matrix: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
    sums = np.add.reduceat(matrix, edges[:-1], axis=axis)
    shape = [1] * matrix.ndim
    shape[axis] = -1
    return sums / np.diff(edges).reshape(shape)


def bin_matrix(matrix: np.ndarray, bins: int) -> BinnedMatrix:
    """Mean-pool a (..., query, key) matrix into at most bins x bins blocks.

    Each binned row still averages rows that sum to 1 over keys, so binned rows times the key-bin
    widths sum to 1: mass is preserved, only resolution is lost.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    q_edges = bin_edges(matrix.shape[-2], bins)
    k_edges = bin_edges(matrix.shape[-1], bins)
    pooled = _pool(_pool(matrix, q_edges, matrix.ndim - 2), k_edges, matrix.ndim - 1)
    return BinnedMatrix(pooled, q_edges, k_edges)
