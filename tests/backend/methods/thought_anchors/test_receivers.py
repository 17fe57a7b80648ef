import numpy as np
import pytest
import scipy.stats
import torch

from backend.methods.thought_anchors.receivers import (
    head_kurtosis,
    receiver_heads,
    receiver_scores,
    sentence_attention,
    vertical_scores,
)

SPANS = [(1, 4), (4, 6), (7, 9), (9, 12), (12, 13), (13, 16)]  # token 0 = prompt, 6 = whitespace


def naive_sentence_attention(attn, spans):
    out = np.zeros(attn.shape[:-2] + (len(spans), len(spans)))
    for q, (qs, qe) in enumerate(spans):
        for k, (ks, ke) in enumerate(spans):
            out[..., q, k] = attn[..., qs:qe, ks:ke].mean(axis=(-2, -1))
    return out


def causal_attention(scores):
    """Row-softmax of (..., T, T) scores under a causal mask."""
    t = scores.shape[-1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_sentence_attention_matches_block_means():
    rng = np.random.default_rng(0)
    attn = causal_attention(rng.normal(size=(3, 16, 16)))
    expected = naive_sentence_attention(attn, SPANS)
    np.testing.assert_allclose(sentence_attention(attn, SPANS), expected, rtol=1e-5, atol=1e-7)
    as_torch = sentence_attention(torch.from_numpy(attn).half(), SPANS)
    assert torch.is_tensor(as_torch) and as_torch.shape == (3, 6, 6)
    np.testing.assert_allclose(as_torch.numpy(), expected, rtol=2e-3, atol=1e-4)
    assert np.isnan(sentence_attention(attn, [(1, 4), (5, 5)])[:, 1]).all()  # empty span


def test_vertical_scores_by_hand():
    a = np.arange(36, dtype=float).reshape(6, 6)  # A[q, k] = 6q + k
    v = vertical_scores(a, proximity_ignore=2)
    # k = 0: q in {2..5} -> mean(12, 18, 24, 30) = 21; k = 3: q = 5 -> 33; k >= 4: nothing left
    np.testing.assert_allclose(v[:4], [21, 25, 29, 33])
    assert np.isnan(v[4:]).all()
    v0 = vertical_scores(a, proximity_ignore=0)  # the diagonal counts when pi = 0
    assert v0[5] == 35


def test_receiver_pattern_wins():
    """Sentence 1 is attended by every later sentence in some heads: top receiver score."""
    rng = np.random.default_rng(1)
    spans = [(1 + 3 * s, 4 + 3 * s) for s in range(12)]  # token 0 is the prompt
    layers, heads, t = 3, 4, 37
    scores = rng.normal(scale=0.5, size=(layers, heads, t, t))
    for layer, head in [(0, 0), (1, 2), (2, 1)]:
        scores[layer, head, :, 4:7] += 6.0  # the tokens of sentence 1
    attn = causal_attention(scores)
    vertical = np.stack(  # (layer, head, sentence)
        [vertical_scores(sentence_attention(attn[layer], spans), 2) for layer in range(layers)]
    )
    kurt = head_kurtosis(vertical)  # (layer, head)
    top = receiver_heads(kurt, top_k=2)
    assert sorted(top) == [(1, 2), (2, 1)]  # layer 0 excluded although its head has the pattern
    assert (0, 0) in receiver_heads(kurt, top_k=3, exclude_layer0=False)
    scores_by_sentence = receiver_scores(vertical, top)
    assert np.nanargmax(scores_by_sentence) == 1


def test_head_kurtosis_matches_scipy():
    rng = np.random.default_rng(2)
    v = rng.gamma(2.0, size=(4, 5, 30))
    v[rng.random(v.shape) < 0.2] = np.nan
    expected = scipy.stats.kurtosis(v, axis=-1, fisher=True, bias=True, nan_policy="omit")
    np.testing.assert_allclose(head_kurtosis(v), np.asarray(expected), rtol=1e-10)


def test_receiver_heads_average_over_traces_and_skip_nan():
    k = np.array([
        [[9.0, 9.0], [1.0, 5.0], [np.nan, 2.0]],
        [[9.0, 9.0], [3.0, 1.0], [np.nan, 2.0]],
    ])  # (trace, layer, head): means (1,0)=2, (1,1)=3, (2,1)=2, (2,0) NaN
    assert receiver_heads(k, top_k=2) == [(1, 1), (1, 0)]
    assert receiver_heads(k, top_k=10) == [(1, 1), (1, 0), (2, 1)]
    with pytest.raises(ValueError):
        receiver_heads(np.zeros(3))
