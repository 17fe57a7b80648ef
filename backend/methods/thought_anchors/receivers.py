"""White-box receiver heads (spec section 3): which sentences later sentences keep attending to.

Pipeline per trace: token attention of a layer (head, query, key) -> `sentence_attention`
(head, sentence, sentence) -> `vertical_scores` (head, sentence) -> over all layers
`head_kurtosis` (layer, head) -> averaged over traces by `receiver_heads` -> `receiver_scores`
(sentence,). Reduce each layer to sentence blocks as it is computed; never keep (layer, head, T, T).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

PROXIMITY_IGNORE = 4
TOP_K = 20


def sentence_attention(attention, token_spans: Sequence[tuple[int, int]]):
    """Mean token attention between sentences: A[..., q, k] = mean of rows[span_q] x cols[span_k].

    `attention`: (..., query, key), e.g. (head, T, T), torch or numpy. `token_spans`: half-open
    token spans of the n sentences (prompt tokens and whitespace between chunks lie outside them).
    Returns (..., n, n) float32 of the input's kind; NaN for empty spans.
    """
    as_numpy = isinstance(attention, np.ndarray)
    a = torch.from_numpy(attention) if as_numpy else attention
    a = a.to(torch.float32)
    n, q_len, k_len = len(token_spans), a.shape[-2], a.shape[-1]
    nan = torch.full(a.shape[:-1], float("nan"), dtype=a.dtype, device=a.device)
    # Mean over each key block, then over each query block (equal row counts: the block mean).
    key_means = torch.stack(  # (..., query, n)
        [a[..., s:e].mean(-1) if 0 <= s < e <= k_len else nan for s, e in token_spans], -1
    )
    nan = torch.full((*a.shape[:-2], n), float("nan"), dtype=a.dtype, device=a.device)
    blocks = torch.stack(  # (..., n, n)
        [key_means[..., s:e, :].mean(-2) if 0 <= s < e <= q_len else nan
         for s, e in token_spans], -2
    )
    return blocks.cpu().numpy() if as_numpy else blocks


def vertical_scores(sentence_attn, proximity_ignore: int = PROXIMITY_IGNORE) -> np.ndarray:
    """Attention each sentence receives from distant later sentences: v[..., k], shape (..., n).

    Entries with k > q or q - k < `proximity_ignore` are dropped; v[k] = mean of the remaining
    A[q, k] over q (NaN entries ignored). NaN where nothing is left (the last `proximity_ignore`
    sentences, for instance).
    """
    if torch.is_tensor(sentence_attn):
        sentence_attn = sentence_attn.detach().float().cpu().numpy()
    a = np.asarray(sentence_attn)
    n = a.shape[-1]
    q, k = np.indices((n, n))
    keep = (q - k >= max(proximity_ignore, 0)) & ~np.isnan(a)  # (..., q, k)
    total = np.where(keep, a, 0.0).sum(-2)
    count = keep.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def head_kurtosis(vertical):
    """Kurtosis of vertical scores over sentences (Fisher, biased, NaN omitted): (..., n) -> (...).

    For (layer, head, n) this gives (layer, head). Matches
    `scipy.stats.kurtosis(v, axis=-1, fisher=True, bias=True, nan_policy="omit")`; NaN where
    fewer than one value is left or the values are constant. A torch tensor stays on its device
    (the capture scores every layer on the GPU), an array gives an array.
    """
    xp = torch if isinstance(vertical, torch.Tensor) else np
    v = vertical.double() if xp is torch else np.asarray(vertical, dtype=np.float64)
    ok = ~xp.isnan(v)
    count = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xp.where(ok, v, 0.0).sum(-1) / count
        centred = xp.where(ok, v - mean[..., None], 0.0)
        m2 = (centred**2).sum(-1) / count
        m4 = (centred**4).sum(-1) / count
        kurt = m4 / m2**2 - 3.0
    return xp.where((count > 0) & (m2 > 0), kurt, float("nan"))


def receiver_heads(
    kurtosis, top_k: int = TOP_K, exclude_layer0: bool = True
) -> list[tuple[int, int]]:
    """The `top_k` (layer, head) pairs of highest kurtosis, highest first.

    `kurtosis`: (layer, head) for one trace or (trace, layer, head), averaged over traces
    (NaN ignored). Heads with NaN mean kurtosis and, by default, layer 0 are never chosen.
    """
    k = np.asarray(kurtosis, dtype=np.float64)
    if k.ndim == 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            k = np.nanmean(k, axis=0)
    if k.ndim != 2:
        raise ValueError(f"kurtosis must be (layer, head) or (trace, layer, head), got {k.shape}")
    k = k.copy()
    if exclude_layer0:
        k[0] = np.nan
    flat = np.where(np.isnan(k), -np.inf, k).ravel()
    order = np.argsort(-flat, kind="stable")[: min(top_k, int(np.isfinite(flat).sum()))]
    return [tuple(int(x) for x in np.unravel_index(i, k.shape)) for i in order]


def receiver_scores(vertical, heads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Receiver score of each sentence: v[layer, head] averaged over `heads`.

    `vertical`: (layer, head, n) vertical scores of one trace -> (n,); NaN entries ignored.
    """
    v = np.asarray(vertical, dtype=np.float64)
    if not heads:
        return np.full(v.shape[-1], np.nan)
    picked = np.stack([v[layer, head] for layer, head in heads])  # (top_k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(picked, axis=0)
