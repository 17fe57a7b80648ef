"""How different two attention maps are: Jensen-Shannon divergence between attention rows.

Inputs are aligned maps (see backend.methods.alignment): both sides share the same units, so row
u of one side and row u of the other are distributions over the same keys.
"""

from __future__ import annotations

import numpy as np
from scipy.special import entr
from scipy.stats import spearmanr

_TINY = 1e-12


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(..., key) x (..., key) -> (...) Jensen-Shannon divergence in bits, in [0, 1]. Each row is
    renormalised first: aligned rows can lose the mass of tokens without a counterpart.
    Computed as H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2: three entropies, no ratios."""
    p = p / np.maximum(p.sum(-1, keepdims=True), _TINY)
    q = q / np.maximum(q.sum(-1, keepdims=True), _TINY)
    entropy = entr((p + q) / 2).sum(-1) - (entr(p).sum(-1) + entr(q).sum(-1)) / 2
    return np.clip(entropy / np.log(2), 0.0, 1.0)


def row_divergence_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., query, key) x (..., query, key) -> (...) Jensen-Shannon divergence summed over the
    queries (rows of full attention maps, which all carry mass): chunks of rows add up."""
    return jensen_shannon(a, b).sum(-1)


def mean_row_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., query, key) x (..., query, key) -> (...) Jensen-Shannon divergence of each query's
    row, averaged over the queries with attention on both sides."""
    js = jensen_shannon(a, b)
    valid = (a.sum(-1) > 0) & (b.sum(-1) > 0)
    return np.where(valid, js, 0).sum(-1) / np.maximum(valid.sum(-1), 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation of two score arrays of the same shape (ties get their mean rank)."""
    return float(spearmanr(np.ravel(x), np.ravel(y)).statistic)


def matching_layer(layer: int, n_layers: int, n_layers_other: int) -> int:
    """The other model's layer at the same relative depth (first to first, last to last)."""
    if n_layers <= 1:
        return n_layers_other - 1
    return int(round(layer * (n_layers_other - 1) / (n_layers - 1)))
