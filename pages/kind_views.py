"""Which view shows which analysis kind, so a link with an id of another kind is redirected
with a clear sentence instead of failing on fields that kind does not have."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from backend.analyses import AnalysisRequest
from backend.service import AtlasError

ATTENTION = ("attention",)
TRACES = ("ta_trace", "ta_published")
PROBES = ("long_context_heads",)
KIND_NAMES = {
    "attention": "an attention analysis",
    "attention_flow": "an attention flow result",
    "gradient_rollout": "a gradient-weighted rollout result",
    "head_importance": "a head importance result",
    "head_roles": "a head roles result",
    "pruning_curve": "a pruning curve",
    "ta_trace": "a Thought Anchors trace",
    "ta_published": "a published Thought Anchors trace",
    "ta_generate": "a generated reasoning trace",
    "ta_receivers": "a receiver heads result",
    "ta_suppression": "an attention suppression result",
    "ta_resampling": "a resampling result",
    "long_context_heads": "a long-context heads probe",
}
# Results computed from an attention analysis or a trace, and the view that shows them.
_FROM_ATTENTION = {"attention_flow": "rollout", "gradient_rollout": "rollout",
                   "head_importance": "head_importance", "head_roles": "head_importance",
                   "pruning_curve": "head_importance"}
_FROM_TRACE = ("ta_receivers", "ta_suppression", "ta_resampling")
_TRACE_PARAMS = ("problem", "answer")


@dataclass(frozen=True)
class Redirect:
    """What to say, and where to send the user: the page name and its query parameters
    (no query when the analysis it came from is not cached)."""

    message: str
    page: str
    query: dict[str, str]
    label: str


def redirect(record, kinds: tuple[str, ...],
             cached: Callable[[AnalysisRequest], str | None]) -> Redirect:
    """Where `record` (an AnalysisRecord of a kind outside `kinds`, those the current view
    shows) can be seen. `cached(request)` gives the id of a stored analysis or None (the
    service's `cached`)."""
    what = KIND_NAMES.get(record.kind, f"a '{record.kind}' result")
    shown = " or ".join(KIND_NAMES.get(kind, kind) for kind in kinds)
    message = f"This link opens {what}, which this view cannot show: it shows {shown}."
    if record.kind in ATTENTION:
        return Redirect(message, "explore", {"a": record.id}, "Explore this analysis")
    if record.kind in TRACES:
        return Redirect(message, "thought_anchors", {"t": record.id}, "Open it in Thought Anchors")
    if record.kind in PROBES:
        return Redirect(message, "long_context_heads", {"lc": record.id},
                        "Open it in Long-context heads")
    if record.kind in _FROM_ATTENTION:
        source = _lookup(cached, AnalysisRequest.make("attention", record.model, record.text))
        return Redirect(message, _FROM_ATTENTION[record.kind], {"a": source} if source else {},
                        "Open the attention analysis it was computed from" if source
                        else "Analyse the text again")
    if record.kind in _FROM_TRACE:
        base = {k: v for k, v in record.params.items() if k in _TRACE_PARAMS}
        source = _lookup(cached, AnalysisRequest.make("ta_trace", record.model, record.text,
                                                      **base))
        return Redirect(message, "thought_anchors", {"t": source} if source else {},
                        "Open the trace it was computed from" if source
                        else "Open Thought Anchors")
    return Redirect(message, "thought_anchors" if record.kind.startswith("ta_") else "overview",
                    {}, "Open a view that can")


def _lookup(cached, request: AnalysisRequest) -> str | None:
    try:
        return cached(request)
    except AtlasError:  # its model is no longer available: offer a fresh start instead
        return None
