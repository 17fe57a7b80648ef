"""Analysis requests, their cache keys, and the computation behind each kind of analysis.

A request is small and frozen; its cache key is the sha256 of its canonical JSON together with the
model's weights fingerprint and `CODE_VERSION`, so a change of weights or of the computation can
never serve a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.tokens import tokenize
from backend.store import AnalysisRecord

CODE_VERSION = 1  # bump when a computation's results change
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class AnalysisRequest:
    """kind: which analysis ("attention", ...); model: a model reference (see backend.models);
    params: extra parameters of the kind, as sorted (name, value) pairs."""

    kind: str
    model: str
    text: str
    params: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def make(cls, kind: str, model: str, text: str, **params: Any) -> "AnalysisRequest":
        return cls(kind, model.strip(), text, tuple(sorted(params.items())))

    def canonical(self) -> str:
        return json.dumps({"kind": self.kind, "model": self.model, "text": self.text,
                           "params": dict(self.params)}, sort_keys=True, ensure_ascii=False)

    def validate(self) -> None:
        if self.kind not in ANALYSES:
            raise InputError(f"Unknown analysis kind '{self.kind}'.")
        if not self.text.strip():
            raise InputError("The text is empty: type or pick a text to analyse.")
        if len(self.text) > MAX_TEXT_CHARS:
            raise InputError(f"The text has {len(self.text):,} characters; the limit is "
                             f"{MAX_TEXT_CHARS:,}.")


def analysis_id(request: AnalysisRequest, fingerprint: str) -> str:
    """Content address of a result. The model enters by its weights, not by its name."""
    payload = json.loads(request.canonical())
    payload.pop("model")
    payload.update(fingerprint=fingerprint, code_version=CODE_VERSION)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:24]


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


ANALYSES: dict[str, Callable] = {"attention": compute_attention}
