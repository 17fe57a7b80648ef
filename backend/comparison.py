"""Comparing two analyses: shared units, aligned maps and how far they diverge.

A part of AtlasService (it uses the service's `analysis`, `maps`, `memory` and `rollout`); kept
apart so the service module stays about requests and results. Aligned maps and divergences are
computed from exact weights a chunk of queries at a time, so they work at any input length;
results are kept under the service's one byte budget.
"""

from __future__ import annotations

import numpy as np

from backend.errors import InputError
from backend.methods.alignment import (SPANS, TOKENS, WORDS, Alignment, Side, align,
                                       aligned_attention, unit_spans)
from backend.methods.comparison import mean_row_divergence, row_divergence_sums


class Comparisons:
    def alignment_levels(self, aid_a: str, aid_b: str) -> list[str]:
        """Alignments that make sense for two attention analyses, finest first: tokens need one
        tokenizer (one model), spans one text."""
        a, b = self.analysis(aid_a), self.analysis(aid_b)
        levels = [TOKENS] if a.model_fingerprint == b.model_fingerprint else []
        return levels + ([SPANS] if a.text == b.text else []) + [WORDS]

    def alignment(self, aid_a: str, aid_b: str, level: str) -> Alignment:
        """The units two analyses share (see backend.methods.alignment)."""
        def side(aid):
            record = self.analysis(aid)
            meta = record.meta
            return Side(record.text, meta["token_ids"], meta["tokens"],
                        [tuple(o) for o in meta["offsets"]], meta["special"])
        return self.memory.get(("alignment", aid_a, aid_b, level),
                               lambda: align(side(aid_a), side(aid_b), level))

    def aligned_layer(self, aid: str, layer: int, membership: np.ndarray) -> np.ndarray:
        """(head, unit, unit) one layer's attention on aligned units: query rows averaged over a
        unit's tokens, key columns summed (as `aligned_attention`)."""
        maps = self.maps(aid)
        spans = unit_spans(membership)
        whole = slice(0, maps.n_tokens)
        means = maps.pooled(layer, None, spans, spans, whole, whole)
        return (means * np.diff(spans)[:, 0][None, None, :]).astype(np.float32)

    def aligned_matrix(self, aid: str, layer: int, head: int | None,
                       membership: np.ndarray) -> np.ndarray:
        """(unit, unit) one head's aligned attention, or the head mean if head is None."""
        heads = self.aligned_layer(aid, layer, membership)
        return heads.mean(0) if head is None else heads[head]

    def aligned_rollout(self, aid: str, membership: np.ndarray) -> np.ndarray:
        """(unit, unit) attention rollout after the last layer (mean fusion), on aligned units."""
        return aligned_attention(self.rollout(aid)[-1], membership)

    def head_divergence(self, aid_a: str, aid_b: str, level: str) -> np.ndarray:
        """(layer, head) mean Jensen-Shannon divergence between the two sides' aligned attention
        rows, head by head. Both analyses must come from models of the same shape."""
        alignment = self.alignment(aid_a, aid_b, level)
        meta_a, meta_b = self.analysis(aid_a).meta, self.analysis(aid_b).meta
        if (meta_a["n_layers"], meta_a["n_heads"]) != (meta_b["n_layers"], meta_b["n_heads"]):
            raise InputError("Head-by-head divergence needs two models with the same layers "
                             "and heads; compare layers instead.")
        return self.memory.get(("head_divergence", aid_a, aid_b, level), lambda: np.stack([
            mean_row_divergence(self.aligned_layer(aid_a, layer, alignment.a),
                                self.aligned_layer(aid_b, layer, alignment.b))
            for layer in range(meta_a["n_layers"])]))

    def layer_divergence(self, aid_a: str, aid_b: str, level: str) -> np.ndarray:
        """(layer of a, layer of b) mean Jensen-Shannon divergence between each pair of layers'
        head-mean aligned attention: which layers of one model behave like which of the other."""
        def compute():
            alignment = self.alignment(aid_a, aid_b, level)
            maps_b = [self.aligned_layer(aid_b, layer, alignment.b).mean(0)
                      for layer in range(self.analysis(aid_b).meta["n_layers"])]
            grid = []
            for layer in range(self.analysis(aid_a).meta["n_layers"]):  # bounded memory
                map_a = self.aligned_layer(aid_a, layer, alignment.a).mean(0)
                grid.append([mean_row_divergence(map_a, map_b) for map_b in maps_b])
            return np.array(grid)
        return self.memory.get(("layer_divergence", aid_a, aid_b, level), compute)

    def head_similarity(self, aid: str, layer: int, head: int | None) -> np.ndarray:
        """(layer, head) mean Jensen-Shannon divergence of every head of one analysis from one
        head (or a layer's head mean): low values are heads with the same pattern. Rows are
        compared a chunk of queries at a time."""
        maps = self.maps(aid)
        whole = slice(0, maps.n_tokens)
        step = maps.chunk(maps.n_tokens)
        totals = np.zeros((maps.n_layers, maps.n_heads))
        for q in range(0, maps.n_tokens, step):
            rows = slice(q, min(q + step, maps.n_tokens))
            reference = maps.weights(layer, rows, whole, None if head is None else [head])
            reference = reference.mean(0, keepdim=True).cpu().numpy()
            for other in range(maps.n_layers):
                weights = maps.weights(other, rows, whole).cpu().numpy()
                totals[other] += row_divergence_sums(weights, reference)
        return totals / maps.n_tokens
