"""White-box attention suppression (spec section 4), the parts that need no model.

Per suppressed chunk i one forward pass with `suppression_mask` (all queries blind to the keys of
chunk i, every layer and head), one baseline pass through the same code path, then per token t
`token_log_kl` between the two next-token distributions, and `suppression_matrix`
S[j, i] = mean log-KL over the tokens of target chunk j. `normalize_suppression` is the display
normalisation of `step_importance_supp.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from backend.rollouts.base import TEMPERATURE  # the reference runs': also the KL's

TOP_P = 0.9999
MAX_TOKENS = 100
MISSING_LOGIT = -1e9  # a token outside one side's top-p set
LOG_EPS = 1e-9


class TopP(NamedTuple):
    """A compressed next-token distribution, padded to K = max_tokens.

    indices: (..., K) int64 token ids, -1 in unused slots; logits: (..., K) float32 raw logits
    (not divided by the temperature), -inf in unused slots.
    """

    indices: torch.Tensor
    logits: torch.Tensor


def compress_top_p(logits: torch.Tensor, p: float = TOP_P, max_tokens: int = MAX_TOKENS,
                   temperature: float = TEMPERATURE) -> TopP:
    """Smallest set of most likely tokens holding probability >= p at `temperature`, at most
    `max_tokens` of them, per position. `logits`: (..., vocab) -> TopP of (..., max_tokens)."""
    logits = torch.as_tensor(logits).to(torch.float32)
    k = min(max_tokens, logits.shape[-1])
    probs = torch.softmax(logits / temperature, dim=-1)
    top_probs, top_idx = probs.topk(k, dim=-1)  # (..., k), descending
    cumulative = top_probs.cumsum(-1)
    keep_count = (cumulative < p).sum(-1, keepdim=True) + 1  # first position reaching p, 1-based
    keep = torch.arange(k, device=logits.device) < keep_count.clamp(max=k)
    indices = torch.where(keep, top_idx, torch.full_like(top_idx, -1))
    unused = torch.full_like(top_probs, -torch.inf)
    kept_logits = torch.where(keep, logits.gather(-1, top_idx), unused)
    return TopP(indices, kept_logits)


def kl_between_compressed(base: TopP, supp: TopP, temperature: float = TEMPERATURE) -> torch.Tensor:
    """KL(P_base || P_supp) per position, shape (...,), clipped at 0.

    Works on TopP of shape (..., K); memory is O(positions x 2K x K), so batch long traces.

    Both distributions live on the union of the two supports; a token missing from one side gets
    the logit -1e9 there; each side is renormalised by a softmax at `temperature`.
    """
    b_idx, s_idx = base.indices, supp.indices
    union = torch.cat([b_idx, s_idx], -1)  # (..., 2K); supp tokens already in base are repeats
    repeat = (s_idx[..., :, None] == b_idx[..., None, :]).any(-1)
    valid = torch.cat([b_idx >= 0, (s_idx >= 0) & ~repeat], -1)

    def on_union(side: TopP) -> torch.Tensor:  # (..., 2K) logits of `side` at the union tokens
        ids = side.indices[..., None, :]  # (..., 1, K)
        match = (union[..., :, None] == ids) & (ids >= 0)  # (..., 2K, K)
        values = torch.where(match, side.logits[..., None, :].float(), -torch.inf).amax(-1)
        values = torch.where(match.any(-1), values, torch.full_like(values, MISSING_LOGIT))
        return torch.where(valid, values, -torch.inf) / temperature

    log_p = torch.log_softmax(on_union(base), -1)
    log_q = torch.log_softmax(on_union(supp), -1)
    terms = torch.where(valid, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    return terms.sum(-1).clamp(min=0.0)


def token_log_kl(base: TopP, supp: TopP, temperature: float = TEMPERATURE) -> torch.Tensor:
    """log(KL + 1e-9) per position, shape (...,): the per-token effect of one suppression."""
    return torch.log(kl_between_compressed(base, supp, temperature) + LOG_EPS)


def suppression_matrix(per_token_log_kl, token_spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """S[j, i] = mean over the tokens of target chunk j of the log-KL when chunk i is suppressed.

    `per_token_log_kl`: (n_sources, T), row i = `token_log_kl` of the pass suppressing chunk i,
    column t = position t of the model input. `token_spans`: (n_targets) half-open token spans
    (the chunks, usually the same list as the sources). Returns (n_targets, n_sources); rows are
    targets, columns suppressed chunks; NaN for empty spans.
    """
    values = np.asarray(torch.as_tensor(per_token_log_kl).detach().cpu(), dtype=np.float64)
    out = np.full((len(token_spans), values.shape[0]), np.nan)
    for j, (start, end) in enumerate(token_spans):
        start, end = max(start, 0), min(end, values.shape[1])
        if start < end:
            out[j] = values[:, start:end].mean(axis=1)
    return out


def normalize_suppression(s: np.ndarray) -> np.ndarray:
    """Display normalisation: NaN where i >= j, then each row j minus its mean over i < j.

    `s`: (n, n) with rows = targets j, columns = suppressed chunks i. Row 0 is all NaN; every
    other row sums to 0 over i < j.
    """
    out = np.array(s, dtype=np.float64)
    target, source = np.indices(out.shape)
    out[source >= target] = np.nan
    for j in range(1, out.shape[0]):
        row = out[j, :j]
        if np.isfinite(row).any():
            row -= np.nanmean(row)
    return out


def suppression_mask(
    seq_len: int, key_span: tuple[int, int] | None, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None, causal: bool = True,
) -> torch.Tensor:
    """Additive attention mask (1, 1, query, key): 0 where a query may look, dtype-min elsewhere.

    Elsewhere = the keys in `key_span` (half-open token span of the suppressed chunk), for every
    query, and (with `causal`) keys after the query. The entries are set, not added, so the two
    never overflow; `key_span=None` gives the plain causal mask of the baseline, through the same
    code path. Add it to the pre-softmax scores and run the softmax in float32.
    """
    positions = torch.arange(seq_len, device=device)
    blocked = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        blocked |= positions[None, :] > positions[:, None]
    if key_span is not None:
        start, end = key_span
        blocked[:, max(start, 0) : max(min(end, seq_len), 0)] = True
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device)
    mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask[None, None]
