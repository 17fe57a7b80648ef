"""Top-p sampling of one token per row in one Triton kernel, with no sort of the vocabulary.

A nucleus of near-uniform logits (a model unsure of its next token, every randomly initialised
one) holds most of the vocabulary, so a sort-based sampler sorts (row, vocab) at every step,
which costs a third of the model's own decoding step on a GPU. Here each program takes one row:
the nucleus threshold is found by bisection over the logits' order-preserving integer keys (each
step one pass summing the mass at or above a candidate key), then one pass draws the token by
the Gumbel-max rule among the tokens at or above it, which samples them in proportion to their
probabilities. The nucleus is `sampling.nucleus_threshold`'s: all tokens at least as likely as
the one whose cumulative mass (most likely first) reaches top_p, ties kept together.

Shapes: logits (row, vocab), any row stride (an expanded row repeats one prompt's logits);
seed (1,) int64 on the device; out (row,) int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.triton_runtime import loop_bound

BLOCK = 4096  # vocabulary entries per step of a pass


@triton.jit
def _keys(x):
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _mass(row_ptr, vocab, top, inv_t, threshold, BLOCK: tl.constexpr):
    """Unnormalised mass of the tokens whose key is >= threshold."""
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, loop_bound(vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        p = tl.exp((x - top) * inv_t)
        total += tl.where(_keys(x) >= threshold, p, 0.0)
    return tl.sum(total, 0)


@triton.jit
def _top_p_kernel(LOGITS, SEED, OUT, vocab, stride_row, inv_t, top_p, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = LOGITS + row.to(tl.int64) * stride_row
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    low = tl.full([BLOCK], 2147483647, tl.int32)
    for start in range(0, loop_bound(vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, x)
        low = tl.minimum(low, tl.where(inside, _keys(x), 2147483647))
    top = tl.max(top, 0)
    # Largest key whose mass at or above it reaches top_p: lo always qualifies, hi never does.
    lo = tl.min(low, 0).to(tl.int64)
    hi = _keys(top).to(tl.int64) + 1
    target = top_p * _mass(row_ptr, vocab, top, inv_t, lo, BLOCK)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if _mass(row_ptr, vocab, top, inv_t, mid, BLOCK) >= target:
            lo = mid
        else:
            hi = mid
    seed = tl.load(SEED)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, loop_bound(vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + cols)
        score = (x - top) * inv_t - tl.log(-tl.log(u))
        score = tl.where(_keys(x) >= lo, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_at = tl.where(better, cols, best_at)
    winner = tl.argmax(best, 0)
    tl.store(OUT + row, tl.sum(tl.where(tl.arange(0, BLOCK) == winner, best_at, 0), 0).to(tl.int64))


def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float,
                 seed: torch.Tensor) -> torch.Tensor:
    """(row, vocab) logits -> (row,) int64 token ids; temperature > 0."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _top_p_kernel[(rows,)](logits, seed, out, vocab, logits.stride(0), 1.0 / temperature,
                           min(float(top_p), 1.0), BLOCK=BLOCK, num_warps=8)
    return out
