"""Forward passes of the white-box methods, on SmolLM2 and a tiny random Gemma 3 (sliding window).

Independent computations: block means of transformers' own `output_attentions`, and a model
that never sees the suppressed chunk (its tokens deleted, the others keeping their positions),
which must produce the suppressed pass's logits everywhere outside the chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from backend.errors import JobCancelled
from backend.methods.thought_anchors.passes import (
    receiver_pass, suppression_attention_masks, suppression_log_kl,
    suppression_scores,
)
from backend.methods.thought_anchors.segmentation import token_spans_for_text
from backend.methods.thought_anchors.suppression import compress_top_p, token_log_kl

TEXT = ("Solve this. Problem: what is 3 + 4 * 2? Solution: \n<think>\nFirst I multiply four by "
        "two. That gives eight. Then I add three to eight. The total is eleven. So it is 11.")
LOG_ZERO = np.log(1e-9)  # log(KL + 1e-9) at KL = 0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these passes are small, and on a shared 2-core machine a second
    thread spinning for a busy core made them several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trace(smollm2):
    ids = smollm2.tokenizer(TEXT, return_tensors="pt").input_ids
    spans = token_spans_for_text(TEXT, smollm2.tokenizer)
    assert len(spans) == 5 and spans[0][0] > 10  # prompt tokens precede the first chunk
    return ids, spans


@pytest.fixture(scope="module")
def log_kl(smollm2, trace):
    ids, spans = trace
    return suppression_log_kl(smollm2.model, ids, spans, batch_size=4)  # 6 passes, 2 batches


def test_receiver_pass_equals_block_means_of_full_attention(smollm2, trace):
    ids, spans = trace
    blocks = receiver_pass(smollm2.model, ids, spans)
    assert blocks.shape == (30, 9, 5, 5) and blocks.dtype == np.float32
    with torch.inference_mode():
        full = torch.stack(smollm2.model(ids, output_attentions=True).attentions)[:, 0].numpy()
    expected = np.empty_like(blocks)
    for q, (qs, qe) in enumerate(spans):
        for k, (ks, ke) in enumerate(spans):
            expected[:, :, q, k] = full[:, :, qs:qe, ks:ke].mean(axis=(-1, -2))
    np.testing.assert_allclose(blocks, expected, atol=1e-6)
    assert np.all(np.triu(blocks[0, 0], 1) == 0)  # causal: no attention to later sentences
    assert blocks[..., 0].min() > 0


def test_suppressed_pass_equals_model_that_never_saw_the_chunk(smollm2, trace):
    ids, spans = trace
    model, seq_len = smollm2.model, ids.shape[1]
    a, b = spans[2]
    kept = torch.cat([torch.arange(a), torch.arange(b, seq_len)])
    masks = suppression_attention_masks(model.config, seq_len, [None, (a, b)])
    with torch.inference_mode():
        ours = model(ids.expand(2, -1), attention_mask=masks).logits
        plain = model(ids).logits[0]
        deleted = model(ids[:, kept], position_ids=kept[None]).logits[0]
    torch.testing.assert_close(ours[0], plain, atol=1e-4, rtol=0)  # baseline = plain forward
    torch.testing.assert_close(ours[1, kept], deleted, atol=1e-4, rtol=0)
    assert (ours[1, b:] - plain[b:]).abs().max() > 1.0  # the suppression does change later logits


def test_log_kl_matches_deleted_chunk_and_is_zero_before_the_chunk(smollm2, trace, log_kl):
    ids, spans = trace
    assert log_kl.shape == (5, ids.shape[1])
    for i, (a, b) in enumerate(spans):
        np.testing.assert_allclose(log_kl[i, :a], LOG_ZERO, atol=1e-3)  # KL < 1e-12
        assert log_kl[i, a:].max() > 0.0
    a, b = spans[1]
    kept = torch.cat([torch.arange(a), torch.arange(b, ids.shape[1])])
    with torch.inference_mode():
        base = smollm2.model(ids).logits[0, b:]
        deleted = smollm2.model(ids[:, kept], position_ids=kept[None]).logits[0, a:]
    expected = token_log_kl(compress_top_p(base), compress_top_p(deleted)).numpy()
    np.testing.assert_allclose(log_kl[1, b:], expected, atol=1e-2)
    assert np.ptp(expected) > 5  # positions differ a lot: the comparison is not trivially flat


def test_batching_does_not_change_log_kl(smollm2, trace, log_kl):
    ids, spans = trace
    one_by_one = suppression_log_kl(smollm2.model, ids, spans[:2], batch_size=1)
    np.testing.assert_allclose(one_by_one, log_kl[:2], atol=1e-3)


def test_suppression_scores(trace, log_kl):
    _, spans = trace
    s, normalised = suppression_scores(log_kl, spans)
    assert s.shape == normalised.shape == (5, 5)
    target, source = np.indices(s.shape)
    np.testing.assert_allclose(s[source > target], LOG_ZERO, atol=1e-3)  # targets before source
    assert np.all(s[source < target] > LOG_ZERO + 1)
    assert np.isnan(normalised[source >= target]).all()
    np.testing.assert_allclose(np.nansum(normalised[1:], axis=1), 0.0, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_gemma():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config).eval()


def test_sliding_window_masks_reproduce_the_models_own_masks(tiny_gemma):
    ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(1))
    masks = suppression_attention_masks(tiny_gemma.config, 14, [None])
    assert set(masks) == {"full_attention", "sliding_attention"}
    full_only = {"full_attention": masks["full_attention"],
                 "sliding_attention": masks["full_attention"]}
    with torch.inference_mode():
        plain = tiny_gemma(ids).logits
        ours = tiny_gemma(ids, attention_mask=masks).logits
        no_window = tiny_gemma(ids, attention_mask=full_only).logits
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    assert (no_window - plain).abs().max() > 1e-3  # the window matters at 14 tokens
    reports = []
    log_kl = suppression_log_kl(tiny_gemma, ids, [(3, 6), (6, 10)],
                                progress=lambda f, msg: reports.append(f))  # batch from memory
    np.testing.assert_allclose(log_kl[0, :3], LOG_ZERO, atol=1e-3)
    np.testing.assert_allclose(log_kl[1, :6], LOG_ZERO, atol=1e-3)
    assert log_kl[0, 3:].max() > LOG_ZERO + 1
    assert reports and reports[-1] == 1.0
    with pytest.raises(JobCancelled):
        suppression_log_kl(tiny_gemma, ids, [(3, 6)], should_stop=lambda: True)
