"""Attention flow and gradient-weighted rollout of one text (rollout itself is cheap enough to
compute from the stored attention when a view asks for it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.analyses.kind import Kind, Result, Task
from backend.analyses.params import param
from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.gradients import attention_and_gradients
from backend.methods.rollout import HEAD_FUSIONS, attention_flow, gradient_rollout
from backend.methods.tokens import tokenize

FLOW_MAX_TOKENS = 256
AUTO_FLOW_TOKENS = 64  # views start flow by themselves up to here; longer inputs ask first


@dataclass(frozen=True)
class FlowParams:
    """head_fusion: how a layer's heads become one graph (mean, max or min over heads)."""

    head_fusion: str = param(HEAD_FUSIONS[0], choices=HEAD_FUSIONS)


@dataclass(frozen=True)
class GradientRolloutParams:
    """target: the token whose prediction is explained (None: the last token)."""

    target: int | None = param(None, low=0, high=10 ** 9)  # its real bound: the text's length


@dataclass(frozen=True)
class FlowResult(Result):
    flow: np.ndarray  # (query, key) float64 raw max-flow values; rows are normalised when shown


@dataclass(frozen=True)
class GradientRolloutResult(Result):
    gradient_rollout: np.ndarray  # (layer, query, key) float32


def compute_flow(ctx, task: Task[FlowParams]):
    """Raw max-flow values (query, key), float64: rows are normalised when shown."""
    request = task.request
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens)
    if len(tokens.ids) > FLOW_MAX_TOKENS:
        raise InputError(f"Attention flow is offered up to {FLOW_MAX_TOKENS} tokens; this text "
                         f"has {len(tokens.ids)}.")
    layers = capture_attention(lm.model, torch.tensor([tokens.ids]),
                               reduce=lambda layer, w: w[0].float().cpu().numpy())
    flow = attention_flow(np.stack(layers), task.params.head_fusion, normalize=False,
                          progress=ctx.span(0.35, 0.95))
    return FlowResult(task.record(lm.fingerprint, {"n_tokens": len(tokens.ids)}), flow)


def compute_gradient_rollout(ctx, task: Task[GradientRolloutParams]):
    """Chefer et al. rollout (layer, query, key) for the target token (default: the last)."""
    request = task.request
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens)
    target = len(tokens.ids) - 1 if task.params.target is None else task.params.target
    if not 0 <= target < len(tokens.ids):
        raise InputError(f"Target token {target} is outside the text's {len(tokens.ids)} tokens.")
    ctx.progress(0.4, "Forward and backward pass")
    attention, gradients = attention_and_gradients(lm.model, torch.tensor([tokens.ids]), target,
                                                   lm.causal)
    rollout = gradient_rollout(attention, gradients).astype(np.float32)
    return GradientRolloutResult(task.record(lm.fingerprint, {"n_tokens": len(tokens.ids)}),
                                 rollout)


ATTENTION_FLOW = Kind("attention_flow", FlowParams, compute_flow, FlowResult)
GRADIENT_ROLLOUT = Kind("gradient_rollout", GradientRolloutParams, compute_gradient_rollout,
                        GradientRolloutResult)
