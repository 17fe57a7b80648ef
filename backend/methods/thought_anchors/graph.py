"""Links between sentences from a (source, target) matrix, for graph views and link lists."""

from __future__ import annotations

import numpy as np


def top_links(matrix: np.ndarray, per_source: int) -> list[tuple[int, int, float]]:
    """The `per_source` strongest (largest |value|) finite links out of each source sentence,
    as (source, target, value), strongest first. matrix: (source, target)."""
    links = []
    for source, row in enumerate(np.asarray(matrix, dtype=float)):
        targets = [t for t in np.argsort(-np.abs(np.nan_to_num(row, nan=0.0)))
                   if np.isfinite(row[t]) and row[t] != 0 and t != source][:per_source]
        links += [(source, int(t), float(row[t])) for t in targets]
    return sorted(links, key=lambda link: -abs(link[2]))


def incoming(matrix: np.ndarray, target: int, limit: int) -> list[tuple[int, float]]:
    """The sentences that affect `target` most: (source, value), strongest first."""
    column = np.asarray(matrix, dtype=float)[:, target]
    order = [s for s in np.argsort(-np.abs(np.nan_to_num(column, nan=0.0)))
             if np.isfinite(column[s]) and s != target][:limit]
    return [(int(s), float(column[s])) for s in order]
