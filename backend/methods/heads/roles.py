"""Head roles: statistics of each head's attention map, one score per (layer, head).

Every function takes attention (..., query, key), usually (layer, head, query, key) as stacked
from `capture_attention` (rows sum to 1), and returns the leading shape, usually (layer, head).

- Positional roles (previous_token, first_token, self) average over queries t >= 2: there the first
  token (key 0), the previous token (key t - 1) and the token itself (key t) are three different
  keys, so a pure previous-token head scores exactly 1, 0, 0 on the three.
- entropy, confidence: over all queries (Voita et al. 2019 for confidence).
- locality: 1 - D / w, D the mean over queries t >= w of the expected distance
  sum_k A[t, k] * min(|t - k|, w), window w (clamped to tokens - 1). Distances are capped at w,
  so a far sink cannot dominate: 1 = all attention on the token itself, 1 - 1/w = previous token,
  0 = all attention w or more tokens away.
- receiver_kurtosis: token-level version of the Thought Anchors receiver score. Vertical score
  v[k] = mean over queries t with t - k >= proximity_ignore of A[t, k]; Fisher kurtosis (biased)
  of v over keys. Key 0 (the sink, scored by first_token) is left out by default, and keys with no
  such query are left out. The sentence-level version is in `thought_anchors`.
- induction: see `induction_scores_from_attention` and `induction_scores`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.special import entr
from torch import nn

from backend.errors import InputError
from backend.methods.capture import capture_attention


def _weights(attention, min_tokens: int = 1) -> np.ndarray:
    weights = np.asarray(attention, dtype=np.float32)
    if weights.ndim < 2 or weights.shape[-1] != weights.shape[-2]:
        raise InputError(f"Expected attention (..., query, key), got {weights.shape}.")
    if weights.shape[-1] < min_tokens:
        raise InputError(f"This head role needs at least {min_tokens} tokens.")
    return weights


def previous_token_scores(attention) -> np.ndarray:
    """Mean attention from query t to key t - 1, over t >= 2: (..., query, key) -> (...)."""
    diagonal = np.diagonal(_weights(attention, 3), offset=-1, axis1=-2, axis2=-1)
    return diagonal[..., 1:].mean(axis=-1)


def first_token_scores(attention) -> np.ndarray:
    """Mean attention to key 0 (the "sink"), over queries t >= 2: (..., query, key) -> (...)."""
    return _weights(attention, 3)[..., 2:, 0].mean(axis=-1)


def self_scores(attention) -> np.ndarray:
    """Mean attention of each query to itself (the diagonal), over t >= 2."""
    diagonal = np.diagonal(_weights(attention, 3), axis1=-2, axis2=-1)
    return diagonal[..., 2:].mean(axis=-1)


def attention_entropy(attention) -> np.ndarray:
    """Mean over queries of -sum_k p log p in nats (0 log 0 = 0): uniform over k keys = log k."""
    return entr(_weights(attention)).sum(axis=-1).mean(axis=-1)


def attention_confidence(attention) -> np.ndarray:
    """Voita et al. (2019): mean over queries of the head's largest attention weight."""
    return _weights(attention).max(axis=-1).mean(axis=-1)


def locality_scores(attention, window: int = 8) -> np.ndarray:
    """1 - (capped mean attention distance) / window, in [0, 1] (module docstring)."""
    weights = _weights(attention, 2)
    tokens = weights.shape[-1]
    w = min(window, tokens - 1)
    positions = np.arange(tokens)
    distance = np.minimum(np.abs(positions[:, None] - positions[None, :]), w)   # (query, key)
    expected = (weights[..., w:, :] * distance[w:]).sum(axis=-1)                 # (..., query)
    return 1.0 - expected.mean(axis=-1) / w


def vertical_scores(attention, proximity_ignore: int = 4) -> np.ndarray:
    """v[k] = mean of A[t, k] over queries t - k >= proximity_ignore: (..., query, key) ->
    (..., key), NaN for keys with no such query."""
    weights = _weights(attention)
    positions = np.arange(weights.shape[-1])
    later = (positions[:, None] - positions[None, :] >= proximity_ignore).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights * later).sum(axis=-2) / later.sum(axis=0)


def receiver_kurtosis(attention, proximity_ignore: int = 4, skip_first: bool = True) -> np.ndarray:
    """Fisher kurtosis (biased) of the vertical scores over keys: (..., query, key) -> (...)."""
    return kurtosis_of_vertical(vertical_scores(attention, proximity_ignore), proximity_ignore,
                                skip_first)


def kurtosis_of_vertical(vertical, proximity_ignore: int = 4,
                         skip_first: bool = True) -> np.ndarray:
    """receiver_kurtosis from vertical scores (..., key) -> (...)."""
    scored = vertical[..., int(skip_first):vertical.shape[-1] - proximity_ignore]
    if scored.shape[-1] < 2:
        raise InputError(f"Receiver kurtosis needs more than {proximity_ignore + 2} tokens.")
    # scipy.stats.kurtosis(fisher=True, bias=True), in array methods that a torch tensor on a
    # GPU has too (scipy took ~60 ms per layer at 16k tokens).
    centred = scored - scored.mean(axis=-1)[..., None]
    return (centred ** 4).mean(axis=-1) / (centred ** 2).mean(axis=-1) ** 2 - 3.0


def induction_scores_from_attention(attention, period: int, start: int = 0) -> np.ndarray:
    """Induction score for a sequence that repeats with `period` from position `start`.

    Query t of the second copy (start + period <= t < start + 2 * period) is a token whose earlier
    occurrence is at t - period; the score is the mean attention to the token after it, key
    t - period + 1. (..., query, key) -> (...).
    """
    weights = _weights(attention, start + period + 1)
    queries = np.arange(start + period, min(start + 2 * period, weights.shape[-1]))
    return weights[..., queries, queries - period + 1].mean(axis=-1)


def head_roles(attention, window: int = 8, proximity_ignore: int = 4) -> dict[str, np.ndarray]:
    """Every role score of an ordinary text, name -> (layer, head), from (layer, head, query, key).
    Induction needs a repeated random sequence: see `induction_scores`."""
    roles: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "previous_token": previous_token_scores,
        "first_token": first_token_scores,
        "self": self_scores,
        "locality": lambda a: locality_scores(a, window),
        "entropy": attention_entropy,
        "confidence": attention_confidence,
        "receiver_kurtosis": lambda a: receiver_kurtosis(a, proximity_ignore),
    }
    weights = _weights(attention)
    return {name: score(weights) for name, score in roles.items()}


def repeated_random_tokens(model: nn.Module, n_tokens: int = 50, seed: int = 0,
                           n_sequences: int = 4) -> tuple[torch.Tensor, int]:
    """(input_ids (n_sequences, start + 2 * n_tokens), start): random tokens repeated twice,
    after the model's BOS token when it has one (start = 1, else 0). Special ids are avoided."""
    config = model.config.get_text_config()
    special = [config.bos_token_id, getattr(config, "eos_token_id", None), config.pad_token_id]
    special = [i for s in special if s is not None for i in (s if isinstance(s, list) else [s])]
    low = 1 + max(special, default=-1)
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(low, config.vocab_size, (n_sequences, n_tokens), generator=generator)
    ids = torch.cat([half, half], dim=1)
    if config.bos_token_id is None:
        return ids, 0
    return torch.cat([torch.full((n_sequences, 1), config.bos_token_id), ids], dim=1), 1


def induction_scores(model: nn.Module, n_tokens: int = 50, seed: int = 0, n_sequences: int = 4,
                     progress: Callable[[float, str], None] | None = None) -> np.ndarray:
    """Induction score per head, (layer, head), on `n_sequences` random sequences of `n_tokens`
    tokens each repeated twice (seeded), averaged over the sequences."""
    ids, start = repeated_random_tokens(model, n_tokens, seed, n_sequences)

    def reduce(layer: int, weights: torch.Tensor) -> np.ndarray:
        scores = induction_scores_from_attention(weights.float().cpu().numpy(), n_tokens, start)
        return scores.mean(axis=0)

    return np.stack(capture_attention(model, ids, reduce=reduce, progress=progress))
