"""Each kind's declared defaults are what its computation uses, checked apart from the
declaration: a tiny real computation with a parameter left out equals one with the value the
method's own definition means (a different cache id where the two spellings differ), and
equals the method called directly."""

from __future__ import annotations

import numpy as np
import torch

from backend.analyses import AnalysisRequest
from backend.methods.capture import capture_attention
from backend.methods.heads import normalize_importance, raw_importance
from backend.methods.rollout import attention_flow

TEXT = "The cat sat on the mat because it was warm."


def test_gradient_rollout_explains_the_last_token_by_default(service, smollm2):
    text = "The cat sat."
    n = len(smollm2.tokenizer(text)["input_ids"])
    default = service.run(AnalysisRequest.make("gradient_rollout", "smollm2", text))
    last = service.run(AnalysisRequest.make("gradient_rollout", "smollm2", text, target=n - 1))
    assert default != last  # two spellings, two computations...
    np.testing.assert_array_equal(service.array(default, "gradient_rollout"),
                                  service.array(last, "gradient_rollout"))  # ...one answer


def test_flow_fuses_heads_by_their_mean_by_default(service, smollm2):
    aid = service.run(AnalysisRequest.make("attention_flow", "smollm2", TEXT))
    assert aid == service.run(AnalysisRequest.make("attention_flow", "smollm2", TEXT,
                                                   head_fusion="mean"))
    ids = torch.tensor([smollm2.tokenizer(TEXT)["input_ids"]])
    layers = capture_attention(smollm2.model, ids, reduce=lambda i, w: w[0].float().numpy())
    np.testing.assert_allclose(service.array(aid, "flow"),
                               attention_flow(np.stack(layers), "mean", normalize=False),
                               rtol=1e-6, atol=1e-9)


def test_head_importance_is_gradient_importance_by_default(service, smollm2):
    aid = service.run(AnalysisRequest.make("head_importance", "smollm2", TEXT))
    assert service.analysis(aid).meta["method"] == "gradient"
    ids = torch.tensor([smollm2.tokenizer(TEXT)["input_ids"]])
    raw = raw_importance(smollm2.model, ids, "gradient")
    np.testing.assert_allclose(service.array(aid, "raw"), raw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(service.array(aid, "layer"), normalize_importance(raw, "layer"),
                               rtol=1e-4, atol=1e-7)
