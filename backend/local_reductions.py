"""Reductions of arrays a view already holds: pure numpy, computed where they are called.

AtlasService and the worker service's client (backend.serving.client) both have them, so a page
calls them the same way in-process or against a remote worker, and they never cross the network.
"""

from __future__ import annotations

import numpy as np

from backend.methods.binning import BinnedMatrix, bin_matrix
from backend.methods.comparison import matching_layer, mean_row_divergence, spearman
from backend.methods.rollout import exclude_first_token
from backend.methods.thought_anchors.graph import incoming, top_links


class LocalReductions:
    @staticmethod
    def bin(matrix: np.ndarray, bins: int) -> BinnedMatrix:
        """Any (query, key) matrix pooled for an overview (see attention_overview)."""
        return bin_matrix(matrix, bins)

    @staticmethod
    def without_first_token(scores: np.ndarray) -> np.ndarray:
        """(..., key) scores without key 0, renormalised to sum 1 (attention-sink view)."""
        return exclude_first_token(scores)

    @staticmethod
    def top_links(matrix: np.ndarray, per_source: int) -> list[tuple[int, int, float]]:
        """Strongest links of a (source, target) sentence matrix (see methods.thought_anchors)."""
        return top_links(matrix, per_source)

    @staticmethod
    def strongest_links(matrix: np.ndarray, sentence: int, direction: str,
                        limit: int) -> list[tuple[int, float]]:
        """(other sentence, value) linked to `sentence`: "incoming" (what affects it) or
        "outgoing" (what it affects), strongest first."""
        return incoming(matrix if direction == "incoming" else matrix.T, sentence, limit)

    @staticmethod
    def divergence(a: np.ndarray, b: np.ndarray) -> float:
        """Mean Jensen-Shannon divergence (bits) between the rows of two aligned maps."""
        return float(mean_row_divergence(a, b))

    @staticmethod
    def matching_layer(layer: int, n_layers: int, n_layers_other: int) -> int:
        """The other model's layer at the same relative depth."""
        return matching_layer(layer, n_layers, n_layers_other)

    @staticmethod
    def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
        """Spearman correlation of two score arrays (e.g. head importance of two inputs)."""
        return spearman(a, b)

    @staticmethod
    def top_cells(values: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        """The k largest cells of a (row, column) grid: (row, column, value), largest first."""
        order = np.argsort(values, axis=None)[::-1][:k]
        return [(int(r), int(c), float(values[r, c]))
                for r, c in zip(*np.unravel_index(order, values.shape))]
