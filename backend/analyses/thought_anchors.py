"""Thought Anchors analyses of a reasoning trace: its sentences, receiver heads, attention
suppression and counterfactual resampling (spec: thought_anchors.md).

A trace request's text is the model's reasoning (the `solution`); its params hold the problem,
the reference answer and the method's settings. The model reads the reference prompt followed by
the trace, so the white-box passes see what the resampling continues from.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from backend.analyses.kind import Kind, Result, Task
from backend.analyses.params import param
from backend.analyses.request import AnalysisRequest, analysis_id
from backend.errors import InputError
from backend.methods.thought_anchors.answers import answers_match, extract_boxed_answer
from backend.methods.thought_anchors.passes import (receiver_pass, suppression_log_kl,
                                                    suppression_scores)
from backend.methods.thought_anchors.published import (PublishedTrace, step_importance_entries,
                                                       step_importance_matrix)
from backend.methods.thought_anchors.receivers import (PROXIMITY_IGNORE, TOP_K, head_kurtosis,
                                                       receiver_heads, receiver_scores,
                                                       vertical_scores)
from backend.methods.thought_anchors.resampling import (Rollout, chunk_metrics,
                                                        counterfactual_matrix, rollout_prompt)
from backend.methods.thought_anchors.sampling import stop_token_ids
from backend.methods.thought_anchors.suppression import TEMPERATURE as SUPPRESSION_TEMPERATURE
from backend.methods.thought_anchors.segmentation import (chunk_spans, clean_resampling_prefix,
                                                          resampling_prefix, split_into_chunks,
                                                          token_spans)
from backend.methods.thought_anchors.tags import heuristic_tag
from backend.rollouts.base import (TEMPERATURE, TOP_P, AnswerStop, Continuation, Prompt,
                                   SamplingParams)
from backend.rollouts.registry import CPU_ROLLOUTS, EMBEDDED, RATES, make_engine
from backend.store import AnalysisRecord

MIN_CHUNKS = 2
WORKED_EXAMPLE = "Worked example"  # the view's source for REASONING_EXAMPLE (a link value)
# The worked problem: the model chosen in the app writes its own trace for it.
REASONING_EXAMPLE = {
    "problem": "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?",
    "answer": "9",
}
MAX_GENERATED_TOKENS = 131_072  # a sanity bound: the server caps rollouts lower
MAX_ROLLOUTS = 1000
SEEDS = 2 ** 31 - 1
FORCED_TOKENS = 12  # the forced answer follows "\\boxed{" at once


@dataclass(frozen=True)
class ReceiversResult(Result):
    """sentence_attention (layer, head, sentence, sentence) float16; vertical (layer, head,
    sentence); kurtosis (layer, head); receiver_heads (k, 2) (layer, head) pairs;
    receiver_scores (sentence,)."""

    sentence_attention: np.ndarray
    vertical: np.ndarray
    kurtosis: np.ndarray
    receiver_heads: np.ndarray
    receiver_scores: np.ndarray


@dataclass(frozen=True)
class SuppressionResult(Result):
    """(source, target) sentence matrices: mean log-KL, and row-centred as published."""

    suppression: np.ndarray
    suppression_normalized: np.ndarray


@dataclass(frozen=True)
class ResamplingResult(Result):
    """Per sentence (sentence,) float64, NaN for those not resampled: the metrics of the spec;
    counterfactual (sentence, sentence) M[i, j]."""

    accuracy: np.ndarray
    resampling_importance_accuracy: np.ndarray
    resampling_importance_kl: np.ndarray
    counterfactual_importance_accuracy: np.ndarray
    counterfactual_importance_kl: np.ndarray
    forced_importance_accuracy: np.ndarray
    forced_importance_kl: np.ndarray
    different_trajectories_fraction: np.ndarray
    overdeterminedness: np.ndarray
    counterfactual: np.ndarray


METRICS = tuple(f.name for f in dataclasses.fields(ResamplingResult)
                if f.name not in ("record", "counterfactual"))


@dataclass(frozen=True)
class TraceParams:
    """problem: what the trace solves; answer: its reference answer ("": the trace's own
    \\boxed{} answer)."""

    problem: str = param("")
    answer: str = param("")


@dataclass(frozen=True)
class GenerationParams:
    """How a trace or a rollout is sampled (the reference runs' temperature and top-p), on
    which rollout engine (a name the registry knows: unknown names are refused there)."""

    temperature: float = param(TEMPERATURE, low=0.01, high=2.0)  # 0 would divide by zero
    top_p: float = param(TOP_P, low=0.01, high=1.0)
    max_new_tokens: int = param(384, low=1, high=MAX_GENERATED_TOKENS)
    seed: int = param(0, low=0, high=SEEDS)
    engine: str = param(EMBEDDED)


@dataclass(frozen=True)
class ReceiverParams(TraceParams):
    """proximity_ignore: sentence pairs closer than this are left out of vertical scores
    (shrunk for short traces, see compute_receivers); top_k: receiver heads kept."""

    proximity_ignore: int = param(PROXIMITY_IGNORE, low=1, high=1000)
    top_k: int = param(TOP_K, low=1, high=10_000)


@dataclass(frozen=True)
class SuppressionParams(TraceParams):
    """temperature: of the softmax the suppressed and base distributions are compared at."""

    temperature: float = param(SUPPRESSION_TEMPERATURE, low=0.01, high=2.0)


@dataclass(frozen=True)
class ResamplingParams(GenerationParams, TraceParams):
    """rollouts per sentence; chunks: the sentences to resample (None: all); forced: also
    sample short answers forced right after each prefix; prefix: "faithful" (the sentences
    before, as the reference cuts them) or "clean" (the trace's own text up to the sentence)."""

    max_new_tokens: int = param(256, low=1, high=MAX_GENERATED_TOKENS)
    rollouts: int = param(CPU_ROLLOUTS, low=1, high=MAX_ROLLOUTS)
    chunks: tuple[int, ...] | None = param(None, low=0, high=10 ** 6)
    forced: bool = param(True)
    prefix: str = param("faithful", choices=("faithful", "clean"))


def trace_chunks(solution: str) -> list[str]:
    chunks = split_into_chunks(solution)
    if len(chunks) < MIN_CHUNKS:
        raise InputError("The trace has fewer than two sentences: nothing to attribute.")
    return chunks


def _model_input(lm, task: Task[TraceParams], max_tokens: int):
    """(input_ids (1, T), token span of each chunk) of prompt + trace as the model reads it."""
    request = task.request
    prompt = rollout_prompt(task.params.problem, "")
    text = prompt + request.text
    encoding = lm.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    if len(encoding["input_ids"]) > max_tokens:
        raise InputError(f"Prompt and trace are {len(encoding['input_ids'])} tokens; the limit "
                         f"is {max_tokens} (ATLAS_MAX_TOKENS).")
    spans = [(a + len(prompt), b + len(prompt)) for a, b in chunk_spans(request.text)]
    return (torch.tensor([encoding["input_ids"]]),
            token_spans(spans, encoding["offset_mapping"]))


def compute_trace(ctx, task: Task[TraceParams]):
    """The trace itself: its sentences, their function tags (heuristic) and the answer."""
    request, params = task.request, task.params
    chunks = trace_chunks(request.text)
    lm = ctx.model(request.model)  # the trace belongs to a model: later passes use it
    meta = {"chunks": chunks, "tags": [heuristic_tag(c) for c in chunks],
            "tags_source": "heuristic", "problem": params.problem,
            "answer": params.answer or extract_boxed_answer(request.text),
            "model_label": lm.source.label}
    return Result(task.record(lm.fingerprint, meta))


def _sampling(params: GenerationParams, lm, seed: int, answer_stop: bool) -> SamplingParams:
    stop = None
    if answer_stop:
        vocab = lm.tokenizer.get_vocab()
        stop = AnswerStop(frozenset(i for t, i in vocab.items() if "boxed" in t),
                          lambda text: extract_boxed_answer(text) is not None,
                          lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True))
    return SamplingParams(params.temperature, params.top_p, params.max_new_tokens,
                          tuple(stop_token_ids(lm.tokenizer, lm.model)), seed,
                          stop_at_repetition=True, answer_stop=stop)


def _rollout_progress(ctx, start: float, end: float, what: str):
    """Job progress from a RolloutMeter: real fractions of rollouts, rates and time left."""
    return lambda meter: ctx.progress(start + (end - start) * meter.done / max(meter.total, 1),
                                      f"{what}: {meter.describe()}", meter.detail())


def compute_generation(ctx, task: Task[GenerationParams]):
    """A base trace for a problem (request.text), sampled from the model; generation stops at
    an end token, at degenerate repetition ("A: A: A: ...") or at max_new_tokens."""
    request, params = task.request, task.params
    lm = ctx.model(request.model)
    prompt = rollout_prompt(request.text, "")
    ids = lm.tokenizer(prompt)["input_ids"]
    ctx.progress(0.35, "Writing a solution")
    engine = make_engine(params.engine, lm, ctx.settings)
    sampling = _sampling(params, lm, params.seed, answer_stop=False)
    [out] = list(engine.run([Prompt("trace", ids, 1, text=prompt)], sampling,
                            _rollout_progress(ctx, 0.35, 0.95, "Writing a solution"),
                            lambda: ctx.cancelled))
    meta = {"solution": out.text, "answer": extract_boxed_answer(out.text),
            "finish_reason": out.finish_reason, "degenerate": out.finish_reason == "repetition"}
    return Result(task.record(lm.fingerprint, meta))


def compute_receivers(ctx, task: Task[ReceiverParams]):
    """Sentence x sentence attention of every head and the receiver heads (spec section 3)."""
    request, params = task.request, task.params
    chunks = trace_chunks(request.text)
    lm = ctx.model(request.model)
    ids, spans = _model_input(lm, task, ctx.settings.max_tokens)
    ctx.progress(0.35, f"One forward pass over {ids.shape[1]} tokens")
    blocks = receiver_pass(lm.model, ids, spans, progress=ctx.span(0.35, 0.9))
    # The spec's proximity_ignore leaves no sentence pairs in a short trace: shrink it so
    # about two thirds of the sentences still have later sentences far enough away.
    proximity = min(params.proximity_ignore, max(1, (len(chunks) - 1) // 3))
    vertical = vertical_scores(blocks, proximity)
    kurtosis = head_kurtosis(vertical)
    top = receiver_heads(kurtosis, top_k=min(params.top_k, kurtosis.size - 1))
    heads = np.array(top, dtype=np.int64).reshape(-1, 2)
    meta = {"n_chunks": len(chunks), "n_tokens": int(ids.shape[1]),
            "proximity_ignore": proximity}
    return ReceiversResult(task.record(lm.fingerprint, meta), blocks.astype(np.float16),
                           vertical, kurtosis, heads,
                           receiver_scores(vertical, [tuple(h) for h in heads]))


def compute_suppression(ctx, task: Task[SuppressionParams]):
    """Mean log-KL on sentence j when sentence i is masked out (spec section 4), stored like
    every sentence matrix here as (source i, target j)."""
    request = task.request
    trace_chunks(request.text)
    lm = ctx.model(request.model)
    ids, spans = _model_input(lm, task, ctx.settings.max_tokens)
    log_kl = suppression_log_kl(lm.model, ids, spans, temperature=task.params.temperature,
                                progress=ctx.span(0.3, 0.95))
    raw, normalized = suppression_scores(log_kl, spans)  # (target, source)
    return SuppressionResult(task.record(lm.fingerprint, {"n_tokens": int(ids.shape[1])}),
                             raw.T, normalized.T)


def _rollout_row(c: Continuation, reference: str | None) -> dict:
    chunk_idx, forced = c.key
    answer = extract_boxed_answer("\\boxed{" + c.text if forced else c.text)
    first = split_into_chunks(c.text) if not forced else []
    return {"chunk_idx": chunk_idx, "forced": forced, "rollout_idx": c.index,
            "continuation": c.text, "chunk_resampled": first[0] if first else "",
            "answer": answer,
            "is_correct": bool(answer and reference and answers_match(answer, reference))}


POOL_PARAMS = ("problem", "answer", "temperature", "top_p", "max_new_tokens", "seed", "prefix")


def rollout_pool(request: AnalysisRequest, fingerprint: str) -> str:
    """Where a resampling request's rollouts are saved: the request without `rollouts`,
    `chunks`, `engine` and `forced`, so a later request for more rollouts or more sentences
    reuses every saved one (and a restarted job resumes)."""
    params = {k: v for k, v in request.params.items() if k in POOL_PARAMS}
    pool = AnalysisRequest.make("ta_rollouts", request.model, request.text, **params)
    return "pool-" + analysis_id(pool, fingerprint)


def resampled_chunks(n_chunks: int, chunks) -> tuple[list[int], list[int]]:
    """(selected sentences, sentences to sample): importance of i compares i with i + 1."""
    selected = sorted(set(range(n_chunks) if chunks is None else map(int, chunks)))
    if not selected or selected[0] < 0 or selected[-1] >= n_chunks:
        raise InputError(f"Sentences to resample must be between 0 and {n_chunks - 1}.")
    return selected, sorted(set(selected) | {i + 1 for i in selected if i + 1 < n_chunks})


def missing_rollouts(rollouts, pool: str, sampled: list[int], n_rollouts: int,
                     forced: bool) -> dict[tuple[int, bool], tuple[int, int]]:
    """{(chunk, forced): (saved, missing)} of the sentences to sample; `rollouts`: the Store or
    a job's rollout log."""
    saved: dict[tuple[int, bool], int] = {}
    for row in rollouts.load_rollouts(pool):
        key = (row["chunk_idx"], row["forced"])
        saved[key] = saved.get(key, 0) + 1
    variants = (False, True) if forced else (False,)
    return {(i, f): (saved.get((i, f), 0), max(0, n_rollouts - saved.get((i, f), 0)))
            for i in sampled for f in variants}


class _Saver:
    """Saves rollouts in batches at most `every_s` apart (one transaction each)."""

    def __init__(self, rollouts, pool: str, every_s: float = 0.5):
        self.rollouts, self.pool, self.every_s = rollouts, pool, every_s
        self.rows: list[dict] = []
        self.last = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.rollouts.save_rollouts(self.pool, self.rows)
        self.rows, self.last = [], time.monotonic()



def compute_resampling(ctx, task: Task[ResamplingParams]):
    """Counterfactual resampling (spec section 2) of the selected sentences (`chunks`, all by
    default) on the chosen rollout engine. Rollouts are saved as they arrive in the request's
    rollout pool (`rollout_pool`): a restarted job, or a later one asking for more, samples
    only what is missing."""
    request, params, store = task.request, task.params, task.store
    chunks = trace_chunks(request.text)
    selected, sampled = resampled_chunks(len(chunks), params.chunks)
    lm = ctx.model(request.model)
    reference = params.answer or extract_boxed_answer(request.text)
    n_rollouts = params.rollouts
    pool = rollout_pool(request, lm.fingerprint)
    todo = missing_rollouts(store, pool, sampled, n_rollouts, params.forced)
    prompts = []
    for (i, forced), (saved, missing) in todo.items():
        if not missing:
            continue
        prefix = (clean_resampling_prefix(request.text, i) if params.prefix == "clean"
                  else resampling_prefix(chunks, i))
        text = rollout_prompt(params.problem, prefix, forced)
        prompts.append(Prompt((i, forced), lm.tokenizer(text)["input_ids"], missing, text, saved,
                              [FORCED_TOKENS] * missing if forced else None))
    engine_name = params.engine
    if prompts:
        ctx.progress(0.3, f"Starting {sum(p.n for p in prompts):,} rollouts on {engine_name}")
        engine = make_engine(engine_name, lm, ctx.settings)
        seed = params.seed * 1_000_003 + sum(s for s, _ in todo.values())
        sampling = _sampling(params, lm, seed, answer_stop=True)
        saver = _Saver(store, pool)
        report = _rollout_progress(ctx, 0.3, 0.9, f"Resampling {len(sampled)} sentences")
        meter = None

        def progress(m):
            nonlocal meter
            meter = m
            report(m)

        try:
            for continuation in engine.run(prompts, sampling, progress, lambda: ctx.cancelled):
                saver.add(_rollout_row(continuation, reference))
        finally:
            saver.flush()
        if meter is not None and meter.rollouts_per_s:
            RATES[engine_name] = meter.rollouts_per_s
    ctx.progress(0.92, "Embedding resampled sentences and computing the metrics")
    saved = [r for r in store.load_rollouts(pool) if r["rollout_idx"] < n_rollouts
             and r["chunk_idx"] in sampled]
    rollouts = [Rollout(r["chunk_idx"], r["chunk_resampled"], r["answer"], r["is_correct"],
                        r["forced"]) for r in saved]
    rows = chunk_metrics(chunks, rollouts)
    unselected = [i for i in range(len(chunks)) if i not in selected]
    arrays = {name: np.array([row[name] for row in rows], dtype=np.float64) for name in METRICS}
    for values in arrays.values():
        values[unselected] = np.nan
    arrays["counterfactual"] = counterfactual_matrix_of(chunks, saved)
    arrays["counterfactual"][unselected] = np.nan
    meta = {"n_chunks": len(chunks), "rollouts": n_rollouts, "reference_answer": reference,
            "chunks": selected, "engine": engine_name, "rollout_pool": pool,
            "rollouts_per_s": RATES.get(engine_name)}
    return ResamplingResult(task.record(lm.fingerprint, meta), **arrays)


TRACE = Kind("ta_trace", TraceParams, compute_trace, Result)
GENERATION = Kind("ta_generate", GenerationParams, compute_generation, Result)
RECEIVERS = Kind("ta_receivers", ReceiverParams, compute_receivers, ReceiversResult)
SUPPRESSION = Kind("ta_suppression", SuppressionParams, compute_suppression, SuppressionResult)
RESAMPLING = Kind("ta_resampling", ResamplingParams, compute_resampling, ResamplingResult,
                  rollout_pool=rollout_pool)


def counterfactual_matrix_of(chunks: list[str], saved: list[dict]) -> np.ndarray:
    """M[i, j] of the spec from the saved full rollouts' sentences (embedded once each)."""
    from backend.methods.thought_anchors.embedding import SentenceEmbedder

    per_chunk = [[split_into_chunks(r["continuation"]) for r in saved
                  if r["chunk_idx"] == i and not r["forced"]] for i in range(len(chunks))]
    unique = sorted({s for group in per_chunk for sentences in group for s in sentences})
    vectors = SentenceEmbedder().embed(list(chunks) + unique)
    row = {s: vectors[len(chunks) + k] for k, s in enumerate(unique)}
    empty = np.zeros((0, vectors.shape[1]))
    return counterfactual_matrix(
        vectors[:len(chunks)],
        [[np.stack([row[s] for s in sentences]) if sentences else empty
          for sentences in group] for group in per_chunk])


PUBLISHED_FILES = ("problem.json", "base_solution.json", "chunks_labeled.json",
                   "chunks_resampled.json", "step_importance.json", "step_importance_supp.json",
                   "summary.json")


def published_analysis(trace, label: str, content_id: str):
    """(AnalysisRecord, arrays) of an imported published trace, in the shape of our own:
    metrics per chunk, the counterfactual matrix (step_importance) and the suppression matrix
    (step_importance_supp) with sources as rows, as published."""
    chunks = trace.chunks
    if len(chunks) < MIN_CHUNKS:
        raise InputError("The imported files hold no chunks (chunks_labeled.json is needed).")
    labeled = trace.chunks_labeled
    arrays = {name: np.array([float(c.get(name) or 0.0) for c in labeled]) for name in METRICS}
    for stem, name in (("step_importance", "counterfactual"),
                       ("step_importance_supp", "suppression_normalized")):
        if stem in trace.step_importance:
            arrays[name] = step_importance_matrix(trace.step_importance[stem], len(chunks))
    problem = (trace.problem or {}).get("problem", "")
    base = trace.base_solution or {}
    meta = {"chunks": chunks, "problem": problem,
            "tags": [(c.get("function_tags") or ["unknown"])[0] for c in labeled],
            "tags_source": "published", "answer": base.get("answer")
            or (trace.problem or {}).get("gt_answer"),
            "reference_answer": (trace.problem or {}).get("gt_answer"),
            "resampled": {str(k): v for k, v in (trace.chunks_resampled or {}).items()},
            "summaries": [c.get("summary", "") for c in labeled], "model_label": label}
    record = AnalysisRecord(content_id, "ta_published", label, "published",
                            base.get("solution") or " ".join(chunks), {"problem": problem}, meta)
    return record, arrays


def as_published_trace(record: AnalysisRecord, scores: dict[str, np.ndarray],
                       counterfactual: np.ndarray | None, suppression: np.ndarray | None,
                       resampled: dict[int, list[str]]) -> PublishedTrace:
    """A trace and its results in the published file format (so other tools can read ours).
    Matrices are (source, target); only the metrics we have are written."""
    meta, chunks = record.meta, record.meta["chunks"]
    labeled = [{"chunk": c, "chunk_idx": i, "function_tags": [meta["tags"][i]], "depends_on": [],
                **{name: float(values[i]) for name, values in scores.items() if name in METRICS}}
               for i, c in enumerate(chunks)]
    steps = {stem: step_importance_entries(m, chunks) for stem, m in
             (("step_importance", counterfactual), ("step_importance_supp", suppression))
             if m is not None}
    return PublishedTrace(
        problem={"problem": meta["problem"], "gt_answer": meta.get("answer")},
        base_solution={"prompt": rollout_prompt(meta["problem"], ""), "solution": record.text,
                       "answer": meta.get("answer")},
        chunks_labeled=labeled, chunks_resampled=resampled or None, step_importance=steps)
