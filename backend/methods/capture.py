"""Capture per-layer, per-head attention weights during one forward pass.

Hooks sit on each layer's attention module (the class transformers itself records attentions
from), so every layer's weights can be reduced as soon as they exist (to float16, or to sentence
blocks) instead of holding all layers in float32 until the pass ends.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from transformers.utils.output_capturing import OutputRecorder

from backend.errors import ModelLoadError

LayerReducer = Callable[[int, torch.Tensor], Any]
Progress = Callable[[float, str], None]


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module, index of the attention weights in its output), one per layer, in depth order."""
    specs = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if specs is None:
        raise ModelLoadError(f"{type(model).__name__} records no attention weights.")
    specs = specs if isinstance(specs, list) else [specs]
    found = []
    for name, module in model.named_modules():
        for spec in specs:
            spec = spec if isinstance(spec, OutputRecorder) else OutputRecorder(spec, index=1)
            if spec.target_class is not None and not isinstance(module, spec.target_class):
                continue
            if spec.class_name is not None and not name.endswith(spec.class_name):
                continue
            if spec.layer_name and f".{spec.layer_name.strip('.')}." not in f".{name}.":
                continue
            found.append((module, spec.index))
    if not found:
        raise ModelLoadError(f"No attention modules found in {type(model).__name__}.")
    return found


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
    The model must use eager attention: sdpa and flash kernels never materialise the weights.
    """
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    modules = attention_modules(model)
    results: list[Any] = [None] * len(modules)

    def hook_for(layer: int, index: int):
        def hook(module, args, output):
            results[layer] = reduce(layer, output[index])
            if progress:
                progress((layer + 1) / len(modules), f"Layer {layer + 1}/{len(modules)}")
        return hook

    handles = [m.register_forward_hook(hook_for(i, idx)) for i, (m, idx) in enumerate(modules)]
    try:
        # The base model: no LM head, whose (tokens x vocab) logits we do not need here.
        model.base_model(input_ids=input_ids.to(model.device),
                         attention_mask=None if attention_mask is None
                         else attention_mask.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return results
