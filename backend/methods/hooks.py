"""Hooking a model: named hook points, installed for a `with` block and always removed, and
explicit attention-implementation switches, always restored.

Hook points, per layer: `attention_weight_hooks` (the eager attention weights, what transformers
records for output_attentions) and `attention_function` (the attention computation itself).

`attention_implementation(model, name)` switches the model (and its sub-models) to one of
transformers' attention implementations for the duration of a `with` block.
`attention_function(model, fn)` runs the block with our own function as the model's attention:
transformers calls it at each layer's hook point with exactly what its eager function receives
(module, query and key after position encoding, value, mask, scaling, sliding window,
soft-capping, sink logits); `fn` returns (output (batch, query, head, head_dim), None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils.output_capturing import OutputRecorder

from backend.errors import ModelLoadError

ATLAS_ATTENTION = "atlas_capture"
_active: ContextVar[Callable | None] = ContextVar("atlas_attention", default=None)


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    fn = _active.get()
    if fn is None:
        raise RuntimeError(f"The '{ATLAS_ATTENTION}' attention runs only inside "
                           "backend.methods.hooks.attention_function.")
    return fn(module, query, key, value, attention_mask, **kwargs)


# The name is registered once; what it calls is scoped by the context variable above. Masks
# are built as for SDPA: boolean (batch, 1, query, key), or None where causality alone is meant.
AttentionInterface.register(ATLAS_ATTENTION, _dispatch)
AttentionMaskInterface.register(ATLAS_ATTENTION, sdpa_mask)


def _implementations(model: nn.Module) -> list[tuple[object, str]]:
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")
               and hasattr(m.config, "_attn_implementation")}
    return [(c, c._attn_implementation) for c in configs.values()]


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the block with `name` ("eager", "sdpa", ...) as the attention of every sub-model."""
    before = _implementations(model)
    try:
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)
        yield
    finally:
        for config, implementation in before:
            config._attn_implementation_internal = implementation


@contextmanager
def attention_function(model: nn.Module, fn: Callable) -> Iterator[None]:
    """Run the block with `fn` called as each layer's attention (module docstring)."""
    token = _active.set(fn)
    try:
        with attention_implementation(model, ATLAS_ATTENTION):
            yield
    finally:
        _active.reset(token)


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


@contextmanager
def attention_weight_hooks(model: nn.Module,
                           fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Run the block in eager attention with fn(layer, weights (batch, head, query, key)) called
    as each layer's weights exist."""
    modules = attention_modules(model)
    with attention_implementation(model, "eager"):
        handles = [m.register_forward_hook(
            lambda module, args, output, i=i, index=index: fn(i, output[index]))
            for i, (m, index) in enumerate(modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
