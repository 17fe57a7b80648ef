"""capture_attention against the packaged models and a hand computation of eager attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModel

from backend.methods.capture import capture_attention
from backend.methods.hooks import attention_modules
from backend.models import resolve_source

TEXT = "The quick brown fox jumps over the lazy dog. Then it rests in the shade."


def _ids(lm, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def smol_capture(smollm2):
    ids = _ids(smollm2)
    return ids, capture_attention(smollm2.model, ids)


@pytest.fixture(scope="module")
def mini_capture(minilm):
    ids = _ids(minilm)
    return ids, capture_attention(minilm.model, ids)


@pytest.mark.parametrize("name, layers, heads", [("smol", 30, 9), ("mini", 6, 12)])
def test_shape_dtype_and_rows_sum_to_one(name, layers, heads, smol_capture, mini_capture):
    ids, captured = smol_capture if name == "smol" else mini_capture
    t = ids.shape[1]
    assert len(captured) == layers
    stacked = np.stack(captured)  # (layer, head, query, key)
    assert stacked.shape == (layers, heads, t, t)
    assert stacked.dtype == np.float16
    assert np.isfinite(stacked).all() and (stacked >= 0).all()
    # T values each rounded to fp16 (relative error 2^-11): the row sum drifts by well under 1e-2.
    np.testing.assert_allclose(stacked.astype(np.float64).sum(-1), 1.0, atol=5e-3)


def test_causal_model_attends_only_to_the_past(smol_capture):
    _, captured = smol_capture
    stacked = np.stack(captured)
    t = stacked.shape[-1]
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    assert (stacked[..., future] == 0).all()
    # The first token can only attend to itself.
    np.testing.assert_allclose(stacked[..., 0, 0].astype(np.float32), 1.0, atol=1e-3)


def test_encoder_attends_in_both_directions(mini_capture):
    _, captured = mini_capture
    stacked = np.stack(captured).astype(np.float32)
    t = stacked.shape[-1]
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    # Every layer puts real mass on later tokens (a few heads may look mostly backwards).
    future_mass = stacked[..., future].sum(-1)  # (layer, head)
    assert (future_mass.sum(-1) > 1.0).all()
    assert (future_mass > 1e-2).mean() > 0.8


def _inputs_entering(module: torch.nn.Module):
    """A pre-hook recording the hidden states (and rotary cos/sin) a module is called with."""
    seen: dict = {}

    def hook(mod, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["position_embeddings"] = kwargs.get("position_embeddings")

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("layer, head", [(0, 0), (7, 4), (29, 8)])
def test_smollm2_head_equals_hand_computed_softmax(smollm2, layer, head):
    model = smollm2.model
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // n_heads
    assert (n_heads, n_kv, head_dim) == (9, 3, 64)
    attn = model.model.layers[layer].self_attn
    ids = _ids(smollm2)
    t = ids.shape[1]
    seen, handle = _inputs_entering(attn)
    try:
        captured = capture_attention(model, ids)
    finally:
        handle.remove()

    h = seen["hidden"][0].float()  # (tokens, hidden)
    cos, sin = (x[0].float() for x in seen["position_embeddings"])  # (tokens, head_dim)
    with torch.no_grad():
        q = attn.q_proj(h).view(t, n_heads, head_dim)[:, head]
        kv_head = head // (n_heads // n_kv)
        k = attn.k_proj(h).view(t, n_kv, head_dim)[:, kv_head]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    scores = q @ k.T / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    expected = torch.softmax(scores, dim=-1).numpy()

    got = captured[layer][head].astype(np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # The query head really uses its own KV group: a neighbouring group gives other weights.
    with torch.no_grad():
        other = attn.k_proj(h).view(t, n_kv, head_dim)[:, (kv_head + 1) % n_kv]
    other = other * cos + _rotate_half(other) * sin
    wrong = torch.softmax((q @ other.T / math.sqrt(head_dim)).masked_fill(
        torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf")), -1).numpy()
    assert np.abs(got - wrong).max() > 1e-2


@pytest.mark.parametrize("layer, head", [(0, 0), (3, 5), (5, 11)])
def test_minilm_head_equals_hand_computed_softmax(minilm, layer, head):
    model = minilm.model
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    self_attn = model.encoder.layer[layer].attention.self
    ids = _ids(minilm)
    t = ids.shape[1]
    seen, handle = _inputs_entering(self_attn)
    try:
        captured = capture_attention(model, ids)
    finally:
        handle.remove()

    h = seen["hidden"][0].float()
    with torch.no_grad():
        q = self_attn.query(h).view(t, -1, head_dim)[:, head]
        k = self_attn.key(h).view(t, -1, head_dim)[:, head]
    expected = torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1).numpy()
    np.testing.assert_allclose(captured[layer][head].astype(np.float32), expected, atol=1e-3)


def test_custom_reduce_result_is_returned_per_layer_and_hooks_are_removed(minilm):
    model = minilm.model
    modules = [m for m, _ in attention_modules(model)]
    assert len(modules) == 6
    before = [dict(m._forward_hooks) for m in modules]
    calls = []

    def head_mean(layer: int, weights: torch.Tensor):
        calls.append(layer)
        assert weights.ndim == 4 and weights.shape[1] == 12
        return ("mean", layer, weights[0].mean(0).clone())

    ids = _ids(minilm)
    out = capture_attention(model, ids, reduce=head_mean)
    assert calls == list(range(6))  # once per layer, in depth order
    full = capture_attention(model, ids)
    for layer, item in enumerate(out):
        tag, index, mean = item
        assert (tag, index) == ("mean", layer)
        assert mean.shape == (ids.shape[1], ids.shape[1])
        np.testing.assert_allclose(mean.numpy(), full[layer].astype(np.float32).mean(0),
                                   atol=1e-3)
    # transformers keeps its own output-capturing hooks once a test has asked for attentions
    assert [dict(m._forward_hooks) for m in modules] == before


def test_hooks_are_removed_when_reduce_fails(minilm):
    modules = [m for m, _ in attention_modules(minilm.model)]
    before = [dict(m._forward_hooks) for m in modules]

    def broken(layer, weights):
        if layer == 2:
            raise RuntimeError("reducer failed")
        return None

    with pytest.raises(RuntimeError, match="reducer failed"):
        capture_attention(minilm.model, _ids(minilm), reduce=broken)
    assert [dict(m._forward_hooks) for m in modules] == before


def test_progress_reports_every_layer_in_order(smollm2):
    seen = []
    capture_attention(smollm2.model, _ids(smollm2, "A short text."),
                      progress=lambda f, stage: seen.append(f))
    assert seen == pytest.approx([(i + 1) / 30 for i in range(30)])


def test_sdpa_model_is_captured_in_eager_and_restored(settings, minilm):
    path = resolve_source("minilm", settings).path
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    assert model.config._attn_implementation == "sdpa"
    ids = _ids(minilm)
    captured = capture_attention(model, ids)
    assert model.config._attn_implementation == "sdpa"  # the switch lasts for the pass only
    assert all(c is not None for c in captured)
    stacked = np.stack(captured).astype(np.float32)
    assert stacked.shape == (6, 12, ids.shape[1], ids.shape[1])
    # Same weights as the model the app loads with eager attention from the start.
    np.testing.assert_allclose(stacked, np.stack(capture_attention(minilm.model, ids)),
                               atol=1e-3)
