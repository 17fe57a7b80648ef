"""Each kind of analysis: its request, its cache key and the computation behind it.

A computation takes (job context, request, analysis id) and returns the AnalysisRecord and the
named arrays to store.
"""

from backend.analyses import attention, heads, long_context, rollout, thought_anchors
from backend.analyses.params import check_params
from backend.analyses.request import CODE_VERSION, AnalysisRequest, analysis_id
from backend.errors import InputError
from backend.inputs import MAX_TEXT_CHARS

ANALYSES = {
    "attention": attention.compute_attention,
    "attention_flow": rollout.compute_flow,
    "gradient_rollout": rollout.compute_gradient_rollout,
    "head_importance": heads.compute_head_importance,
    "head_roles": heads.compute_head_roles,
    "long_context_heads": long_context.compute_long_context_heads,
    "pruning_curve": heads.compute_pruning_curve,
    "ta_trace": thought_anchors.compute_trace,
    "ta_generate": thought_anchors.compute_generation,
    "ta_receivers": thought_anchors.compute_receivers,
    "ta_suppression": thought_anchors.compute_suppression,
    "ta_resampling": thought_anchors.compute_resampling,
}
# Kinds that save partial results as they go (and so resume): they also get the rollout log,
# and name the rollout pool they read and extend: pool(request, model fingerprint).
RESUMABLE = {"ta_resampling": thought_anchors.rollout_pool}


def compute(ctx, request: AnalysisRequest, aid: str, rollouts):
    """(AnalysisRecord, {name: array}) of the request's kind. `rollouts`: where resumable kinds
    read and append saved rollouts (`load_rollouts(pool)`, `save_rollouts(pool, rows)`): the
    Store itself, or a job's rollout log on another process (backend.serving.rollout_log)."""
    if request.kind in RESUMABLE:
        return ANALYSES[request.kind](ctx, request, aid, rollouts)
    return ANALYSES[request.kind](ctx, request, aid)


def rollout_pools(request: AnalysisRequest, fingerprint: str) -> list[str]:
    """The rollout pools a request's compute reads (none unless its kind is resumable)."""
    pool = RESUMABLE.get(request.kind)
    return [pool(request, fingerprint)] if pool else []


def validate(request: AnalysisRequest) -> None:
    """InputError for an unknown kind, a bad text or a bad parameter, before any job."""
    if request.kind not in ANALYSES:
        raise InputError(f"Unknown analysis kind '{request.kind}'.")
    request.validate()
    check_params(request.kind, request.params)


__all__ = ["ANALYSES", "CODE_VERSION", "MAX_TEXT_CHARS", "AnalysisRequest", "analysis_id",
           "compute", "rollout_pools", "validate"]
