"""Head importance, head roles and pruning curves as analyses, checked against computations done
by hand on the model's weights (a head removed = its slice of the output projection's input
columns zeroed; a gate of 1 + eps = that slice scaled)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.analyses import AnalysisRequest
from backend.analyses.heads import (ROLES, head_ranks, parse_head_label, split_in_halves,
                                    top_attended_pairs)
from backend.errors import InputError
from backend.methods import heads as H

TEXT = "The cat sat on the mat because it was warm."      # 11 SmolLM2 tokens
PAIR = "A man is playing a guitar. Someone plays an instrument on stage."


def smol_ids(smollm2, text: str = TEXT) -> torch.Tensor:
    return smollm2.tokenizer(text, return_tensors="pt").input_ids


def lm_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of one row, by hand."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:]).item()


@contextmanager
def scaled_heads(projections, heads: list[tuple[int, int]], n_heads: int, factor: float):
    """Multiply each (layer, head)'s input columns of the attention output projection by
    factor (0 removes the head), restoring the weights afterwards."""
    saved = {}
    try:
        with torch.no_grad():
            for layer, head in heads:
                weight = projections[layer].weight
                d = weight.shape[1] // n_heads
                if layer not in saved:
                    saved[layer] = weight.clone()
                weight[:, head * d:(head + 1) * d] *= factor
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                projections[layer].weight.copy_(weight)


def llama_projections(lm):
    return [layer.self_attn.o_proj for layer in lm.model.model.layers]


def run(service, kind: str, model: str = "smollm2", text: str = TEXT, **params) -> str:
    return service.run(AnalysisRequest.make(kind, model, text, **params), timeout=600)


# ---------------------------------------------------------------- importance


def test_gradient_importance_is_the_gate_derivative(service, smollm2):
    aid = run(service, "head_importance", method="gradient")
    record, raw = service.analysis(aid), service.array(aid, "raw")
    assert raw.shape == (30, 9) and record.meta["loss_kind"] == "next_token"
    ids, projections = smol_ids(smollm2), llama_projections(smollm2)
    assert record.meta["n_tokens"] == ids.shape[1]
    eps = 1e-2
    for index in np.argsort(raw.ravel())[-2:]:
        layer, head = divmod(int(index), 9)
        with scaled_heads(projections, [(layer, head)], 9, 1 + eps):
            up = lm_loss(smollm2.model, ids)
        with scaled_heads(projections, [(layer, head)], 9, 1 - eps):
            down = lm_loss(smollm2.model, ids)
        assert raw[layer, head] == pytest.approx(abs(up - down) / (2 * eps), rel=3e-2)
    # the stored normalisations: unit layers; [0, 1] with the same ranking
    layer_normed = service.array(aid, "layer")
    np.testing.assert_allclose(np.linalg.norm(layer_normed, axis=1), 1.0)
    np.testing.assert_allclose(layer_normed * np.linalg.norm(raw, axis=1, keepdims=True), raw,
                               rtol=1e-9)
    spread = service.array(aid, "global")
    assert spread.min() == 0.0 and spread.max() == 1.0
    assert (np.argsort(spread.ravel(), kind="stable")
            == np.argsort(layer_normed.ravel(), kind="stable")).all()


def test_attention_statistics_match_the_stored_attention(service):
    attention = service.attention(run(service, "attention"))       # float16 when stored
    confidence = service.array(run(service, "head_importance", method="confidence"), "raw")
    np.testing.assert_allclose(confidence, attention.max(-1).mean(-1), atol=2e-3)
    record = service.analysis(run(service, "head_importance", method="entropy"))
    assert record.meta["loss_kind"] == "none"


def test_encoder_importance_uses_the_similarity_of_the_two_halves(service, minilm):
    """Ablation (every head removed in turn, batched) against heads removed by hand, on the
    encoder's loss: the cosine similarity of the text's two halves. (On SmolLM2 a full ablation
    takes minutes on a small CPU: tests/backend/methods/test_heads.py checks it on a few heads.)"""
    aid = run(service, "head_importance", model="minilm", text=PAIR, method="ablation")
    meta, raw = service.analysis(aid).meta, service.array(aid, "raw")
    assert raw.shape == (6, 12) and meta["loss_kind"] == "sentence_similarity"
    first, second = "A man is playing a guitar.", "Someone plays an instrument on stage."
    assert (meta["first"], meta["second"], meta["split"]) == (first, second, "sentence")
    projections = [layer.attention.output.dense for layer in minilm.model.encoder.layer]

    def similarity() -> float:  # each half embedded alone, unpadded, mean-pooled
        with torch.no_grad():
            a, b = (minilm.model(**minilm.tokenizer(t, return_tensors="pt"))
                    .last_hidden_state[0].mean(0) for t in (first, second))
        return torch.cosine_similarity(a, b, dim=0).item()

    base = similarity()
    for index in {int(np.argmax(raw)), int(np.argmin(raw)), 17}:
        layer, head = divmod(index, 12)
        with scaled_heads(projections, [(layer, head)], 12, 0.0):
            assert raw[layer, head] == pytest.approx(similarity() - base, abs=1e-5)
    assert np.abs(raw).max() > 1e-3
    # gradient importance on the same loss: |d similarity / d gate| by finite differences
    gradient = service.array(run(service, "head_importance", model="minilm", text=PAIR,
                                 method="gradient"), "raw")
    eps = 1e-2
    layer, head = divmod(int(np.argmax(gradient)), 12)
    with scaled_heads(projections, [(layer, head)], 12, 1 + eps):
        up = similarity()
    with scaled_heads(projections, [(layer, head)], 12, 1 - eps):
        down = similarity()
    assert gradient[layer, head] == pytest.approx(abs(up - down) / (2 * eps), rel=5e-2)


def test_unknown_method_is_refused(service):
    with pytest.raises(InputError, match="method"):
        run(service, "head_importance", method="magic")


# ---------------------------------------------------------------- roles


def test_roles_agree_with_head_roles_of_the_stored_attention(service):
    roles_id = run(service, "head_roles")
    expected = H.head_roles(service.attention(run(service, "attention")))
    assert set(ROLES) == set(expected) | {"induction"}
    for name, values in expected.items():
        stored = service.array(roles_id, name)
        assert stored.shape == (30, 9), name
        # the roles come from float32 weights, the stored attention is float16
        np.testing.assert_allclose(stored, values, rtol=2e-2, atol=5e-3, err_msg=name)
    assert expected["first_token"].max() > 0.9       # SmolLM2 has sink heads


def test_induction_scores_find_copying_heads(service, smollm2):
    induction = service.array(run(service, "head_roles"), "induction")
    assert induction.shape == (30, 9) and (induction >= 0).all() and (induction <= 1).all()
    assert induction.max() > 0.5 and np.median(induction) < 0.1
    # the top head, checked by hand: random tokens repeated; attention of the second copy to
    # the token after each one's first occurrence, from transformers' own attention output
    layer, head = divmod(int(np.argmax(induction)), 9)
    generator = torch.Generator().manual_seed(7)
    half = torch.randint(1000, 40000, (1, 30), generator=generator)
    bos = smollm2.model.config.bos_token_id
    ids = torch.cat([torch.tensor([[bos]]), half, half], dim=1)
    with torch.no_grad():
        weights = smollm2.model(input_ids=ids, output_attentions=True).attentions[layer][0, head]
    queries = torch.arange(31, 61)
    assert weights[queries, queries - 29].mean().item() > 0.5


def test_short_texts_leave_out_roles_they_cannot_give(service):
    aid = run(service, "head_roles", text="Hello there, friend.")
    meta = service.analysis(aid).meta
    assert meta["n_tokens"] < 7 and "receiver_kurtosis" in meta["unavailable"]
    assert service.array(aid, "previous_token").shape == (30, 9)


# ---------------------------------------------------------------- pruning curve


def test_pruning_curve_losses_equal_masking_by_hand(service, smollm2):
    aid = run(service, "pruning_curve", method="gradient", recompute=False)
    fractions = service.array(aid, "fractions")
    np.testing.assert_allclose(fractions, np.linspace(0, 1, 21))
    by_importance, by_chance = service.array(aid, "loss_importance"), service.array(aid,
                                                                                     "loss_random")
    order = service.array(aid, "order_importance")
    assert sorted(order.tolist()) == list(range(270))
    assert sorted(service.array(aid, "order_random").tolist()) == list(range(270))
    # the order is the ranking of the gradient importance the importance analysis shows
    shown = service.array(run(service, "head_importance", method="gradient"), "layer")
    np.testing.assert_allclose(service.array(aid, "importance"), shown, rtol=1e-6)
    assert np.all(np.diff(shown.ravel()[order]) >= 0)

    ids, projections = smol_ids(smollm2), llama_projections(smollm2)
    base = lm_loss(smollm2.model, ids)
    assert by_importance[0] == pytest.approx(base, abs=3e-4)
    assert by_chance[0] == pytest.approx(base, abs=3e-4)
    first = [divmod(int(i), 9) for i in order[:27]]              # 10 % of 270 heads
    with scaled_heads(projections, first, 9, 0.0):
        assert by_importance[2] == pytest.approx(lm_loss(smollm2.model, ids), abs=3e-4)
    every = [(layer, head) for layer in range(30) for head in range(9)]
    with scaled_heads(projections, every, 9, 0.0):
        all_masked = lm_loss(smollm2.model, ids)
    assert by_importance[-1] == pytest.approx(all_masked, abs=3e-4)
    assert by_chance[-1] == pytest.approx(all_masked, abs=3e-4)
    assert service.analysis(aid).meta["loss"].startswith("next-token loss")


# ---------------------------------------------------------------- helpers of the views


def test_split_in_halves():
    assert split_in_halves("One. Two two. Three three three. Four.") == (
        "One. Two two.", "Three three three. Four.", "sentence")
    assert split_in_halves("the animal did not cross the street") == (   # middle: 17.5
        "the animal did not", "cross the street", "word")
    with pytest.raises(InputError):
        split_in_halves("word")


def test_top_attended_pairs_and_ranks():
    matrix = np.array([[1.0, 0, 0], [0.7, 0.3, 0], [0.5, 0.1, 0.4]])
    assert top_attended_pairs(matrix, 3) == [(0, 0, 1.0), (1, 0, 0.7), (2, 0, 0.5)]
    assert top_attended_pairs(matrix, 2, skip_first=True) == [(2, 2, 0.4), (1, 1, 0.3)]
    assert len(top_attended_pairs(matrix, 10, skip_first=True)) == 4   # pairs without token 0
    assert head_ranks(np.array([[0.2, np.nan], [0.9, 0.1]])).tolist() == [[2, 4], [1, 3]]
    assert parse_head_label("L12H3") == (12, 3) and parse_head_label("12.3") is None
