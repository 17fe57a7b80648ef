"""Analysis requests and their cache keys.

A request is small and frozen; its cache key is the sha256 of its canonical JSON together with the
model's weights fingerprint and `CODE_VERSION`, so a change of weights or of the computation can
never serve a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from backend.inputs import check_text

CODE_VERSION = 3  # bump when a computation's results change


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
        # Non-strings pass through unchanged so that validation names them.
        return cls(kind, model.strip() if isinstance(model, str) else model, text,
                   tuple(sorted(params.items())))

    def canonical(self) -> str:
        return json.dumps({"kind": self.kind, "model": self.model, "text": self.text,
                           "params": dict(self.params)}, sort_keys=True, ensure_ascii=False)

    def validate(self) -> None:
        check_text(self.text)


def analysis_id(request: AnalysisRequest, fingerprint: str) -> str:
    """Content address of a result. The model enters by its weights, not by its name."""
    payload = json.loads(request.canonical())
    payload.pop("model")
    payload.update(fingerprint=fingerprint, code_version=CODE_VERSION)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:24]
