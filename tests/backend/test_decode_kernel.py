"""The rollout engine's split-key decoding attention against sdpa with the engine's own masks.

On a GPU the kernel runs compiled; without one (CI) in Triton's interpreter on the CPU
(tests/conftest.py sets TRITON_INTERPRET=1 there before anything imports Triton). Rows sit at
different positions, caches are longer than one split (256 keys), and groups of query heads
share key/value heads.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from backend.rollouts import embedded
from backend.rollouts.decode_kernel import decode_attention
from backend.rollouts.embedded import _decode, _masks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(query, key, value, positions, scaling, window=None):
    """softmax(q k^T) v over each row's keys 0..position (within `window`), heads repeated."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1).float()
    v = value.repeat_interleave(group, 1).float()
    scores = torch.einsum("rhd,rhtd->rht", query.float(), k) * scaling
    index = torch.arange(key.shape[2])
    allowed = index[None, :] <= positions[:, None]
    if window is not None:
        allowed &= positions[:, None] - index[None, :] < window
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return torch.einsum("rht,rhtd->rhd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads, kv_heads, head_dim, window", [
    (12, 2, 32, None),  # Qwen2's grouping (6 query heads per key/value head)
    (4, 4, 16, None),  # no grouping
    (8, 2, 24, 100),  # a head size that is not a power of two, a sliding window
])
def test_matches_softmax_attention_at_each_rows_position(heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(0)
    rows, capacity = 5, 600
    query = torch.randn(rows, heads, head_dim, generator=g)
    key = torch.randn(rows, kv_heads, capacity, head_dim, generator=g)
    value = torch.randn(rows, kv_heads, capacity, head_dim, generator=g)
    positions = torch.tensor([0, 255, 256, 431, 599])  # first key only, split edges, last
    # garbage past each row's position must not be read
    for r, p in enumerate(positions.tolist()):
        key[r, :, p + 1:] = float("nan")
        value[r, :, p + 1:] = float("nan")
    expected = reference(query, key.nan_to_num(), value.nan_to_num(), positions, 0.3, window)
    out = decode_attention(query.to(DEVICE), key.to(DEVICE), value.to(DEVICE),
                           positions.to(DEVICE), 0.3, window).cpu()
    assert out.shape == (rows, heads, head_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_a_decoding_step_through_the_kernel_gives_sdpas_logits():
    """A Gemma 3 config (mixed sliding and full layers, 2 query heads per key/value head): one
    decoding step of three rows at different positions, through the engine's attention function
    with the kernel and with sdpa, gives the same logits."""
    config = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, sliding_window=40, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval().to(DEVICE)
    model.set_attn_implementation(embedded.ATTENTION)
    capacity, rows = 300, 3
    positions = torch.tensor([20, 150, 299], device=DEVICE)
    cache = embedded.SlotCache()
    with torch.inference_mode():
        prompt = torch.randint(0, 97, (1, capacity), device=DEVICE)
        staged, _ = embedded.EmbeddedEngine(model)._prefill(prompt[0].tolist())
        cache.allocate(rows, capacity, staged)
        cache.place(staged, torch.arange(rows, device=DEVICE))
        cache.pos.copy_(positions)
        cache.tokens.copy_(prompt[0, positions])
        logits = {}
        for how in ("sdpa", "kernel"):
            _decode.update(attention=how, positions=cache.pos)
            cache.length = capacity
            keys = torch.arange(capacity, device=DEVICE)
            try:
                out = model(input_ids=cache.tokens[:, None], position_ids=cache.pos[:, None],
                            attention_mask=_masks(config, keys, cache.pos[:, None]),
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                _decode.update(attention="sdpa", positions=None)
            logits[how] = out.logits[:, -1].float().cpu()
    torch.testing.assert_close(logits["kernel"], logits["sdpa"], rtol=1e-4, atol=1e-4)
