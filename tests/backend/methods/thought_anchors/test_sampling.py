"""Batched shared-prefix sampling on SmolLM2 (the embedded rollout engine), checked against
transformers' own decoding.

Independent computations: `model.generate(do_sample=False)` (greedy, its own cache and loop) and
full forward passes without any cache over each sampled row.
"""

from __future__ import annotations

import pytest
import torch

from backend.errors import JobCancelled
from backend.methods.thought_anchors.resampling import rollout_prompt
from backend.methods.thought_anchors.sampling import (
    resampling_prompt, sample_continuations, sample_next, sample_one_by_one, sample_token_ids,
    stop_token_ids,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these passes are small, and on a shared 2-core machine a second
    thread spinning for a busy core made them several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]  # (1, T)


@pytest.fixture(scope="module")
def prompt(smollm2):
    return chat_ids(smollm2.tokenizer, "What is 2+2?")


@pytest.fixture(scope="module")
def greedy(smollm2, prompt) -> list[int]:
    """8 greedy tokens from transformers' generate (no end token among them)."""
    with torch.inference_mode():
        out = smollm2.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     do_sample=False, max_new_tokens=8)
    ids = out[0, prompt.shape[1]:].tolist()
    assert len(ids) == 8 and not set(ids) & set(stop_token_ids(smollm2.tokenizer, smollm2.model))
    return ids


class ForwardCalls:
    """(batch, tokens) of every call of the base model, via a forward pre-hook."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.base_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_sample_next_draws_from_the_top_p_set_in_proportion():
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3])).expand(4000, -1)
    draws = sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == counts[2] == 0  # the set is {1, 3}: 0.5 + 0.3 >= 0.75
    assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03
    assert (sample_next(logits[:3], 1e-4, 0.95) == 1).all()  # cold: the argmax
    flat = torch.zeros(4000, 5000)  # 4750 tokens needed: more than the first ranking holds
    assert len(set(sample_next(flat, 0.6, 0.95).tolist())) > 2000


def test_stop_tokens_of_smollm2(smollm2):
    vocab = smollm2.tokenizer.get_vocab()
    assert stop_token_ids(smollm2.tokenizer, smollm2.model) == sorted(
        [vocab["<|im_end|>"], vocab["<|endoftext|>"]])


def test_cold_rollouts_equal_greedy_decoding_with_one_prefill(smollm2, prompt, greedy):
    with ForwardCalls(smollm2.model) as calls:
        texts = sample_continuations(smollm2.model, smollm2.tokenizer, prompt, 4,
                                     temperature=1e-4, max_new_tokens=8, seed=0)
    assert texts == [smollm2.tokenizer.decode(greedy, skip_special_tokens=True)] * 4
    # one pass over the whole prompt, then one pass of one token per row per new token
    assert calls.shapes == [(1, prompt.shape[1])] + [(4, 1)] * 7


def test_batches_share_the_prefill(smollm2, prompt, greedy):
    with ForwardCalls(smollm2.model) as calls:
        rows = sample_token_ids(smollm2.model, prompt, 5, temperature=1e-4, max_new_tokens=8,
                                batch_size=2)
    assert rows == [greedy] * 5
    # one prefill for all 5; 2 static rows, refilled twice as rollouts finish: 3 x 7 steps
    assert calls.shapes == [(1, prompt.shape[1])] + [(2, 1)] * 21


def test_seeded_sampling_is_reproducible(smollm2, prompt):
    def run(seed):
        return sample_continuations(smollm2.model, smollm2.tokenizer, prompt, 4,
                                    temperature=1.0, top_p=0.95, max_new_tokens=8, seed=seed)

    first = run(0)
    assert len(first) == 4 and all(isinstance(t, str) and t for t in first)
    assert run(0) == first
    assert run(1) != first
    assert len(set(first)) > 1  # rows are sampled independently, not copies of one sample


def test_rows_stop_at_end_token(smollm2, prompt, greedy):
    with ForwardCalls(smollm2.model) as calls:
        rows = sample_token_ids(smollm2.model, prompt, 3, eos_token_ids=[greedy[2]],
                                temperature=1e-4, max_new_tokens=8)
    assert rows == [greedy[:2]] * 3
    assert calls.shapes == [(1, prompt.shape[1]), (3, 1), (3, 1)]  # stopped when all finished


def test_rows_left_after_others_stopped_are_top_p_samples(smollm2):
    """Rows that finish leave the batch (their cache rows are dropped); every token of the rows
    that go on must still lie in the top-p set that a cache-free forward pass computes for it."""
    tokenizer, model = smollm2.tokenizer, smollm2.model
    prompt = chat_ids(tokenizer, "Write one short sentence about cats.")
    stop = stop_token_ids(tokenizer, model) + [tokenizer.convert_tokens_to_ids(".")]
    for seed in range(5):
        rows = sample_token_ids(model, prompt, 6, stop, temperature=1.0, top_p=0.8,
                                max_new_tokens=12, seed=seed)
        lengths = sorted(len(r) for r in rows)
        if lengths[0] < 11 and lengths[-1] == 12:
            break
    else:
        pytest.fail(f"no seed gave rows of different lengths: {lengths}")
    assert not any(set(r) & set(stop) for r in rows)
    with torch.inference_mode():
        for row in rows:
            ids = torch.cat([prompt, torch.tensor([row])], 1)
            probs = torch.softmax(model(ids).logits[0, prompt.shape[1] - 1 : -1], -1)
            chosen = probs.gather(-1, torch.tensor(row)[:, None])[:, 0]
            mass_above = (probs * (probs > chosen[:, None])).sum(-1)
            assert (mass_above < 0.8 + 1e-4).all(), (row, mass_above)


def test_progress_and_cancellation(smollm2, prompt):
    reports = []
    sample_token_ids(smollm2.model, prompt, 3, max_new_tokens=3, batch_size=2,
                     progress=lambda f, msg: reports.append((f, msg)))
    # after each decoding step: rows 0-1 finish at step 2, the refilled row at step 4
    assert [f for f, _ in reports] == pytest.approx([0, 2 / 3, 2 / 3, 1.0])
    assert reports[-1][1].startswith("Rollouts 3/3 · ") and "rollouts/s" in reports[-1][1]
    with pytest.raises(JobCancelled):
        sample_token_ids(smollm2.model, prompt, 2, max_new_tokens=3, should_stop=lambda: True)


def test_one_by_one_baseline_equals_greedy_when_cold(smollm2, prompt, greedy):
    rows = sample_one_by_one(smollm2.model, prompt[0].tolist(), 2,
                             stop_token_ids(smollm2.tokenizer, smollm2.model),
                             temperature=1e-4, max_new_tokens=8, seed=0)
    assert rows == [greedy] * 2


def test_resampling_prompt_variants():
    chunks = ["First step here.", "Second step here.", "Third step here."]
    trace = "First step here.\n\nSecond step here. Third step here."
    assert resampling_prompt("P?", chunks, 2) == rollout_prompt(
        "P?", "First step here. Second step here.")
    assert resampling_prompt("P?", chunks, 2, trace=trace) == rollout_prompt(
        "P?", "First step here.\n\nSecond step here.")
    assert resampling_prompt("P?", chunks, 0, forced=True) == rollout_prompt("P?", "", True)
