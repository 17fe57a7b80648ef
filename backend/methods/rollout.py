"""Attention rollout, attention flow (Abnar & Zuidema, ACL 2020) and gradient-weighted rollout
(Chefer, Gur & Wolf, ICCV 2021).

Every function takes attention of shape (layer, head, query, key), rows summing to 1, as a numpy
array or a torch tensor, and returns numpy float64 arrays.

Flow is the exact max-flow of every (query, key) pair, but not computed the way the reference
does it (one networkx Edmonds-Karp per pair: ~40-70 s for 12 layers x 16 tokens). Three steps:

1. Bound. A pair's flow is at most the cheaper of two trivial cuts: the edges out of the source
   (L, i) and the edges into the sink (0, j), counting only nodes on some source-to-sink path.
   A bound of 0 means unconnected (causal attention: key > query).
2. Certificate. In deep bidirectional attention the bound is nearly always the answer; a flow
   that reaches it proves it. Flows meeting in a middle layer give such a flow for many pairs at
   once: about 3n max-flows on half-depth graphs stand for the n^2 pair flows
   (_certify_trivial_cuts).
3. Max-flow for the other pairs (shallow models, causal attention), each on the tokens between
   the first and last one its paths can use (causal: keys j..i), many pairs per scipy Dinic call.

scipy's max-flow wants integers: capacities become floor(c * 2^30), so every flow it finds is
feasible for the real capacities. The certificate rounds its demands up, which makes it exact
(where the two cuts tie, to within a relative 8 (n + 1) 2^-30, about 2e-6 at 256 tokens).
Step 3 returns the float capacity of the min cut that scipy's flow leaves, exact whenever that
cut is a min cut of the real capacities too, and within (edges in the cut) * 2^-30 otherwise.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from backend.errors import InputError, JobCancelled
from backend.progress import Progress

HEAD_FUSIONS = ("mean", "max", "min")
_SCALE = 2**30  # integer capacity = floor(capacity * _SCALE); capacities are <= 1


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


def fuse_heads(weights, head_fusion: str, axis: int):
    """One map from a layer's heads along `axis`: their mean, max or min (HEAD_FUSIONS), of a
    numpy array or a torch tensor."""
    if head_fusion not in HEAD_FUSIONS:
        raise InputError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}; "
                         f"got {head_fusion!r}.")
    if head_fusion == "mean":
        return weights.mean(axis)
    torch_reduce = getattr(weights, "a" + head_fusion, None)  # tensors: amax / amin
    return torch_reduce(axis) if torch_reduce else getattr(weights, head_fusion)(axis)


def residual_attention(attn, head_fusion: str = "mean") -> np.ndarray:
    """Atil_l = (Abar_l + I) / rowsum: heads fused, residual added, rows renormalised.

    attn (layer, head, query, key) -> (layer, query, key); entry [l - 1] is Atil_l.
    """
    fused = fuse_heads(_attention(attn), head_fusion, axis=1)
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
    """Chefer et al.: Abar_l = mean_h clamp(G_l * A_l, min=0), R_l = R_{l-1} + Abar_l @ R_{l-1}.

    attn, grads (layer, head, query, key), grads = d target / d attn -> (layer, query, key):
    R_1 .. R_L, with R_0 = I. Rows are not renormalised.
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


def target_rollout_rows(fused_rows: Callable, n_layers: int, n_tokens: int, target: int,
                        chunk: int = 1024, causal: bool = False) -> np.ndarray:
    """Row `target` of the rollout after each layer, (layer, key) float64, without forming R_l.

    fused_rows(layer, queries) -> (query, key) torch tensor: the layer's head-fused attention
    rows (before the residual). Row t of R_l = e_t Atil_l ... Atil_1 is a chain of vector-matrix
    products; walking the layers once from the top, every start layer's vector is multiplied by
    the current layer together ((layer, T) @ (T, T)), so each layer's rows are produced once, a
    chunk of queries at a time, on their device: O(layers x T^2) weights recomputed,
    O(layers x T + chunk x T) memory. causal: queries after the target cannot reach it.
    """
    import torch  # the rest of this module is numpy only

    vectors = None
    last = target + 1 if causal else n_tokens
    for layer in reversed(range(n_layers)):
        out = None
        for q in range(0, last, chunk):
            rows = fused_rows(layer, slice(q, min(q + chunk, last))).double()
            if vectors is None:
                vectors = torch.zeros(0, n_tokens, dtype=torch.float64, device=rows.device)
            if out is None:  # start layer `layer` joins the walk
                start = torch.zeros(1, n_tokens, dtype=torch.float64, device=rows.device)
                start[0, target] = 1.0
                vectors = torch.cat([vectors, start])
                out = torch.zeros_like(vectors)
            diagonal = torch.arange(len(rows), device=rows.device)
            rows[diagonal, q + diagonal] += 1.0  # residual, then renormalise
            rows /= rows.sum(-1, keepdim=True)
            out += vectors[:, q:q + len(rows)] @ rows
        vectors = out
    return vectors.flip(0).cpu().numpy()  # vectors[i] started at layer n_layers - 1 - i


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
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Max-flow from every top-layer token (L, i) to every input token (0, j).

    attn (layer, head, query, key) -> (query, key). The graph has a node (l, k) per layer l = 0..L
    and token k, and edges (l, i) -> (l - 1, j) of capacity Atil_l[i, j]. With normalize, each row
    is divided by its sum; otherwise the raw max-flow values are returned.

    progress(fraction, stage) is called now and then with fraction in [0, 1]; should_stop() is
    polled about every 50 ms and JobCancelled raised as soon as it returns True.
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
            raise JobCancelled(f"attention flow cancelled during {stage}")
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
    edges = (atil > 0).astype(np.float32)  # float32 0/1 matrices: counts stay exact, BLAS is fast
    reach = {n_layers - 1: edges[-1]}
    for layer in range(n_layers - 1, 1, -1):
        reach[layer - 1] = np.minimum(reach[layer] @ edges[layer - 1], 1)
    coreach = {1: edges[0].T}
    for layer in range(1, n_layers - 1):
        coreach[layer + 1] = np.minimum(coreach[layer] @ edges[layer].T, 1)
    return {k: v > 0 for k, v in reach.items()}, {k: v > 0 for k, v in coreach.items()}


def _first_token(reachable: dict) -> np.ndarray:
    return np.logical_or.reduce(list(reachable.values())).argmax(1)


def _last_token(reachable: dict) -> np.ndarray:
    seen = np.logical_or.reduce(list(reachable.values()))
    return seen.shape[1] - 1 - seen[:, ::-1].argmax(1)


def _certify_trivial_cuts(atil, reach, coreach, source_cut, sink_cut, pending, flow, work, ticker):
    """Prove flow = min(source_cut, sink_cut) with flows that meet at a middle layer m.

    For pairs whose paths may use every token (bidirectional attention). Let pi be uniform over
    the n tokens of layer m, u = w * pi, "top" the layers L..m and "bottom" the layers m..0.
    - source cut < sink cut: all of the source's capacity fits through top into u, and all of u
      passes through bottom into the sink: a flow of value source_cut;
    - sink cut < source cut: top can deliver all of u, and at most u fills every edge into the
      sink through bottom: a flow of value sink_cut;
    - a tie (within the margin): top delivers all of u = (1 - margin) * bound * pi and all of u
      passes into the sink, so the flow is within a relative margin (~1e-6) of the bound.
    One test per source on top and one per sink on bottom, each a max-flow on a half-depth graph:
    about 3n of them instead of n^2 pair flows. Proven pairs get their flow, leave pending.
    """
    n_layers, n = atil.shape[:2]
    margin = 8 * (n + 1) / _SCALE  # relative slack: absorbs the rounding to integers
    dense = reach[1].all(1)[:, None] & coreach[n_layers - 1].all(1)[None, :]
    by_source = source_cut * (1 + margin) <= sink_cut * (1 - margin)
    by_sink = sink_cut * (1 + margin) <= source_cut * (1 - margin)
    bound = np.minimum(source_cut, sink_cut)
    cases = [  # which pairs, level w, what top and bottom must saturate
        (by_source, source_cut * (1 + margin), "source", "source"),
        (by_sink, sink_cut * (1 + margin), "sink", "sink"),
        (~by_source & ~by_sink, bound * (1 - margin), "sink", "source"),
    ]
    uniform = np.full(n, 1.0 / n)
    for middle in dict.fromkeys([n_layers // 2, n_layers // 3, 2 * n_layers // 3]):
        if (pending & dense).sum() <= 2 * n:
            return  # too few pairs left to be worth ~3n half-depth flows
        top = _HalfNetwork(atil[-2 : middle - 1 : -1], n)  # layers L-1 .. middle
        bottom = _HalfNetwork(atil[middle - 1 : 0 : -1], n)  # layers middle .. 1
        full = reach[middle].all(1)[:, None] & coreach[middle].all(1)[None, :]
        for pairs, level, top_demand, bottom_demand in cases:
            level = np.where(pairs & pending & dense & full, level, 0.0)
            tops = _each(level.max(1), lambda i, w: top.saturates(
                atil[-1][i], w * uniform, top_demand), top.size, work, pending, ticker)
            level *= tops[:, None]
            bottoms = _each(level.max(0), lambda j, w: bottom.saturates(
                w * uniform, atil[0][:, j], bottom_demand), bottom.size, work, pending, ticker)
            proven = (level > 0) & bottoms[None, :]
            flow[proven] = bound[proven]
            pending &= ~proven


def _each(levels, test, size, work, pending, ticker) -> np.ndarray:
    """test(k, levels[k]) for every k with a level > 0; False for the others."""
    passed = np.zeros(len(levels), bool)
    todo = np.flatnonzero(levels > 0)
    for count, k in enumerate(todo):
        ahead = (len(todo) - count) * size + work[pending].sum()
        ticker.report("certify", ahead=ahead, step=size)
        passed[k] = test(k, levels[k])
    return passed


class _HalfNetwork:
    """source -> n tokens -> ... -> n tokens -> sink, blocks[g] linking token groups g, g + 1.

    The integer CSR graph is built once; source and sink capacities are set per test.
    """

    def __init__(self, blocks, n: int):
        self.blocks, self.n = list(blocks), n
        self.size = (len(self.blocks) + 1) * n * n  # work units, for progress
        if not self.blocks:  # source -> tokens -> sink: no graph needed
            return
        self.sink = 1 + (len(self.blocks) + 1) * n  # source 0; token k of group g: 1 + g * n + k
        stacked = np.concatenate(self.blocks)  # row g * n + k: token k of group g
        rows, cols = np.nonzero(stacked)  # in CSR order
        heads = np.concatenate([1 + np.arange(n), 1 + n + rows // n * n + cols, [self.sink] * n])
        counts = np.concatenate([[0, n], np.count_nonzero(stacked, axis=1), np.ones(n, int), [0]])
        caps = np.concatenate([np.zeros(n), stacked[rows, cols], np.zeros(n)])
        indptr = np.cumsum(counts, dtype=np.int32)
        units = np.floor(caps * _SCALE).astype(np.int32)
        self.graph = sp.csr_array((units, heads.astype(np.int32), indptr), (self.sink + 1,) * 2)

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
        graph = None
        for start in range(0, len(group), per_solve):
            batch = group[start : start + per_solve]
            ahead -= len(batch) * n_layers * width**2
            ticker.report("max-flow", ahead=ahead, step=len(batch) * n_layers * width**2)
            i, j, first = pairs[batch, 0], pairs[batch, 1], low[batch]
            tokens = first[:, None] + np.arange(width)  # (pair, width)
            source_caps = atil[-1][i[:, None], tokens]
            layered = np.zeros((len(batch), n_layers - 1, width, width))
            layered[:, :-1] = windows[:, first, first].swapaxes(0, 1)
            layered[:, -1, :, 0] = atil[0][tokens, j[:, None]]  # edges into the sink
            if graph is None or not graph.fits(source_caps, layered):
                graph = _BatchedGraph(source_caps != 0, layered != 0)  # same for most batches
            values[batch] = graph.max_flows(source_caps, layered)
    return values


class _BatchedGraph:
    """P layered graphs sharing a super source s and a super sink t, for one sparsity pattern.

    Graph p: s -> group 0 (source_caps[p], (w,)), group g -> group g + 1 (layered_caps[p, g],
    (w, w)); the last block's column 0 holds the capacities into t.
    """

    def __init__(self, source_mask: np.ndarray, layered_mask: np.ndarray):
        self.source_mask, self.layered_mask = source_mask, layered_mask
        n_pairs, n_groups, width = layered_mask.shape[:3]
        nodes_per_pair = n_groups * width
        self.sink = 1 + n_pairs * nodes_per_pair  # node 0 is the super source
        self.first = np.flatnonzero(source_mask)  # s -> group 0
        self.flat = np.flatnonzero(layered_mask)  # ordered by (pair, group, row): CSR order
        row, down = np.divmod(self.flat, width)  # row = (pair * n_groups + group) * width + up
        into_sink = (row // width) % n_groups == n_groups - 1
        self.tails = np.concatenate([np.zeros(len(self.first), np.int64), 1 + row])
        self.heads = np.concatenate([
            1 + self.first // width * nodes_per_pair + self.first % width,
            np.where(into_sink, self.sink, 1 + row - row % width + width + down),
        ])
        self.heads32 = self.heads.astype(np.int32)
        self.owner = np.concatenate([self.first // width, row // nodes_per_pair])
        counts = [[0, len(self.first)], layered_mask.sum(-1).ravel(), [0]]
        self.indptr = np.cumsum(np.concatenate(counts), dtype=np.int32)

    def fits(self, source_caps, layered_caps) -> bool:
        return (self.layered_mask.shape == layered_caps.shape
                and np.array_equal(self.source_mask, source_caps != 0)
                and np.array_equal(self.layered_mask, layered_caps != 0))

    def max_flows(self, source_caps, layered_caps) -> np.ndarray:
        """Each graph's max-flow, as the float capacity of its edges in the min cut of the
        integer problem (s's side: the nodes reachable from s in the residual graph)."""
        caps = np.concatenate([source_caps.ravel()[self.first], layered_caps.ravel()[self.flat]])
        units = np.floor(caps * _SCALE).astype(np.int32)
        shape = (self.sink + 1, self.sink + 1)
        graph = sp.csr_array((units, self.heads32, self.indptr), shape)
        residual = graph - maximum_flow(graph, 0, self.sink).flow  # capacity - flow; or flow
        residual.data = (residual.data > 0).astype(np.int8)
        residual.eliminate_zeros()
        source_side = np.zeros(self.sink + 1, bool)
        source_side[breadth_first_order(residual, 0, return_predecessors=False)] = True
        cut = source_side[self.tails] & ~source_side[self.heads]
        return np.bincount(self.owner[cut], caps[cut], len(source_caps))
