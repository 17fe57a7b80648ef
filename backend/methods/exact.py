"""Exact attention weights recomputed from a layer's query and key, by eager attention's rule.

Eager attention of one head: s = (q . k) * scaling; with soft-capping s = tanh(s / cap) * cap;
keys outside the mask get -inf; with learned sink logits (gpt-oss) one more logit per head joins
the softmax and is dropped after it. The mask of every supported layer is causal or
bidirectional, optionally limited to a sliding window of the last `window` keys (q - k < window).
Grouped-query attention: query head h reads key head h // (heads / key heads), as repeat_kv does.

A row's softmax needs every key of the row; a window of keys reuses the row's log-sum-exp kept at
capture time (`lse`), so recomputing a window costs only the window.

Shapes: query (head, token, head_dim), key (key_head, token, head_dim), lse (head, token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from backend.errors import InputError


@dataclass(frozen=True)
class AttentionRule:
    """What eager attention of one layer does besides q . k (see the module docstring)."""

    scaling: float
    causal: bool
    window: int | None = None
    softcap: float | None = None
    sinks: tuple[float, ...] | None = None  # one logit per query head

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "AttentionRule":
        sinks = data.get("sinks")
        return cls(data["scaling"], data["causal"], data.get("window"), data.get("softcap"),
                   tuple(sinks) if sinks is not None else None)

    def allowed(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(query, key) bool: which keys each query position sees."""
        distance = queries[:, None] - keys[None, :]
        ok = distance >= 0 if self.causal else torch.ones_like(distance, dtype=torch.bool)
        if self.window is not None:
            ok &= distance < self.window if self.causal else distance.abs() < self.window
        return ok

    def edge_ranges(self, start: int, stop: int, first: int,
                    last: int) -> list[tuple[int, int]]:
        """Key ranges inside [first, last) where some query of [start, stop) is masked; every
        other key is seen by every query of the chunk, so only these columns need the mask."""
        ranges = [(start + 1 if self.causal else start + (self.window or last), last)]
        if self.window is not None:
            ranges.append((first, stop - self.window))
        return [(max(a, first), min(b, last)) for a, b in ranges if min(b, last) > max(a, first)]

    def key_range(self, start: int, stop: int, n_tokens: int) -> tuple[int, int]:
        """The keys queries [start, stop) can see at all (others are skipped, not masked)."""
        first = 0 if self.window is None else max(0, start - self.window + 1)
        last = stop if self.causal else (n_tokens if self.window is None
                                          else min(n_tokens, stop + self.window - 1))
        return first, last


def expand_heads(key: torch.Tensor, heads: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """Key rows of the query heads `heads` (None: all), (head, token, head_dim)."""
    group = n_heads // key.shape[0]
    index = torch.arange(n_heads, device=key.device) if heads is None else heads.to(key.device)
    return key[torch.div(index, group, rounding_mode="floor")]


def logits(query: torch.Tensor, key: torch.Tensor, rule: AttentionRule, queries: slice,
           keys: slice, heads: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """(head, query, key) float32 logits of a window, masked keys at -inf, no sink column.

    dtype: the dtype of the product q . k (eager: the model's dtype); default the inputs'.
    """
    n_heads = query.shape[0]
    q = query[heads if heads is not None else slice(None), queries]
    k = expand_heads(key, heads, n_heads)[:, keys]
    if dtype is not None:
        q, k = q.to(dtype), k.to(dtype)
    scores = torch.matmul(q, k.transpose(1, 2)).mul_(rule.scaling).float()
    if rule.softcap is not None:
        scores = torch.tanh(scores / rule.softcap) * rule.softcap
    device = scores.device
    q_pos = torch.arange(queries.start, queries.stop, device=device)
    for a, b in rule.edge_ranges(queries.start, queries.stop, keys.start, keys.stop):
        block = scores[..., a - keys.start:b - keys.start]
        block.masked_fill_(~rule.allowed(q_pos, torch.arange(a, b, device=device)), -torch.inf)
    return scores


def sink_logits(rule: AttentionRule, heads: torch.Tensor | None, n_heads: int,
                device) -> torch.Tensor | None:
    """(head, 1, 1) the sink logit of each selected head, or None."""
    if rule.sinks is None:
        return None
    sinks = torch.tensor(rule.sinks, dtype=torch.float32, device=device)
    return (sinks if heads is None else sinks[heads.to(device)])[:, None, None]


def softmax_(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Whole rows of float32 logits (head, query, key) turned into their weights in place, as
    eager's softmax computes them (exp(s - max) / sum), the sink logit in the sum; returns the
    rows' (head, query) log-sum-exp. One exp per weight, where logsumexp then exp(s - lse)
    take two and a copy."""
    top = scores.amax(-1, keepdim=True)
    if sinks is not None:
        top = torch.maximum(top, sinks)
    top = torch.where(top.isfinite(), top, 0.0)  # a row with every key masked stays 0 / 0
    total = scores.sub_(top).exp_().sum(-1, keepdim=True)
    if sinks is not None:
        total += torch.exp(sinks - top)
    scores.div_(total)
    return (top + total.log())[..., 0]


def weights(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, rule: AttentionRule,
            queries: slice, keys: slice, heads: torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """(head, query, key) float32 exact attention weights of a window of heads x queries x keys.

    lse: (head, token) row log-sum-exp of the whole layer (from the capture).
    """
    scores = logits(query, key, rule, queries, keys, heads, dtype)
    row = lse[heads.to(lse.device) if heads is not None else slice(None), queries]
    return scores.sub_(row.to(scores.device)[:, :, None]).exp_()


def check_window(n_tokens: int, query: slice, key: slice) -> tuple[slice, slice]:
    """Resolved (start, stop) slices of a non-empty window inside the input (step 1)."""
    resolved = []
    for name, s in (("query", query), ("key", key)):
        start, stop, step = s.indices(n_tokens)
        if step != 1 or stop <= start:
            raise InputError(f"The {name} window {s.start}:{s.stop} is empty or strided; "
                             f"the input has {n_tokens} tokens.")
        resolved.append(slice(start, stop))
    return resolved[0], resolved[1]
