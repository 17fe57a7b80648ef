"""Head importance, gates, head roles and the pruning curve (specs/head_importance.md).

Structural facts run on tiny random models (2 layers, hidden 32) in float64; the real-model checks
share one SmolLM2 (and MiniLM for the sentence-encoder loss).
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from backend.errors import InputError, ModelLoadError
from backend.methods import heads as H

# ---------------------------------------------------------------- fixtures and independent code


def tiny_llama(kv_heads: int = 2, attn: str = "eager", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=64, vocab_size=100,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).double().eval()
    model.set_attn_implementation(attn)
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100,
                        initializer_range=0.2, bos_token_id=99, eos_token_id=99)
    return GPT2LMHeadModel(config).double().eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=100, initializer_range=0.2)
    return BertModel(config, add_pooling_layer=False).double().eval()


def random_ids(rows: int = 1, tokens: int = 12, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def output_projection(model: nn.Module, layer: int) -> nn.Module:
    """Found by hand, independently of the module under test."""
    if isinstance(model, LlamaForCausalLM):
        return model.model.layers[layer].self_attn.o_proj
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.h[layer].attn.c_proj
    return model.encoder.layer[layer].attention.output.dense


def without_head(model: nn.Module, layer: int, head: int) -> nn.Module:
    """A copy of the model whose output projection ignores one head: its weights for that head's
    input slice are zero (GPT-2's Conv1D stores the weight transposed)."""
    pruned = copy.deepcopy(model)
    heads = model.config.num_attention_heads
    proj = output_projection(pruned, layer)
    with torch.no_grad():
        if isinstance(model, GPT2LMHeadModel):
            d = proj.weight.shape[0] // heads
            proj.weight[head * d:(head + 1) * d, :] = 0
        else:
            d = proj.weight.shape[1] // heads
            proj.weight[:, head * d:(head + 1) * d] = 0
    return pruned


def hf_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over all rows, in the model's dtype (transformers' own
    `labels=` loss upcasts to float32 only, too coarse for float64 comparisons)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def single_gate(shape: tuple[int, int], layer: int, head: int, value: float) -> torch.Tensor:
    gates = torch.ones(shape, dtype=torch.float64)
    gates[layer, head] = value
    return gates


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these passes are small, and on a shared 2-core machine a second
    thread spinning for a busy core made them up to 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    return load_model(resolve_source("smollm2", settings), settings)


@pytest.fixture(scope="session")
def smol_ids(smollm2) -> torch.Tensor:
    text = "The cat sat on the mat because the mat was warm, and the dog slept by the door all day."
    return smollm2.tokenizer(text, return_tensors="pt").input_ids[:, :20]


@pytest.fixture(scope="session")
def smol_gradients(smollm2, smol_ids) -> np.ndarray:
    """dLoss/dxi of the one SmolLM2 example, (layer, head)."""
    return H.gate_gradients(smollm2.model, smol_ids)[0]


# ---------------------------------------------------------------- gates and gradients


@pytest.mark.parametrize("build, eps, rtol", [
    (tiny_gpt2, 1e-5, 1e-6),    # float64 throughout
    (tiny_llama, 1e-2, 2e-3),   # Llama takes RMSNorm and softmax in float32: a larger step
])
def test_gate_gradient_equals_finite_difference_tiny(build, eps, rtol):
    model, ids = build(), random_ids(rows=2)
    grads = H.gate_gradients(model, ids)                       # (example, layer, head)
    finite_differences = []
    for example in range(2):
        settings = torch.stack([single_gate((2, 4), l, h, 1 + s * eps)
                                for l in range(2) for h in range(4) for s in (1, -1)])
        losses = H.loss_under_gates(model, ids[example:example + 1], settings).reshape(2, 4, 2)
        finite_differences.append((losses[..., 0] - losses[..., 1]) / (2 * eps))
        assert np.abs(finite_differences[-1]).max() > 1e-2
        np.testing.assert_allclose(grads[example], finite_differences[-1], rtol=rtol,
                                   atol=rtol * 1e-2)
    # gradient importance: the mean of each example's |gradient|, not |mean gradient| (the
    # bertology quirk), which differs here
    raw = H.head_importance(model, ids, normalize=None)
    expected = np.abs(finite_differences).mean(axis=0)
    np.testing.assert_allclose(raw, expected, rtol=rtol, atol=rtol * 1e-2)
    assert np.abs(raw - np.abs(np.mean(finite_differences, axis=0))).max() > 100 * rtol


def test_gate_gradient_equals_finite_difference_smollm2(smollm2, smol_ids, smol_gradients):
    top = np.argsort(np.abs(smol_gradients).ravel())[-3:]
    eps = 1e-2
    settings = torch.stack([single_gate((30, 9), i // 9, i % 9, 1 + s * eps)
                            for i in top for s in (1, -1)]).float()
    losses = H.loss_under_gates(smollm2.model, smol_ids, settings).reshape(3, 2)
    finite_difference = (losses[:, 0] - losses[:, 1]) / (2 * eps)
    np.testing.assert_allclose(smol_gradients.ravel()[top], finite_difference, rtol=3e-2,
                               atol=1e-3)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_gate_gradient_independent_of_attention_implementation(build):
    eager = build()
    eager.set_attn_implementation("eager")
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa" != eager.config._attn_implementation
    ids = random_ids(rows=2)
    # tolerance: eager Llama takes its softmax in float32 (the rest runs in float64)
    np.testing.assert_allclose(H.gate_gradients(sdpa, ids), H.gate_gradients(eager, ids),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_zero_gate_equals_removing_head_from_output_projection(build):
    model, ids = build(), random_ids(rows=2)
    settings = torch.stack([single_gate((2, 4), l, h, 0.0) for l in range(2) for h in range(4)])
    gated = H.loss_under_gates(model, ids, settings, settings_per_pass=3)
    by_hand = [hf_loss(without_head(model, l, h), ids) for l in range(2) for h in range(4)]
    np.testing.assert_allclose(gated, by_hand, rtol=1e-10)
    assert np.ptp(by_hand) > 1e-3                    # the heads do matter, differently


def test_zero_gate_equals_removing_head_bert_encoder():
    model, ids = tiny_bert(), random_ids(rows=2)
    for layer, head in [(0, 1), (1, 3)]:
        with torch.no_grad(), H.head_gates(model, single_gate((2, 4), layer, head, 0.0)):
            gated = model(input_ids=ids).last_hidden_state
        by_hand = without_head(model, layer, head)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(gated, by_hand, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(gated, model(input_ids=ids).last_hidden_state, atol=1e-6)


def test_gqa_gates_index_query_heads():
    model, ids = tiny_llama(kv_heads=2), random_ids()
    assert H.gate_shape(model) == (2, 4)                        # 4 query heads, 2 KV heads
    assert H.head_importance(model, ids).shape == (2, 4)
    settings = torch.stack([single_gate((2, 4), 1, h, 0.0) for h in range(4)])
    gated = H.loss_under_gates(model, ids, settings)
    by_hand = [hf_loss(without_head(model, 1, h), ids) for h in range(4)]
    np.testing.assert_allclose(gated, by_hand, rtol=1e-10)
    assert abs(gated[0] - gated[1]) > 1e-4                      # heads 0 and 1 share a KV head


def test_batched_ablation_equals_one_head_at_a_time_tiny():
    model, ids = tiny_llama(), random_ids(rows=2, seed=3)
    deltas = H.ablation_deltas(model, ids, settings_per_pass=3)   # chunks of 3 settings x 2 rows
    base = hf_loss(model, ids)
    by_hand = np.array([[hf_loss(without_head(model, l, h), ids) - base for h in range(4)]
                        for l in range(2)])
    np.testing.assert_allclose(deltas, by_hand, rtol=1e-9, atol=1e-12)


def test_batched_ablation_equals_one_head_at_a_time_smollm2(smollm2, smol_ids):
    model = smollm2.model
    heads = [(0, 3), (17, 8), (29, 4)]
    settings = torch.stack([torch.ones(30, 9)] + [single_gate((30, 9), l, h, 0.0).float()
                                                  for l, h in heads])
    losses = H.loss_under_gates(model, smol_ids, settings, settings_per_pass=len(settings))
    for (layer, head), batched in zip(heads, losses[1:]):
        proj = model.model.layers[layer].self_attn.o_proj
        saved = proj.weight[:, head * 64:(head + 1) * 64].clone()
        try:
            with torch.no_grad():
                proj.weight[:, head * 64:(head + 1) * 64] = 0
            one_by_one = hf_loss(model, smol_ids)
        finally:
            with torch.no_grad():
                proj.weight[:, head * 64:(head + 1) * 64] = saved
        assert batched == pytest.approx(one_by_one, abs=2e-4)
    assert losses[0] == pytest.approx(hf_loss(model, smol_ids), abs=2e-4)
    assert np.ptp(losses) > 1e-3


def test_no_output_projection_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ModelLoadError) as error:
        H.head_gates(model, torch.ones(1, 1)).__enter__()
    for path in ("self_attn.o_proj", "attn.c_proj", "attention.output.dense"):
        assert path in str(error.value)


def test_encoder_without_loss_fn_is_refused():
    with pytest.raises(InputError, match="loss_fn"):
        H.head_importance(tiny_bert(), random_ids())


# ---------------------------------------------------------------- sentence-encoder loss


def test_sentence_similarity_loss_on_minilm():
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    lm = load_model(resolve_source("minilm", settings), settings)
    first, second = "A man is playing a guitar.", "Someone plays an instrument on stage tonight."
    pair = H.sentence_similarity_loss(lm.tokenizer, first, second)
    assert pair.input_ids.shape[0] == 2 and (pair.attention_mask == 0).any()   # padded

    def embed(text):  # each sentence alone, unpadded: independent of the pair's padding
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        return lm.model(input_ids=ids).last_hidden_state[0].mean(dim=0)

    with torch.no_grad():
        expected = torch.cosine_similarity(embed(first), embed(second), dim=0).item()
        assert pair(lm.model, pair.input_ids).item() == pytest.approx(expected, abs=1e-5)
    scores = H.head_importance(lm.model, pair.input_ids, loss_fn=pair)
    assert scores.shape == (6, 12)
    np.testing.assert_allclose(np.linalg.norm(scores, axis=1), 1.0, rtol=1e-9)
    # batched ablation of the pair = the pair re-encoded with one head removed by hand
    deltas = H.ablation_deltas(lm.model, pair.input_ids, loss_fn=pair)
    with torch.no_grad():
        by_hand = pair(without_head(lm.model, 2, 5), pair.input_ids).item()
        assert deltas[2, 5] == pytest.approx(by_hand - pair(lm.model, pair.input_ids).item(),
                                             abs=1e-5)


# ---------------------------------------------------------------- normalisation


def test_normalisation_invariants():
    model, ids = tiny_llama(), random_ids(rows=2)
    raw = H.head_importance(model, ids, normalize=None)
    per_layer = H.head_importance(model, ids, normalize="layer")
    np.testing.assert_allclose(np.linalg.norm(per_layer, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(per_layer * np.linalg.norm(raw, axis=1, keepdims=True), raw,
                               rtol=1e-9)
    spread = H.head_importance(model, ids, normalize="global")
    assert spread.min() == 0.0 and spread.max() == 1.0
    assert (np.argsort(spread.ravel()) == np.argsort(per_layer.ravel())).all()
    with pytest.raises(InputError):
        H.normalize_importance(raw, "softmax")


# ---------------------------------------------------------------- head roles on known patterns


def previous_token_pattern(tokens: int) -> np.ndarray:
    attention = np.zeros((tokens, tokens))
    attention[0, 0] = 1
    attention[np.arange(1, tokens), np.arange(tokens - 1)] = 1
    return attention


def random_causal(tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    attention = np.tril(rng.dirichlet(np.ones(tokens), size=tokens))
    return attention / attention.sum(axis=1, keepdims=True)


def test_previous_token_pattern_roles():
    attention = previous_token_pattern(16)[None, None]          # (layer, head, query, key)
    roles = H.head_roles(attention, window=8)
    assert roles["previous_token"][0, 0] == pytest.approx(1.0)
    assert roles["first_token"][0, 0] == pytest.approx(0.0)
    assert roles["self"][0, 0] == pytest.approx(0.0)
    assert roles["locality"][0, 0] == pytest.approx(1 - 1 / 8)
    assert roles["confidence"][0, 0] == pytest.approx(1.0)
    assert roles["entropy"][0, 0] == pytest.approx(0.0, abs=1e-7)


def test_sink_self_and_locality_patterns():
    tokens = 32
    sink = np.zeros((tokens, tokens))
    sink[:, 0] = 1
    diagonal = np.eye(tokens)
    attention = np.stack([sink, diagonal])                      # (head, query, key)
    assert H.first_token_scores(attention).tolist() == [1.0, 0.0]
    assert H.self_scores(attention).tolist() == [0.0, 1.0]
    assert H.previous_token_scores(attention).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(H.locality_scores(attention, window=8), [0.0, 1.0])


def test_entropy_of_uniform_and_one_hot_rows():
    for keys in (2, 7, 30):
        uniform = np.full((keys, keys), 1 / keys)
        assert H.attention_entropy(uniform) == pytest.approx(math.log(keys), rel=1e-6)
        assert H.attention_confidence(uniform) == pytest.approx(1 / keys, rel=1e-6)
    causal_uniform = np.tril(np.ones((10, 10))) / np.arange(1, 11)[:, None]
    expected = np.mean([math.log(k) for k in range(1, 11)])
    assert H.attention_entropy(causal_uniform) == pytest.approx(expected, rel=1e-6)
    assert H.attention_entropy(np.eye(10)) == 0.0


def test_induction_score_synthetic_and_random():
    period, start = 20, 1
    tokens = start + 2 * period
    induction = random_causal(tokens) * 0.05                    # a little noise everywhere
    for query in range(start + period, tokens):
        induction[query] *= 0.05 / induction[query].sum()
        induction[query, query - period + 1] += 0.95
    attention = np.stack([induction, random_causal(tokens, seed=1), previous_token_pattern(tokens)])
    scores = H.induction_scores_from_attention(attention, period, start)
    assert scores[0] > 0.9
    assert scores[1] < 0.1 and scores[2] < 0.1


def test_receiver_kurtosis_matches_hand_computation():
    tokens, pi = 24, 4
    attention = random_causal(tokens, seed=2)
    attention[8:, 3] += 2.0                                     # later queries broadcast key 3
    attention /= attention.sum(axis=1, keepdims=True)
    vertical = [np.mean([attention[q, k] for q in range(k + pi, tokens)])
                for k in range(1, tokens - pi)]                 # key 0 (sink) left out
    centred = np.asarray(vertical) - np.mean(vertical)
    expected = np.mean(centred ** 4) / np.mean(centred ** 2) ** 2 - 3
    assert H.receiver_kurtosis(attention, pi) == pytest.approx(expected, rel=1e-5)
    assert expected > 5
    assert H.receiver_kurtosis(random_causal(tokens, seed=2), pi) < expected


def test_smollm2_has_induction_heads(smollm2):
    scores = H.induction_scores(smollm2.model, n_tokens=20, n_sequences=2, seed=0)
    assert scores.shape == (30, 9)
    assert scores.max() > 0.5                                  # some heads copy the next token
    assert np.median(scores) < 0.1                             # most do not


# ---------------------------------------------------------------- importance by attention stats


def test_confidence_and_entropy_importance_match_captured_attention():
    model, ids = tiny_llama(), random_ids(rows=2)
    with torch.no_grad():
        attention = torch.stack(model(input_ids=ids, output_attentions=True).attentions, dim=1)
    attention = attention.numpy()                               # (batch, layer, head, q, k)
    confidence = H.head_importance(model, ids, method="confidence", normalize=None)
    entropy = H.head_importance(model, ids, method="entropy", normalize=None)
    np.testing.assert_allclose(confidence, attention.max(-1).mean(-1).mean(0), rtol=1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(attention > 0, attention * np.log(attention), 0.0)
    np.testing.assert_allclose(entropy, -plogp.sum(-1).mean(-1).mean(0), rtol=1e-5)


# ---------------------------------------------------------------- pruning curve


def test_pruning_curve_tiny():
    model, ids = tiny_llama(), random_ids(rows=2)
    seen = []
    curve = H.pruning_curve(model, ids, method="ablation", progress=lambda f, s: seen.append(f))
    assert len(curve.fractions) == 21 and curve.fractions[[0, -1]].tolist() == [0.0, 1.0]
    assert sorted(curve.order["importance"].tolist()) == list(range(8))
    importance = H.head_importance(model, ids, method="ablation").ravel()
    assert importance[curve.order["importance"][0]] == importance.min()
    for order in ("importance", "random"):
        assert curve.loss[order][0] == pytest.approx(hf_loss(model, ids), rel=1e-10)
    assert curve.loss["importance"][-1] == pytest.approx(curve.loss["random"][-1], rel=1e-10)
    # the loss at 50 % = the first 4 heads of the order removed by hand
    pruned = model
    for flat in curve.order["importance"][:4]:
        pruned = without_head(pruned, flat // 4, flat % 4)
    assert curve.loss["importance"][10] == pytest.approx(hf_loss(pruned, ids), rel=1e-10)
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)


def test_pruning_curve_recomputed_order_is_a_permutation():
    model, ids = tiny_llama(), random_ids()
    curve = H.pruning_curve(model, ids, method="gradient", recompute=True, step=0.25)
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sorted(curve.order["importance"].tolist()) == list(range(8))
    first = H.head_importance(model, ids).ravel()
    assert set(curve.order["importance"][:2]) == set(np.argsort(first)[:2])


def test_pruning_by_importance_beats_random_on_smollm2(smollm2, smol_ids, smol_gradients):
    importance = H.normalize_importance(np.abs(smol_gradients), "layer")
    curve = H.pruning_curve(smollm2.model, smol_ids, importance=importance, step=0.1)
    early = slice(1, 6)                                        # 10 % ... 50 % of heads masked
    assert curve.loss["importance"][early].mean() < curve.loss["random"][early].mean()
