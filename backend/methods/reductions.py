"""Small summaries of a layer's attention, accumulated a chunk of queries at a time.

A reducer sees exact weights p (head, query, key) float32 of queries [q0, q0 + C) and keys
[k0, k0 + K) (keys outside that range have weight 0) and never the whole (head, T, T) map.
`result()` gives the layer's summary once every query has been seen.

- BlockMeans: mean attention of query spans x key spans (binned overviews, sentence blocks).
- HeadStatistics: the head-role scores of `methods.heads.roles`, with the same definitions.

`results(reducers)` gives every reducer's result() with one device-to-host copy per kind (the
layers of a capture are summarised together after the forward pass, never one sync per layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

from backend.methods.binning import bin_edges
from backend.methods.heads.roles import LOCALITY_WINDOW, ROLE_NAMES, kurtosis_of_vertical
from backend.methods.thought_anchors.receivers import PROXIMITY_IGNORE


STACKED_BYTES = 1 << 28  # BlockMeans.results stacks layers' sums up to this size at a time
MATMUL_SPANS = 512  # up to this many key spans, block sums are one product with a 0/1 matrix
# Per-row terms (head, query) that HeadStatistics.add_terms sums, in this order: the first six
# give the totals of ROLE_NAMES[:-1] (near_mass's row is turned into locality's), the last two
# only enter locality.
ROW_TERMS = ("previous", "first", "self", "near_mass", "entropy", "confidence", "near_dist",
             "row_mass")
if ROLE_NAMES[:-1] != ("previous_token", "first_token", "self", "locality", "entropy",
                       "confidence"):
    raise ImportError("HeadStatistics.add_terms sums ROW_TERMS in the order of ROLE_NAMES.")


def _grouped(items: list, key: Callable, compute: Callable[[list], list]) -> list:
    """compute(group) -> one value per item, applied to each group of items of equal key(item);
    the values in the order of items."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    out: list = [None] * len(items)
    for members in groups.values():
        for i, value in zip(members, compute([items[i] for i in members])):
            out[i] = value
    return out


def results(reducers: list) -> list:
    """[r.result() for r in reducers], reducers of one kind computed together (one copy to the
    host per kind) where the kind has a static results()."""
    def compute(group):
        batched = getattr(type(group[0]), "results", None)
        return batched(group) if batched is not None else [r.result() for r in group]
    return _grouped(reducers, type, compute)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """The tensor as a host array; from a GPU through pinned memory (a copy to pageable memory
    runs several times slower, which a short capture feels)."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor).numpy()


def span_index(spans: np.ndarray, n_tokens: int) -> np.ndarray:
    """(token,) the span each token lies in, -1 outside every span."""
    index = np.full(n_tokens, -1)
    for i, (start, end) in enumerate(spans):
        index[max(start, 0):min(end, n_tokens)] = i
    return index


@lru_cache(maxsize=16)
def _on_device(spans: bytes, n_tokens: int | None, outside: int,
               device: torch.device) -> torch.Tensor:
    """The spans (span, 2) on the device, or with n_tokens their `span_index` (`outside` for
    tokens outside every span). Cached: every layer has the same."""
    array = np.frombuffer(spans, dtype=np.int64).reshape(-1, 2).copy()
    if n_tokens is not None:
        index = span_index(array, n_tokens)
        array = np.where(index < 0, outside, index)
    return torch.as_tensor(array).to(device, non_blocking=True)  # pageable: staged, no sync


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
        spans = _bin_spans(n_tokens, bins)
        return cls(spans, spans, n_heads, n_tokens, device)

    def update(self, q0: int, k0: int, p: torch.Tensor) -> None:
        self.add_key_sums(q0, self._key_sums(k0, p))

    def add_key_sums(self, q0: int, sums: torch.Tensor) -> None:
        """sums (head, query, key span): rows q0.. of p summed over each key span."""
        self.sums.index_add_(1, self.q_index[q0:q0 + sums.shape[1]], sums.double())

    def sorted_key_spans(self) -> bool:
        """Whether key spans are in order and disjoint (then `span_index` says all)."""
        spans = self.k_spans
        return bool((spans[1:, 0] >= spans[:-1, 1]).all())

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
        return self.results([self])[0]

    @staticmethod
    def results(blocks: list["BlockMeans"]) -> list[np.ndarray]:
        """result() of each: means on the device in float32 (half the bytes of the float64
        sums), those of the same spans (the layers of one capture) stacked, so that a capture
        takes a few launches and one copy to the host, not a few per layer."""
        def alike(group):
            b = group[0]
            sizes = _block_sizes(b.q_spans.tobytes(), b.k_spans.tobytes(), torch.device(b.device))
            out = []
            step = max(1, STACKED_BYTES // b.sums.nbytes)  # many spans: bounded extra memory
            for i in range(0, len(group), step):
                # the last query span holds the rows outside every span
                sums = torch.stack([g.sums[:, :-1] for g in group[i:i + step]])
                out += list(to_host(torch.where(sizes > 0, sums / sizes, torch.nan).float()))
            return out
        return _grouped(blocks, lambda b: (b.q_spans.tobytes(), b.k_spans.tobytes(),
                                           str(b.device)), alike)


@lru_cache(maxsize=16)
def _bin_spans(n_tokens: int, bins: int) -> np.ndarray:
    """(bin, 2) token spans of `bin_edges`, read-only (cached: every layer has the same)."""
    edges = bin_edges(n_tokens, bins)
    spans = np.stack([edges[:-1], edges[1:]], axis=1)
    spans.flags.writeable = False
    return spans


@lru_cache(maxsize=16)
def _block_sizes(q_spans: bytes, k_spans: bytes, device: torch.device) -> torch.Tensor:
    """(query span, key span) rows x columns of each block, on the device (cached: every layer
    has the same)."""
    rows = np.diff(np.frombuffer(q_spans, dtype=np.int64).reshape(-1, 2))
    cols = np.diff(np.frombuffer(k_spans, dtype=np.int64).reshape(-1, 2))
    return torch.as_tensor(rows * cols.T).to(device)


@lru_cache(maxsize=16)
def _term_weights(q0: int, rows: int, w: int, device: torch.device) -> torch.Tensor:
    """(6, ROW_TERMS x rows) float64: each total of ROLE_NAMES[:-1] as a weighted sum of the
    per-row terms of rows q0.. (the positional roles count rows t >= 2, locality rows t >= w,
    entropy and confidence all). Locality, w (row mass - near mass) + near distance, is linear
    in the terms too, so all totals are one product. Cached: every layer has the same."""
    t = torch.arange(q0, q0 + rows, device=device)
    late, far = (t >= 2).double(), (t >= w).double()
    weights = torch.zeros(6, len(ROW_TERMS), rows, dtype=torch.float64, device=device)
    for role, term in enumerate(("previous", "first", "self")):
        weights[role, ROW_TERMS.index(term)] = late
    weights[3, ROW_TERMS.index("row_mass")] = w * far
    weights[3, ROW_TERMS.index("near_mass")] = -w * far
    weights[3, ROW_TERMS.index("near_dist")] = far
    weights[4, ROW_TERMS.index("entropy")] = 1.0
    weights[5, ROW_TERMS.index("confidence")] = 1.0
    return weights.flatten(1)


class HeadStatistics:
    """Every role of `methods.heads.roles.head_roles` for one layer, (head,) each."""

    def __init__(self, n_heads: int, n_tokens: int, device, window: int = LOCALITY_WINDOW,
                 proximity_ignore: int = PROXIMITY_IGNORE):
        self.n, self.prox = n_tokens, proximity_ignore
        self.w = max(1, min(window, n_tokens - 1))
        # (role, head): the sums over rows of each role of ROLE_NAMES[:-1]
        self.totals = torch.zeros(len(ROLE_NAMES) - 1, n_heads, dtype=torch.float64,
                                  device=device)
        self.vertical = torch.zeros(n_heads, n_tokens, dtype=torch.float64, device=device)

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
        self.add_terms(q0, torch.stack([terms[name] for name in ROW_TERMS]))
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

    def add_terms(self, q0: int, terms: torch.Tensor,
                  vertical: torch.Tensor | None = None) -> None:
        """terms (ROW_TERMS, head, query): per-row terms of rows q0.. (`update` computes them
        from p): previous, first, self (weight at key t - 1, 0, t), near_mass / near_dist (mass
        within distance < w, and its sum of weight x distance), entropy, confidence (max
        weight), row_mass; vertical (head, key): column sums over keys <= t - proximity_ignore,
        if given. Three launches whatever the chunk (the capture calls this once per layer, and
        a short input's capture is bound by the host's launches)."""
        weights = _term_weights(q0, terms.shape[-1], self.w, terms.device)
        self.totals.addmm_(weights, terms.transpose(0, 1).flatten(1).T.double())
        if vertical is not None:
            self.vertical.add_(vertical)  # in float64, as vertical.double() would

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
        return self.results([self])[0]

    @staticmethod
    def results(stats: list["HeadStatistics"]) -> list[dict[str, np.ndarray]]:
        """result() of each; those of one length and windows (the layers of one capture)
        together: receiver kurtosis of all on the device, one small copy back."""
        return _grouped(stats, lambda s: (s.n, s.w, s.prox), HeadStatistics._alike)

    @staticmethod
    def _alike(stats: list["HeadStatistics"]) -> list[dict[str, np.ndarray]]:
        n, w, prox = stats[0].n, stats[0].w, stats[0].prox
        totals = torch.stack([s.totals for s in stats])  # (layer, role, head)
        parts = [totals.flatten()]
        kurtosis = "receiver_kurtosis" not in HeadStatistics.unavailable(n, prox)
        if kurtosis:
            vertical = torch.stack([s.vertical for s in stats])  # (layer, head, key)
            counts = (n - torch.arange(n, device=vertical.device) - prox).clamp(min=0)
            vertical = torch.where(counts > 0, vertical / counts, torch.nan)
            parts.append(kurtosis_of_vertical(vertical, prox).flatten())
        host = to_host(torch.cat(parts))
        shape, size = totals.shape, totals.numel()
        totals = dict(zip(ROLE_NAMES[:-1], np.moveaxis(
            host[:size].reshape(shape), 1, 0)))  # role -> (layer, head)
        positional = max(n - 2, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {name: totals[name] / positional if n >= 3 else totals[name] * np.nan
                   for name in ("previous_token", "first_token", "self")}
            out["entropy"] = totals["entropy"] / n
            out["confidence"] = totals["confidence"] / n
            out["locality"] = (1.0 - totals["locality"] / max(n - w, 1) / w
                               if n >= 2 else totals["locality"] * np.nan)
        out["receiver_kurtosis"] = (host[size:].reshape(shape[0], shape[2])
                                    if kurtosis else np.full((shape[0], shape[2]), np.nan))
        return [{k: np.asarray(v[i], dtype=np.float32) for k, v in out.items()}
                for i in range(len(stats))]
