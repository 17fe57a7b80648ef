"""Attention maps: every layer's (head, query, key) weights for one text."""

from __future__ import annotations

import numpy as np
import torch

from backend.analyses.request import AnalysisRequest
from backend.methods.capture import capture_attention
from backend.methods.tokens import tokenize
from backend.store import AnalysisRecord


def layer_array_name(layer: int) -> str:
    return f"attention/{layer:03d}"


def compute_attention(ctx, request: AnalysisRequest, aid: str) -> tuple[AnalysisRecord,
                                                                       dict[str, np.ndarray]]:
    """Per-layer attention (head, query, key) in float16, one array per layer."""
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens)
    ctx.progress(0.35, f"Running the model on {len(tokens.ids)} tokens")
    layers = capture_attention(lm.model, torch.tensor([tokens.ids]), progress=ctx.span(0.35, 0.8))
    meta = {
        "tokens": tokens.labels, "token_ids": tokens.ids, "special": tokens.special,
        "offsets": tokens.offsets, "n_layers": len(layers), "n_heads": int(layers[0].shape[0]),
        "causal": lm.causal, "model_label": lm.source.label,
    }
    record = AnalysisRecord(aid, request.kind, request.model, lm.fingerprint, request.text,
                            dict(request.params), meta)
    return record, {layer_array_name(i): a for i, a in enumerate(layers)}
