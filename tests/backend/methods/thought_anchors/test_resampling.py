import json
import math

import numpy as np
import pytest

from backend.methods.thought_anchors import trajectory_stats
from backend.methods.thought_anchors.resampling import (
    KL_ALPHA,
    Rollout,
    accuracy,
    chunk_metrics,
    counterfactual_importance_accuracy,
    counterfactual_importance_kl,
    counterfactual_matrix,
    different_trajectories_fraction,
    forced_importance_accuracy,
    kl_divergence,
    overdeterminedness,
    resampling_importance_accuracy,
    resampling_importance_kl,
    rollout_prompt,
    trajectory_stats_by_chunk,
)


def rollouts(chunk_idx, answers, correct="1", resampled=None, forced=False):
    resampled = resampled or ["s"] * len(answers)
    return [Rollout(chunk_idx, c, a, a == correct, forced) for a, c in zip(answers, resampled)]


class TableEmbedder:
    """Unit vectors chosen by hand, so similarities are known exactly."""

    def __init__(self, table):
        self.table = {k: np.asarray(v, float) / np.linalg.norm(v) for k, v in table.items()}
        self.calls = []

    def embed(self, sentences):
        self.calls.append(list(sentences))
        return np.stack([self.table[s] for s in sentences]) if sentences else np.zeros((0, 2))


def test_kl_by_hand():
    # P = (2/3, 1/3), Q = (1/3, 2/3): KL = 2/3 ln 2 + 1/3 ln 1/2 = ln(2) / 3
    kl = kl_divergence({"1": 2, "2": 1}, {"1": 1, "2": 2})
    assert kl == pytest.approx(math.log(2) / 3, abs=1e-8)
    # Disjoint supports: the smoothing a keeps it finite. V = 2.
    a = KL_ALPHA
    p, q = (1 + a) / (1 + 2 * a), a / (1 + 2 * a)
    by_hand = p * math.log(p / q) + q * math.log(q / p)
    assert kl_divergence({"x": 1}, {"y": 1}) == pytest.approx(by_hand, rel=1e-12)
    assert kl_divergence({"x": 3, "y": 1}, {"x": 3, "y": 1}) == 0.0
    assert kl_divergence({}, {"x": 1}) == 0.0


def test_resampling_importance_by_hand():
    r0 = rollouts(0, ["1", "1", "2", None])  # the answerless rollout is dropped: acc = 2/3
    r1 = rollouts(1, ["1", "2", "2"])  # acc = 1/3
    assert accuracy(r0) == pytest.approx(2 / 3)
    assert resampling_importance_accuracy(r0, r1) == pytest.approx(1 / 3 - 2 / 3)
    assert resampling_importance_kl(r0, r1) == pytest.approx(math.log(2) / 3, abs=1e-8)
    assert resampling_importance_accuracy(r1, None) == 0.0  # last chunk
    assert resampling_importance_kl(r1, []) == 0.0


def test_answers_are_compared_normalised():
    r0 = rollouts(0, ["282,240", "282240"], correct="282240")
    r1 = rollouts(1, ["282240", "282240"], correct="282240")
    assert resampling_importance_kl(r0, r1) == 0.0


def test_counterfactual_importance_by_hand():
    r0 = rollouts(0, ["1", "2", "2", "1", None])
    different = [True, True, True, False, True]  # D_0 = first three kept, S_0 = the fourth
    r1 = rollouts(1, ["1", "1", "1", "2"])  # acc_1 = 3/4
    # sign: acc(D_i) - acc_{i+1} = 1/3 - 3/4
    assert counterfactual_importance_accuracy(r0, r1, different) == pytest.approx(1 / 3 - 3 / 4)
    # KL(P(D) || P(R_1 + S_0)): P(D) = (1/3, 2/3) over (1, 2); R_1 + S_0 = (4/5, 1/5)
    expected = 1 / 3 * math.log((1 / 3) / (4 / 5)) + 2 / 3 * math.log((2 / 3) / (1 / 5))
    assert counterfactual_importance_kl(r0, r1, different) == pytest.approx(expected, abs=1e-8)
    assert different_trajectories_fraction([True, True, True, False]) == 0.75


def test_counterfactual_importance_is_zero_without_different_rollouts_or_next_chunk():
    r0 = rollouts(0, ["1", "2"])
    r1 = rollouts(1, ["2", "2"])
    assert counterfactual_importance_accuracy(r0, r1, [False, False]) == 0.0
    assert counterfactual_importance_kl(r0, r1, [False, False]) == 0.0
    assert counterfactual_importance_accuracy(r0, None, [True, True]) == 0.0
    with pytest.raises(ValueError):
        counterfactual_importance_accuracy(r0, r1, [True])


def test_overdeterminedness_by_hand():
    assert overdeterminedness(["a", "a", "b", "c"]) == pytest.approx(1 - 3 / 4)
    assert overdeterminedness([]) == 0.0


def test_trajectory_stats_with_known_similarities():
    # cos(chunk, same) = 1, cos(chunk, near) = cos(30 deg) = 0.866 >= 0.8, cos(chunk, far) = 0
    table = {"chunk": [1, 0], "same": [1, 0], "near": [math.sqrt(3), 1], "far": [0, 1]}
    embedder = TableEmbedder(table)
    stats = trajectory_stats("chunk", ["same", "near", "far", "far"], embedder=embedder)
    assert stats == {"different_trajectories_fraction": 0.25 * 2, "overdeterminedness": 0.25}
    assert sorted(embedder.calls[0]) == ["chunk", "far", "near", "same"]  # one call, no repeats
    stricter = trajectory_stats(
        "chunk", ["same", "near", "far", "far"], threshold=0.9, embedder=embedder
    )
    assert stricter["different_trajectories_fraction"] == 0.75


def test_chunk_metrics_trace_by_hand():
    table = {"c0": [1, 0], "c1": [0, 1], "x": [1, 0], "y": [0, 1]}
    data = (
        rollouts(0, ["1", "2", "1"], resampled=["x", "y", "y"])
        + rollouts(1, ["1", "1"], resampled=["y", "x"])
        + rollouts(0, ["2", "2"], forced=True)
        + rollouts(1, ["1", "2"], forced=True)
    )
    rows = chunk_metrics(["c0", "c1"], data, embedder=TableEmbedder(table))
    first, last = rows
    assert first["accuracy"] == pytest.approx(2 / 3)
    assert first["resampling_importance_accuracy"] == pytest.approx(1 - 2 / 3)
    assert first["different_trajectories_fraction"] == pytest.approx(2 / 3)  # the two "y"
    # D_0 = the two "y" rollouts, answers "2" and "1": acc(D_0) - acc_1 = 1/2 - 1
    assert first["counterfactual_importance_accuracy"] == pytest.approx(0.5 - 1.0)
    assert first["forced_importance_accuracy"] == pytest.approx(0.5 - 0.0)
    assert forced_importance_accuracy(data[5:7], data[7:9]) == pytest.approx(0.5)
    assert first["overdeterminedness"] == pytest.approx(1 - 2 / 3)
    for key, value in last.items():
        assert value == (1.0 if key == "accuracy" else 0.0), key


def test_counterfactual_matrix_by_hand():
    e = np.eye(3)  # chunk j's embedding is e_j
    groups = [
        [np.array([e[1]]), np.array([e[0], e[2]])],  # chunk 0: F[0] = (1/2, 1/2, 1/2)
        [np.array([e[1], e[2]]), np.array([e[1]])],  # chunk 1: F[1] = (0, 1, 1/2)
        [np.array([e[2]]), np.zeros((0, 3))],  # chunk 2: F[2] = (0, 0, 1/2); an empty rollout
    ]
    m = counterfactual_matrix(e, groups)
    expected = np.full((3, 3), np.nan)
    expected[0, 1:] = [1 - 0.5, 0.5 - 0.5]
    expected[1, 2] = 0.5 - 0.5
    np.testing.assert_allclose(m, expected)


def test_trajectory_stats_reproduce_published_values(trace_dir, embedder):
    labeled = json.loads((trace_dir / "chunks_labeled.json").read_text())
    listed = json.loads((trace_dir / "chunks_resampled.json").read_text())
    resampled = {int(k): v for k, v in listed.items()}
    chunks = [c["chunk"] for c in labeled]
    stats = trajectory_stats_by_chunk(chunks, resampled, embedder=embedder)
    for key in ("different_trajectories_fraction", "overdeterminedness"):
        gaps = [abs(ours[key] - row[key]) for row, ours in zip(labeled, stats, strict=True)]
        worst = int(np.argmax(gaps))
        assert gaps[worst] <= 0.02, (key, worst, stats[worst][key], labeled[worst][key])
        assert np.mean(gaps) < 0.005, key  # most chunks match exactly (no dropped rollouts)
    # The single-chunk function agrees with the batched one (chunk 0, R_0 = the listed sentences).
    assert trajectory_stats(chunks[0], resampled[0], embedder=embedder) == pytest.approx(stats[0])


def test_rollout_prompt_is_the_published_one(trace_dir):
    problem = json.loads((trace_dir / "problem.json").read_text())["problem"]
    base = json.loads((trace_dir / "base_solution.json").read_text())
    assert rollout_prompt(problem, "") == base["prompt"]
    assert rollout_prompt(problem, base["solution"]) == base["full_cot"]
    forced = rollout_prompt(problem, "x", forced=True)
    assert forced.endswith("x\n</think>\n\nTherefore, the final answers is \\boxed{")
