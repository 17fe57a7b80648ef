"""Forward passes that feed the white-box Thought Anchors methods (spec sections 3 and 4).

`receiver_pass`: one forward pass over prompt + trace; each layer's attention is reduced to
sentence blocks a chunk of queries at a time (`qk_capture`), so no (head, T, T) map is alive.

`suppression_log_kl`: a baseline pass and one pass per chunk i in which every query of every layer
and head is blind to the keys of chunk i. All passes go through the same code path: a 4D additive
attention mask (batch, 1, query, key), which transformers' mask builders return as-is (for models
that mix sliding-window and full layers, a dict of two such masks keyed by layer type). The
baseline is the same mask with nothing suppressed. Several suppressed variants share one forward
pass as rows of the batch. Each position's next-token distribution is compressed to its top-p set
as soon as it is computed, so (T, vocab) logits of all variants never coexist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from backend.errors import JobCancelled
from backend.progress import Progress

from ..capture import capture_attention
from ..qk_capture import UnsupportedAttention, capture_layers
from ..reductions import BlockMeans
from .receivers import sentence_attention
from .suppression import (
    MAX_TOKENS, TEMPERATURE, TOP_P, TopP, compress_top_p, normalize_suppression,
    suppression_mask, suppression_matrix, token_log_kl,
)

Span = tuple[int, int]

MAX_BATCH = 8  # suppressed variants per forward pass, at most
CPU_BATCH_BYTES = 2 * 2**30  # activation budget of one pass on the CPU
HEAD_BLOCK_BYTES = 2**30  # float32 attention of this many bytes is reduced at a time
LOGIT_BLOCK_ELEMENTS = 2**26  # (variant, position, vocab) logits alive at once
KL_BLOCK_ELEMENTS = 2**26  # (variant, position, 2K, K) comparisons alive at once


def _as_batch(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, T) or (T,); got {tuple(ids.shape)}")
    return ids


# --- receiver heads --------------------------------------------------------------------------


def receiver_pass(model: nn.Module, input_ids, token_spans: Sequence[Span],
                  progress: Progress | None = None) -> np.ndarray:
    """Sentence-block attention of every layer and head from ONE forward pass.

    input_ids: (1, T). token_spans: n half-open token spans of the chunks. Returns
    (layer, head, n, n) float32, A[l, h, q, k] = mean attention of the tokens of chunk q to the
    tokens of chunk k (`sentence_attention`). The long-context capture computes the blocks from
    exact weights a chunk of queries at a time, so no layer's (head, T, T) ever exists; models
    it does not cover fall back to eager weights, reduced a block of heads at a time.
    """
    input_ids = _as_batch(input_ids)

    def blocks(layer, n_heads, n_tokens, device):
        return [BlockMeans(token_spans, token_spans, n_heads, n_tokens, device)]

    try:
        layers = [layer.reductions[0] for layer in capture_layers(
            model, input_ids, blocks, keep_qk=False, progress=progress)]
    except UnsupportedAttention:
        seq_len = input_ids.shape[1]
        heads_per_block = max(1, HEAD_BLOCK_BYTES // (4 * seq_len * seq_len))

        def reduce(layer: int, weights: torch.Tensor) -> np.ndarray:  # (1, head, T, T)
            parts = [sentence_attention(weights[0, h : h + heads_per_block], token_spans)
                     for h in range(0, weights.shape[1], heads_per_block)]
            return torch.cat(parts).cpu().numpy()  # (head, n, n)

        layers = capture_attention(model, input_ids, reduce=reduce, progress=progress)
    return np.stack(layers).astype(np.float32)


# --- attention suppression -------------------------------------------------------------------


def suppression_attention_masks(config, seq_len: int, key_spans: Sequence[Span | None],
                                dtype: torch.dtype = torch.float32, device=None):
    """Additive masks (batch, 1, query, key), one row per entry of `key_spans`.

    Keys of the row's span get dtype-min for every query (`suppression_mask`); keys after the
    query get -inf (so a query whose every visible key is suppressed still never sees the future);
    0 elsewhere. `None` suppresses nothing: the baseline, through the same path. For configs whose
    `layer_types` mix "full_attention" and "sliding_attention" (Gemma 3, Qwen 2 with sliding
    windows) returns {layer type: mask}; sliding layers also get -inf at q - k >= sliding_window.
    """
    rows = [suppression_mask(seq_len, span, dtype, device, causal=False)[0] for span in key_spans]
    positions = torch.arange(seq_len, device=device)
    distance = positions[:, None] - positions[None, :]  # (query, key): q - k
    full = torch.stack(rows).masked_fill(distance < 0, -torch.inf)  # (batch, 1, q, k)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types == {"full_attention"}:
        return full
    if not types <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"attention suppression supports full and sliding-window layers only, "
                         f"not {sorted(types)}")
    far = distance >= config.sliding_window
    return {"full_attention": full, "sliding_attention": full.masked_fill(far, -torch.inf)}


def _batch_size(model: nn.Module, seq_len: int) -> int:
    """Variants per pass from a rough activation estimate: one layer's eager attention (scores,
    float32 softmax, weights), the mask and the hidden states, per variant."""
    config, param = model.config, next(model.parameters())
    size = param.element_size()
    heads = getattr(config, "num_attention_heads", 1)
    per_variant = seq_len * seq_len * (heads * (3 * size + 4) + 2 * size)
    per_variant += seq_len * getattr(config, "hidden_size", 1) * size * 16
    if param.device.type == "cuda":
        budget = torch.cuda.mem_get_info(param.device)[0] // 2
    else:
        budget = CPU_BATCH_BYTES
    return int(max(1, min(MAX_BATCH, budget // max(per_variant, 1))))


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) of hidden states (..., hidden), final soft-capping included."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _compressed_passes(model, input_ids, key_spans, temperature, top_p, max_tokens) -> TopP:
    """One forward pass with a row per entry of `key_spans` -> TopP of (batch, T, max_tokens)."""
    batch, seq_len = len(key_spans), input_ids.shape[1]
    dtype = next(model.parameters()).dtype
    masks = suppression_attention_masks(model.config, seq_len, key_spans, dtype, input_ids.device)
    hidden = model.base_model(input_ids=input_ids.expand(batch, -1), attention_mask=masks,
                              use_cache=False).last_hidden_state  # (batch, T, hidden)
    del masks
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, LOGIT_BLOCK_ELEMENTS // (batch * vocab))
    parts = [compress_top_p(_logits(model, hidden[:, s : s + step]), top_p, max_tokens,
                            temperature) for s in range(0, seq_len, step)]
    return TopP(torch.cat([p.indices for p in parts], 1), torch.cat([p.logits for p in parts], 1))


def _log_kl(base: TopP, supp: TopP, temperature: float) -> torch.Tensor:
    """token_log_kl of (T, K) base against (batch, T, K) variants -> (batch, T), in blocks."""
    batch, seq_len, k = supp.indices.shape
    step = max(1, KL_BLOCK_ELEMENTS // (batch * 2 * k * k))
    out = []
    for s in range(0, seq_len, step):
        b = TopP(*(x[None, s : s + step].expand(batch, -1, -1) for x in base))
        out.append(token_log_kl(b, TopP(supp.indices[:, s : s + step],
                                        supp.logits[:, s : s + step]), temperature))
    return torch.cat(out, 1)


@torch.inference_mode()
def suppression_log_kl(model: nn.Module, input_ids, token_spans: Sequence[Span],
                       temperature: float = TEMPERATURE, top_p: float = TOP_P,
                       max_tokens: int = MAX_TOKENS, batch_size: int | None = None,
                       progress: Progress | None = None,
                       should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Per-token effect of suppressing each chunk: (n_chunks, T) float32.

    input_ids: (1, T); token_spans: n half-open token spans. Row i, column t = log(KL + 1e-9),
    KL(P_base(t) || P_supp_i(t)) between the next-token distributions at position t, each
    compressed to its top-p set at `temperature` (`compress_top_p`, union support). Positions
    before chunk i see nothing suppressed and give KL ~ 0 (log ~ -20.7). n_chunks + 1 passes in
    batches of `batch_size` rows (default: from the free memory, at most 8); the baseline is row 0
    of the first batch. should_stop() is polled between passes (raises JobCancelled).
    """
    if model.config._attn_implementation not in ("eager", "sdpa"):
        raise ValueError("attention suppression needs eager or sdpa attention (4D float masks), "
                         f"not {model.config._attn_implementation}")
    device = next(model.parameters()).device
    input_ids = _as_batch(input_ids).to(device)
    variants: list[Span | None] = [None, *token_spans]
    batch_size = batch_size or _batch_size(model, input_ids.shape[1])
    base, rows = None, []
    for start in range(0, len(variants), batch_size):
        if should_stop is not None and should_stop():
            raise JobCancelled("attention suppression cancelled")
        top = _compressed_passes(model, input_ids, variants[start : start + batch_size],
                                 temperature, top_p, max_tokens)
        if base is None:
            base = TopP(top.indices[0], top.logits[0])
            top = TopP(top.indices[1:], top.logits[1:])
        if top.indices.shape[0]:
            rows.append(_log_kl(base, top, temperature).float().cpu())
        if progress is not None:
            done = min(start + batch_size, len(variants))
            progress(done / len(variants), f"Suppression pass {done}/{len(variants)}")
    if not rows:
        return np.zeros((0, input_ids.shape[1]), dtype=np.float32)
    return torch.cat(rows).numpy()


def suppression_scores(log_kl, token_spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray]:
    """(S, S normalised), both (n, n), rows = target chunks j, columns = suppressed chunks i.

    S[j, i] = mean of `log_kl[i]` over the tokens of chunk j (`suppression_matrix`); the
    normalised copy has NaN at i >= j and each row centred over i < j (`normalize_suppression`).
    """
    s = suppression_matrix(log_kl, token_spans)
    return s, normalize_suppression(s)
