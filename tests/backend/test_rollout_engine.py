"""The embedded rollout engine on SmolLM2 (CPU), checked against transformers' own decoding."""

from __future__ import annotations

import pytest
import torch

from backend.analyses import AnalysisRequest
from backend.rollouts.base import (FINISH_REASONS, AnswerStop, Prompt, RolloutMeter,
                                   SamplingParams, degenerate)
from backend.rollouts.embedded import EmbeddedEngine


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_rows_refilled_across_prompts_of_different_lengths_decode_like_generate(smollm2):
    """3 prompts x 2 rollouts on 2 rows: rows hold different prompts at different positions
    and are refilled mid-run; every greedy rollout equals its prompt's own generate()."""
    tok, model = smollm2.tokenizer, smollm2.model
    texts = ["The capital of France is", "Three pencils cost one dollar, so twenty-seven",
             "def add(a, b):"]
    prompts = [Prompt(k, tok(t)["input_ids"], 2, max_new_tokens=[6, 4]) for k, t in
               enumerate(texts)]
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(),
                            stop_at_repetition=False)
    engine = EmbeddedEngine(model, tok, max_rows=2)
    meters: list[RolloutMeter] = []
    out = list(engine.run(prompts, params, meters.append))
    assert sorted((c.key, c.index) for c in out) == [(k, i) for k in range(3) for i in (0, 1)]
    for c in out:
        expected = greedy(model, list(prompts[c.key].token_ids), 6)[: (6, 4)[c.index]]
        assert c.token_ids == expected and c.finish_reason == "length"
        assert c.text == tok.decode(expected, skip_special_tokens=True)
    assert meters[-1].done == 6 and meters[-1].tokens == 3 * (6 + 4)
    assert model.config._attn_implementation == "eager"  # the app's setting, restored


def test_degenerate_repetition_is_detected():
    assert degenerate([5, 9] * 30)  # "A: A: A: ..."
    assert degenerate([1, 2, 3] + [7] * 60)
    assert not degenerate(list(range(100)))
    assert not degenerate([5, 9] * 29)  # shorter than the window
    assert not degenerate(list(range(30)) * 2)  # period 30 seen twice only: not 3 periods


def test_generation_stops_at_degenerate_repetition(smollm2):
    tok = smollm2.tokenizer
    ids = tok("A: A: A: A: A: A: A: A: A: A: A: A: A: A: A:")["input_ids"]
    params = SamplingParams(temperature=0, max_new_tokens=300, stop_token_ids=())
    [c] = EmbeddedEngine(smollm2.model, tok).run([Prompt(0, ids, 1)], params)
    assert c.finish_reason == "repetition" and len(c.token_ids) < 100
    assert degenerate(c.token_ids)


def test_answer_stop_needs_a_whole_boxed_answer(smollm2):
    from backend.methods.thought_anchors.answers import extract_boxed_answer

    tok = smollm2.tokenizer
    stop = AnswerStop(frozenset(), lambda t: extract_boxed_answer(t) is not None, tok.decode)
    whole = tok("so the answer is \\boxed{\\frac{1}{3}} and", add_special_tokens=False)
    part = tok("so the answer is \\boxed{\\frac{1}{3}", add_special_tokens=False)
    assert stop.reached(whole["input_ids"], 0) and not stop.reached(part["input_ids"], 0)


def test_generated_trace_says_why_it_stopped(service):
    aid = service.run(AnalysisRequest.make("ta_generate", "smollm2", "What is 2 + 3?",
                                           max_new_tokens=8), timeout=300)
    meta = service.analysis(aid).meta
    assert meta["finish_reason"] in FINISH_REASONS and meta["degenerate"] is False
    assert meta["solution"]
