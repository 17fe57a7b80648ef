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


def compute(ctx, request: AnalysisRequest, aid: str, rollouts):
    """(AnalysisRecord, {name: array}) of the request's kind: its result, as it is stored.
    `rollouts`: where resumable kinds read and append saved rollouts (`load_rollouts(pool)`,
    `save_rollouts(pool, rows)`): the Store itself, or a job's rollout log on another process
    (backend.serving.rollout_log)."""
    kind = kind_of(request)
    task = Task(request, parse(kind.name, kind.params, request.params), aid,
                rollouts if kind.resumable else None)
    result = kind.compute(ctx, task)
    return result.record, result.arrays()


def load(store, aid: str) -> Result:
    """A stored analysis as its kind's typed result (an imported or unknown kind: by name)."""
    kind = KINDS.get(store.load(aid).kind)
    return (kind.result if kind else NamedArrays).load(store, aid)


def rollout_pools(request: AnalysisRequest, fingerprint: str) -> list[str]:
    """The rollout pools a request's compute reads (none unless its kind is resumable)."""
    pool = kind_of(request).rollout_pool
    return [pool(request, fingerprint)] if pool else []


def validate(request: AnalysisRequest) -> None:
    """InputError for an unknown kind, a bad text or a bad parameter, before any job."""
    kind = kind_of(request)
    request.validate()
    parse(kind.name, kind.params, request.params)


__all__ = ["CODE_VERSION", "KINDS", "MAX_TEXT_CHARS", "AnalysisRequest", "Kind", "Result",
           "Task", "analysis_id", "compute", "load", "rollout_pools", "validate"]
