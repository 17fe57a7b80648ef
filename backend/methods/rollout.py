"""Attention rollout, attention flow (Abnar & Zuidema, ACL 2020) and gradient-weighted rollout
(Chefer, Gur & Wolf, ICCV 2021).

Every function takes attention of shape (layer, head, query, key), rows summing to 1, as a numpy
array or a torch tensor, and returns numpy float64 arrays.

Flow is computed exactly, but not the way the reference does it (one networkx Edmonds-Karp per
(query, key) pair, ~73 s for 12 layers x 16 tokens). The graph has a structure that makes most
pairs cheap:

1. Upper bound. Every pair's flow is at most the cheaper of two trivial cuts: the edges out of
   the source (L, i) and the edges into the sink (0, j), both counted over the nodes that lie on
   some source-to-sink path. Pairs whose bound is 0 are unconnected (e.g. causal key > query).
2. Certificate. In deep bidirectional models the bound is almost always the answer. We prove it
   by meeting in the middle: if the source can deliver t * pi to layer m (pi uniform) and pi
   scaled by b can be routed from layer m to the sink, the two flows join into a flow of value
   min(t, b). That takes 2n max-flows on half-depth graphs instead of n^2 on the whole one, and
   proves F[i, j] = bound for every pair with bound <= min(t_i, b_j).
3. Exact max-flow for the remaining pairs (shallow models, causal attention) on the subgraph of
   nodes lying on a source-to-sink path (for causal attention: tokens j..i), with scipy's Dinic
   on integer capacities; the min cut it finds is then re-valued with the float capacities.

Integer capacities are floor(c * 2^30), so every flow found is feasible for the real capacities;
demands in step 2 are rounded up, so the certificate is exact. Step 3 returns the float value of
the min cut found, within (edges in that cut) * 2^-30 of the true value, in practice exact.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

HEAD_FUSIONS = ("mean", "max", "min")
_SCALE = 2**30  # integer capacity = floor(capacity * _SCALE); capacities are <= 1


class FlowCancelled(Exception):
    """attention_flow was stopped because should_stop() returned True."""


# --- inputs --------------------------------------------------------------------------------------


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _checked(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim != 4:
        raise ValueError(f"{name} must have shape (layer, head, query, key); got {array.shape}")
    if array.shape[-1] != array.shape[-2]:
        raise ValueError(f"{name} must be square in (query, key); got {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _attention(attn) -> np.ndarray:
    array = _checked(_as_array(attn), "attn")
    if (array < 0).any():
        raise ValueError("attention weights must be non-negative")
    return array


def residual_attention(attn, head_fusion: str = "mean") -> np.ndarray:
    """Atil_l = (Abar_l + I) / rowsum: heads fused, residual added, rows renormalised.

    attn (layer, head, query, key) -> (layer, query, key); entry [l - 1] is Atil_l.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}; got {head_fusion!r}")
    fused = getattr(_attention(attn), head_fusion)(axis=1)
    fused = fused + np.eye(fused.shape[-1])
    return fused / fused.sum(-1, keepdims=True)


# --- rollout -------------------------------------------------------------------------------------


def attention_rollout(attn, head_fusion: str = "mean") -> np.ndarray:
    """Rollout after each layer: R_1 = Atil_1, R_l = Atil_l @ R_{l-1}.

    attn (layer, head, query, key) -> (layer, query, key); rows sum to 1. Row i of R_l says how
    token i after layer l is mixed from the input tokens.
    """
    atil = residual_attention(attn, head_fusion)
    rollout = np.empty_like(atil)
    rollout[0] = atil[0]
    for layer in range(1, len(atil)):
        rollout[layer] = atil[layer] @ rollout[layer - 1]
    return rollout


def gradient_rollout(attn, grads) -> np.ndarray:
    """Chefer et al. (ICCV 2021): Abar_l = mean_h clamp(G_l * A_l, min=0), R_l = (I + Abar_l) R_{l-1}.

    attn, grads (layer, head, query, key), grads = d target / d attn -> (layer, query, key), R_1..R_L
    with R_0 = I. Rows are not renormalised.
    """
    array, gradient = _attention(attn), _as_array(grads)
    if gradient.shape != array.shape:
        raise ValueError(f"grads shape {gradient.shape} differs from attn shape {array.shape}")
    _checked(gradient, "grads")
    relevance = np.clip(gradient * array, 0.0, None).mean(axis=1)
    rollout = np.empty_like(relevance)
    current = np.eye(array.shape[-1])
    for layer, weights in enumerate(relevance):
        current = current + weights @ current
        rollout[layer] = current
    return rollout


def exclude_first_token(scores) -> np.ndarray:
    """Drop key position 0 (CLS, BOS or an attention sink) and renormalise what is left to sum 1.

    scores (..., key) -> (..., key - 1): a row (key,) or a matrix (query, key).
    """
    array = _as_array(scores)
    if array.ndim == 0 or array.shape[-1] < 2:
        raise ValueError(f"need at least two key positions; got shape {array.shape}")
    rest = array[..., 1:]
    total = rest.sum(-1, keepdims=True)
    return np.divide(rest, total, out=np.zeros_like(rest), where=total != 0)


# --- flow ----------------------------------------------------------------------------------------


def attention_flow(
    attn,
    head_fusion: str = "mean",
    normalize: bool = True,
    progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Max-flow from every top-layer token (L, i) to every input token (0, j).

    attn (layer, head, query, key) -> (query, key). The graph has a node (l, k) per layer l = 0..L
    and token k, and edges (l, i) -> (l - 1, j) of capacity Atil_l[i, j]. With normalize, each row
    is divided by its sum; otherwise the raw max-flow values are returned.

    progress(fraction, stage) is called now and then with fraction in [0, 1]; should_stop() is
    polled about every 50 ms and FlowCancelled raised as soon as it returns True.
    """
    atil = residual_attention(attn, head_fusion)
    ticker = _Ticker(progress, should_stop)
    flow = _all_pairs_max_flow(atil, ticker)
    ticker.report("done", ahead=0.0, force=True)
    if not normalize:
        return flow
    total = flow.sum(1, keepdims=True)
    return np.divide(flow, total, out=np.zeros_like(flow), where=total > 0)


class _Ticker:
    """Progress as work done / (done + still ahead), and cancellation, at most every 50 ms."""

    def __init__(self, progress, should_stop, every: float = 0.05):
        self.progress, self.should_stop, self.every = progress, should_stop, every
        self.done, self.shown, self.last = 0.0, 0.0, -np.inf

    def report(self, stage: str, ahead: float, step: float = 0.0, force: bool = False) -> None:
        self.done += step
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.should_stop is not None and self.should_stop():
            raise FlowCancelled(f"attention flow cancelled during {stage}")
        total = self.done + ahead
        self.shown = max(self.shown, self.done / total if total > 0 else 1.0)
        if self.progress is not None:
            self.progress(min(self.shown, 1.0), stage)


def _all_pairs_max_flow(atil: np.ndarray, ticker: _Ticker) -> np.ndarray:
    """Raw max-flow values (query, key) for atil (layer, query, key)."""
    n_layers, n = atil.shape[:2]
    ticker.report("bounds", ahead=1.0, force=True)
    if n_layers == 1:  # a single edge per pair
        return atil[0].copy()
    if n_layers == 2:  # disjoint paths (2, i) -> (1, k) -> (0, j)
        return np.stack([np.minimum(atil[1][i][:, None], atil[0]).sum(0) for i in range(n)])

    reach, coreach = _reachability(atil)
    source_cut = atil[-1] @ coreach[n_layers - 1].T  # (i, j): edges out of (L, i) on a path to j
    sink_cut = reach[1] @ atil[0]  # (i, j): edges into (0, j) on a path from i
    # Tokens off every path from (L, i) to (0, j) change nothing: pair (i, j) needs only low..high
    low = np.maximum(_first_token(reach)[:, None], _first_token(coreach)[None, :])
    high = np.minimum(_last_token(reach)[:, None], _last_token(coreach)[None, :])
    work = (n_layers - 1) * (high - low + 1.0) ** 2  # edges of each pair's graph
    flow = np.zeros((n, n))
    pending = np.minimum(source_cut, sink_cut) > 0
    _certify_trivial_cuts(atil, reach, coreach, source_cut, sink_cut, pending, flow, work, ticker)
    pairs = np.argwhere(pending)
    flow[pending] = _pair_max_flows(atil, pairs, low[pending], high[pending], ticker)
    return flow


def _reachability(atil: np.ndarray) -> tuple[dict, dict]:
    """reach[l][i, k]: (l, k) is reachable from (L, i); coreach[l][j, k]: (l, k) reaches (0, j)."""
    n_layers = len(atil)
    edges = (atil > 0).astype(np.float32)
    reach = {n_layers - 1: atil[-1] > 0}
    for layer in range(n_layers - 1, 1, -1):
        reach[layer - 1] = (reach[layer] @ edges[layer - 1]) > 0
    coreach = {1: (atil[0] > 0).T}
    for layer in range(1, n_layers - 1):
        coreach[layer + 1] = (coreach[layer] @ edges[layer].T) > 0
    return reach, coreach


def _first_token(reachable: dict) -> np.ndarray:
    return np.logical_or.reduce(list(reachable.values())).argmax(1)


def _last_token(reachable: dict) -> np.ndarray:
    seen = np.logical_or.reduce(list(reachable.values()))
    return seen.shape[1] - 1 - seen[:, ::-1].argmax(1)


def _certify_trivial_cuts(atil, reach, coreach, source_cut, sink_cut, pending, flow, work, ticker):
    """Prove flow = min(source_cut, sink_cut) with flows that meet at a middle layer m.

    For pairs whose paths cover every token (bidirectional attention). With pi uniform over
    the tokens of layer m, u = w * pi, "top" the layers L..m and "bottom" the layers m..0:
    - source cut < sink cut: the source's whole capacity fits through top into u (fits_i) and
      u passes through bottom into the sink (passes_j): together a flow of value source_cut;
    - sink cut < source cut: a supply of at most u fills the sink's edges through bottom
      (fills_j) and top can deliver u (delivers_i): together a flow of value sink_cut.
    One half-depth max-flow per test: about 3n of them instead of n^2 pair flows. Proven pairs
    get their flow and leave pending.
    """
    n_layers, n = atil.shape[:2]
    margin = 8 * (n + 1) / _SCALE  # relative slack: absorbs the rounding to integers
    dense = reach[1].all(1)[:, None] & coreach[n_layers - 1].all(1)[None, :]
    source_side = pending & dense & (source_cut * (1 + margin) <= sink_cut * (1 - margin))
    sink_side = pending & dense & (sink_cut * (1 + margin) <= source_cut * (1 - margin))
    uniform = np.full(n, 1.0 / n)

    for middle in dict.fromkeys([n_layers // 2, n_layers // 3, 2 * n_layers // 3]):
        if source_side.sum() + sink_side.sum() <= 2 * n:
            return  # too few pairs left to be worth ~3n half-depth flows
        top = _HalfNetwork(atil[-2 : middle - 1 : -1], n)  # layers L-1 .. middle
        bottom = _HalfNetwork(atil[middle - 1 : 0 : -1], n)  # layers middle .. 1
        tests_ahead = [4 * n]

        def each(levels, test, cost):
            """test(k, level) for every k with a level > 0; False elsewhere."""
            passed = np.zeros(n, bool)
            for k in np.flatnonzero(levels > 0):
                tests_ahead[0] -= 1
                ahead = tests_ahead[0] * cost + work[pending].sum()
                ticker.report("certify", ahead=ahead, step=cost)
                passed[k] = test(k, levels[k] * uniform)
            return passed

        full = reach[middle].all(1)[:, None] & coreach[middle].all(1)[None, :]
        level = np.where(source_side & full, source_cut * (1 + margin), 0.0)
        fits = each(level.max(1), lambda i, u: top.saturates(atil[-1][i], u, "source"), top.size)
        level *= fits[:, None]
        passes = each(level.max(0), lambda j, u: bottom.saturates(u, atil[0][:, j], "source"), bottom.size)
        proven = source_side & fits[:, None] & passes[None, :]
        flow[proven] = source_cut[proven]
        pending &= ~proven
        source_side &= ~proven

        level = np.where(sink_side & full, sink_cut * (1 + margin), 0.0)
        fills = each(level.max(0), lambda j, u: bottom.saturates(u, atil[0][:, j], "sink"), bottom.size)
        level *= fills[None, :]
        delivers = each(level.max(1), lambda i, u: top.saturates(atil[-1][i], u, "sink"), top.size)
        proven = sink_side & delivers[:, None] & fills[None, :]
        flow[proven] = sink_cut[proven]
        pending &= ~proven
        sink_side &= ~proven


class _HalfNetwork:
    """source -> n tokens -> ... -> n tokens -> sink, blocks[t] linking token groups t and t + 1.

    The integer CSR graph is built once; source and sink capacities are set per test.
    """

    def __init__(self, blocks, n: int):
        self.blocks, self.n = list(blocks), n
        self.size = (len(self.blocks) + 1) * n * n  # work units, for progress
        if not self.blocks:  # source -> tokens -> sink: no graph needed
            return
        groups = len(self.blocks) + 1
        self.sink = 1 + groups * n  # node 0 is the source; token k of group g is 1 + g * n + k
        stacked = np.concatenate(self.blocks)  # row g * n + k: token k of group g
        rows, cols = np.nonzero(stacked)  # in CSR order
        heads = np.concatenate([1 + np.arange(n), 1 + n + rows // n * n + cols, np.full(n, self.sink)])
        counts = np.concatenate([[0, n], np.count_nonzero(stacked, axis=1), np.ones(n, int), [0]])
        caps = np.concatenate([np.zeros(n), stacked[rows, cols], np.zeros(n)])
        units = np.floor(caps * _SCALE).astype(np.int32)
        shape = (self.sink + 1, self.sink + 1)
        self.graph = sp.csr_array((units, heads.astype(np.int32), np.cumsum(counts, dtype=np.int32)), shape)

    def saturates(self, source_caps, sink_caps, demand: str) -> bool:
        """Is there a flow that uses all of the source's (demand="source") or sink's capacities?

        The demand side is rounded up and everything else down, so True proves it for the reals.
        """
        source = np.floor(np.asarray(source_caps) * _SCALE).astype(np.int64)
        sink = np.floor(np.asarray(sink_caps) * _SCALE).astype(np.int64)
        wanted = source if demand == "source" else sink
        wanted += 1
        if not self.blocks:
            return int(np.minimum(source, sink).sum()) == wanted.sum()
        self.graph.data[: self.n] = source
        self.graph.data[-self.n :] = sink
        return int(maximum_flow(self.graph, 0, self.sink).flow_value) == wanted.sum()


_ENTRIES_PER_SOLVE = 1_000_000  # capacities in one batched max-flow problem


def _pair_max_flows(atil, pairs, low, high, ticker) -> np.ndarray:
    """Exact max-flow of each pair (i, j) on tokens low..high of layers L-1..1.

    Pairs with the same window width become components of one graph, between one super source
    and one super sink, so that one scipy call solves many pairs.
    """
    n_layers = len(atil)
    inner = atil[-2:0:-1]  # Atil_{L-1} .. Atil_2
    widths = high - low + 1
    ahead = float((n_layers * widths.astype(float) ** 2).sum())
    values = np.zeros(len(pairs))
    for width in np.unique(widths):
        group = np.flatnonzero(widths == width)
        windows = np.lib.stride_tricks.sliding_window_view(inner, (width, width), axis=(1, 2))
        per_solve = max(1, _ENTRIES_PER_SOLVE // (n_layers * width * width))
        for start in range(0, len(group), per_solve):
            batch = group[start : start + per_solve]
            ahead -= len(batch) * n_layers * width**2
            ticker.report("max-flow", ahead=ahead, step=len(batch) * n_layers * width**2)
            i, j, first = pairs[batch, 0], pairs[batch, 1], low[batch]
            tokens = first[:, None] + np.arange(width)  # (pair, width)
            layered = np.zeros((len(batch), n_layers - 1, width, width))
            layered[:, :-1] = windows[:, first, first].swapaxes(0, 1)
            layered[:, -1, :, 0] = atil[0][tokens, j[:, None]]  # edges into the sink
            values[batch] = _batched_max_flow(atil[-1][i[:, None], tokens], layered)
    return values


def _batched_max_flow(source_caps: np.ndarray, layered_caps: np.ndarray) -> np.ndarray:
    """Max-flow of P layered graphs sharing a super source s and a super sink t.

    Graph p: s -> group 0 (source_caps[p], (w,)), group g -> group g + 1 (layered_caps[p, g],
    (w, w)); the last block's column 0 holds the capacities into t. Each value returned is the
    float capacity of graph p's edges in the min cut (s's side: reachable in the residual graph).
    """
    n_pairs, n_groups, width = layered_caps.shape[:3]
    nodes_per_pair = n_groups * width
    sink = 1 + n_pairs * nodes_per_pair  # node 0 is the super source
    first = np.flatnonzero(source_caps)  # s -> group 0
    flat = np.flatnonzero(layered_caps)  # ordered by (pair, group, row): CSR order
    row, down = np.divmod(flat, width)  # row = (pair * n_groups + group) * width + up
    into_sink = (row // width) % n_groups == n_groups - 1
    tails = np.concatenate([np.zeros(len(first), np.int64), 1 + row])
    heads = np.concatenate([
        1 + first // width * nodes_per_pair + first % width,
        np.where(into_sink, sink, 1 + row - row % width + width + down),
    ])
    owner = np.concatenate([first // width, row // nodes_per_pair])
    caps = np.concatenate([source_caps.ravel()[first], layered_caps.ravel()[flat]])
    counts = np.concatenate([[0, len(first)], np.count_nonzero(layered_caps, axis=-1).ravel(), [0]])
    units = np.floor(caps * _SCALE).astype(np.int32)
    shape = (sink + 1, sink + 1)
    graph = sp.csr_array((units, heads.astype(np.int32), np.cumsum(counts, dtype=np.int32)), shape)
    residual = graph - maximum_flow(graph, 0, sink).flow  # forward: capacity - flow; backward: flow
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    source_side = np.zeros(sink + 1, bool)
    source_side[breadth_first_order(residual, 0, return_predecessors=False)] = True
    cut = source_side[tails] & ~source_side[heads]
    return np.bincount(owner[cut], caps[cut], n_pairs)
