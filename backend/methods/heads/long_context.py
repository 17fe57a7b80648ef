"""Long-context head roles: retrieval heads, streaming heads and attention sinks, each scored the
way its paper scores it. Pure functions of arrays and tensors; `haystack` runs the model.

- Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
  Factuality"; their code: top-k = 1, up to 50 greedy tokens, ROUGE-1 recall > 0.5 with
  stemming). At each greedy step a head scores when its top-1 attended position lies inside the
  needle span and the token there is the token being generated; a trial's score is the number
  of such steps over the span's length; the head's score is the mean over the trials (haystack
  lengths x needle depths) whose answer retrieved the needle. A position copied twice counts
  twice, as in their code.
- Streaming error (a training-free proxy of DuoAttention's gates, Xiao et al. 2024: their gate
  per key-value head is trained so that heads whose output survives attending only to the sink
  and recent tokens can be made streaming; they train with 128 sink and 256 recent tokens and
  evaluate with 64 and 256). Here: the relative L2 error ||o_stream - o_full|| / ||o_full|| of
  one head's own output (before the output projection) when that head alone attends only to the
  first `sink` tokens and the last `recent` tokens, on the queries of a passkey question.
  Near 0: the head does not need the long context (a streaming head); large: it reads far back.
- Sink share (Xiao et al. 2023, StreamingLLM; Gu et al. 2024, "When Attention Sink Emerges"):
  alpha[layer, head] = mean over every query of the attention it gives the first token; a head is
  sink-dominated when alpha > epsilon (their epsilon = 0.3); the share is the fraction of such
  heads, per layer and over the model.

Shapes: (layer, head) for scores; query/key/value (head, token, head_dim) as in `exact`.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.errors import InputError
from backend.methods import exact
from backend.methods.exact import AttentionRule

RECALL_THRESHOLD = 0.5  # Wu et al.: a trial counts when ROUGE-1 recall > 0.5
RETRIEVAL_HEAD = 0.1  # Wu et al. call heads scoring above 0.1 retrieval heads
SINK_EPSILON = 0.3  # Gu et al.'s epsilon
SINK_TOKENS, RECENT_TOKENS = 64, 256  # DuoAttention's evaluation setting


# --------------------------------------------------------------------------- retrieval


def copy_hits(top_keys: np.ndarray, generated: np.ndarray, prompt_ids: np.ndarray,
              span: tuple[int, int]) -> np.ndarray:
    """(step, layer, head) bool: the head's top-1 key lies in span [start, end) and holds the
    token generated at that step. top_keys: (step, layer, head) positions (-1: no step);
    generated: (step,) token ids; prompt_ids: (token,)."""
    top = np.asarray(top_keys)
    start, end = span
    inside = (top >= start) & (top < end)
    prompt = np.asarray(prompt_ids)
    at_top = prompt[np.clip(top, 0, len(prompt) - 1)]
    return inside & (at_top == np.asarray(generated)[:, None, None])


def trial_retrieval_scores(top_keys: np.ndarray, generated: np.ndarray, prompt_ids: np.ndarray,
                           span: tuple[int, int]) -> np.ndarray:
    """(layer, head): copy hits of one trial over the span's length (Wu et al.'s per-trial
    score; 1 = every needle token copied through this head)."""
    if span[1] <= span[0]:
        raise InputError("The needle span is empty.")
    return copy_hits(top_keys, generated, prompt_ids, span).sum(0) / (span[1] - span[0])


def retrieval_scores(trial_scores: np.ndarray, recalls: np.ndarray,
                     threshold: float = RECALL_THRESHOLD) -> np.ndarray:
    """(layer, head) mean of the per-trial scores (trial, layer, head) over trials whose recall
    exceeds the threshold; NaN where no trial retrieved the needle."""
    accepted = np.asarray(recalls) > threshold
    if not accepted.any():
        return np.full(np.shape(trial_scores)[1:], np.nan)
    return np.asarray(trial_scores)[accepted].mean(0)


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of the response against the reference, with Porter stemming (what Wu et al.
    score answers with), in [0, 1]."""
    from rouge_score import rouge_scorer  # imported when needed: it loads nltk's stemmer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return float(scorer.score(reference, response)["rouge1"].recall)


# --------------------------------------------------------------------------- streaming


def streaming_allowed(rule: AttentionRule, queries: slice, n_tokens: int, sink: int,
                      recent: int) -> torch.Tensor:
    """(query, key) bool: what a streaming head sees, the layer's own mask restricted to the
    first `sink` keys and the `recent` keys up to the query (the query itself included)."""
    q = torch.arange(queries.start, queries.stop)
    k = torch.arange(n_tokens)
    distance = q[:, None] - k[None, :]
    kept = (k[None, :] < sink) | ((distance >= 0) & (distance < recent))
    return rule.allowed(q, k) & kept


def streaming_errors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     rule: AttentionRule, queries: slice, sink: int = SINK_TOKENS,
                     recent: int = RECENT_TOKENS) -> np.ndarray:
    """(head,) ||o_stream - o_full|| / ||o_full|| over the given queries, each head on its own:
    o = softmax(logits) @ value with the layer's mask (full) or `streaming_allowed` (stream).
    query (head, T, d), key and value (key_head, T, d)."""
    n_heads, n_tokens = query.shape[0], query.shape[1]
    scores = exact.logits(query, key, rule, queries, slice(0, n_tokens), dtype=torch.float32)
    sinks = exact.sink_logits(rule, None, n_heads, scores.device)
    values = exact.expand_heads(value, None, n_heads).float()
    allowed = streaming_allowed(rule, queries, n_tokens, sink, recent).to(scores.device)

    def output(logits: torch.Tensor) -> torch.Tensor:
        exact.softmax_(logits, sinks)  # the logits become the weights
        return torch.matmul(logits, values)

    stream = output(scores.masked_fill(~allowed, -torch.inf))
    full = output(scores)  # last: in place
    error = (stream - full).flatten(1).norm(dim=1) / full.flatten(1).norm(dim=1).clamp_min(1e-12)
    return error.cpu().numpy()


def streaming_scores(errors: np.ndarray) -> np.ndarray:
    """1 - min(error, 1): 1 = the head's output is unchanged under streaming attention."""
    return 1.0 - np.clip(np.asarray(errors, dtype=np.float64), 0.0, 1.0)


# --------------------------------------------------------------------------- sinks


class FirstKeyMass:
    """Gu et al.'s alpha of one layer, (head,): mean over every query of its weight on key 0.
    A capture reducer (see `reductions`): sees exact weights a chunk of queries at a time."""

    def __init__(self, n_heads: int, n_tokens: int, device):
        self.n = n_tokens
        self.total = torch.zeros(n_heads, dtype=torch.float64, device=device)

    def update(self, q0: int, k0: int, p: torch.Tensor) -> None:
        if k0 == 0:
            self.total += p[..., 0].sum(-1).double()

    def result(self) -> np.ndarray:
        return (self.total / self.n).cpu().numpy()


def first_key_mass(attention) -> np.ndarray:
    """alpha from full maps: (..., query, key) -> (...), mean over every query of A[t, 0]."""
    return np.asarray(attention, dtype=np.float64)[..., :, 0].mean(-1)


def sink_shares(alpha: np.ndarray, epsilon: float = SINK_EPSILON) -> tuple[np.ndarray, float]:
    """(per-layer share (layer,), whole-model share) of heads with alpha > epsilon."""
    if not 0.0 <= epsilon <= 1.0:
        raise InputError(f"The sink threshold epsilon must lie in [0, 1], not {epsilon}.")
    dominated = np.asarray(alpha) > epsilon
    return dominated.mean(1), float(dominated.mean())
