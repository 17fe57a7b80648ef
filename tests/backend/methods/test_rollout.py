"""Rollout, flow and gradient-weighted rollout against published values, invariants and networkx.

Spec: ../shared/specs/rollout_flow.md. Every expected value is computed independently of the code
under test: fixture values from the reference implementation, closed forms, explicit loops, or
networkx's max-flow on the graph built here.
"""

from __future__ import annotations

from functools import partial

import networkx as nx
import numpy as np
import pytest

from backend.errors import JobCancelled
from backend.methods import rollout as rollout_module
from backend.methods.rollout import (
    attention_flow,
    attention_rollout,
    exclude_first_token,
    gradient_rollout,
)

# --- inputs ---------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def fixture_attention(causal: bool = False) -> np.ndarray:
    """The spec's input, L=2, H=2, n=5.

    A[l, h, i, j] = softmax over j of 3 sin(0.7 (l+1) + 1.3 (h+1)(i+1) + 0.5 (j+1)^2).
    """
    l, h, i, j = np.meshgrid(*(np.arange(k) for k in (2, 2, 5, 5)), indexing="ij")
    logits = 3 * np.sin(0.7 * (l + 1) + 1.3 * (h + 1) * (i + 1) + 0.5 * (j + 1) ** 2)
    if causal:
        logits = np.where(j > i, -np.inf, logits)
    return softmax(logits)


def random_attention(layers, heads, n, seed, causal=False, scale=2.0, band=None) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=scale, size=(layers, heads, n, n))
    i, j = np.indices((n, n))
    if causal:
        logits = np.where(j > i, -np.inf, logits)
    if band is not None:  # local attention: only keys within `band` positions
        logits = np.where(abs(i - j) > band, -np.inf, logits)
    return softmax(logits)


def independent_atil(attn: np.ndarray, fuse=np.mean) -> np.ndarray:
    """Atil_l = (Abar_l + I) / rowsum, with explicit loops: (layer, query, key)."""
    layers, _, n, _ = attn.shape
    out = np.zeros((layers, n, n))
    for layer in range(layers):
        fused = fuse(attn[layer], axis=0) + np.eye(n)
        for row in range(n):
            out[layer, row] = fused[row] / fused[row].sum()
    return out


def networkx_flow(atil: np.ndarray) -> np.ndarray:
    """Raw max-flow (L, i) -> (0, j) for every pair, with networkx on float capacities."""
    layers, n, _ = atil.shape
    graph = nx.DiGraph()
    for layer in range(1, layers + 1):
        for a in range(n):
            for b in range(n):
                if atil[layer - 1, a, b] > 0:
                    graph.add_edge((layer, a), (layer - 1, b), capacity=atil[layer - 1, a, b])
    flow = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if (layers, i) in graph and (0, j) in graph:
                flow[i, j] = nx.maximum_flow_value(graph, (layers, i), (0, j))
    return flow


# --- the spec's fixture values ------------------------------------------------------------------


def test_fixture_rollout_row_0():
    expected = [0.327063, 0.050513, 0.394520, 0.027235, 0.200669]
    np.testing.assert_allclose(attention_rollout(fixture_attention())[-1, 0], expected, atol=1e-5)


def test_fixture_flow_row_0():
    expected = [0.324901, 0.069779, 0.339723, 0.054862, 0.210735]
    np.testing.assert_allclose(attention_flow(fixture_attention())[0], expected, atol=1e-5)


def test_fixture_raw_flow_row_0():
    expected = [0.645405, 0.138615, 0.674848, 0.108981, 0.418619]
    raw = attention_flow(fixture_attention(), normalize=False)
    np.testing.assert_allclose(raw[0], expected, atol=1e-5)


def test_fixture_causal_rollout_last_row():
    expected = [0.389894, 0.022792, 0.012497, 0.041932, 0.532886]
    rollout = attention_rollout(fixture_attention(causal=True))
    np.testing.assert_allclose(rollout[-1, -1], expected, atol=1e-5)


def test_fixture_causal_flow_last_row():
    expected = [0.372663, 0.035985, 0.018333, 0.042585, 0.530434]
    flow = attention_flow(fixture_attention(causal=True))
    np.testing.assert_allclose(flow[-1], expected, atol=1e-5)


def test_fixture_flow_through_general_solver():
    """The fixture again, with an identity layer on top: same raw flow, via the max-flow path."""
    attn = np.concatenate([fixture_attention(), np.eye(5)[None, None].repeat(2, axis=1)])
    expected = [0.645405, 0.138615, 0.674848, 0.108981, 0.418619]
    np.testing.assert_allclose(attention_flow(attn, normalize=False)[0], expected, atol=1e-5)


# --- the spec's invariants ------------------------------------------------------------------------


def test_invariant_1_rows_of_atil_and_rollout_sum_to_one():
    attn = random_attention(5, 3, 9, seed=1)
    np.testing.assert_allclose(rollout_module.residual_attention(attn).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(attention_rollout(attn).sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2, 3, 12])
def test_invariant_2_identity_attention_gives_identity(layers):
    attn = np.broadcast_to(np.eye(6), (layers, 2, 6, 6))
    np.testing.assert_allclose(attention_rollout(attn), np.broadcast_to(np.eye(6), (layers, 6, 6)))
    np.testing.assert_allclose(attention_flow(attn), np.eye(6), atol=1e-12)
    np.testing.assert_allclose(attention_flow(attn, normalize=False), np.eye(6), atol=1e-12)


def test_invariant_3_uniform_attention_closed_form():
    layers, n = 6, 7
    attn = np.full((layers, 3, n, n), 1.0 / n)
    expected = 2.0**-layers * np.eye(n) + (1 - 2.0**-layers) * np.full((n, n), 1.0 / n)
    np.testing.assert_allclose(attention_rollout(attn)[-1], expected, atol=1e-12)


def test_invariant_4_one_layer_rollout_and_flow_equal_atil():
    attn = random_attention(1, 3, 6, seed=4)
    atil = independent_atil(attn)[0]
    np.testing.assert_allclose(attention_rollout(attn)[0], atil, atol=1e-12)
    np.testing.assert_allclose(attention_flow(attn), atil, atol=1e-12)
    np.testing.assert_allclose(attention_flow(attn, normalize=False), atil, atol=1e-12)


@pytest.mark.parametrize("layers", [2, 4])
def test_invariant_5_causal_attention_gives_lower_triangular_results(layers):
    attn = random_attention(layers, 2, 7, seed=5, causal=True)
    e0 = np.eye(7)[0]
    for result in (attention_rollout(attn)[-1], attention_flow(attn)):
        np.testing.assert_array_equal(np.triu(result, k=1), 0.0)
        np.testing.assert_allclose(result[0], e0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layers, n", [(3, 6), (6, 12)])
def test_invariant_6_raw_flow_bounds(causal, layers, n):
    attn = random_attention(layers, 2, n, seed=6, causal=causal)
    raw = attention_flow(attn, normalize=False)
    into_sink = independent_atil(attn)[0].sum(0)  # sum_k Atil_1[k, v]
    assert (raw <= np.minimum(1.0, into_sink)[None, :] + 1e-12).all()
    assert (raw.sum(1) >= 1.0 - 1e-12).all()


def test_invariant_7_two_layer_closed_form():
    attn = random_attention(2, 3, 6, seed=7)
    atil = independent_atil(attn)
    n = 6
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            expected[i, j] = sum(min(atil[1, i, k], atil[0, k, j]) for k in range(n))
    np.testing.assert_allclose(attention_flow(attn, normalize=False), expected, atol=1e-12)
    # the same graph under an identity layer (capacity-1 edges (3, i) -> (2, i)) goes through the
    # general max-flow solver instead of the closed form
    stacked = np.concatenate([attn, np.broadcast_to(np.eye(n), (1, 3, n, n))])
    np.testing.assert_allclose(attention_flow(stacked, normalize=False), expected, atol=1e-12)


def test_invariant_8_gradient_rollout_with_unit_gradient_is_product_of_i_plus_abar():
    attn = random_attention(4, 3, 5, seed=8)
    expected = np.eye(5)
    for layer in range(4):
        expected = (np.eye(5) + attn[layer].mean(0)) @ expected  # later layers on the left
    np.testing.assert_allclose(gradient_rollout(attn, np.ones_like(attn))[-1], expected, atol=1e-12)


# --- flow against an independent max-flow solver -------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [False, True])
def test_flow_matches_networkx_on_small_inputs(causal, seed):
    attn = random_attention(3, 2, 6, seed=seed, causal=causal, scale=3.0)
    expected = networkx_flow(independent_atil(attn))
    np.testing.assert_allclose(attention_flow(attn, normalize=False), expected, atol=1e-7)
    normalised = expected / expected.sum(1, keepdims=True)
    np.testing.assert_allclose(attention_flow(attn), normalised, atol=1e-7)


def test_flow_matches_networkx_with_local_attention():
    """Banded attention: many pairs are unconnected and the rest use a window of tokens."""
    attn = random_attention(5, 2, 9, seed=11, band=1)
    expected = networkx_flow(independent_atil(attn))
    np.testing.assert_allclose(attention_flow(attn, normalize=False), expected, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_flow_matches_networkx_on_deeper_inputs(causal):
    attn = random_attention(6, 2, 9, seed=12, causal=causal)
    expected = networkx_flow(independent_atil(attn))
    np.testing.assert_allclose(attention_flow(attn, normalize=False), expected, atol=1e-7)


def test_flow_matches_networkx_when_the_cut_certificate_decides(monkeypatch):
    """Deep bidirectional attention: the meet-in-the-middle certificate settles most pairs."""
    solved_by_max_flow = []
    original = rollout_module._pair_max_flows

    def spy(atil, pairs, *args):
        solved_by_max_flow.append(len(pairs))
        return original(atil, pairs, *args)

    monkeypatch.setattr(rollout_module, "_pair_max_flows", spy)
    attn = random_attention(6, 3, 9, seed=13, scale=1.0)
    raw = attention_flow(attn, normalize=False)
    assert sum(solved_by_max_flow) < 40  # of 81 pairs: the certificate did the rest
    np.testing.assert_allclose(raw, networkx_flow(independent_atil(attn)), atol=1e-7)


def test_flow_of_uniform_attention_where_both_trivial_cuts_tie():
    """Every source cut and sink cut equal 1: the certificate's tie case, within 1e-6."""
    attn = np.full((6, 2, 8, 8), 1.0 / 8)
    expected = networkx_flow(independent_atil(attn))
    np.testing.assert_allclose(attention_flow(attn, normalize=False), expected, atol=1e-6)


def test_flow_accepts_torch_tensors():
    import torch

    attn = random_attention(3, 2, 5, seed=14)
    from_torch = attention_flow(torch.tensor(attn, dtype=torch.float64), normalize=False)
    np.testing.assert_allclose(from_torch, networkx_flow(independent_atil(attn)), atol=1e-7)


# --- head fusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion, fuse", [("max", np.max), ("min", np.min), ("mean", np.mean)])
def test_head_fusion_rollout(fusion, fuse):
    attn = random_attention(3, 4, 6, seed=15)
    atil = independent_atil(attn, fuse)
    expected = atil[2] @ atil[1] @ atil[0]
    result = attention_rollout(attn, head_fusion=fusion)[-1]
    np.testing.assert_allclose(result, expected, atol=1e-12)


@pytest.mark.parametrize("fusion, fuse", [("max", np.max), ("min", np.min)])
def test_head_fusion_flow(fusion, fuse):
    attn = random_attention(3, 4, 6, seed=16)
    expected = networkx_flow(independent_atil(attn, fuse))
    result = attention_flow(attn, head_fusion=fusion, normalize=False)
    np.testing.assert_allclose(result, expected, atol=1e-7)


# --- gradient-weighted rollout --------------------------------------------------------------------


def test_gradient_rollout_matches_explicit_loops():
    rng = np.random.default_rng(17)
    layers, heads, n = 3, 2, 4
    attn = random_attention(layers, heads, n, seed=17)
    grads = rng.normal(size=attn.shape)  # negative products are clamped away
    current = np.eye(n)
    for layer in range(layers):
        abar = np.zeros((n, n))
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    abar[i, j] += max(grads[layer, h, i, j] * attn[layer, h, i, j], 0.0) / heads
        step = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                step[i, j] = sum(abar[i, k] * current[k, j] for k in range(n))
        current = current + step
        np.testing.assert_allclose(gradient_rollout(attn, grads)[layer], current, atol=1e-12)


# --- readout ------------------------------------------------------------------------------------


def test_exclude_first_token_renormalises_a_row_and_a_matrix():
    np.testing.assert_allclose(exclude_first_token([0.5, 0.1, 0.3, 0.1]), [0.2, 0.6, 0.2])
    matrix = exclude_first_token(np.array([[0.9, 0.05, 0.05], [0.0, 0.75, 0.25]]))
    np.testing.assert_allclose(matrix, [[0.5, 0.5], [0.75, 0.25]])


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attn, message",
    [
        (np.ones((2, 4, 4)) / 4, "shape"),  # no head axis
        (np.ones((2, 1, 4, 3)) / 3, "square"),
        (-np.ones((2, 1, 3, 3)), "non-negative"),
        (np.full((2, 1, 3, 3), np.nan), "NaN"),
    ],
)
def test_bad_attention_is_refused(attn, message):
    for method in (attention_rollout, attention_flow):
        with pytest.raises(ValueError, match=message):
            method(attn)


def test_unknown_head_fusion_is_refused():
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(random_attention(2, 2, 3, seed=0), head_fusion="median")
    with pytest.raises(ValueError, match="head_fusion"):
        attention_flow(random_attention(2, 2, 3, seed=0), head_fusion="sum")


def test_gradient_shape_mismatch_is_refused():
    attn = random_attention(2, 2, 3, seed=0)
    with pytest.raises(ValueError, match="grads shape"):
        gradient_rollout(attn, np.ones((2, 2, 3, 4)))


# --- progress and cancellation --------------------------------------------------------------------


def test_should_stop_cancels_flow():
    with pytest.raises(JobCancelled):
        attention_flow(random_attention(4, 2, 8, seed=0), should_stop=lambda: True)


def test_should_stop_cancels_a_running_flow(monkeypatch):
    monkeypatch.setattr(rollout_module, "_Ticker", partial(rollout_module._Ticker, every=0.0))
    calls = []

    def stop_on_third_poll():
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(JobCancelled):
        attn = random_attention(6, 2, 12, seed=0, causal=True)
        attention_flow(attn, should_stop=stop_on_third_poll)
    assert len(calls) == 3


@pytest.mark.parametrize("causal", [False, True])
def test_progress_reports_growing_fractions_up_to_one(causal):
    seen = []
    attention_flow(random_attention(6, 2, 24, seed=3, causal=causal),
                   progress=lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [fraction for fraction, _ in seen]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and len(seen) >= 2
    assert all(isinstance(stage, str) for _, stage in seen)
