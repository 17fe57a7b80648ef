"""Compare view: the per-head divergence grid, ours against the straightforward way.

    python -m bench.compare_bench

SmolLM2's shape (30 layers x 9 heads), random causal attention (fixed seed), tokens grouped into
units as a word alignment would (about one unit per 1.3 tokens). Ours pools rows and columns by
unit runs (`aligned_attention`) and takes the Jensen-Shannon divergence of all rows at once
(`mean_row_divergence`). The baseline multiplies by dense (unit, token) membership matrices and
calls scipy's `jensenshannon` row by row. One layer is timed and multiplied by 30 (both sides
compute every layer the same way). Times are CPU seconds of this process, BLAS on one thread.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS

import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.spatial.distance import jensenshannon  # noqa: E402

from backend.methods.alignment import aligned_attention  # noqa: E402
from backend.methods.comparison import mean_row_divergence  # noqa: E402

LAYERS, HEADS, SEED = 30, 9, 0
TOKENS = (128, 256, 512, 1024)


def causal_attention(rng, n: int) -> np.ndarray:
    logits = np.where(np.triu(np.ones((n, n), bool), k=1), -np.inf,
                      rng.normal(size=(HEADS, n, n)))
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def word_units(rng, n: int) -> np.ndarray:
    """(unit, token) membership: runs of 1-2 tokens, as words of a BPE tokenizer."""
    starts = np.flatnonzero(np.r_[True, rng.random(n - 1) < 0.75])
    membership = np.zeros((len(starts), n), dtype=np.float32)
    for unit, (a, b) in enumerate(zip(starts, np.r_[starts[1:], n])):
        membership[unit, a:b] = 1
    return membership


def ours(a, b, membership):
    return mean_row_divergence(aligned_attention(a, membership),
                               aligned_attention(b, membership))


def baseline(a, b, membership):
    rows = membership / membership.sum(1, keepdims=True)
    ua, ub = rows @ a @ membership.T, rows @ b @ membership.T
    return np.array([np.mean([jensenshannon(ua[h, q], ub[h, q], base=2) ** 2
                              for q in range(ua.shape[1])]) for h in range(HEADS)])


def cpu_seconds(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


def main() -> None:
    rng = np.random.default_rng(SEED)
    print(f"{LAYERS} layers x {HEADS} heads, causal random attention; CPU s for the whole grid")
    print(f"{'tokens':>7} {'units':>6} {'ours':>9} {'baseline':>10} {'ratio':>8} {'max |diff|':>11}")
    for n in TOKENS:
        a, b = causal_attention(rng, n), causal_attention(rng, n)
        membership = word_units(rng, n)
        ours_s, ours_grid = cpu_seconds(ours, a, b, membership)
        base_s, base_grid = cpu_seconds(baseline, a, b, membership)
        print(f"{n:>7} {len(membership):>6} {ours_s * LAYERS:>9.2f} {base_s * LAYERS:>10.2f} "
              f"{base_s / ours_s:>7.1f}x {np.abs(ours_grid - base_grid).max():>11.1e}")


if __name__ == "__main__":
    main()
