"""Attention flow: the reference (networkx Edmonds-Karp per pair) against attention_flow.

    python -m bench.flow_bench

12 layers, 12 heads of random softmax attention (fixed seed), on one core: BLAS is limited to one
thread before numpy loads, and both max-flow codes are single-threaded. For 16 tokens the
reference solves every pair; for 32 and 64 it solves a random sample of pairs and its all-pairs
time is extrapolated from them (marked "~"). Every pair the reference solved is compared with
attention_flow's raw value. Times are CPU seconds of this process, so that other load on the
machine does not count; the wall time of our runs is shown too.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import time  # noqa: E402

import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from networkx.algorithms.flow import edmonds_karp  # noqa: E402

from backend.methods.rollout import attention_flow, residual_attention  # noqa: E402

LAYERS, HEADS, SEED = 12, 12, 0
REFERENCE_PAIRS = {16: None, 32: 8, 64: 2}  # None: all pairs
OURS_ONLY = (128, 256)


def random_attention(n: int, causal: bool = False) -> np.ndarray:
    logits = np.random.default_rng(SEED).normal(size=(LAYERS, HEADS, n, n))
    if causal:
        logits = np.where(np.triu(np.ones((n, n), bool), k=1), -np.inf, logits)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def reference_graph(atil: np.ndarray) -> nx.DiGraph:
    """Abnar & Zuidema's graph: node (l, k), edge (l, i) -> (l - 1, j) of capacity Atil_l[i, j]."""
    layers, n, _ = atil.shape
    graph = nx.DiGraph()
    for layer in range(1, layers + 1):
        for i in range(n):
            for j in range(n):
                if atil[layer - 1, i, j] > 0:
                    graph.add_edge((layer, i), (layer - 1, j), capacity=atil[layer - 1, i, j])
    return graph


def reference_flows(attn: np.ndarray, pairs) -> tuple[dict, float]:
    """Raw max-flow of the given (i, j) pairs, networkx Edmonds-Karp; CPU seconds."""
    start = time.process_time()
    graph = reference_graph(residual_attention(attn))
    values = {
        (i, j): nx.maximum_flow_value(graph, (LAYERS, i), (0, j), flow_func=edmonds_karp)
        for i, j in pairs
    }
    return values, time.process_time() - start


def ours(attn: np.ndarray) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    flow = attention_flow(attn, normalize=False)
    return flow, time.process_time() - cpu, time.perf_counter() - wall


def sample_pairs(n: int, count: int | None, causal: bool = False) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(n) for j in range(n) if not causal or j <= i]
    if count is None:
        return pairs
    rng = np.random.default_rng(SEED + n)
    return [pairs[k] for k in sorted(rng.choice(len(pairs), size=count, replace=False))]


def main() -> None:
    print(f"attention flow, {LAYERS} layers x {HEADS} heads, random softmax attention, seed {SEED}")
    print("one core: BLAS limited to 1 thread; networkx and scipy's max-flow are single-threaded\n")
    header = (f"{'tokens':>6}  {'reference (networkx EK)':>28}  {'ours':>8}  {'wall':>7}  "
              f"{'speed-up':>10}  {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for n, count in REFERENCE_PAIRS.items():
        attn = random_attention(n)
        flow, cpu, wall = ours(attn)
        pairs = sample_pairs(n, count)
        expected, ref_cpu = reference_flows(attn, pairs)
        diff = max(abs(flow[i, j] - value) for (i, j), value in expected.items())
        ref_all = ref_cpu * n * n / len(pairs)
        mark = " " if count is None else "~"
        note = f"{len(pairs)} of {n * n} pairs"
        print(f"{n:>6}  {mark}{ref_all:>9.1f} s ({note:>15})  {cpu:>6.3f} s  {wall:>5.2f} s  "
              f"{mark}{ref_all / cpu:>8.0f}x  {diff:>10.1e}")
        assert diff < 1e-7, f"attention_flow differs from the reference by {diff:.2e} at {n} tokens"
    for n in OURS_ONLY:
        _, cpu, wall = ours(random_attention(n))
        print(f"{n:>6}  {'(not run)':>28}  {cpu:>6.2f} s  {wall:>5.2f} s")
    print("\n~ extrapolated: reference CPU time of the sampled pairs x (all pairs / sampled pairs)")

    print("\ncausal (lower-triangular) attention: most pairs go to max-flow (no certificate)")
    for n in (64, 128):
        attn = random_attention(n, causal=True)
        flow, cpu, wall = ours(attn)
        line = f"{n:>6}  ours {cpu:>6.2f} s CPU, {wall:>6.2f} s wall"
        if n == 64:
            expected, _ = reference_flows(attn, sample_pairs(n, 3, causal=True))
            diff = max(abs(flow[i, j] - value) for (i, j), value in expected.items())
            line += f"; max |diff| on 3 reference pairs {diff:.1e}"
            assert diff < 1e-7, f"causal attention_flow differs from the reference by {diff:.2e}"
        print(line)

if __name__ == "__main__":
    main()
