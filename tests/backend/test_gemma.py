"""Gemma 3 270M from its packaged GGUF: converted once (slow, ~100 s on 2 cores), then cached."""

from __future__ import annotations

import numpy as np
import torch

from backend.methods.capture import capture_attention
from backend.models import load_model, resolve_source


def test_gemma3_loads_and_gives_causal_attention(settings):
    lm = load_model(resolve_source("gemma3-270m", settings), settings)
    assert lm.causal and (lm.n_layers, lm.n_heads) == (18, 4)
    assert lm.model.config._attn_implementation == "eager"
    ids = lm.tokenizer("Attention shows which earlier words a model reads.")["input_ids"]
    assert ids[0] == lm.tokenizer.bos_token_id  # Gemma prepends <bos>
    t = len(ids)
    stacked = np.stack(capture_attention(lm.model, torch.tensor([ids])))
    assert stacked.shape == (18, 4, t, t) and stacked.dtype == np.float16
    assert np.isfinite(stacked).all() and (stacked >= 0).all()
    np.testing.assert_allclose(stacked.astype(np.float64).sum(-1), 1.0, atol=5e-3)
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    assert (stacked[..., future] == 0).all()
    # Below the diagonal the heads do attend: not a degenerate identity.
    assert (stacked[..., np.tril(np.ones((t, t), dtype=bool), k=-1)].sum(-1) > 0.1).all()
