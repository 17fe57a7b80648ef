"""Head gates (Michel et al. 2019): a multiplier xi[layer, head] on each head's output.

transformers 5 has no `head_mask`, so the gate is a forward pre-hook on each layer's attention
output projection: its input, (rows, tokens, heads * head_dim), is viewed as
(rows, tokens, heads, head_dim) and multiplied by the layer's gates. The hook sits after the
attention kernel, so it works with any attention implementation (eager, sdpa, flash), and with
grouped-query attention the gates index QUERY heads (`num_attention_heads`), never KV groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from backend.errors import ModelLoadError

# Module path suffixes of the attention output projection, per architecture family.
OUTPUT_PROJECTIONS = (
    "self_attn.o_proj",        # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Olmo...
    "attn.c_proj",             # GPT-2
    "attention.output.dense",  # BERT, RoBERTa, MiniLM
    "self_attn.out_proj",      # OPT, BART-style decoders
    "attention.dense",         # GPT-NeoX, Pythia
)


def _ends_with_path(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def attention_output_projections(model: nn.Module) -> list[nn.Module]:
    """The attention output projection of every layer, in depth order (one per layer)."""
    config = getattr(model, "config", None)
    layers = config.get_text_config().num_hidden_layers if config is not None else None
    for suffix in OUTPUT_PROJECTIONS:
        found = [m for name, m in model.named_modules() if _ends_with_path(name, suffix)]
        if found and layers in (None, len(found)):  # a vision tower's matches do not count
            return found
    raise ModelLoadError(
        f"Cannot gate heads of {type(model).__name__}: no attention output projection found. "
        f"Module paths tried: {', '.join('*.' + s for s in OUTPUT_PROJECTIONS)}."
    )


def head_count(model: nn.Module) -> int:
    """Number of query heads per layer (`num_attention_heads` of the text config)."""
    return model.config.get_text_config().num_attention_heads


def gate_shape(model: nn.Module) -> tuple[int, int]:
    """(layer, head): the shape of one gate setting for this model."""
    return len(attention_output_projections(model)), head_count(model)


def _gate_hook(layer: int, gates: torch.Tensor, heads: int):
    """Pre-hook multiplying the projection input by gates[..., layer, :]."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        g = gates[..., layer, :].to(x.dtype)          # (head,) or (rows, head)
        if g.dim() == 2:
            if g.shape[0] != x.shape[0]:
                raise ValueError(f"{g.shape[0]} gate rows for a batch of {x.shape[0]} rows.")
            g = g[:, None, :, None]                   # (rows, 1, head, 1)
        else:
            g = g[:, None]                            # (head, 1)
        return (x.unflatten(-1, (heads, -1)) * g).flatten(-2)

    def hook(module, args, kwargs):
        if args:
            return (apply(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "input": apply(kwargs["input"])}

    return hook


@contextmanager
def head_gates(model: nn.Module, gates: torch.Tensor) -> Iterator[None]:
    """Multiply each head's output by its gate while the context is open.

    gates: (layer, head), shared by every row of the batch, or (rows, layer, head), one gate
    setting per batch row (rows must equal the batch size of each forward pass).
    """
    projections = attention_output_projections(model)
    heads = head_count(model)
    if tuple(gates.shape[-2:]) != (len(projections), heads):
        raise ValueError(f"Gates of shape {tuple(gates.shape)} for a model with "
                         f"{len(projections)} layers x {heads} heads.")
    handles = [p.register_forward_pre_hook(_gate_hook(i, gates, heads), with_kwargs=True)
               for i, p in enumerate(projections)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
