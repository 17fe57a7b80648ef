"""Attention maps of one text, stored so that any exact weight can be recomputed.

Format "qk" (every architecture the exact rule covers): per layer `query/LLL` (head, T, head_dim)
and `key/LLL` (key_head, T, head_dim) in the model's dtype (16 bits on a GPU; float32 models in
16 bits with ATLAS_QK_16BIT=1; uint16 arrays are bfloat16 bit patterns),
`lse/LLL` (head, T) float32 row log-sum-exps, `overview/LLL` (head, B, B) float32 block means at
B = min(T, OVERVIEW_BINS) bins (`bin_edges`), and `stats/<role>` (layer, head) float32 for each
role of `reductions.ROLE_NAMES`; meta["rules"] holds each layer's AttentionRule.
Format "maps" (analyses stored before, and short inputs of models the rule does not cover):
per layer `attention/LLL` (head, query, key) float16.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.analyses.kind import Kind, NamedArrays, NoParams, Task
from backend.methods.capture import capture_attention
from backend.methods.qk_capture import UnsupportedAttention, capture_layers
from backend.methods.reductions import ROLE_NAMES, BlockMeans, HeadStatistics
from backend.methods.tokens import model_context, tokenize

OVERVIEW_BINS = 64  # what Explore draws; thumbnails pool these further


def layer_array_name(layer: int) -> str:
    return f"attention/{layer:03d}"


def qk_array_name(part: str, layer: int) -> str:
    """part: "query", "key", "lse" or "overview"."""
    return f"{part}/{layer:03d}"


def as_stored(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy: bfloat16 as its uint16 bit patterns, other dtypes as they are."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy()
    return tensor.numpy()


def from_stored(array: np.ndarray) -> torch.Tensor:
    """Inverse of as_stored."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if array.dtype == np.uint16 else tensor


def layer_reducers(layer: int, n_heads: int, n_tokens: int, device) -> list:
    """What an attention analysis keeps of each layer besides query and key."""
    return [BlockMeans.binned(n_tokens, OVERVIEW_BINS, n_heads, device),
            HeadStatistics(n_heads, n_tokens, device)]


def _qk_arrays(layers) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        arrays[qk_array_name("query", i)] = as_stored(layer.query)
        arrays[qk_array_name("key", i)] = as_stored(layer.key)
        arrays[qk_array_name("lse", i)] = layer.lse
        arrays[qk_array_name("overview", i)] = layer.reductions[0]
    for name in ROLE_NAMES:
        arrays[f"stats/{name}"] = np.stack([layer.reductions[1][name] for layer in layers])
    return arrays


def compute_attention(ctx, task: Task[NoParams]):
    """The "qk" format where the rule covers the model, else "maps" for short inputs."""
    request = task.request
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens,
                      model_context(lm.model.config))
    n_tokens = len(tokens.ids)
    ctx.progress(0.35, f"Running the model on {n_tokens} tokens")
    ids = torch.tensor([tokens.ids])
    meta = {"tokens": tokens.labels, "token_ids": tokens.ids, "special": tokens.special,
            "offsets": tokens.offsets, "n_layers": 0, "n_heads": 0, "causal": lm.causal,
            "model_label": lm.source.label}
    try:
        layers = capture_layers(lm.model, ids, layer_reducers,
                                sixteen_bits=ctx.settings.qk_16bit, progress=ctx.span(0.35, 0.8))
        arrays = _qk_arrays(layers)
        meta.update(format="qk", n_layers=len(layers), n_heads=int(layers[0].query.shape[0]),
                    n_kv_heads=int(layers[0].key.shape[0]),
                    score_dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                    rules=[layer.rule.to_json() for layer in layers])
    except UnsupportedAttention as e:
        ctx.settings.check_full_matrix(n_tokens, f"{e} Its attention as full maps",
                                       "Shorten the text.")
        maps = capture_attention(lm.model, ids, progress=ctx.span(0.35, 0.8))
        arrays = {layer_array_name(i): a for i, a in enumerate(maps)}
        meta.update(format="maps", n_layers=len(maps), n_heads=int(maps[0].shape[0]),
                    refused=str(e))
    return NamedArrays(task.record(lm.fingerprint, meta), arrays)


ATTENTION = Kind("attention", NoParams, compute_attention)
