"""The long-context capture against eager attention (`output_attentions=True`) of the same model:
tiny random configs of each architecture the rule covers, one it refuses, and the packaged models.

Chunks are forced small (a few rows) and sliding windows shorter than the input, so chunk edges,
windows and key ranges all matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertModel, BloomConfig, BloomForCausalLM, Gemma2Config,
                          Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig,
                          GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

from backend.methods import exact
from backend.methods.binning import bin_matrix
from backend.methods.heads import roles
from backend.methods.hooks import attention_function
from backend.methods.qk_capture import LayerRecorder, UnsupportedAttention, capture_layers
from backend.methods.reductions import BlockMeans, HeadStatistics

T = 41  # tokens: longer than every sliding window below, not a multiple of the chunk
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def _mistral():
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=7))


def _gemma3():
    return Gemma3ForCausalLM(Gemma3TextConfig(
        **SMALL, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=20))


def _gemma2():
    return Gemma2ForCausalLM(Gemma2Config(
        **SMALL, sliding_window=9, attn_logit_softcapping=0.5,
        layer_types=["sliding_attention", "full_attention"]))


def _gpt_oss():
    model = GptOssForCausalLM(GptOssConfig(
        **SMALL, num_local_experts=2, num_experts_per_tok=1, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():  # learned sink logits, large enough to take real mass
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    return model


def _bert():
    return BertModel(BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4))


ARCHITECTURES = {"llama-gqa": _llama, "mistral-window": _mistral, "gemma3-mixed": _gemma3,
                 "gemma2-softcap": _gemma2, "gpt-oss-sinks": _gpt_oss, "bert": _bert}


def _eager(model, ids):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.base_model(input_ids=ids, output_attentions=True)
    return out.last_hidden_state, [a[0] for a in out.attentions]


def _reducers(layer, heads, tokens, device):
    return [BlockMeans.binned(tokens, 5, heads, device), HeadStatistics(heads, tokens, device)]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def captured(request):
    torch.manual_seed(0)
    model = ARCHITECTURES[request.param]().eval()
    ids = torch.randint(3, 97, (1, T))
    # 4 heads x 41 keys x 4 bytes x 6 rows: chunks of 16 rows (the minimum), edges off-window.
    layers = capture_layers(model, ids, _reducers, chunk_bytes=4 * 4 * T * 6)
    hidden, eager = _eager(model, ids)
    return request.param, model, ids, layers, hidden, eager


def test_every_weight_equals_eager(captured):
    name, _, _, layers, _, eager = captured
    for layer, reference in zip(layers, eager):
        weights = exact.weights(layer.query, layer.key, torch.from_numpy(layer.lse), layer.rule,
                                slice(0, T), slice(0, T))
        torch.testing.assert_close(weights, reference, atol=2e-6, rtol=1e-5)


def test_rules_name_what_each_layer_does(captured):
    name, model, _, layers, _, _ = captured
    rules = [layer.rule for layer in layers]
    assert [r.causal for r in rules] == [name != "bert"] * 2
    windows = {"mistral-window": [7, 7], "gemma3-mixed": [6, None], "gemma2-softcap": [9, None],
               "gpt-oss-sinks": [5, None]}.get(name, [None, None])
    assert [r.window for r in rules] == windows
    assert all((r.softcap == 0.5) == (name == "gemma2-softcap") for r in rules)
    assert all((r.sinks is not None) == (name == "gpt-oss-sinks") for r in rules)
    if name == "gemma3-mixed":
        assert rules[0].scaling == pytest.approx(20 ** -0.5)
    assert [layer.query.shape for layer in layers] == [(4, T, 8)] * 2
    if name != "bert":  # key heads are kept once, not repeated for the query heads
        assert [layer.key.shape for layer in layers] == [(2, T, 8)] * 2


def test_windows_rows_and_columns_equal_eager(captured):
    _, _, _, layers, _, eager = captured
    layer, reference = layers[1], eager[1]
    lse = torch.from_numpy(layer.lse)
    for q, k, heads in [(slice(17, 30), slice(3, 20), None), (slice(40, 41), slice(0, T), [3]),
                        (slice(0, T), slice(12, 13), [0, 2])]:
        index = None if heads is None else torch.tensor(heads)
        got = exact.weights(layer.query, layer.key, lse, layer.rule, q, k, index)
        expected = reference[heads if heads is not None else slice(None)][:, q, k]
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_layer_output_equals_eager(captured):
    """The capture computes each layer's output itself (SDPA, or its own chunks under
    soft-capping and sinks): the model's final hidden state must be eager's."""
    _, model, ids, _, hidden, _ = captured
    recorder = LayerRecorder(2, _reducers, True, False, 4 * 4 * T * 6, None)
    with attention_function(model, recorder), torch.no_grad():
        out = model.base_model(input_ids=ids).last_hidden_state
    assert len(recorder.layers) == 2
    torch.testing.assert_close(out, hidden, atol=1e-5, rtol=1e-4)


def test_reductions_equal_statistics_of_eager_weights(captured):
    _, _, _, layers, _, eager = captured
    for layer, reference in zip(layers, eager):
        full = reference.numpy()
        np.testing.assert_allclose(layer.reductions[0], bin_matrix(full, 5).values, atol=1e-6)
        expected = roles.head_roles(full[None])
        for role, values in expected.items():
            # Kurtosis of near-flat vertical scores amplifies the reference's float32 sums.
            atol = 1e-4 if role == "receiver_kurtosis" else 1e-5
            np.testing.assert_allclose(layer.reductions[1][role], values[0], rtol=1e-4,
                                       atol=atol, err_msg=role)


def test_implementation_is_restored_after_a_capture():
    model = _llama().eval()
    model.set_attn_implementation("sdpa")
    capture_layers(model, torch.randint(3, 97, (1, 9)))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError):  # a failing pass restores it too
        capture_layers(model, torch.randint(3, 97, (2, 9)))
    assert model.config._attn_implementation == "sdpa"


def test_position_bias_models_are_refused():
    model = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedAttention, match="attention interface"):
        capture_layers(model.eval(), torch.randint(3, 97, (1, 9)))


def test_additive_bias_in_the_mask_is_refused():
    model = _llama().eval()
    ids = torch.randint(3, 97, (1, 9))
    bias = torch.arange(9.0)[None, :] - torch.arange(9.0)[:, None]  # ALiBi-like, plus causal
    mask = bias.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -torch.inf)
    recorder = LayerRecorder(2, None, True, False, None, None)
    with pytest.raises(UnsupportedAttention, match="position bias"), \
            attention_function(model, recorder), torch.no_grad():
        model.base_model(input_ids=ids, attention_mask=mask[None, None])


@pytest.mark.parametrize("fixture", ["smollm2", "minilm"])
def test_packaged_models_equal_eager(request, fixture):
    lm = request.getfixturevalue(fixture)
    text = "The archive keeps every letter the river town ever sent, and the keeper reads " \
           "them aloud on Sundays to whoever comes."
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    n = ids.shape[1]
    layers = capture_layers(lm.model, ids, _reducers, chunk_bytes=4 * 12 * n * 16)
    _, eager = _eager(lm.model, ids)
    for i in (0, len(layers) // 2, len(layers) - 1):
        layer = layers[i]
        weights = exact.weights(layer.query, layer.key, torch.from_numpy(layer.lse),
                                layer.rule, slice(0, n), slice(0, n))
        torch.testing.assert_close(weights, eager[i], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(layer.reductions[0], bin_matrix(eager[i].numpy(), 5).values,
                                   atol=1e-6)
    assert lm.model.config._attn_implementation == "eager"


def test_softmax_in_place_equals_softmax_with_the_sink_column():
    """exact.softmax_ against torch's softmax and logsumexp over the row with the sink logit
    appended as one more key (gpt-oss's definition), masked keys and a wholly masked row too."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 9) * 4
    logits[:, :, 6:] = -torch.inf  # masked keys
    logits[1, 2] = -torch.inf  # a row that sees no key
    sinks = torch.tensor([0.5, -1.0, 2.0])[:, None, None]
    for sink in (None, sinks):
        extended = logits if sink is None else torch.cat(
            [logits, sink.expand(-1, logits.shape[1], 1)], dim=-1)
        weights = logits.clone()
        lse = exact.softmax_(weights, sink)
        torch.testing.assert_close(lse, torch.logsumexp(extended, -1), equal_nan=True)
        torch.testing.assert_close(weights, torch.softmax(extended, -1)[..., :9], equal_nan=True)
