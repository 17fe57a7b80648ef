"""Fused Triton kernels for the capture on a CUDA GPU: a layer's output with its row
log-sum-exps, then its reductions, in two passes over key blocks as flash attention's forward
walks them. No (head, query, key) array is ever formed.

Pass 1 (`forward`): the layer's output, as flash attention computes it, with each row's
log-sum-exp and maximum logit, so the capture costs no pass beyond the forward's own for them.
Pass 2 (`reduce_layer`): exact weights p = exp(s - lse) block by block, pooled into what
`BlockMeans` (row sums per key span) and `HeadStatistics` (per-row terms, vertical column sums)
accumulate. Both passes walk the key blocks wholly inside the mask in a loop of their own,
without masking (`_full_blocks`), and the edge blocks before and after it with the mask. Logits
follow eager attention and `exact.logits`: q . k accumulated in float32, rounded to the model's
dtype, times scaling, rounded again. Rules covered: causal or bidirectional, grouped-query
attention, sliding windows (`supported`); soft-capping and sink logits stay on the plain-torch
path.

Shapes: query (head, T, head_dim), key and value (key_head, T, head_dim), any strides; lse
(head, T)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

from backend.methods.exact import AttentionRule
from backend.methods.reductions import ROW_TERMS, BlockMeans, HeadStatistics, span_index
from backend.triton_runtime import INTERPRETED, loop_bound

# (rows, keys, warps, stages) per program of each pass, tuned on an H200 (bf16, head_dim 128).
FORWARD_BLOCKS = (64, 64, 4, 3)
REDUCE_BLOCKS = (128, 64, 4, 2)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): one fused multiply-add
MASKED = tl.constexpr(-1e30)  # pass 2's masked logit: p = 0 and p (lse - s) = 0, not NaN


@triton.jit
def _logits(q, K, k_base, cols, d, T, stride_kt, stride_kd, scaling, D: tl.constexpr,
            PRECISION: tl.constexpr):
    """(rows, keys) float32 logits of one key block, unmasked."""
    k = tl.load(K + k_base + cols[None, :] * stride_kt + d[:, None] * stride_kd,
                mask=(cols[None, :] < T) & (d[:, None] < D), other=0.0)
    dot = tl.dot(q, k, input_precision=PRECISION)
    return (dot.to(q.dtype).to(tl.float32) * scaling).to(q.dtype).to(tl.float32)


@triton.jit
def _allowed(distance, rows, cols, T, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    ok = (cols[None, :] < T) & (rows[:, None] < T)
    if CAUSAL:
        ok &= distance >= 0
    if WINDOW:
        ok &= tl.abs(distance) < window
    return ok


@triton.jit
def _key_range(q_lo, q_hi, T, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The key blocks queries [q_lo, q_hi) can see at all (`AttentionRule.key_range`)."""
    first = 0
    last = T
    if WINDOW:
        if q_lo - window + 1 > 0:
            first = q_lo - window + 1
        if q_hi + window - 1 < T:
            last = q_hi + window - 1
    if CAUSAL:
        if q_hi < T:
            last = q_hi
        else:
            last = T
    return (first // BLOCK_N) * BLOCK_N, last


@triton.jit
def _full_blocks(q_lo, start, last, T, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) inside [start, last): the key blocks none of whose (row, key) pairs is masked
    (all rows and keys inside the input, every distance row - key inside the rule), so that
    the loop over them needs no mask; the blocks before and after are the edges."""
    lo = start
    hi = (T // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, ((q_lo + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW:  # every distance row - key of the block below the window
        lo = tl.maximum(lo, tl.cdiv(q_lo + BLOCK_M - window, BLOCK_N) * BLOCK_N)
        if not CAUSAL:
            hi = tl.minimum(hi, ((q_lo + window) // BLOCK_N) * BLOCK_N)
    if q_lo + BLOCK_M > T:  # rows past the end: every block masks them
        hi = lo
    lo = tl.minimum(lo, last)
    return lo, tl.minimum(tl.maximum(hi, lo), last)


@triton.jit
def _part(part: tl.constexpr, start, lo, hi, last):
    """The key blocks [k_start, k_stop) of part 0 (the edge before `_full_blocks`), 1 (the
    blocks inside the mask) or 2 (the edge after)."""
    if part == 0:
        return start, lo
    elif part == 1:
        return lo, hi
    else:
        return hi, last


@triton.jit
def _forward_step(q, K, k_base, v_base, k_lo, rows, d, dv, T, window, stride_kt, stride_kd,
                  stride_vt, stride_vd, scaling, m, total, acc, D: tl.constexpr,
                  DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  PRECISION: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the flash attention loop: the running maximum m, sum and output."""
    cols = k_lo + tl.arange(0, BLOCK_N)
    s = _logits(q, K, k_base, cols, d, T, stride_kt, stride_kd, scaling, D, PRECISION)
    if MASK:
        distance = rows[:, None] - cols[None, :]
        s = tl.where(_allowed(distance, rows, cols, T, window, CAUSAL, WINDOW), s,
                     float("-inf"))
    new = tl.maximum(m, tl.max(s, 1))
    safe = tl.where(new == float("-inf"), 0.0, new)  # a row with no key seen yet
    alpha = tl.math.exp2((m - safe) * LOG2E)  # exactly 1 while the maximum holds
    p = tl.math.exp2(s * LOG2E - (safe * LOG2E)[:, None])
    v = tl.load(v_base + cols[:, None] * stride_vt + dv[None, :] * stride_vd,
                mask=(cols[:, None] < T) & (dv[None, :] < DV), other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new, total * alpha + tl.sum(p, 1), acc


@triton.jit
def _forward_kernel(Q, K, T, group, scaling, window,
                    stride_qh, stride_qt, stride_qd, stride_kh, stride_kt, stride_kd,
                    V, stride_vh, stride_vt, stride_vd, O, stride_ot, stride_oh, LSE, MAX,
                    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The layer's output o = softmax(s) v as flash attention computes it (running maximum,
    weights cast to v's dtype before the product, as eager casts them), and each row's
    log-sum-exp and maximum logit of the rounded logits."""
    head = tl.program_id(1)
    q_lo = tl.program_id(0) * BLOCK_M
    rows = q_lo + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
    k_base = (head // group) * stride_kh
    v_base = V + (head // group) * stride_vh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)
    start, last = _key_range(q_lo, q_lo + BLOCK_M, T, window, CAUSAL, WINDOW, BLOCK_N)
    lo, hi = _full_blocks(q_lo, start, last, T, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for part in tl.static_range(3):  # the edge before, the blocks inside the mask, the edge after
        k_start, k_stop = _part(part, start, lo, hi, last)
        for k_lo in range(loop_bound(k_start), loop_bound(k_stop), BLOCK_N):
            m, total, acc = _forward_step(q, K, k_base, v_base, k_lo, rows, d, dv, T, window,
                                          stride_kt, stride_kd, stride_vt, stride_vd, scaling,
                                          m, total, acc, D, DV, CAUSAL, WINDOW, PRECISION,
                                          part != 1, BLOCK_N)
    out = head * T + rows
    tl.store(LSE + out, m + tl.log(total), mask=rows < T)
    tl.store(MAX + out, m, mask=rows < T)
    tl.store(O + rows[:, None] * stride_ot + head * stride_oh + dv[None, :],
             (acc / total[:, None]).to(O.dtype.element_ty),
             mask=(rows[:, None] < T) & (dv[None, :] < DV))


@triton.jit
def _reduce_step(q, K, k_base, k_lo, rows, d, lse, lse2, T, window, stride_kt, stride_kd,
                 scaling, q_lo, q_hi, head, local, chunk, SPAN, SPAN_LO, SPAN_HI, SPAN_ONE,
                 ROW_SUMS, n_spans, VERTICAL, near, prox, entropy, mass, first, previous,
                 itself, near_mass, near_dist, D: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCKS: tl.constexpr,
                 STATS: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of pass 2: row sums per key span into ROW_SUMS, column sums into
    VERTICAL, and the per-row terms carried from block to block."""
    cols = k_lo + tl.arange(0, BLOCK_N)
    s = _logits(q, K, k_base, cols, d, T, stride_kt, stride_kd, scaling, D, PRECISION)
    distance = rows[:, None] - cols[None, :]
    if MASK:
        s = tl.where(_allowed(distance, rows, cols, T, window, CAUSAL, WINDOW), s, MASKED)
    p = tl.math.exp2(s * LOG2E - lse2[:, None])
    row = tl.sum(p, 1)
    if BLOCKS:
        block = k_lo // BLOCK_N
        one = tl.load(SPAN_ONE + block)
        if one >= 0:  # every key of the block in one span
            out = ROW_SUMS + (head * n_spans + one) * chunk + local
            tl.store(out, tl.load(out, mask=rows < T, other=0.0) + row, mask=rows < T)
        else:
            span = tl.load(SPAN + cols, mask=cols < T, other=-1)
            for b in range(loop_bound(tl.load(SPAN_LO + block)),
                           loop_bound(tl.load(SPAN_HI + block)) + 1):
                out = ROW_SUMS + (head * n_spans + b) * chunk + local
                part = tl.sum(tl.where(span[None, :] == b, p, 0.0), 1)
                tl.store(out, tl.load(out, mask=rows < T, other=0.0) + part, mask=rows < T)
    if STATS:
        entropy += tl.sum(p * (lse[:, None] - s), 1)  # -p log p, log p = s - lse
        mass += row
        if k_lo == 0:
            first += tl.sum(tl.where(cols[None, :] == 0, p, 0.0), 1)
        if (k_lo < q_hi + near) & (k_lo + BLOCK_N > q_lo - near):
            previous += tl.sum(tl.where(distance == 1, p, 0.0), 1)
            itself += tl.sum(tl.where(distance == 0, p, 0.0), 1)
            close = tl.where(tl.abs(distance) < near, p, 0.0)
            near_mass += tl.sum(close, 1)
            near_dist += tl.sum(close * tl.abs(distance).to(tl.float32), 1)
        if k_lo + BLOCK_N - 1 <= q_lo - prox:  # every row far enough from every key
            tl.atomic_add(VERTICAL + head * T + cols, tl.sum(p, 0), mask=cols < T,
                          sem="relaxed")
        elif k_lo <= q_hi - 1 - prox:
            column = tl.sum(tl.where(distance >= prox, p, 0.0), 0)
            tl.atomic_add(VERTICAL + head * T + cols, column, mask=cols < T, sem="relaxed")
    return entropy, mass, first, previous, itself, near_mass, near_dist


@triton.jit
def _reduce_kernel(Q, K, T, group, scaling, window,
                   stride_qh, stride_qt, stride_qd, stride_kh, stride_kt, stride_kd, LSE,
                   q_start, chunk, SPAN, SPAN_LO, SPAN_HI, SPAN_ONE, ROW_SUMS, n_spans, TERMS,
                   VERTICAL, near, prox,
                   D: tl.constexpr, DP: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCKS: tl.constexpr,
                   STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    n_heads = tl.num_programs(1)
    q_lo = q_start + tl.program_id(0) * BLOCK_M
    q_hi = q_lo + BLOCK_M
    rows = q_lo + tl.arange(0, BLOCK_M)
    local = rows - q_start  # outputs hold rows [q_start, q_start + chunk)
    d = tl.arange(0, DP)
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
    lse = tl.load(LSE + head * T + rows, mask=rows < T, other=0.0)
    lse2 = lse * LOG2E
    k_base = (head // group) * stride_kh
    entropy = tl.zeros([BLOCK_M], tl.float32)
    mass = tl.zeros([BLOCK_M], tl.float32)
    first = tl.zeros([BLOCK_M], tl.float32)
    previous = tl.zeros([BLOCK_M], tl.float32)
    itself = tl.zeros([BLOCK_M], tl.float32)
    near_mass = tl.zeros([BLOCK_M], tl.float32)
    near_dist = tl.zeros([BLOCK_M], tl.float32)
    start, last = _key_range(q_lo, q_hi, T, window, CAUSAL, WINDOW, BLOCK_N)
    lo, hi = _full_blocks(q_lo, start, last, T, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for part in tl.static_range(3):  # the edge before, the blocks inside the mask, the edge after
        k_start, k_stop = _part(part, start, lo, hi, last)
        for k_lo in range(loop_bound(k_start), loop_bound(k_stop), BLOCK_N):
            entropy, mass, first, previous, itself, near_mass, near_dist = _reduce_step(
                q, K, k_base, k_lo, rows, d, lse, lse2, T, window, stride_kt, stride_kd,
                scaling, q_lo, q_hi, head, local, chunk, SPAN, SPAN_LO, SPAN_HI, SPAN_ONE,
                ROW_SUMS, n_spans, VERTICAL, near, prox, entropy, mass, first, previous, itself,
                near_mass, near_dist, D, CAUSAL, WINDOW, PRECISION, BLOCKS, STATS, part != 1,
                BLOCK_N)
    if STATS:  # rows of reductions.ROW_TERMS; confidence's (5) comes from the forward pass
        out = TERMS + head * chunk + local
        step = n_heads * chunk
        tl.store(out, previous, mask=rows < T)
        tl.store(out + step, first, mask=rows < T)
        tl.store(out + 2 * step, itself, mask=rows < T)
        tl.store(out + 3 * step, near_mass, mask=rows < T)
        tl.store(out + 4 * step, entropy, mask=rows < T)
        tl.store(out + 6 * step, near_dist, mask=rows < T)
        tl.store(out + 7 * step, mass, mask=rows < T)


def supported(rule: AttentionRule, reducers: list, query: torch.Tensor) -> bool:
    """Whether the kernels reproduce this layer: CUDA tensors (any tensors in the interpreter),
    a rule without soft-capping or sink logits, and at most one BlockMeans (sorted, disjoint key
    spans) and one HeadStatistics."""
    kinds = [type(r) for r in reducers]
    return ((query.is_cuda or INTERPRETED) and rule.softcap is None and rule.sinks is None
            and set(kinds) <= {BlockMeans, HeadStatistics} and len(set(kinds)) == len(kinds)
            and all(r.sorted_key_spans() for r in reducers if isinstance(r, BlockMeans)))


def _launch(kernel, blocks, q: torch.Tensor, k: torch.Tensor, rule: AttentionRule, *args,
            rows: int | None = None, **flags) -> None:
    """One program per block_m query rows (`rows` of them, default all) and query head."""
    n_heads, n_tokens, head_dim = q.shape
    block_m, block_n, warps, stages = blocks
    kernel[(triton.cdiv(rows or n_tokens, block_m), n_heads)](
        q, k, n_tokens, n_heads // k.shape[0], rule.scaling, rule.window or 0, *q.stride(),
        *k.stride(), *args, D=head_dim, DP=max(16, triton.next_power_of_2(head_dim)),
        CAUSAL=rule.causal, WINDOW=rule.window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rule: AttentionRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's output (T, head, value_dim) in v's dtype, and (head, T) float32 log-sum-exp
    and maximum logit of every row. v: (key_head, T, value_dim)."""
    n_heads, n_tokens, _ = q.shape
    value_dim = v.shape[-1]
    out = torch.empty(n_tokens, n_heads, value_dim, dtype=v.dtype, device=q.device)
    lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    top = torch.empty_like(lse)
    _launch(_forward_kernel, FORWARD_BLOCKS, q, k, rule, v, *v.stride(), out, out.stride(0),
            out.stride(1), lse, top, DV=value_dim,
            DVP=max(16, triton.next_power_of_2(value_dim)))
    return out, lse, top


@lru_cache(maxsize=16)
def _span_tables(spans: bytes, n_tokens: int, block_n: int,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """On the device, from key spans (span, 2) int64: the span of each key (-1 outside every
    span), and per key block the first and last span it meets (last < first where it meets
    none) and the span that holds all its keys (-1 where none does). Cached: every layer of a
    capture has the same, computed on the host once and copied without a sync."""
    span = span_index(np.frombuffer(spans, dtype=np.int64).reshape(-1, 2), n_tokens)
    blocks = np.pad(span, (0, (-n_tokens) % block_n), constant_values=-1).reshape(-1, block_n)
    lo = np.where(blocks >= 0, blocks, np.iinfo(np.int64).max).min(1)
    hi = blocks.max(1)
    one = np.where((blocks == hi[:, None]).all(1), hi, -1)
    return tuple(torch.as_tensor(a, dtype=torch.int64).to(device, non_blocking=True)
                 for a in (span, np.where(hi >= 0, lo, 0), hi, one))


def reduce_layer(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, top: torch.Tensor,
                 rule: AttentionRule, reducers: list, chunk_bytes: int = 1 << 30) -> None:
    """Feed every reducer the whole layer (`supported` reducers), one launch per chunk of
    queries whose outputs (row sums per key span, per-row terms) fit in chunk_bytes."""
    n_heads, n_tokens, _ = q.shape
    device = q.device
    blocks = next((r for r in reducers if isinstance(r, BlockMeans)), None)
    stats = next((r for r in reducers if isinstance(r, HeadStatistics)), None)
    empty = torch.empty(1, device=device)
    span = lo = hi = one = terms = vertical = empty
    n_spans = near = prox = 0
    if blocks is not None:
        span, lo, hi, one = _span_tables(blocks.k_spans.tobytes(), n_tokens, REDUCE_BLOCKS[1],
                                         device)
        n_spans = len(blocks.k_spans)
    if stats is not None:
        vertical = torch.zeros(n_heads, n_tokens, dtype=torch.float32, device=device)
        near, prox = stats.w, stats.prox
    row_bytes, block_m = 4 * n_heads * (n_spans + len(ROW_TERMS)), REDUCE_BLOCKS[0]
    step = max(block_m, chunk_bytes // row_bytes // block_m * block_m)
    for q0 in range(0, n_tokens, step):
        rows = min(step, n_tokens - q0)
        row_sums = torch.zeros(n_heads, n_spans, rows, dtype=torch.float32, device=device)
        if stats is not None:
            terms = torch.empty(len(ROW_TERMS), n_heads, rows, dtype=torch.float32,
                                device=device)
        _launch(_reduce_kernel, REDUCE_BLOCKS, q, k, rule, lse, q0, rows, span, lo, hi, one,
                row_sums, n_spans, terms, vertical, near, prox, rows=rows,
                BLOCKS=blocks is not None, STATS=stats is not None)
        if blocks is not None:
            blocks.add_key_sums(q0, row_sums.transpose(1, 2))
        if stats is not None:  # confidence: the largest weight, exp(max logit - lse)
            torch.sub(top[:, q0:q0 + rows], lse[:, q0:q0 + rows], out=terms[5]).exp_()
            # column sums are complete only after the last chunk's launch
            stats.add_terms(q0, terms, vertical if q0 + rows == n_tokens else None)
