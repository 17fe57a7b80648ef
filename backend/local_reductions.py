"""Reductions of arrays a view already holds: pure numpy, computed where they are called.

Pages import them from here (they may not import backend.methods), so they run in the app's
process whether its service is in-process or the worker service's client, and never cross the
network.
"""

from __future__ import annotations

import numpy as np

from backend.methods.binning import BinnedMatrix, bin_matrix
from backend.methods.comparison import matching_layer, mean_row_divergence, spearman
from backend.methods.rollout import exclude_first_token
from backend.methods.thought_anchors.graph import incoming, top_links

__all__ = ["BinnedMatrix", "bin_matrix", "divergence", "exclude_first_token", "matching_layer",
           "spearman", "strongest_links", "top_cells", "top_links"]


def strongest_links(matrix: np.ndarray, sentence: int, direction: str,
                    limit: int) -> list[tuple[int, float]]:
    """(other sentence, value) linked to `sentence` in a (source, target) sentence matrix:
    "incoming" (what affects it) or "outgoing" (what it affects), strongest first."""
    return incoming(matrix if direction == "incoming" else matrix.T, sentence, limit)


def divergence(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Jensen-Shannon divergence (bits) between the rows of two aligned maps."""
    return float(mean_row_divergence(a, b))


def top_cells(values: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The k largest cells of a (row, column) grid: (row, column, value), largest first."""
    order = np.argsort(values, axis=None)[::-1][:k]
    return [(int(r), int(c), float(values[r, c]))
            for r, c in zip(*np.unravel_index(order, values.shape))]
