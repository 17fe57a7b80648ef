"""The analyses each view needs for a view state, besides the ones its ids name: the one
`requests(state, service)` function per view that its page, a lesson step and the precompute
command all call. Streamlit-free, so lesson files (pages.lesson_files) and the precompute
command can import it.

A view's requests come in order and may depend on earlier results: whoever asks computes each
request it is given (or finds it cached) before taking the next. The precompute command waits
for each; a page reads each result where it draws it (pages.shared.Results), for states whose
requests need no result still computing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from backend.analyses import AnalysisRequest
from backend.analyses.heads import METHODS
from backend.analyses.long_context import link_request
from backend.analyses.rollout import AUTO_FLOW_TOKENS, FLOW_MAX_TOKENS
from backend.analyses.thought_anchors import REASONING_EXAMPLE, WORKED_EXAMPLE
from pages.view_state import PUBLISHED_SOURCE, RESAMPLE_WHICH

Requests = Iterator[AnalysisRequest]


def attention_only(state, service) -> Requests:
    """Views that draw the attention analysis alone (Overview, Explore, Head grid, bertviz)."""
    return iter(())


def target_token(target: str | None, labels: list[str], causal: bool) -> int:
    """Rollout's target token from its widget's spelling ("5 cat"), else the view's default:
    the last token of a causal model (what it predicts from), the first of an encoder (CLS)."""
    spelled = {f"{i} {label}": i for i, label in enumerate(labels)}
    return spelled.get(target or "", len(labels) - 1 if causal else 0)


def rollout(state, service) -> Requests:
    """Attention flow (started by itself for short texts, else when asked: `state.flow`) and
    gradient-weighted rollout for the target token (up to the server's full-matrix limit)."""
    record = service.analysis(state.a)
    labels = record.meta["tokens"]
    if len(labels) <= AUTO_FLOW_TOKENS or (state.flow and len(labels) <= FLOW_MAX_TOKENS):
        yield AnalysisRequest.make("attention_flow", record.model, record.text,
                                   head_fusion=state.fusion)
    if len(labels) <= service.settings.full_matrix_max_tokens:
        yield AnalysisRequest.make("gradient_rollout", record.model, record.text,
                                   target=target_token(state.target, labels,
                                                       record.meta["causal"]))


def head_importance(state, service) -> Requests:
    """The grid's importance score (when it is one: roles come with head_roles), the head
    roles, and the pruning curve."""
    record = service.analysis(state.a)
    if state.hi_score in METHODS:
        yield AnalysisRequest.make("head_importance", record.model, record.text,
                                   method=state.hi_score)
    yield AnalysisRequest.make("head_roles", record.model, record.text)
    yield AnalysisRequest.make("pruning_curve", record.model, record.text,
                               method=state.hi_prune, recompute=state.hi_recompute)


def compare(state, service) -> Requests:
    """Gradient head importance of both sides, when the comparison asks for it."""
    if state.cmp_importance:
        for aid in (state.a, state.b):
            record = service.analysis(aid)
            yield AnalysisRequest.make("head_importance", record.model, record.text,
                                       method="gradient")


def trace(model: str, problem: str, answer: str, solution: str, service) -> Requests:
    """A trace to analyse: the model writes a solution first when none is given (its text
    comes from that result), which is then split into sentences."""
    if not solution:
        generation = AnalysisRequest.make("ta_generate", model, problem)
        yield generation
        solution = service.analysis(service.cached(generation)).meta["solution"]
    yield AnalysisRequest.make("ta_trace", model, solution, problem=problem, answer=answer)


def resampling(record, engine: dict, rollouts: int, max_new_tokens: int,
               chunks: list[int] | None = None) -> AnalysisRequest:
    """Counterfactual resampling of the trace `record` (every sentence, or `chunks`) on
    `engine` (one of service.rollout_engines()), at the paper's temperature and top-p (the
    kind's defaults)."""
    selection = {} if chunks is None else {"chunks": chunks}
    return AnalysisRequest.make("ta_resampling", record.model, record.text,
                                engine=engine["name"], rollouts=rollouts,
                                max_new_tokens=max_new_tokens, **selection,
                                **dict(record.params))


def thought_anchors(state, service, model: str | None = None) -> Requests:
    """The trace's white-box passes and the resampling the state asks for (of every sentence,
    or of those it chose; the flagged ones are picked on the page). Without a trace
    (`state.t` None) the view's source gives one: the published example (imported, not a job)
    or, for the worked example, the trace `model` writes."""
    if state.t is None and state.ta_source == PUBLISHED_SOURCE:
        state = replace(state, t=service.published_example())
    elif state.t is None and state.ta_source == WORKED_EXAMPLE and model:
        for request in trace(model, REASONING_EXAMPLE["problem"], REASONING_EXAMPLE["answer"],
                             "", service):
            yield request  # the generation, then the split: each computed before the next
        state = replace(state, t=service.cached(request))
    if state.t is None:
        return
    record = service.analysis(state.t)
    if record.kind == "ta_published":  # the authors' own results come with it
        return
    base = dict(record.params)
    yield AnalysisRequest.make("ta_receivers", record.model, record.text, **base)
    if state.ta_supp:
        yield AnalysisRequest.make("ta_suppression", record.model, record.text, **base)
    n = len(record.meta["chunks"])  # a link's sentences past the trace's end are dropped
    chosen = state.ta_which == RESAMPLE_WHICH[3] and [i for i in state.ta_chunks or () if i < n]
    if state.ta_resample and (state.ta_which == RESAMPLE_WHICH[0] or chosen):
        engines = {engine["name"]: engine for engine in service.rollout_engines()}
        engine = engines.get(state.ta_engine, next(iter(engines.values())))
        yield resampling(record, engine, state.ta_r or engine["default_rollouts"],
                         state.ta_tokens or engine["default_max_new_tokens"],
                         chosen or None)


def long_context_heads(state, service) -> Requests:
    """The probe of the analysis' model with the link's settings, unless the link names one."""
    if state.lc is None:
        record = service.analysis(state.a)
        yield link_request(record.model, {"lc_lengths": state.lc_lengths or "",
                                          "lc_depths": state.lc_depths or "",
                                          "lc_passkey": state.lc_passkey or ""},
                           service.device_name())


REQUESTS = {"overview": attention_only, "explore": attention_only, "head_grid": attention_only,
            "bertviz_views": attention_only,
            "rollout": rollout, "head_importance": head_importance, "compare": compare,
            "thought_anchors": thought_anchors, "long_context_heads": long_context_heads}
