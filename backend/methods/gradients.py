"""Attention weights together with the gradient of a scalar target with respect to them.

What gradient-weighted rollout (Chefer et al., ICCV 2021) needs: for a target y (a next-token
logit, a similarity), G_l = dy / dA_l for every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.methods.hooks import attention_weight_hooks


def target_logit(model: nn.Module, input_ids: torch.Tensor, position: int) -> torch.Tensor:
    """Causal LMs: the logit of the token the model predicts after `position` (its top one)."""
    logits = model(input_ids=input_ids).logits[0, position]
    return logits.max()


def target_similarity(model: nn.Module, input_ids: torch.Tensor, position: int) -> torch.Tensor:
    """Encoders: cosine similarity between the token's final state and the mean-pooled sentence
    embedding, i.e. how much this token stands for the whole input."""
    hidden = model(input_ids=input_ids).last_hidden_state[0]
    return torch.cosine_similarity(hidden[position], hidden.mean(0), dim=0)


def attention_and_gradients(model: nn.Module, input_ids: torch.Tensor, position: int,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention, gradients), both (layer, head, query, key) float32 on the CPU, for the target
    at token `position` (input_ids: (1, tokens))."""
    weights: list[torch.Tensor] = []

    def keep(layer: int, output: torch.Tensor) -> None:
        output.retain_grad()
        weights.append(output)

    try:
        with attention_weight_hooks(model, keep), torch.enable_grad():
            target = (target_logit if causal else target_similarity)(
                model, input_ids.to(model.device), position)
            target.backward()
    finally:
        model.zero_grad(set_to_none=True)
    attention = torch.stack([w.detach()[0].float().cpu() for w in weights])
    gradients = torch.stack([w.grad[0].float().cpu() for w in weights])
    return attention, gradients
