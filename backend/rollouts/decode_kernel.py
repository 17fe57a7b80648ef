"""Split-key ("flash decoding") attention of one query token per row, for the rollout engine's
decoding steps on a CUDA GPU.

Each row attends its own keys 0..position (a static cache holds every row at its own length);
each program takes one row, one key/value head with its group of query heads, and one split of
`SPLIT` keys, so keys are read once, never repeated per query head, and positions past a row's
length are never read at all (sdpa with a boolean mask reads them all, and expands the key/value
heads first). Splits' partial softmax sums are merged afterwards by their maxima.

Shapes: query (row, head, head_dim); key and value (row, key_head, capacity, head_dim), any
strides; positions (row,) int64, the position of each row's query (it attends keys 0..position,
within `window` of it when given); output (row, head, head_dim) in the query's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.triton_runtime import INTERPRETED, loop_bound

SPLIT = 256  # keys per program
BLOCK_N = 64  # keys per step inside a program


@triton.jit
def _split_kernel(Q, K, V, POS, ACC, M, L, group, scaling, window,
                  stride_qr, stride_qh, stride_qd, stride_kr, stride_kh, stride_kt, stride_kd,
                  stride_vr, stride_vh, stride_vt, stride_vd,
                  D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, WINDOW: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(2)
    length = tl.load(POS + row) + 1
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, length)
    if WINDOW:
        lo = tl.maximum(lo, length - window)
    g = tl.arange(0, G)
    d = tl.arange(0, DP)
    heads = kv_head * group + g
    q = tl.load(Q + row * stride_qr + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=(g[:, None] < group) & (d[None, :] < D), other=0.0)
    k_base = K + row * stride_kr + kv_head * stride_kh
    v_base = V + row * stride_vr + kv_head * stride_vh
    m = tl.full([G], float("-inf"), tl.float32)
    total = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, DP], tl.float32)
    for start in range(loop_bound(lo), loop_bound(hi), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < hi
        k = tl.load(k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                    mask=inside[None, :] & (d[:, None] < D), other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scaling
        s = tl.where(inside[None, :], s, float("-inf"))
        new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - new[:, None])
        alpha = tl.exp(m - new)
        v = tl.load(v_base + cols[:, None] * stride_vt + d[None, :] * stride_vd,
                    mask=inside[:, None] & (d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        total = total * alpha + tl.sum(p, 1)
        m = new
    out = ((row * tl.num_programs(1) + kv_head) * splits + split) * G + g
    tl.store(ACC + out[:, None] * DP + d[None, :], acc)
    tl.store(M + out, m)
    tl.store(L + out, total)


def supported(query: torch.Tensor, softcap=None, sinks=None) -> bool:
    """Whether the kernel reproduces this layer's decoding attention: one query token per row on
    CUDA (any device in the interpreter), no soft-capping, no sink logits."""
    return ((query.is_cuda or bool(INTERPRETED)) and query.shape[2] == 1 and softcap is None
            and sinks is None)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     positions: torch.Tensor, scaling: float,
                     window: int | None = None) -> torch.Tensor:
    """(row, head, head_dim) attention output of one query per row over its own keys."""
    rows, heads, head_dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    group = heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    dp = max(16, triton.next_power_of_2(head_dim))
    splits = triton.cdiv(capacity, SPLIT)
    acc = torch.empty(rows, kv_heads, splits, g_pad, dp, dtype=torch.float32,
                      device=query.device)
    m = torch.empty(rows, kv_heads, splits, g_pad, dtype=torch.float32, device=query.device)
    total = torch.empty_like(m)
    _split_kernel[(rows, kv_heads, splits)](
        query, key, value, positions, acc, m, total, group, scaling, window or 0,
        *query.stride(), *key.stride(), *value.stride(), D=head_dim, DP=dp, G=g_pad,
        WINDOW=window is not None, SPLIT=SPLIT, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4,
        num_stages=2)
    # Merge the splits: weights exp(m_split - m_max); empty splits have m = -inf, weight 0.
    weight = torch.exp(m - m.amax(2, keepdim=True))
    out = (acc * weight[..., None]).sum(2) / (total * weight).sum(2)[..., None]
    return out[:, :, :group, :head_dim].reshape(rows, heads, head_dim).to(query.dtype)
