import json
import math

import numpy as np
import pytest
import torch

from backend.methods.thought_anchors.suppression import (
    compress_top_p,
    kl_between_compressed,
    normalize_suppression,
    suppression_mask,
    suppression_matrix,
    token_log_kl,
)


def tempered_kl(base_logits, supp_logits, temperature):
    """Exact KL(P || Q) of the full tempered softmaxes, in float64 numpy."""
    def log_softmax(x):
        x = np.asarray(x, np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(base_logits), log_softmax(supp_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_compress_top_p_keeps_smallest_set():
    # probabilities at T = 1: 0.5, 0.3, 0.15, 0.05
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = compress_top_p(logits, p=0.8, temperature=1.0)
    assert kept.indices.tolist()[:2] == [1, 3] and kept.indices.tolist()[2:] == [-1, -1]
    assert compress_top_p(logits, p=0.81, temperature=1.0).indices.tolist()[:3] == [1, 3, 0]
    assert (compress_top_p(logits, p=0.9999, max_tokens=2, temperature=1.0).indices >= 0).sum() == 2
    # the temperature sharpens before choosing: at T = 0.6 the top two already hold > 0.8
    assert (compress_top_p(logits, p=0.85, temperature=0.6).indices >= 0).sum() == 2
    torch.testing.assert_close(kept.logits[:2], logits[[1, 3]])  # raw logits are kept


def test_kl_equals_exact_kl_when_nothing_is_dropped():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 50, generator=gen) * 3
    supp = base + torch.randn(5, 50, generator=gen)
    full = lambda x: compress_top_p(x, p=1.5, max_tokens=50)  # noqa: E731 (p > 1: keep all 50)
    ours = kl_between_compressed(full(base), full(supp), temperature=0.6)
    assert ours.shape == (5,)
    np.testing.assert_allclose(ours.numpy(), tempered_kl(base, supp, 0.6), rtol=1e-3, atol=1e-5)
    assert torch.equal(kl_between_compressed(full(base), full(base)), torch.zeros(5))


def test_kl_union_support_with_missing_logits():
    # base keeps tokens {0, 1}; supp keeps {1, 2}: on the union {0, 1, 2} each side misses one
    # token, whose logit becomes -1e9 (probability 0 after the softmax).
    base_logits = torch.tensor([2.0, 1.0, -30.0, -30.0])
    supp_logits = torch.tensor([-30.0, 1.0, 2.0, -30.0])
    base, supp = compress_top_p(base_logits, p=0.99), compress_top_p(supp_logits, p=0.99)
    assert sorted(base.indices[base.indices >= 0].tolist()) == [0, 1]
    t = 0.6
    p0 = 1 / (1 + math.exp(-1 / t))  # P(token 0) on {0, 1}
    log_q0 = -1e9 / t - math.log(math.exp(1 / t) + math.exp(2 / t))  # token 0 under supp
    log_q1 = 1 / t - math.log(math.exp(1 / t) + math.exp(2 / t))
    expected = p0 * (math.log(p0) - log_q0) + (1 - p0) * (math.log(1 - p0) - log_q1)
    assert kl_between_compressed(base, supp, t).item() == pytest.approx(expected, rel=1e-5)
    assert token_log_kl(base, supp, t).item() == pytest.approx(math.log(expected + 1e-9), rel=1e-6)


def test_batched_kl_matches_a_per_position_union():
    """Positions in a batch, supports that partly overlap: compare with a dict-based union."""
    gen = torch.Generator().manual_seed(1)
    base_logits = torch.randn(6, 40, generator=gen) * 4
    supp_logits = base_logits + torch.randn(6, 40, generator=gen) * 2
    base = compress_top_p(base_logits, p=0.99, max_tokens=8)
    supp = compress_top_p(supp_logits, p=0.99, max_tokens=8)
    expected = []
    for t in range(6):
        b = {int(i): float(x) for i, x in zip(base.indices[t], base.logits[t]) if i >= 0}
        s = {int(i): float(x) for i, x in zip(supp.indices[t], supp.logits[t]) if i >= 0}
        union = sorted(set(b) | set(s))
        lb = np.array([b.get(i, -1e9) for i in union]) / 0.6
        ls = np.array([s.get(i, -1e9) for i in union]) / 0.6
        lp, lq = lb - np.logaddexp.reduce(lb), ls - np.logaddexp.reduce(ls)
        expected.append(max(float((np.exp(lp) * (lp - lq)).sum()), 0.0))
    np.testing.assert_allclose(kl_between_compressed(base, supp).numpy(), expected, rtol=1e-4)


def test_suppression_matrix_by_hand():
    per_token = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]])
    spans = [(1, 3), (3, 6)]
    s = suppression_matrix(per_token, spans)  # rows = targets, columns = suppressed chunks
    np.testing.assert_allclose(s, [[1.5, 11.5], [4.0, 14.0]])
    assert np.isnan(suppression_matrix(per_token, [(2, 2)])).all()


def test_normalize_suppression_rows_sum_to_zero():
    s = np.random.default_rng(0).normal(size=(7, 7))
    n = normalize_suppression(s)
    target, source = np.indices(n.shape)
    assert np.isnan(n[source >= target]).all() and np.isfinite(n[source < target]).all()
    for j in range(1, 7):
        assert abs(n[j, :j].sum()) < 1e-12
        np.testing.assert_allclose(n[j, :j], s[j, :j] - s[j, :j].mean())


def test_published_suppression_scores_are_row_normalised(qwen_dir):
    entries = json.loads((qwen_dir / "step_importance_supp.json").read_text())
    by_target = {}
    for row in entries:
        for impact in row["target_impacts"]:
            assert impact["target_chunk_idx"] > row["source_chunk_idx"]
            by_target.setdefault(impact["target_chunk_idx"], []).append(impact["importance_score"])
    assert len(by_target) == len(entries) - 1
    for target, scores in by_target.items():
        assert len(scores) == target  # every source i < j
        assert abs(sum(scores)) < 1e-9, target


def test_suppression_mask_values():
    m = suppression_mask(5, (1, 3), dtype=torch.float16)
    low = torch.finfo(torch.float16).min
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.float16
    blocked = (m[0, 0] == low).int().tolist()
    assert blocked == [
        [0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 1, 1, 0, 1],
        [0, 1, 1, 0, 0],
    ]
    assert not torch.isinf(m).any()  # set, never added twice
    assert torch.equal(suppression_mask(5, None), suppression_mask(5, (0, 0)))


def test_suppression_leaves_earlier_positions_untouched():
    """One attention layer, same code path: queries before the suppressed chunk see no change,
    later ones do, and no one attends to the chunk."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen) for _ in range(3))

    def attend(mask):
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() + mask, dim=-1)
        return weights, weights @ v

    base_w, base_out = attend(suppression_mask(9, None))
    supp_w, supp_out = attend(suppression_mask(9, (3, 5)))
    assert torch.equal(base_out[..., :3, :], supp_out[..., :3, :])
    assert not torch.allclose(base_out[..., 5:, :], supp_out[..., 5:, :])
    assert supp_w[..., 3:, 3:5].max() == 0
