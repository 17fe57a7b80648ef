"""Attention flow and gradient-weighted rollout of one text (rollout itself is cheap enough to
compute from the stored attention when a view asks for it)."""

from __future__ import annotations

import numpy as np
import torch

from backend.analyses.request import AnalysisRequest
from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.gradients import attention_and_gradients
from backend.methods.rollout import attention_flow, gradient_rollout
from backend.methods.tokens import tokenize
from backend.store import AnalysisRecord

FLOW_MAX_TOKENS = 256
AUTO_FLOW_TOKENS = 64  # views start flow by themselves up to here; longer inputs ask first


def _record(request: AnalysisRequest, aid: str, lm, n_tokens: int) -> AnalysisRecord:
    return AnalysisRecord(aid, request.kind, request.model, lm.fingerprint, request.text,
                          dict(request.params), {"n_tokens": n_tokens})


def compute_flow(ctx, request: AnalysisRequest, aid: str):
    """Raw max-flow values (query, key), float64: rows are normalised when shown."""
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens)
    if len(tokens.ids) > FLOW_MAX_TOKENS:
        raise InputError(f"Attention flow is offered up to {FLOW_MAX_TOKENS} tokens; this text "
                         f"has {len(tokens.ids)}.")
    layers = capture_attention(lm.model, torch.tensor([tokens.ids]),
                               reduce=lambda layer, w: w[0].float().cpu().numpy())
    params = dict(request.params)
    flow = attention_flow(np.stack(layers), params.get("head_fusion", "mean"), normalize=False,
                          progress=ctx.span(0.35, 0.95))
    return _record(request, aid, lm, len(tokens.ids)), {"flow": flow}


def compute_gradient_rollout(ctx, request: AnalysisRequest, aid: str):
    """Chefer et al. rollout (layer, query, key) for the target token `params["target"]`."""
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens)
    target = int(dict(request.params).get("target", len(tokens.ids) - 1))
    if not 0 <= target < len(tokens.ids):
        raise InputError(f"Target token {target} is outside the text's {len(tokens.ids)} tokens.")
    ctx.progress(0.4, "Forward and backward pass")
    attention, gradients = attention_and_gradients(lm.model, torch.tensor([tokens.ids]), target,
                                                   lm.causal)
    rollout = gradient_rollout(attention, gradients).astype(np.float32)
    return _record(request, aid, lm, len(tokens.ids)), {"gradient_rollout": rollout}
