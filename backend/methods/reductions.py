"""Small summaries of a layer's attention, accumulated a chunk of queries at a time.

A reducer sees exact weights p (head, query, key) float32 of queries [q0, q0 + C) and keys
[k0, k0 + K) (keys outside that range have weight 0) and never the whole (head, T, T) map.
`result()` gives the layer's summary once every query has been seen.

- BlockMeans: mean attention of query spans x key spans (binned overviews, sentence blocks).
- HeadStatistics: the head-role scores of `methods.heads.roles`, with the same definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from backend.methods.binning import bin_edges
from backend.methods.heads.roles import LOCALITY_WINDOW, ROLE_NAMES, kurtosis_of_vertical
from backend.methods.thought_anchors.receivers import PROXIMITY_IGNORE


MATMUL_SPANS = 512  # up to this many key spans, block sums are one product with a 0/1 matrix


def _span_index(spans: np.ndarray, n_tokens: int) -> np.ndarray:
    """(token,) the span each token lies in, -1 outside every span."""
    index = np.full(n_tokens, -1)
    for i, (start, end) in enumerate(spans):
        index[max(start, 0):min(end, n_tokens)] = i
    return index


@lru_cache(maxsize=16)
def _on_device(spans: bytes, n_tokens: int | None, outside: int,
               device: torch.device) -> torch.Tensor:
    """The spans (span, 2) on the device, or with n_tokens their `_span_index` (`outside` for
    tokens outside every span). Cached: every layer has the same, and each host-to-device copy
    is a sync."""
    array = np.frombuffer(spans, dtype=np.int64).reshape(-1, 2).copy()
    if n_tokens is not None:
        index = _span_index(array, n_tokens)
        array = np.where(index < 0, outside, index)
    return torch.as_tensor(array, device=device)


def _device_spans(spans: np.ndarray, device, n_tokens: int | None = None,
                  outside: int = -1) -> torch.Tensor:
    return _on_device(spans.tobytes(), n_tokens, outside, torch.device(device))


class BlockMeans:
    """(head, query span, key span) mean attention: block sum / (rows x columns); NaN for empty
    spans. Key blocks come from a running sum over keys, so the cost is one pass over p.
    Rows outside every query span are summed into one extra row, dropped at the end (no
    data-dependent indexing, so no device sync)."""

    def __init__(self, query_spans: Sequence[tuple[int, int]],
                 key_spans: Sequence[tuple[int, int]], n_heads: int, n_tokens: int, device):
        self.q_spans = np.asarray(query_spans, dtype=np.int64).reshape(-1, 2).clip(0, n_tokens)
        self.k_spans = np.asarray(key_spans, dtype=np.int64).reshape(-1, 2).clip(0, n_tokens)
        self.q_index = _device_spans(self.q_spans, device, n_tokens, len(self.q_spans))
        self.k_ends = _device_spans(self.k_spans, device)
        self.n_tokens, self.device = n_tokens, device
        self.sums = torch.zeros(n_heads, len(self.q_spans) + 1, len(self.k_spans),
                                dtype=torch.float64, device=device)

    @classmethod
    def binned(cls, n_tokens: int, bins: int, n_heads: int, device) -> "BlockMeans":
        """Blocks of `bin_edges(n_tokens, bins)` on both axes (a binned overview)."""
        edges = bin_edges(n_tokens, bins)
        spans = np.stack([edges[:-1], edges[1:]], axis=1)
        return cls(spans, spans, n_heads, n_tokens, device)

    def update(self, q0: int, k0: int, p: torch.Tensor) -> None:
        self.add_key_sums(q0, self._key_sums(k0, p))

    def add_key_sums(self, q0: int, sums: torch.Tensor) -> None:
        """sums (head, query, key span): rows q0.. of p summed over each key span."""
        self.sums.index_add_(1, self.q_index[q0:q0 + sums.shape[1]], sums.double())

    def sorted_key_spans(self) -> bool:
        """Whether key spans are in order and disjoint (then `key_span_index` says all)."""
        spans = self.k_spans
        return bool((spans[1:, 0] >= spans[:-1, 1]).all())

    def key_span_index(self) -> torch.Tensor:
        """(key,) int64 on the device: the key span each key lies in, -1 outside every span."""
        return _device_spans(self.k_spans, self.device, self.n_tokens)

    def _key_sums(self, k0: int, p: torch.Tensor) -> torch.Tensor:
        """(head, query, key span) sums of p over each key span."""
        n_keys = p.shape[-1]
        ends = (self.k_ends - k0).clamp(0, n_keys)
        if len(self.k_spans) <= MATMUL_SPANS:  # p @ (key, span) membership: no cancellation
            keys = torch.arange(n_keys, device=p.device)[:, None]
            member = ((keys >= ends[None, :, 0]) & (keys < ends[None, :, 1])).to(p.dtype)
            return torch.matmul(p, member)
        # Many spans: differences of running sums, in float64 so that a span's sum keeps its
        # small values after a large sink.
        running = torch.cumsum(p, -1, dtype=torch.float64)

        def before(x):  # mass on keys < k0 + x, (head, query, span)
            return running.index_select(-1, (x - 1).clamp(min=0)) * (x > 0)
        return before(ends[:, 1]) - before(ends[:, 0])

    def result(self) -> np.ndarray:
        sizes = (np.diff(self.q_spans)[:, 0][:, None] * np.diff(self.k_spans)[:, 0][None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sums[:, :-1].cpu().numpy() / sizes
        return np.where(sizes > 0, out, np.nan).astype(np.float32)




class HeadStatistics:
    """Every role of `methods.heads.roles.head_roles` for one layer, (head,) each."""

    def __init__(self, n_heads: int, n_tokens: int, device, window: int = LOCALITY_WINDOW,
                 proximity_ignore: int = PROXIMITY_IGNORE):
        self.n, self.prox = n_tokens, proximity_ignore
        self.w = max(1, min(window, n_tokens - 1))
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.totals = {name: zeros(n_heads) for name in ROLE_NAMES[:-1]}
        self.vertical = zeros(n_heads, n_tokens)

    def update(self, q0: int, k0: int, p: torch.Tensor) -> None:
        heads, rows, n_keys = p.shape
        device = p.device
        t = torch.arange(q0, q0 + rows, device=device)

        def at(keys):  # p[h, i, keys[i]] (0 outside the chunk's keys), (head, query)
            local = keys - k0
            ok = (local >= 0) & (local < n_keys)
            picked = p.gather(-1, local.clamp(0, n_keys - 1)[None, :, None].expand(heads, -1, 1))
            return picked[..., 0] * ok

        terms = {"entropy": torch.special.entr(p).sum(-1), "confidence": p.amax(-1),
                 "first": at(torch.zeros_like(t)), "previous": at(t - 1), "self": at(t),
                 "row_mass": p.sum(-1)}
        # Mass within distance < w of the row's token, and its distance-weighted sum.
        terms["near_mass"] = torch.zeros(heads, rows, dtype=torch.float64, device=device)
        terms["near_dist"] = torch.zeros_like(terms["near_mass"])
        for d in range(-(self.w - 1), self.w):
            keys = t + d
            value = at(keys.clamp(0, self.n - 1)) * ((keys >= 0) & (keys < self.n))
            terms["near_mass"] += value
            terms["near_dist"] += value * abs(d)
        self.add_terms(q0, terms)
        # Vertical scores: keys k <= t - proximity_ignore. Keys up to q0 - prox qualify for every
        # row of the chunk; the few after need the per-row test.
        every = max(0, min(n_keys, q0 - self.prox + 1 - k0))
        if every:
            self.vertical[:, k0:k0 + every] += p[..., :every].sum(1).double()
        stop = max(every, min(n_keys, q0 + rows - self.prox - k0))
        if stop > every:
            keys = torch.arange(k0 + every, k0 + stop, device=device)
            later = (t[:, None] - keys[None, :] >= self.prox)
            self.vertical[:, k0 + every:k0 + stop] += (p[..., every:stop] * later).sum(1).double()

    def add_terms(self, q0: int, terms: dict[str, torch.Tensor],
                  vertical: torch.Tensor | None = None) -> None:
        """Per-row terms (head, query) of rows q0.. (`update` computes them from p): entropy,
        confidence (max weight), first, previous, self (weight at key 0, t - 1, t), row_mass,
        near_mass / near_dist (mass within distance < w, and its sum of weight x distance);
        vertical (head, key): column sums over keys <= t - proximity_ignore, if given."""
        rows = terms["entropy"].shape[1]
        t = torch.arange(q0, q0 + rows, device=terms["entropy"].device)
        late = (t >= 2).double()
        totals = {name: terms[name].double() for name in terms}
        self.totals["entropy"] += totals["entropy"].sum(-1)
        self.totals["confidence"] += totals["confidence"].sum(-1)
        for name, term in (("first_token", "first"), ("previous_token", "previous"),
                           ("self", "self")):
            self.totals[name] += (totals[term] * late).sum(-1)
        # Locality: w (row mass - mass within distance < w) + sum of p |t - k| within it.
        far_rows = (t >= self.w).double()
        self.totals["locality"] += ((self.w * (totals["row_mass"] - totals["near_mass"])
                                     + totals["near_dist"]) * far_rows).sum(-1)
        if vertical is not None:
            self.vertical += vertical.double()

    @staticmethod
    def unavailable(n_tokens: int,
                    proximity_ignore: int = PROXIMITY_IGNORE) -> dict[str, str]:
        """Roles an input of n_tokens cannot give (NaN in result()), with the reason."""
        reasons = {}
        if n_tokens < 3:
            for name in ("previous_token", "first_token", "self"):
                reasons[name] = "This head role needs at least 3 tokens."
        if n_tokens - proximity_ignore - 1 < 2:
            reasons["receiver_kurtosis"] = (f"Receiver kurtosis needs more than "
                                            f"{proximity_ignore + 2} tokens.")
        return reasons

    def result(self) -> dict[str, np.ndarray]:
        n, names = self.n, ROLE_NAMES[:-1]
        totals = dict(zip(names, torch.stack([self.totals[k] for k in names]).cpu().numpy()))
        positional = max(n - 2, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {name: totals[name] / positional if n >= 3 else totals[name] * np.nan
                   for name in ("previous_token", "first_token", "self")}
            out["entropy"] = totals["entropy"] / n
            out["confidence"] = totals["confidence"] / n
            out["locality"] = (1.0 - totals["locality"] / max(n - self.w, 1) / self.w
                               if n >= 2 else totals["locality"] * np.nan)
        if "receiver_kurtosis" in self.unavailable(n, self.prox):
            out["receiver_kurtosis"] = np.full(len(self.vertical), np.nan)
        else:  # on the device: one small copy back
            counts = (n - torch.arange(n, device=self.vertical.device) - self.prox).clamp(min=0)
            vertical = torch.where(counts > 0, self.vertical / counts, torch.nan)
            out["receiver_kurtosis"] = kurtosis_of_vertical(vertical, self.prox).cpu().numpy()
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
