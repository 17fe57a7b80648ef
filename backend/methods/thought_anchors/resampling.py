"""Black-box counterfactual resampling metrics (spec section 2), from rollout records.

R_i = kept rollouts of chunk i (those with an answer; the others are dropped everywhere here).
A rollout of chunk i is "different" (in D_i) when cos(chunk_i, chunk_resampled) < threshold;
S_i = the others. Per-chunk functions take R_i and R_{i+1}; `None` (or empty) for R_{i+1} means
chunk i is the last one, whose importances are 0 as in the published data. `chunk_metrics`
computes every column of `chunks_labeled.json` for a whole trace.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .answers import normalize_answer

ROLLOUT_PROMPT = (
    "Solve this math problem step by step. You MUST put your final answer in \\boxed{{}}. "
    "Problem: {problem} Solution: \n<think>\n{prefix}"
)
FORCED_ANSWER_SUFFIX = "\n</think>\n\nTherefore, the final answers is \\boxed{"  # sic, as published
THRESHOLD = 0.8  # tau: cosine similarity at or above it means "same meaning"
KL_ALPHA = 1e-9  # additive smoothing of the reference (effectively none)


def rollout_prompt(problem: str, prefix: str, forced: bool = False) -> str:
    """Raw completion prompt of the reference runs (no chat template) for a chunk's prefix;
    `forced` appends the forced-answer suffix, after which the model writes the answer."""
    prompt = ROLLOUT_PROMPT.format(problem=problem, prefix=prefix)
    return prompt + FORCED_ANSWER_SUFFIX if forced else prompt


@dataclass(frozen=True)
class Rollout:
    """One continuation sampled from the prefix before chunk `chunk_idx`.

    `chunk_resampled`: its first chunk; `answer`: first `\\boxed{}` content (None: no answer,
    dropped); `forced`: True for the forced-answer variant, which has no `chunk_resampled` ("").
    """

    chunk_idx: int
    chunk_resampled: str
    answer: str | None
    is_correct: bool
    forced: bool = False


def kept(rollouts: Sequence[Rollout] | None) -> list[Rollout]:
    """R_i: the rollouts that have an answer."""
    return [r for r in rollouts or () if r.answer is not None]


def accuracy(rollouts: Sequence[Rollout] | None) -> float:
    """Fraction of kept rollouts that are correct (0.0 when none is kept)."""
    rollouts = kept(rollouts)
    return sum(bool(r.is_correct) for r in rollouts) / len(rollouts) if rollouts else 0.0


def answer_counts(rollouts: Sequence[Rollout] | None) -> Counter:
    """Empirical distribution of normalised answers, as counts."""
    return Counter(normalize_answer(r.answer) for r in kept(rollouts))


def kl_divergence(
    p_counts: Mapping[str, int], q_counts: Mapping[str, int], alpha: float = KL_ALPHA
) -> float:
    """KL(P || Q) of two answer-count tables, smoothed as the reference does, clipped at 0.

    Over the V answers of either table: p = (c1 + a) / (n1 + a V), q = (c2 + a) / (n2 + a V),
    KL = sum p log(p / q). 0.0 when either table is empty (nothing to compare).
    """
    n1, n2 = sum(p_counts.values()), sum(q_counts.values())
    if n1 == 0 or n2 == 0:
        return 0.0
    support = set(p_counts) | set(q_counts)
    v = len(support)
    total = 0.0
    for answer in support:
        p = (p_counts.get(answer, 0) + alpha) / (n1 + alpha * v)
        q = (q_counts.get(answer, 0) + alpha) / (n2 + alpha * v)
        total += p * math.log(p / q)
    return max(total, 0.0)


def resampling_importance_accuracy(
    current: Sequence[Rollout], following: Sequence[Rollout] | None
) -> float:
    """acc_{i+1} - acc_i; 0.0 for the last chunk (`following` None or empty)."""
    return accuracy(following) - accuracy(current) if kept(following) else 0.0


def resampling_importance_kl(
    current: Sequence[Rollout], following: Sequence[Rollout] | None
) -> float:
    """KL(P_i || P_{i+1}) of the answer distributions; 0.0 for the last chunk."""
    if not kept(following):
        return 0.0
    return kl_divergence(answer_counts(current), answer_counts(following))


# The forced-answer importances are the same formulas applied to forced-answer rollouts.
forced_importance_accuracy = resampling_importance_accuracy
forced_importance_kl = resampling_importance_kl


def _split(
    current: Sequence[Rollout], different: Sequence[bool]
) -> tuple[list[Rollout], list[Rollout]]:
    """(D_i, S_i) of the kept rollouts; `different` is aligned with `current` (all of it)."""
    if len(different) != len(current):
        raise ValueError(f"`different` has {len(different)} flags for {len(current)} rollouts")
    pairs = [(r, d) for r, d in zip(current, different) if r.answer is not None]
    return [r for r, d in pairs if d], [r for r, d in pairs if not d]


def counterfactual_importance_accuracy(
    current: Sequence[Rollout], following: Sequence[Rollout] | None, different: Sequence[bool]
) -> float:
    """acc(D_i) - acc_{i+1} (this sign, as published); 0.0 if D_i is empty or i is the last."""
    d, _ = _split(current, different)
    return accuracy(d) - accuracy(following) if d and kept(following) else 0.0


def counterfactual_importance_kl(
    current: Sequence[Rollout], following: Sequence[Rollout] | None, different: Sequence[bool]
) -> float:
    """KL(P(D_i) || P(R_{i+1} union S_i)); 0.0 if D_i is empty or i is the last chunk."""
    d, s = _split(current, different)
    if not d or not kept(following):
        return 0.0
    return kl_divergence(answer_counts(d), answer_counts(kept(following) + s))


def different_trajectories_fraction(different: Sequence[bool]) -> float:
    """|D_i| / |R_i| from the per-rollout "different meaning" flags (0.0 for no rollouts)."""
    return float(np.mean(different)) if len(different) else 0.0


def overdeterminedness(resampled: Sequence[str]) -> float:
    """1 - (distinct resampled first chunks) / |R_i| (0.0 for no rollouts)."""
    return 1.0 - len(set(resampled)) / len(resampled) if resampled else 0.0


def _embed_unique(strings: Sequence[str], embedder) -> dict[str, np.ndarray]:
    """One batched embedding call over the distinct strings."""
    unique = list(dict.fromkeys(strings))
    return dict(zip(unique, embedder.embed(unique))) if unique else {}


def _default_embedder():
    from .embedding import SentenceEmbedder

    return SentenceEmbedder()


def different_flags(
    chunk: str, resampled: Sequence[str], vectors: Mapping[str, np.ndarray], threshold: float
) -> list[bool]:
    """cos(chunk, resampled_r) < threshold for each r, from unit embeddings keyed by string."""
    if not resampled:
        return []
    similarity = np.stack([vectors[s] for s in resampled]) @ vectors[chunk]
    return (similarity < threshold).tolist()


def trajectory_stats(
    chunk: str, resampled: Sequence[str], threshold: float = THRESHOLD, embedder=None
) -> dict:
    """{"different_trajectories_fraction", "overdeterminedness"} of one chunk, R_i = `resampled`.

    `embedder`: any object with `embed(list[str]) -> (n, d)` unit rows; default all-MiniLM-L6-v2.
    """
    vectors = _embed_unique([chunk, *resampled], embedder or _default_embedder())
    flags = different_flags(chunk, resampled, vectors, threshold)
    return {
        "different_trajectories_fraction": different_trajectories_fraction(flags),
        "overdeterminedness": overdeterminedness(resampled),
    }


def trajectory_stats_by_chunk(
    chunks: Sequence[str], resampled: Mapping[int, Sequence[str]], threshold: float = THRESHOLD,
    embedder=None, last_chunk_zero: bool = True,
) -> list[dict]:
    """`trajectory_stats` for every chunk of a trace, with one embedding call for all strings.

    `resampled[i]`: resampled first chunks of chunk i (the `chunks_resampled.json` mapping, keys
    as ints). `last_chunk_zero`: report 0.0 for the last chunk, as the published data does.
    """
    listed = [list(resampled.get(i, ())) for i in range(len(chunks))]
    if last_chunk_zero and listed:
        listed[-1] = []
    strings = list(chunks) + [s for group in listed for s in group]
    vectors = _embed_unique(strings, embedder or _default_embedder())
    stats = []
    for chunk, group in zip(chunks, listed):
        flags = different_flags(chunk, group, vectors, threshold)
        stats.append({
            "different_trajectories_fraction": different_trajectories_fraction(flags),
            "overdeterminedness": overdeterminedness(group),
        })
    return stats


def chunk_metrics(
    chunks: Sequence[str], rollouts: Sequence[Rollout], threshold: float = THRESHOLD, embedder=None
) -> list[dict]:
    """The metric columns of `chunks_labeled.json` for every chunk of a trace.

    `rollouts`: all rollouts of the trace, resampled and forced (`forced=True`) together. The last
    chunk's importances and trajectory statistics are 0.0, as published.
    """
    by_chunk: list[list[Rollout]] = [[] for _ in chunks]
    forced: list[list[Rollout]] = [[] for _ in chunks]
    for r in rollouts:
        (forced if r.forced else by_chunk)[r.chunk_idx].append(r)
    by_chunk = [kept(group) for group in by_chunk]
    strings = list(chunks) + [r.chunk_resampled for group in by_chunk[:-1] for r in group]
    vectors = _embed_unique(strings, embedder or _default_embedder())
    rows = []
    for i, chunk in enumerate(chunks):
        current = by_chunk[i]
        following = by_chunk[i + 1] if i + 1 < len(chunks) else None
        forced_following = forced[i + 1] if i + 1 < len(chunks) else None
        last = following is None
        resampled = [r.chunk_resampled for r in current] if not last else []
        flags = different_flags(chunk, resampled, vectors, threshold)
        rows.append({
            "accuracy": accuracy(current),
            "resampling_importance_accuracy": resampling_importance_accuracy(current, following),
            "resampling_importance_kl": resampling_importance_kl(current, following),
            "counterfactual_importance_accuracy": counterfactual_importance_accuracy(
                current if not last else [], following, flags),
            "counterfactual_importance_kl": counterfactual_importance_kl(
                current if not last else [], following, flags),
            "forced_importance_accuracy": forced_importance_accuracy(forced[i], forced_following),
            "forced_importance_kl": forced_importance_kl(forced[i], forced_following),
            "different_trajectories_fraction": different_trajectories_fraction(flags),
            "overdeterminedness": overdeterminedness(resampled),
        })
    return rows


def counterfactual_matrix(
    chunk_embeddings: np.ndarray, rollout_sentence_embeddings: Sequence[Sequence[np.ndarray]],
    threshold: float = THRESHOLD,
) -> np.ndarray:
    """Sentence-to-sentence counterfactual matrix M, shape (n_chunks, n_chunks), rows = sources.

    `chunk_embeddings`: (n_chunks, d) unit rows. `rollout_sentence_embeddings[i][r]`: (m, d) unit
    embeddings of the sentences of rollout r of chunk i (m may differ per rollout).
    F[i, j] = fraction of chunk i's rollouts that contain a sentence with cos(., chunk_j) >= tau;
    M[i, j] = F[i+1, j] - F[i, j] for j > i, NaN elsewhere (j <= i).
    """
    chunk_embeddings = np.asarray(chunk_embeddings, dtype=np.float64)
    n = chunk_embeddings.shape[0]
    if len(rollout_sentence_embeddings) != n:
        raise ValueError(f"{len(rollout_sentence_embeddings)} rollout groups for {n} chunks")
    contains = np.zeros((n, n))
    for i, group in enumerate(rollout_sentence_embeddings):
        hits = [
            (np.asarray(s, dtype=np.float64) @ chunk_embeddings.T >= threshold).any(axis=0)
            for s in group if len(s)
        ]
        contains[i] = np.sum(hits, axis=0) / len(group) if hits else 0.0
    m = np.full((n, n), np.nan)
    for i in range(n - 1):
        m[i, i + 1 :] = contains[i + 1, i + 1 :] - contains[i, i + 1 :]
    return m
