"""A stored attention analysis as exact weights on demand, whatever its storage format.

`open_maps` gives QKMaps for the "qk" format (weights recomputed from query and key by
`methods.exact`, on the service's device) and FullMaps for the "maps" format (full layers as
stored before; see analyses.attention). Both answer in torch float32, shapes (head, query, key),
and keep what they load in the service's one BoundedCache.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.analyses.attention import (OVERVIEW_BINS, from_stored, layer_array_name,
                                        qk_array_name)
from backend.errors import NotFoundError
from backend.memory import BoundedCache
from backend.methods import exact
from backend.methods.binning import bin_edges, bin_matrix
from backend.methods.exact import AttentionRule
from backend.methods.qk_capture import chunk_rows
from backend.methods.reductions import ROLE_NAMES, BlockMeans, HeadStatistics
from backend.methods.rollout import fuse_heads
from backend.store import AnalysisRecord, Store


class _Maps:
    def __init__(self, store: Store, record: AnalysisRecord, cache: BoundedCache, device):
        self.store, self.record, self.cache = store, record, cache
        self.device = torch.device(device)
        meta = record.meta
        self.n_tokens, self.n_layers = len(meta["tokens"]), meta["n_layers"]
        self.n_heads, self.causal = meta["n_heads"], meta["causal"]

    def _array(self, name: str) -> np.ndarray:
        return self.cache.get((self.record.id, name),
                              lambda: self.store.load_array(self.record.id, name))

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise NotFoundError(f"Analysis '{self.record.id}' has no layer {layer}; it has "
                                f"{self.n_layers}.")

    def chunk(self, n_keys: int) -> int:
        """Queries whose weights over n_keys keys are recomputed at a time."""
        return chunk_rows(self.n_heads, n_keys, self.device)

    def key_range(self, layer: int, queries: slice) -> tuple[int, int]:
        """The keys that queries can see at all (every other key has weight 0)."""
        return 0, self.n_tokens

    def fused_rows(self, layer: int, queries: slice, fusion: str = "mean") -> torch.Tensor:
        """(query, key) weights over the whole input fused over heads ("mean", "max", "min");
        keys no query of the chunk can see (causal, windows) are 0 without being computed."""
        k0, k1 = self.key_range(layer, queries)
        weights = self.weights(layer, queries, slice(k0, k1))
        fused = fuse_heads(weights, fusion, 0)
        return torch.nn.functional.pad(fused, (k0, self.n_tokens - k1))

    def pooled(self, layer: int, heads, query_spans, key_spans, queries: slice,
               keys: slice) -> np.ndarray:
        """(head, query span, key span) block means over a window, a chunk of queries at a
        time (spans are token indices of the whole input, inside the window)."""
        blocks = BlockMeans(query_spans, key_spans, self.n_heads if heads is None
                            else len(heads), self.n_tokens, self.device)
        step = self.chunk(keys.stop - keys.start)
        for q0 in range(queries.start, queries.stop, step):
            q1 = min(q0 + step, queries.stop)
            blocks.update(q0, keys.start, self.weights(layer, slice(q0, q1), keys, heads))
        return blocks.result()

    def statistics(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def weights(self, layer: int, queries: slice, keys: slice, heads=None) -> torch.Tensor:
        raise NotImplementedError

    def overview(self, layer: int) -> np.ndarray:
        raise NotImplementedError


class QKMaps(_Maps):
    """Weights from stored query, key and row log-sum-exps."""

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_layer(layer)

        def load():
            parts = [from_stored(self.store.load_array(self.record.id, qk_array_name(p, layer)))
                     for p in ("query", "key")]
            lse = torch.from_numpy(self.store.load_array(self.record.id,
                                                         qk_array_name("lse", layer)))
            return tuple(t.to(self.device) for t in (*parts, lse))
        return self.cache.get((self.record.id, "qk", layer, str(self.device)), load)

    def rule(self, layer: int) -> AttentionRule:
        return AttentionRule.from_json(self.record.meta["rules"][layer])

    def key_range(self, layer: int, queries: slice) -> tuple[int, int]:
        return self.rule(layer).key_range(queries.start, queries.stop, self.n_tokens)

    @property
    def score_dtype(self) -> torch.dtype:
        # Eager attention multiplies q and k in the model's dtype; on the CPU in float32.
        dtype = self.record.meta.get("score_dtype", "float32")
        return torch.float32 if self.device.type == "cpu" else getattr(torch, dtype)

    def weights(self, layer: int, queries: slice, keys: slice, heads=None) -> torch.Tensor:
        query, key, lse = self._layer(layer)
        index = None if heads is None else torch.as_tensor(heads, device=self.device)
        return exact.weights(query, key, lse, self.rule(layer), queries, keys, index,
                             self.score_dtype)

    def overview(self, layer: int) -> np.ndarray:
        self.check_layer(layer)
        return self._array(qk_array_name("overview", layer))

    def statistics(self) -> dict[str, np.ndarray]:
        return {name: self._array(f"stats/{name}") for name in ROLE_NAMES}


class FullMaps(_Maps):
    """Weights from full (head, query, key) float16 layers."""

    def _layer(self, layer: int) -> np.ndarray:
        self.check_layer(layer)
        return self._array(layer_array_name(layer))

    def weights(self, layer: int, queries: slice, keys: slice, heads=None) -> torch.Tensor:
        block = self._layer(layer)[:, queries, keys] if heads is None \
            else self._layer(layer)[list(heads), queries, keys]
        return torch.from_numpy(block.astype(np.float32)).to(self.device)

    def overview(self, layer: int) -> np.ndarray:
        return self.cache.get((self.record.id, "overview", layer), lambda: bin_matrix(
            self._layer(layer), OVERVIEW_BINS).values)

    def statistics(self) -> dict[str, np.ndarray]:
        def compute():
            layers = []
            for layer in range(self.n_layers):
                stats = HeadStatistics(self.n_heads, self.n_tokens, self.device)
                stats.update(0, 0, self.weights(layer, slice(0, self.n_tokens),
                                                slice(0, self.n_tokens)))
                layers.append(stats.result())
            return {name: np.stack([s[name] for s in layers]) for name in ROLE_NAMES}
        return self.cache.get((self.record.id, "statistics"), compute)


def open_maps(store: Store, record: AnalysisRecord, cache: BoundedCache, device) -> _Maps:
    kind = QKMaps if record.meta.get("format") == "qk" else FullMaps
    return kind(store, record, cache, device)


def regroup(values: np.ndarray, edges: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means (..., B, B) on `edges` pooled into at most bins x bins groups of whole blocks:
    exact means of the larger blocks. Returns (values, edges)."""
    groups = bin_edges(len(edges) - 1, bins)
    widths = np.diff(edges).astype(np.float64)
    sums = values * widths[:, None] * widths[None, :]
    pooled = np.add.reduceat(np.add.reduceat(sums, groups[:-1], axis=-2), groups[:-1], axis=-1)
    new_edges = edges[groups]
    sizes = np.diff(new_edges).astype(np.float64)
    return (pooled / sizes[:, None] / sizes[None, :]).astype(np.float32), new_edges

