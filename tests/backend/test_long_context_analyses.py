"""The long-context probe end to end on SmolLM2 (small settings), checked against eager attention
computed apart: the top-1 keys while copying, the first-token attention, the trial bookkeeping;
trials sharing their haystack's prefill against each trial decoded on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.analyses.long_context import GPU_SCALE, probe_request, role_shares
from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.heads import haystack
from backend.methods.heads.long_context import RECALL_THRESHOLD, rouge1_recall

SMALL = {"lengths": [300], "depths": [0.5], "max_new_tokens": 8, "bins": 64,
         "passkey_length": 300, "sink": 8, "recent": 32}


def _eager(model, ids: list[int]) -> list[np.ndarray]:
    """(head, query, key) float32 eager attention of every layer."""
    maps = capture_attention(model, torch.tensor([ids]), reduce=lambda i, w: w[0].float().numpy())
    return maps


@pytest.fixture(scope="module")
def probe(service):
    request = probe_request("smollm2", **SMALL)
    aid = service.run(request, timeout=600)
    return request, aid, service.analysis(aid), service


def test_trial_input_holds_the_needle_where_it_says(smollm2):
    tok = smollm2.tokenizer
    needle = "The secret ingredient of the lighthouse soup is smoked paprika."
    trial = haystack.build_trial(tok, 300, 0.5, needle, "What is the secret ingredient?",
                                 "The secret ingredient of the lighthouse soup is")
    assert len(trial.ids) <= 300
    assert tok.decode(trial.ids[slice(*trial.needle)]).strip() == needle
    assert tok.decode(trial.ids[slice(*trial.span)]).strip() == "smoked paprika."
    assert trial.needle[0] / trial.question == pytest.approx(0.5, abs=0.1)
    first = haystack.build_trial(tok, 300, 0.0, needle, "Q?")
    assert first.span == first.needle and first.needle[0] == len(tok("")["input_ids"])
    last = haystack.build_trial(tok, 300, 1.0, needle, "Q?")
    assert last.needle[1] == last.question
    with pytest.raises(InputError):
        haystack.build_trial(tok, 20, 0.5, needle, "Q?")


def test_probe_top_keys_and_sink_alpha_match_eager_attention(probe, smollm2):
    request, aid, record, service = probe
    params = dict(request.params)
    meta = record.meta["trials"][0]
    tok = smollm2.tokenizer
    trial = haystack.build_trial(tok, 300, 0.5, request.text, params["question"],
                                 params["answer_start"], params["seed"])
    generated = service.array(aid, "generated")[0]
    generated = generated[generated >= 0]
    top = service.array(aid, "top_keys")[0][:len(generated)]
    # eager attention over the input and the answer: the query of step s is token T - 1 + s
    maps = _eager(smollm2.model, trial.ids + generated[:-1].tolist())
    n = len(trial.ids)
    eager_top = np.stack([np.stack([m[:, n - 1 + s, :n + s].argmax(-1) for m in maps])
                          for s in range(len(generated))])
    assert (eager_top == top).mean() > 0.99  # ties aside, the same top-1 key for every head
    # greedy decoding: each generated token is the argmax of the model after the previous ones
    with torch.no_grad():
        logits = smollm2.model(torch.tensor([trial.ids + generated[:-1].tolist()])).logits[0]
    assert (logits[n - 1:].argmax(-1).numpy() == generated).all()
    # the trial's recall and acceptance
    answer = tok.decode(generated.tolist(), skip_special_tokens=True)
    recall = rouge1_recall(request.text, f"{params['answer_start']} {answer}")
    assert meta["recall"] == pytest.approx(recall)
    assert meta["accepted"] == (recall > RECALL_THRESHOLD)
    # sink alpha: mean over every query of the weight on the first token, eager, by hand
    ids, _ = haystack.passkey_input(tok, params["passkey_length"], params["seed"])
    eager_alpha = np.stack([m[:, :, 0].mean(-1) for m in _eager(smollm2.model, ids)])
    np.testing.assert_allclose(service.array(aid, "sink_alpha"), eager_alpha, atol=2e-4)


def test_probe_scores_and_shares_are_consistent(probe):
    request, aid, record, service = probe
    arrays = {name: service.array(aid, name) for name in
              ("retrieval", "retrieval_trials", "recall", "streaming", "streaming_error",
               "sink_alpha", "attention_bins", "bin_edges", "span_attention")}
    assert arrays["retrieval"].shape == arrays["sink_alpha"].shape == (30, 9)
    accepted = arrays["recall"] > RECALL_THRESHOLD
    if accepted.any():
        np.testing.assert_allclose(arrays["retrieval"],
                                   arrays["retrieval_trials"][accepted].mean(0))
    else:
        assert np.isnan(arrays["retrieval"]).all()
    np.testing.assert_allclose(arrays["streaming"], 1 - np.clip(arrays["streaming_error"], 0, 1))
    assert (arrays["streaming_error"] >= 0).all()
    # the binned attention during the copy: mean weight per token of each bin; over the input
    # at most 1 (the rest goes to the answer's own tokens)
    widths = np.diff(arrays["bin_edges"][0])
    mass = (arrays["attention_bins"][0] * widths).sum(-1)
    assert (mass <= 1 + 1e-4).all() and (mass > 0).all()
    shares = role_shares(arrays, 0.1, 0.9, 0.3)
    assert shares["sink"] == pytest.approx((arrays["sink_alpha"] > 0.3).mean())


def test_probe_refuses_bad_settings(service):
    with pytest.raises(InputError):
        probe_request("smollm2", colour="blue")
    with pytest.raises(InputError):
        service.run(probe_request("smollm2", lengths=[100], depths=[0.5]))
    with pytest.raises(InputError):
        service.run(probe_request("minilm", **SMALL))


def test_trials_sharing_the_haystack_prefill_copy_as_each_trial_alone(smollm2):
    tok = smollm2.tokenizer
    trials = [haystack.build_trial(tok, n, d, haystack.NEEDLE, haystack.QUESTION,
                                   haystack.ANSWER_START) for n in (200, 300) for d in (0.8, 0.3)]
    reports = []
    shared = haystack.greedy_copies(smollm2.model, tok, trials, 4, 64,
                                    lambda f, stage: reports.append((f, stage)))
    for trial, copy in zip(trials, shared):
        alone = haystack.greedy_copy(smollm2.model, tok, trial, 4, 64)  # no prefix cache
        np.testing.assert_array_equal(copy.generated, alone.generated)
        assert (copy.top_keys == alone.top_keys).mean() > 0.99  # float ties aside
        np.testing.assert_allclose(copy.bins, alone.bins, atol=1e-5)
        np.testing.assert_allclose(copy.span, alone.span, atol=1e-5)
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert [s.split(":")[0] for s in dict.fromkeys(s.split(",")[0] for _, s in reports)] == \
        [f"Trial {k}/4" for k in range(1, 5)]


def test_the_defaults_are_the_machines_and_given_settings_win():
    cpu = dict(probe_request("smollm2", device="cpu").params)
    gpu = dict(probe_request("smollm2", device="cuda:0").params)
    assert max(cpu["lengths"]) * len(cpu["depths"]) < max(gpu["lengths"]) * len(gpu["depths"])
    assert {name: gpu[name] for name in GPU_SCALE} == GPU_SCALE
    assert {name: v for name, v in gpu.items() if name not in GPU_SCALE} == \
        {name: v for name, v in cpu.items() if name not in GPU_SCALE}
    assert dict(probe_request("smollm2", device="cuda", lengths=[500]).params)["lengths"] == (500,)
