"""Analysis requests and their cache keys.

A request is small and frozen; its parameters are completed with the kind's declared defaults
when it is made, so its cache key (the sha256 of its canonical JSON together with the model's
weights fingerprint and `CODE_VERSION`) is the same whether a default was given or left out. A
change of weights or of the computation can never serve a stale result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.inputs import check_text

CODE_VERSION = 3  # bump when a computation's results change


class Params(Mapping):
    """A request's parameters: a read-only, hashable mapping of name -> value."""

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
        self._items = dict(sorted(dict(items).items()))

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(json.dumps(self._items, sort_keys=True, default=repr))

    def __repr__(self) -> str:
        return f"Params({self._items!r})"


@dataclass(frozen=True)
class AnalysisRequest:
    """kind: which analysis ("attention", ...); model: a model reference (see backend.models);
    params: the kind's parameters, every declared one present (defaults filled in)."""

    kind: str
    model: str
    text: str
    params: Params = field(default_factory=Params)

    def __post_init__(self):
        object.__setattr__(self, "params", Params(_completed(self.kind, self.params)))

    @classmethod
    def make(cls, kind: str, model: str, text: str, **params: Any) -> "AnalysisRequest":
        # Non-strings pass through unchanged so that validation names them.
        return cls(kind, model.strip() if isinstance(model, str) else model, text, params)

    def canonical(self) -> str:
        return json.dumps({"kind": self.kind, "model": self.model, "text": self.text,
                           "params": dict(self.params)}, sort_keys=True, ensure_ascii=False)

    def validate(self) -> None:
        check_text(self.text)


def _completed(kind: str, params) -> dict[str, Any]:
    """The params with the declared defaults of a known kind; an unknown kind's as given (the
    registry refuses it when the request is submitted)."""
    from backend.analyses import KINDS  # the registry imports this module
    from backend.analyses.params import complete

    given = dict(params)
    declared = KINDS.get(kind) if isinstance(kind, str) else None
    return complete(declared.params, given) if declared else given


def analysis_id(request: AnalysisRequest, fingerprint: str) -> str:
    """Content address of a result. The model enters by its weights, not by its name."""
    payload = json.loads(request.canonical())
    payload.pop("model")
    payload.update(fingerprint=fingerprint, code_version=CODE_VERSION)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:24]
