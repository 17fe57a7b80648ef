"""Each kind of analysis: its request, its cache key and the computation behind it.

A computation takes (job context, request, analysis id) and returns the AnalysisRecord and the
named arrays to store.
"""

from backend.analyses import attention, rollout
from backend.analyses.request import (CODE_VERSION, MAX_TEXT_CHARS, AnalysisRequest,
                                      analysis_id)
from backend.errors import InputError

ANALYSES = {
    "attention": attention.compute_attention,
    "attention_flow": rollout.compute_flow,
    "gradient_rollout": rollout.compute_gradient_rollout,
}


def compute(ctx, request: AnalysisRequest, aid: str):
    """(AnalysisRecord, {name: array}) of the request's kind."""
    return ANALYSES[request.kind](ctx, request, aid)


def validate(request: AnalysisRequest) -> None:
    if request.kind not in ANALYSES:
        raise InputError(f"Unknown analysis kind '{request.kind}'.")
    request.validate()


__all__ = ["ANALYSES", "CODE_VERSION", "MAX_TEXT_CHARS", "AnalysisRequest", "analysis_id",
           "compute", "validate"]
