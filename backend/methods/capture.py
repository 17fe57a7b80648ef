"""Capture per-layer, per-head attention weights during one forward pass.

The hook point is each layer's attention weights (`hooks.attention_weight_hooks`, eager
attention for the pass), so every layer's weights can be reduced as soon as they exist (to float16, or to sentence
blocks) instead of holding all layers in float32 until the pass ends.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from backend.methods.hooks import attention_modules, attention_weight_hooks
from backend.progress import Progress

LayerReducer = Callable[[int, torch.Tensor], Any]


def to_float16(layer: int, weights: torch.Tensor) -> np.ndarray:
    """Default reducer: the first sequence's weights, (head, query, key), float16 on the CPU."""
    return weights[0].detach().to(torch.float16).cpu().numpy()


@torch.inference_mode()
def capture_attention(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      reduce: LayerReducer = to_float16,
                      progress: Progress | None = None) -> list[Any]:
    """Run the model once and return `reduce(layer, weights)` for every layer.

    input_ids: (batch, tokens). weights passed to `reduce`: (batch, head, query, key), rows sum
    to 1 (eager attention). Returns a list with one entry per layer.
    Eager attention is used for the pass (sdpa and flash kernels never materialise the weights).
    """
    results: list[Any] = [None] * len(attention_modules(model))

    def record(layer: int, weights: torch.Tensor) -> None:
        results[layer] = reduce(layer, weights)
        if progress:
            progress((layer + 1) / len(results), f"Layer {layer + 1}/{len(results)}")

    with attention_weight_hooks(model, record):
        # The base model: no LM head, whose (tokens x vocab) logits we do not need here.
        model.base_model(input_ids=input_ids.to(model.device),
                         attention_mask=None if attention_mask is None
                         else attention_mask.to(model.device))
    return results
