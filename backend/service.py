"""The one door pages use: cache first, else a job for the worker; slices and aggregates out.

Pages never see torch or SQL. Results are addressed by analysis id (what links carry); large
tensors stay here and leave only as the slice or aggregate a view shows.
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

import numpy as np

from backend import analyses
from backend.analyses import AnalysisRequest, analysis_id
from backend.analyses.attention import layer_array_name
from backend.analyses.thought_anchors import (PUBLISHED_FILES, as_published_trace,
                                             published_analysis)
from backend.comparison import Comparisons
from backend.config import Settings
from backend.errors import InputError
from backend.inputs import check_strings, check_text, check_upload
from backend.memory_budget import BoundedCache
from backend.methods.binning import BinnedMatrix, bin_matrix
from backend.methods.rollout import attention_rollout, exclude_first_token
from backend.methods.thought_anchors.graph import incoming, top_links
from backend.methods.thought_anchors.published import (read_published_trace,
                                                       write_published_trace)
from backend.models import resolve_source, source_fingerprint
from backend.store import AnalysisRecord, Store
from backend.worker import JobContext, JobStatus, Worker


@dataclass(frozen=True)
class Ticket:
    """Either a finished analysis (analysis_id) or a job to poll (job_id)."""

    analysis_id: str | None = None
    job_id: str | None = None


class AtlasService(Comparisons):
    def __init__(self, settings: Settings | None = None, store: Store | None = None,
                 worker: Worker | None = None):
        self.settings = settings or Settings.from_env()
        self.store = store or Store(self.settings.database_path)
        self.worker = worker or Worker(self.settings)
        self._memory = BoundedCache(self.settings.memory_budget_mb << 20)

    # --- requests -------------------------------------------------------------------------
    def submit(self, request: AnalysisRequest) -> Ticket:
        """Return the cached result at once, or start (or join) the job that computes it."""
        analyses.validate(request)
        source = resolve_source(request.model, self.settings)  # refuse bad references now
        # Fingerprints are memoised by file size and mtime, so this is cheap after the first
        # time, and changed weights get a new id.
        aid = analysis_id(request, source_fingerprint(source))
        if self.store.has(aid):
            return Ticket(analysis_id=aid)
        job_id = self.worker.submit(aid, lambda ctx: self._compute(ctx, request, aid))
        return Ticket(job_id=job_id)

    def _compute(self, ctx: JobContext, request: AnalysisRequest, aid: str) -> str:
        if not self.store.has(aid):  # an identical job may have finished while this one queued
            record, arrays = analyses.compute(ctx, request, aid, self.store)
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
        """The analysis id if this request's result is already stored, else None."""
        analyses.validate(request)
        aid = analysis_id(request, source_fingerprint(resolve_source(request.model,
                                                                     self.settings)))
        return aid if self.store.has(aid) else None

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

    @staticmethod
    def top_links(matrix: np.ndarray, per_source: int) -> list[tuple[int, int, float]]:
        """Strongest links of a (source, target) sentence matrix (see methods.thought_anchors)."""
        return top_links(matrix, per_source)

    @staticmethod
    def strongest_links(matrix: np.ndarray, sentence: int, direction: str,
                        limit: int) -> list[tuple[int, float]]:
        """(other sentence, value) linked to `sentence`: "incoming" (what affects it) or
        "outgoing" (what it affects), strongest first."""
        return incoming(matrix if direction == "incoming" else matrix.T, sentence, limit)

    # --- results --------------------------------------------------------------------------
    def analysis(self, aid: str) -> AnalysisRecord:
        return self.store.load(aid)

    def recent(self, limit: int = 20) -> list[AnalysisRecord]:
        return self.store.recent(limit=limit)

    def attention_layer(self, aid: str, layer: int) -> np.ndarray:
        """(head, query, key) float16 attention of one layer."""
        return self._memory.get(("layer", aid, layer),
                                lambda: self.store.load_array(aid, layer_array_name(layer)))

    def attention_matrix(self, aid: str, layer: int, head: int | None,
                         query: slice = slice(None), key: slice = slice(None)) -> np.ndarray:
        """(query, key) float32 attention of one head, or the mean over heads if head is None,
        restricted to a token window."""
        layer_attn = self.attention_layer(aid, layer)
        block = layer_attn[:, query, key].astype(np.float32)
        return block.mean(axis=0) if head is None else block[head]

    def attention_overview(self, aid: str, layer: int, head: int | None,
                           bins: int) -> BinnedMatrix:
        """The whole (query, key) matrix mean-pooled to at most bins x bins."""
        return bin_matrix(self.attention_matrix(aid, layer, head), bins)

    def array_names(self, aid: str) -> list[str]:
        """Names of the arrays an analysis stored (what a view can show of it)."""
        return self.store.array_names(aid)

    def array(self, aid: str, name: str) -> np.ndarray:
        """A stored result array of any analysis kind (small ones: flow, rollouts, scores)."""
        return self.store.load_array(aid, name)

    def attention(self, aid: str) -> np.ndarray:
        """(layer, head, query, key) float32: every layer, for methods that combine layers."""
        meta = self.analysis(aid).meta
        return np.stack([self.attention_layer(aid, layer) for layer in range(meta["n_layers"])],
                        dtype=np.float32)

    def rollout(self, aid: str, head_fusion: str = "mean") -> np.ndarray:
        """Attention rollout after each layer, (layer, query, key) (Abnar & Zuidema)."""
        return self._memory.get(("rollout", aid, head_fusion),
                                lambda: attention_rollout(self.attention(aid), head_fusion))

    @staticmethod
    def bin(matrix: np.ndarray, bins: int) -> BinnedMatrix:
        """Any (query, key) matrix pooled for an overview (see attention_overview)."""
        return bin_matrix(matrix, bins)

    @staticmethod
    def without_first_token(scores: np.ndarray) -> np.ndarray:
        """(..., key) scores without key 0, renormalised to sum 1 (attention-sink view)."""
        return exclude_first_token(scores)

    def head_thumbnails(self, aid: str, size: int) -> np.ndarray:
        """(layer, head, size', size') every head's attention pooled to at most size x size."""
        meta = self.analysis(aid).meta
        return np.stack([bin_matrix(self.attention_layer(aid, layer), size).values
                         for layer in range(meta["n_layers"])])
