"""The analysis kinds: one registry of self-describing kinds (backend.analyses.kind), their
requests and cache keys, and the one dispatcher that runs them."""

from backend.analyses import attention, heads, long_context, rollout, thought_anchors
from backend.analyses.kind import Kind, NamedArrays, Result, Task
from backend.analyses.params import parse
from backend.analyses.request import CODE_VERSION, AnalysisRequest, analysis_id
from backend.errors import InputError
from backend.inputs import MAX_TEXT_CHARS

KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    attention.ATTENTION, rollout.ATTENTION_FLOW, rollout.GRADIENT_ROLLOUT,
    heads.HEAD_IMPORTANCE, heads.HEAD_ROLES, heads.PRUNING_CURVE,
    long_context.LONG_CONTEXT_HEADS, thought_anchors.TRACE, thought_anchors.GENERATION,
    thought_anchors.RECEIVERS, thought_anchors.SUPPRESSION, thought_anchors.RESAMPLING)}


def kind_of(request: AnalysisRequest) -> Kind:
    if request.kind not in KINDS:
        raise InputError(f"Unknown analysis kind '{request.kind}'; known: "
                         f"{', '.join(sorted(KINDS))}.")
    return KINDS[request.kind]


def compute(ctx, request: AnalysisRequest, aid: str, store):
    """(AnalysisRecord, {name: array}) of the request's kind: its result, as it is stored."""
    kind = kind_of(request)
    task = Task(request, parse(kind.name, kind.params, request.params), aid,
                store if kind.resumable else None)
    result = kind.compute(ctx, task)
    return result.record, result.arrays()


def load(store, aid: str) -> Result:
    """A stored analysis as its kind's typed result (an imported or unknown kind: by name)."""
    kind = KINDS.get(store.load(aid).kind)
    return (kind.result if kind else NamedArrays).load(store, aid)


def validate(request: AnalysisRequest) -> None:
    """InputError for an unknown kind, a bad text or a bad parameter, before any job."""
    kind = kind_of(request)
    request.validate()
    parse(kind.name, kind.params, request.params)


__all__ = ["CODE_VERSION", "KINDS", "MAX_TEXT_CHARS", "AnalysisRequest", "Kind", "Result",
           "Task", "analysis_id", "compute", "load", "validate"]
