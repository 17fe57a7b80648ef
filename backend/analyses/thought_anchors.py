"""Thought Anchors analyses of a reasoning trace: its sentences, receiver heads, attention
suppression and counterfactual resampling (spec: thought_anchors.md).

A trace request's text is the model's reasoning (the `solution`); its params hold the problem,
the reference answer and the method's settings. The model reads the reference prompt followed by
the trace, so the white-box passes see what the resampling continues from.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from backend.analyses.request import AnalysisRequest
from backend.errors import InputError
from backend.methods.thought_anchors.answers import answers_match, extract_boxed_answer
from backend.methods.thought_anchors.passes import (receiver_pass, suppression_log_kl,
                                                    suppression_scores)
from backend.methods.thought_anchors.published import (PublishedTrace, step_importance_entries,
                                                       step_importance_matrix)
from backend.methods.thought_anchors.receivers import (head_kurtosis, receiver_heads,
                                                       receiver_scores, vertical_scores)
from backend.methods.thought_anchors.resampling import (Rollout, chunk_metrics,
                                                        counterfactual_matrix, rollout_prompt)
from backend.methods.thought_anchors.sampling import sample_continuations
from backend.methods.thought_anchors.segmentation import (chunk_spans, clean_resampling_prefix,
                                                          resampling_prefix, split_into_chunks,
                                                          token_spans)
from backend.methods.thought_anchors.tags import heuristic_tag
from backend.store import AnalysisRecord

MIN_CHUNKS = 2
# The Thought Anchors view's defaults, shared with the lessons that prepare it.
WORKED_EXAMPLE = "Worked example"  # the view's source for REASONING_EXAMPLE (a link value)
RESAMPLING_ROLLOUTS = 4  # rollouts per sentence the view offers first
RESAMPLING_TOKENS = 160  # longest continuation a rollout writes in the view
METRICS = ("accuracy", "resampling_importance_accuracy", "resampling_importance_kl",
           "counterfactual_importance_accuracy", "counterfactual_importance_kl",
           "forced_importance_accuracy", "forced_importance_kl",
           "different_trajectories_fraction", "overdeterminedness")


def trace_chunks(solution: str) -> list[str]:
    chunks = split_into_chunks(solution)
    if len(chunks) < MIN_CHUNKS:
        raise InputError("The trace has fewer than two sentences: nothing to attribute.")
    return chunks


def _record(request: AnalysisRequest, aid: str, fingerprint: str, meta: dict) -> AnalysisRecord:
    return AnalysisRecord(aid, request.kind, request.model, fingerprint, request.text,
                          dict(request.params), meta)


def _model_input(lm, request: AnalysisRequest, max_tokens: int):
    """(input_ids (1, T), token span of each chunk) of prompt + trace as the model reads it."""
    params = dict(request.params)
    prompt = rollout_prompt(params.get("problem", ""), "")
    text = prompt + request.text
    encoding = lm.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    if len(encoding["input_ids"]) > max_tokens:
        raise InputError(f"Prompt and trace are {len(encoding['input_ids'])} tokens; the limit "
                         f"is {max_tokens} (ATLAS_MAX_TOKENS).")
    spans = [(a + len(prompt), b + len(prompt)) for a, b in chunk_spans(request.text)]
    return (torch.tensor([encoding["input_ids"]]),
            token_spans(spans, encoding["offset_mapping"]))


def compute_trace(ctx, request: AnalysisRequest, aid: str):
    """The trace itself: its sentences, their function tags (heuristic) and the answer."""
    chunks = trace_chunks(request.text)
    params = dict(request.params)
    lm = ctx.model(request.model)  # the trace belongs to a model: later passes use it
    meta = {"chunks": chunks, "tags": [heuristic_tag(c) for c in chunks],
            "tags_source": "heuristic", "problem": params.get("problem", ""),
            "answer": params.get("answer") or extract_boxed_answer(request.text),
            "model_label": lm.source.label}
    return _record(request, aid, lm.fingerprint, meta), {}


def compute_generation(ctx, request: AnalysisRequest, aid: str):
    """A base trace for a problem (request.text), sampled from the model."""
    params = dict(request.params)
    lm = ctx.model(request.model)
    prompt = rollout_prompt(request.text, "")
    ids = lm.tokenizer(prompt)["input_ids"]
    ctx.progress(0.35, "Writing a solution")
    [solution] = sample_continuations(
        lm.model, lm.tokenizer, ids, 1, temperature=params.get("temperature", 0.6),
        top_p=0.95, max_new_tokens=params.get("max_new_tokens", 384),
        seed=params.get("seed", 0), progress=ctx.span(0.35, 0.95))
    meta = {"solution": solution, "answer": extract_boxed_answer(solution)}
    return _record(request, aid, lm.fingerprint, meta), {}


def compute_receivers(ctx, request: AnalysisRequest, aid: str):
    """Sentence x sentence attention of every head and the receiver heads (spec section 3)."""
    params = dict(request.params)
    chunks = trace_chunks(request.text)
    lm = ctx.model(request.model)
    ids, spans = _model_input(lm, request, ctx.settings.max_tokens)
    ctx.progress(0.35, f"One forward pass over {ids.shape[1]} tokens")
    blocks = receiver_pass(lm.model, ids, spans, progress=ctx.span(0.35, 0.9))
    # The spec's proximity_ignore (4) leaves no sentence pairs in a short trace: shrink it so
    # about two thirds of the sentences still have later sentences far enough away.
    proximity = min(params.get("proximity_ignore", 4), max(1, (len(chunks) - 1) // 3))
    vertical = vertical_scores(blocks, proximity)
    kurtosis = head_kurtosis(vertical)
    top = receiver_heads(kurtosis, top_k=min(params.get("top_k", 20), kurtosis.size - 1))
    heads = np.array(top, dtype=np.int64).reshape(-1, 2)
    meta = {"n_chunks": len(chunks), "n_tokens": int(ids.shape[1]),
            "proximity_ignore": proximity}
    return _record(request, aid, lm.fingerprint, meta), {
        "sentence_attention": blocks.astype(np.float16), "vertical": vertical,
        "kurtosis": kurtosis, "receiver_heads": heads,
        "receiver_scores": receiver_scores(vertical, [tuple(h) for h in heads])}


def compute_suppression(ctx, request: AnalysisRequest, aid: str):
    """Mean log-KL on sentence j when sentence i is masked out (spec section 4), stored like
    every sentence matrix here as (source i, target j)."""
    params = dict(request.params)
    trace_chunks(request.text)
    lm = ctx.model(request.model)
    ids, spans = _model_input(lm, request, ctx.settings.max_tokens)
    log_kl = suppression_log_kl(lm.model, ids, spans, temperature=params.get("temperature", 0.6),
                                progress=ctx.span(0.3, 0.95))
    raw, normalized = suppression_scores(log_kl, spans)  # (target, source)
    return _record(request, aid, lm.fingerprint, {"n_tokens": int(ids.shape[1])}), {
        "suppression": raw.T, "suppression_normalized": normalized.T}


def _rollout_rows(continuations: list[str], forced: bool, start: int, chunk_idx: int,
                  reference: str | None) -> list[dict]:
    rows = []
    for k, text in enumerate(continuations):
        answer = extract_boxed_answer("\\boxed{" + text if forced else text)
        first = split_into_chunks(text) if not forced else []
        rows.append({"chunk_idx": chunk_idx, "forced": forced, "rollout_idx": start + k,
                     "continuation": text, "chunk_resampled": first[0] if first else "",
                     "answer": answer,
                     "is_correct": bool(answer and reference and answers_match(answer,
                                                                                reference))})
    return rows


def compute_resampling(ctx, request: AnalysisRequest, aid: str, store):
    """Counterfactual resampling (spec section 2). Rollouts are saved to the store as each
    chunk's batch finishes, and a restarted job only samples what is missing."""
    params = dict(request.params)
    chunks = trace_chunks(request.text)
    lm = ctx.model(request.model)
    reference = params.get("answer") or extract_boxed_answer(request.text)
    n_rollouts, forced_tokens = int(params.get("rollouts", 4)), 12
    done = {}
    for row in store.load_rollouts(aid):
        key = (row["chunk_idx"], row["forced"])
        done[key] = done.get(key, 0) + 1
    started, sampled = time.monotonic(), 0
    for i in range(len(chunks)):
        prefix = (clean_resampling_prefix(request.text, i) if params.get("prefix") == "clean"
                  else resampling_prefix(chunks, i))
        for forced in (False, True):
            missing = n_rollouts - done.get((i, forced), 0)
            if missing <= 0:
                continue
            rate = f", {sampled / (time.monotonic() - started):.2f} rollouts/s" if sampled else ""
            ctx.progress(0.3 + 0.6 * i / len(chunks),
                         f"Chunk {i + 1}/{len(chunks)}: {missing} {'forced ' if forced else ''}"
                         f"rollouts{rate}")
            ids = lm.tokenizer(rollout_prompt(params.get("problem", ""), prefix, forced))[
                "input_ids"]
            texts = sample_continuations(
                lm.model, lm.tokenizer, ids, missing, temperature=params.get("temperature", 0.6),
                top_p=params.get("top_p", 0.95),
                max_new_tokens=forced_tokens if forced else params.get("max_new_tokens", 256),
                seed=params.get("seed", 0) * 1_000_003 + 2 * i + forced + 7919 * (n_rollouts -
                                                                                   missing))
            store.save_rollouts(aid, _rollout_rows(texts, forced, n_rollouts - missing, i,
                                                   reference))
            sampled += missing
    ctx.progress(0.92, "Embedding resampled sentences and computing the metrics")
    saved = store.load_rollouts(aid)
    rollouts = [Rollout(r["chunk_idx"], r["chunk_resampled"], r["answer"], r["is_correct"],
                        r["forced"]) for r in saved]
    rows = chunk_metrics(chunks, rollouts)
    arrays = {name: np.array([row[name] for row in rows], dtype=np.float64) for name in METRICS}
    arrays["counterfactual"] = counterfactual_matrix_of(chunks, saved)
    meta = {"n_chunks": len(chunks), "rollouts": n_rollouts, "reference_answer": reference}
    return _record(request, aid, lm.fingerprint, meta), arrays


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
