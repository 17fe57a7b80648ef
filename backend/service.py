"""The one door pages use: cache first, else a job for the worker; slices and aggregates out.

Pages never see torch or SQL. Results are addressed by analysis id (what links carry); large
tensors stay here and leave only as the slice or aggregate a view shows. Besides the service,
pages import from here what its calls take and give (records, tickets, job statuses, its
errors), the packaged models a user may pick, and what to do with a damaged cache file.
"""

from __future__ import annotations

from collections import Counter
import dataclasses
import hashlib
import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backend import analyses
from backend.analyses import AnalysisRequest, analysis_id
from backend.attention_maps import open_maps, regroup
from backend.analyses.thought_anchors import (PUBLISHED_FILES, as_published_trace,
                                             missing_rollouts, published_analysis,
                                             resampled_chunks, rollout_pool)
from backend.comparison import Comparisons
from backend.config import Settings
from backend.cache_recovery import move_aside
from backend.errors import (AtlasError, CacheFileError, CorruptCacheError, InputError,
                            JobInterrupted, WorkerUnavailable)
from backend.inputs import check_strings, check_text, check_upload
from backend.memory import BoundedCache
from backend.methods.binning import BinnedMatrix, bin_edges
from backend.methods.exact import check_window
from backend.methods.rollout import (attention_rollout, exclude_first_token, fuse_heads,
                                     target_rollout_rows)
from backend.methods.thought_anchors.answers import answers_match, extract_boxed_answer
from backend.methods.thought_anchors.published import (read_published_trace,
                                                       write_published_trace)
from backend.models import DEFAULT_CAUSAL, PACKAGED, resolve_source, source_fingerprint
from backend.models.loading import pick_device
from backend.rollouts.registry import EMBEDDED, engine_infos
from backend.store import AnalysisRecord, Store
from backend.worker import JobContext, JobStatus, Worker


__all__ = ["DEFAULT_CAUSAL", "PACKAGED", "AnalysisRecord", "AtlasError", "AtlasService",
           "CacheFileError", "CorruptCacheError", "InputError", "JobInterrupted", "JobStatus",
           "Ticket", "WorkerUnavailable", "move_aside"]
# The published trace the Thought Anchors page opens on (folder, label): MIT-licensed data of the
# paper's authors, shipped with its licence (see the folder's README).
PUBLISHED_EXAMPLE = (Path(__file__).resolve().parent / "data" / "thought_anchors"
                     / "deepseek-r1-distill-qwen-14b" / "problem_2238",
                     "DeepSeek-R1-Distill-Qwen-14B")


@dataclass(frozen=True)
class Ticket:
    """Either a finished analysis (analysis_id) or a job to poll (job_id)."""

    analysis_id: str | None = None
    job_id: str | None = None


# Where a job's compute runs: (ctx, request, analysis id, store) -> (record, {name: array}).
Executor = Callable[[JobContext, AnalysisRequest, str, Store],
                    tuple[AnalysisRecord, dict[str, np.ndarray]]]


class AtlasService(Comparisons):
    def __init__(self, settings: Settings | None = None, store: Store | None = None,
                 worker: Worker | None = None, executor: Executor | None = None):
        self.settings = settings or Settings.from_env()
        self.store = store or Store(self.settings.database_path,
                                     self.settings.store_memory_bytes)
        self.worker = worker or Worker(self.settings)
        # In this process by default, or on model-worker replicas (backend.serving.ray_serve);
        # either way the result is saved here, by the cache's only writer.
        self.executor: Executor = executor or analyses.compute
        self.memory = BoundedCache(self.settings.memory_budget_bytes)
        self.device = str(pick_device(self.settings))

    def ready(self) -> bool:
        """Whether requests can be served: the cache file answers and the worker runs jobs."""
        self.store.has("")
        return self.worker.alive

    def close(self) -> None:
        """Stop the worker (after its current job) and release the cache file."""
        self.worker.shutdown()
        self.store.close()

    # --- requests -------------------------------------------------------------------------
    def submit(self, request: AnalysisRequest) -> Ticket:
        """Return the cached result at once, or start (or join) the job that computes it.
        The caller's thread (a page's) only checks the request: a hub download or a first
        hash of the weights, which the analysis id needs, happens in the job."""
        analyses.validate(request)
        source = resolve_source(request.model, self.settings)  # refuse bad references now
        # Fingerprints are memoised by file size and mtime, so they are known here after the
        # first time, and changed weights get a new id.
        fingerprint = source_fingerprint(source, read=False)
        aid = fingerprint and analysis_id(request, fingerprint)
        if aid and self.store.has(aid):
            return Ticket(analysis_id=aid)
        # One job per request, fingerprinted or not yet: identical requests join it.
        job_id = self.worker.submit(request.canonical(),
                                    lambda ctx: self._compute(ctx, request, source, aid))
        return Ticket(job_id=job_id)

    def _compute(self, ctx: JobContext, request: AnalysisRequest, source,
                 aid: str | None) -> str:
        if aid is None:
            ctx.progress(0.0, "Reading the model's weights")
            aid = analysis_id(request, source_fingerprint(source))
        if not self.store.has(aid):  # an identical job may have finished while this one queued
            record, arrays = self.executor(ctx, request, aid, self.store)
            ctx.progress(0.85, "Saving to the cache")
            self.store.save(record, arrays)
        return aid

    def job_status(self, job_id: str) -> JobStatus:
        return self.worker.status(job_id)

    def job_result(self, job_id: str, timeout: float | None = None) -> str:
        """The analysis id a finished job produced (raises the job's error)."""
        return self.worker.result(job_id, timeout)

    def cancel(self, job_id: str) -> None:
        self.worker.cancel(job_id)

    def cached(self, request: AnalysisRequest) -> str | None:
        """The analysis id if this request's result is already stored, else None (also while
        its model's weights are not fingerprinted yet: `submit` does that in a job)."""
        analyses.validate(request)
        fingerprint = source_fingerprint(resolve_source(request.model, self.settings),
                                         read=False)
        aid = fingerprint and analysis_id(request, fingerprint)
        return aid if aid and self.store.has(aid) else None

    def run(self, request: AnalysisRequest, timeout: float | None = None) -> str:
        """Submit and wait: the analysis id. For scripts, benchmarks and tests."""
        ticket = self.submit(request)
        return ticket.analysis_id or self.job_result(ticket.job_id, timeout)

    def import_published_trace(self, files: dict[str, bytes], label: str) -> str:
        """Store a published Thought Anchors trace (its JSON files by name) as an analysis; its
        id is the hash of the files, so importing it twice gives one analysis."""
        unknown = set(files) - set(PUBLISHED_FILES)
        if unknown:
            raise InputError(f"Not a published trace file: {', '.join(sorted(unknown))}. "
                             f"Expected some of {', '.join(PUBLISHED_FILES)}.")
        check_upload(files)
        digest = hashlib.sha256()
        with tempfile.TemporaryDirectory() as folder:
            for name in sorted(files):  # only the known names above: no path reaches the disk
                (Path(folder) / name).write_bytes(files[name])
                digest.update(name.encode() + b"\0" + files[name])
            try:
                trace = read_published_trace(folder)
            except InputError as e:  # the server's temporary folder means nothing to the user
                raise InputError(str(e).replace(f" in {folder}", "").replace(
                    folder, "The upload")) from None
        check_strings(dataclasses.asdict(trace), "uploaded trace")
        label = check_text(label, "label", max_chars=1_000, required=False)
        record, arrays = published_analysis(trace, label.strip() or "published trace",
                                            digest.hexdigest()[:24])
        self.store.save(record, arrays)
        return record.id

    def published_zip(self, trace_id: str, resampling_id: str | None,
                      scores: dict[str, np.ndarray], counterfactual: np.ndarray | None,
                      suppression: np.ndarray | None) -> bytes:
        """A trace and its results as a zip of the published JSON files."""
        record = self.analysis(trace_id)
        resampled: dict[int, list[str]] = {}
        if record.kind == "ta_published":
            resampled = {int(k): v for k, v in record.meta.get("resampled", {}).items()}
        elif resampling_id:
            for r in self.store.load_rollouts(resampling_id):
                if not r["forced"]:
                    resampled.setdefault(r["chunk_idx"], []).append(r["chunk_resampled"])
        trace = as_published_trace(record, scores, counterfactual, suppression, resampled)
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(buffer, "w") as archive:
            write_published_trace(trace, folder)
            for path in sorted(Path(folder).iterdir()):
                archive.write(path, path.name)
        return buffer.getvalue()

    def resampled_alternatives(self, trace_id: str, resampling_id: str | None, chunk: int,
                               limit: int = 3) -> list[tuple[str, int]]:
        """The most frequent first sentences that resampling put in place of `chunk`:
        (sentence, count), from a published trace or our own resampling analysis."""
        record = self.analysis(trace_id)
        if record.kind == "ta_published":
            sentences = record.meta.get("resampled", {}).get(str(chunk), [])
        elif resampling_id:
            sentences = [r["chunk_resampled"] for r in self.store.load_rollouts(resampling_id)
                         if r["chunk_idx"] == chunk and not r["forced"] and r["chunk_resampled"]]
        else:
            sentences = []
        return Counter(sentences).most_common(limit)

    def device_name(self) -> str:
        """Where this service runs models ("cpu", "cuda", ...): what machine-scaled defaults
        (the long-context probe's) are chosen for."""
        return self.device

    # --- rollout engines (Thought Anchors resampling) ---------------------------------------
    def rollout_engines(self) -> list[dict]:
        """Engines a user may pick, "embedded" first: name, label, kind, device, the defaults
        (paper's on a GPU or endpoint, small on the CPU: `noisy`) and the last measured
        rollouts/s (None before a run)."""
        return engine_infos(self.settings, self.device)

    def resampling_estimate(self, trace_id: str, engine: str = EMBEDDED,
                            rollouts: int | None = None, chunks=None, **params) -> dict:
        """Cost of a ta_resampling request on a trace before it starts: sentences sampled, and
        of their (full) rollouts: in all, already saved (reused), still to sample, seconds at
        the engine's measured rate (None before any run); `forced_to_sample`: the short
        forced-answer rollouts also to sample. `params`: the request's other parameters."""
        record = self.analysis(trace_id)
        given = {**record.params, **params, **({} if rollouts is None else
                                               {"rollouts": rollouts})}
        request = AnalysisRequest.make("ta_resampling", record.model, record.text, **given)
        rollouts = request.params["rollouts"]
        _, sampled = resampled_chunks(len(record.meta["chunks"]), chunks)
        pool = rollout_pool(request, source_fingerprint(resolve_source(record.model,
                                                                       self.settings)))
        todo = missing_rollouts(self.store, pool, sampled, int(rollouts),
                                request.params["forced"])
        plain = sum(missing for (_, forced), (_, missing) in todo.items() if not forced)
        rate = next((e["rollouts_per_s"] for e in self.rollout_engines() if e["name"] == engine),
                    None)
        total = len(sampled) * int(rollouts)
        return {"sentences": len(sampled), "rollouts_total": total,
                "rollouts_saved": total - plain, "rollouts_to_sample": plain,
                "forced_to_sample": sum(m for (_, f), (_, m) in todo.items() if f),
                "seconds": plain / rate if rate else None}

    # --- results --------------------------------------------------------------------------
    def analysis(self, aid: str) -> AnalysisRecord:
        return self.store.load(aid)

    def recent(self, limit: int = 20) -> list[AnalysisRecord]:
        return self.store.recent(limit=limit)

    def maps(self, aid: str):
        """The analysis's exact weights on demand (backend.attention_maps)."""
        record = self.analysis(aid)
        if record.kind != "attention":
            raise InputError(f"Analysis '{aid}' is a {record.kind} analysis, not attention.")
        return open_maps(self.store, record, self.memory, self.device)

    def attention_layer(self, aid: str, layer: int) -> np.ndarray:
        """(head, query, key) float32 exact attention of one layer (inputs up to
        settings.full_matrix_max_tokens)."""
        maps = self.maps(aid)
        self.settings.check_full_matrix(maps.n_tokens, "A whole layer",
                                        "Ask for a window instead.")
        whole = slice(0, maps.n_tokens)
        return maps.weights(layer, whole, whole).cpu().numpy()

    def attention_matrix(self, aid: str, layer: int, head: int | None,
                         query: slice = slice(None), key: slice = slice(None)) -> np.ndarray:
        """(query, key) float32 exact attention of one head, or the mean over heads if head is
        None, of a token window; the cost grows with the window, not with the input."""
        maps = self.maps(aid)
        query, key = check_window(maps.n_tokens, query, key)
        heads = None if head is None else [self._head(maps, head)]
        return maps.weights(layer, query, key, heads).mean(0).cpu().numpy()

    @staticmethod
    def _head(maps, head: int) -> int:
        if not 0 <= head < maps.n_heads:
            raise InputError(f"Head {head} does not exist; layers have {maps.n_heads} heads.")
        return int(head)

    @staticmethod
    def _token(maps, token: int) -> int:
        if not 0 <= token < maps.n_tokens:
            raise InputError(f"Token {token} is outside the input's {maps.n_tokens} tokens.")
        return int(token)

    def attention_row(self, aid: str, layer: int, head: int | None, token: int) -> np.ndarray:
        """(key,) where `token` looks: its full row."""
        token = self._token(self.maps(aid), token)
        return self.attention_matrix(aid, layer, head, slice(token, token + 1))[0]

    def attention_column(self, aid: str, layer: int, head: int | None,
                         token: int) -> np.ndarray:
        """(query,) who looks at `token`: its full column."""
        token = self._token(self.maps(aid), token)
        return self.attention_matrix(aid, layer, head, key=slice(token, token + 1))[:, 0]

    def strongest_keys(self, aid: str, layer: int, head: int | None, token: int,
                       k: int = 10) -> list[tuple[int, float]]:
        """The k keys `token` attends to most: (key index, weight), strongest first."""
        row = self.attention_row(aid, layer, head, token)
        order = np.argsort(-row, kind="stable")[:k]
        return [(int(i), float(row[i])) for i in order]

    def attention_overview(self, aid: str, layer: int, head: int | None, bins: int,
                           query: slice = slice(None), key: slice = slice(None)) -> BinnedMatrix:
        """Mean-pooled blocks of the exact map: the whole map from the stored overview (pooled
        further for fewer bins), a window (or more bins than stored) computed. Edges are token
        indices of the whole input."""
        maps = self.maps(aid)
        n = maps.n_tokens
        query, key = check_window(n, query, key)
        heads = None if head is None else [self._head(maps, head)]
        stored = maps.overview(layer)  # (head, B, B), B = its own bins (from the array)
        if query == key == slice(0, n) and bins <= stored.shape[-1]:
            stored = stored.mean(0) if head is None else stored[head]
            values, edges = regroup(stored, bin_edges(n, stored.shape[-1]), bins)
            return BinnedMatrix(values, edges, edges)
        q_edges = bin_edges(query.stop - query.start, bins) + query.start
        k_edges = bin_edges(key.stop - key.start, bins) + key.start
        spans = lambda e: np.stack([e[:-1], e[1:]], axis=1)
        values = maps.pooled(layer, heads, spans(q_edges), spans(k_edges), query, key)
        return BinnedMatrix(values.mean(0), q_edges, k_edges)

    def array_names(self, aid: str) -> list[str]:
        """Names of the arrays an analysis stored (what a view can show of it)."""
        return self.store.array_names(aid)

    def array(self, aid: str, name: str) -> np.ndarray:
        """A stored result array of any analysis kind (small ones: flow, rollouts, scores)."""
        return self.store.load_array(aid, name)

    def attention(self, aid: str) -> np.ndarray:
        """(layer, head, query, key) float32: every layer, for methods that combine layers
        (inputs up to settings.full_matrix_max_tokens)."""
        return np.stack([self.attention_layer(aid, layer)
                         for layer in range(self.analysis(aid).meta["n_layers"])])

    def rollout(self, aid: str, head_fusion: str = "mean") -> np.ndarray:
        """Attention rollout after each layer, (layer, query, key) (Abnar & Zuidema); inputs up
        to settings.full_matrix_max_tokens (longer: target_rollout)."""
        self.settings.check_full_matrix(len(self.analysis(aid).meta["tokens"]),
                                        "The full rollout",
                                        "Follow one token instead (target_rollout).")
        return self.memory.get((aid, "rollout", head_fusion),
                               lambda: attention_rollout(self.attention(aid), head_fusion))

    def target_rollout(self, aid: str, target: int, head_fusion: str = "mean",
                       exclude_first: bool = False) -> np.ndarray:
        """(layer, key) the rollout row of `target` after each layer: r_l = r_{l+1..} chain of
        vector-matrix products from the top, O(layers x T^2) (see methods.rollout)."""
        maps = self.maps(aid)
        target = self._token(maps, target)

        def fused_rows(layer: int, queries: slice) -> torch.Tensor:
            return maps.fused_rows(layer, queries, head_fusion)

        rows = self.memory.get((aid, "target_rollout", target, head_fusion), lambda: (
            target_rollout_rows(fused_rows, maps.n_layers, maps.n_tokens, target,
                                maps.chunk(maps.n_tokens), maps.causal)))
        return exclude_first_token(rows) if exclude_first else rows

    def head_statistics(self, aid: str) -> dict[str, np.ndarray]:
        """(layer, head) per-head scores: "entropy" (nats, mean over queries), "sink" (mass on
        token 0), "previous_token", "diagonal" (see methods.heads.roles; NaN under 3 tokens)."""
        stats = self.maps(aid).statistics()
        return {"entropy": stats["entropy"], "sink": stats["first_token"],
                "previous_token": stats["previous_token"], "diagonal": stats["self"]}

    def head_thumbnails(self, aid: str, size: int) -> np.ndarray:
        """(layer, head, size', size') every head's attention pooled to at most size x size,
        from the stored overviews."""
        maps = self.maps(aid)
        overviews = [maps.overview(layer) for layer in range(maps.n_layers)]
        edges = bin_edges(maps.n_tokens, overviews[0].shape[-1])
        return np.stack([regroup(overview, edges, size)[0] for overview in overviews])

    # --- Thought Anchors page helpers
    def published_example(self) -> str:
        """The id of the published trace the Thought Anchors page opens on (shipped with the
        app, see backend/data/thought_anchors), imported into the cache the first time."""
        known = getattr(self, "_published_example", None)
        if known and self.store.has(known):  # reading the files again on every rerun is slow
            return known
        folder, label = PUBLISHED_EXAMPLE
        self._published_example = self.import_published_trace(
            {p.name: p.read_bytes() for p in sorted(folder.glob("*.json"))}, label)
        return self._published_example

    def trace_answers(self, trace_id: str) -> dict:
        """What a trace answers and what it should answer, kept apart: {"trace": the trace's
        own \\boxed{} answer or None, "reference": the reference answer or None, "matches": their
        equality (None unless both are known), "degenerate": True when the model writing it
        stopped on repetition}."""
        record = self.analysis(trace_id)
        meta, params = record.meta, dict(record.params)
        trace = meta.get("trace_answer") or (extract_boxed_answer(record.text) if
                                             record.kind == "ta_trace" else meta.get("answer"))
        reference = meta.get("reference_answer", params.get("answer") or None)
        degenerate = False
        if record.kind == "ta_trace" and params.get("problem"):
            generated = self.cached(AnalysisRequest.make("ta_generate", record.model,
                                                         params["problem"]))
            written = self.analysis(generated).meta if generated else {}
            degenerate = bool(written.get("degenerate")) and written.get("solution") == record.text
        return {"trace": trace, "reference": reference, "degenerate": degenerate,
                "matches": answers_match(trace, reference) if trace and reference else None}

    def flagged_sentences(self, analysis_id: str, count: int) -> list[int]:
        """The `count` sentences a white-box pass flags, in trace order: the highest receiver
        scores (a ta_receivers analysis) or the strongest mean effect on later sentences when
        suppressed (a ta_suppression analysis; its matrix is (source, target), row-centred)."""
        if self.analysis(analysis_id).kind == "ta_receivers":
            scores = self.array(analysis_id, "receiver_scores").astype(np.float64)
        else:
            effect = self.array(analysis_id, "suppression_normalized")
            later = np.isfinite(effect).sum(axis=1)
            scores = np.where(later > 0, np.nansum(effect, axis=1) / np.maximum(later, 1), np.nan)
        ranked = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
                  if np.isfinite(scores[i])]
        return sorted(ranked[:count])
