"""The model worker: owns loaded models and the device, runs jobs one at a time, reports progress.

The interface is narrow (submit, status, result, cancel) so the worker can move to another process
or host without touching pages. Jobs run on the worker's own thread; torch releases the GIL while
it computes, so Streamlit sessions stay responsive meanwhile.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backend.config import Settings
from backend.errors import AtlasError, JobCancelled, JobInterrupted, NotFoundError
from backend.models import LoadedModel, load_model, resolve_source, source_fingerprint
from backend.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStatus:
    """state: queued | running | done | failed | cancelled. fraction never decreases.
    eta_s: seconds left, from the measured rate of the current stage; None while that stage has
    not measured one (it is a single library call, or has only just started).
    stage_elapsed_s: seconds in the current stage.
    detail: measured figures of the current stage (rollouts: done, total, rates, time left)."""

    id: str
    state: str
    fraction: float
    stage: str
    elapsed_s: float
    eta_s: float | None
    error: str | None = None
    stage_elapsed_s: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class _Stage:
    """A part of a job: a span [start, end] of its fraction, or a run of direct progress calls.
    Its rate is measured from its first report that moved the fraction to its latest one."""

    def __init__(self, label: str, fraction: float, now: float, span: bool):
        self.label, self.span, self.started = label, span, now
        self.first: tuple[float, float] | None = None  # (time, fraction) of the first advance
        self.last: tuple[float, float] | None = None

    def advanced(self, now: float, fraction: float) -> None:
        if self.first is None:
            self.first = (now, fraction)
        self.last = (now, fraction)

    def eta(self, now: float, fraction: float) -> float | None:
        """Seconds left for the whole job at this stage's rate (stages weigh their span)."""
        if self.first is None or self.last is None or self.last[0] - self.first[0] < MIN_RATE_S:
            return None
        rate = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
        if rate <= 0:
            return None
        return max(0.0, (1 - fraction) / rate - (now - self.last[0]))


MIN_RATE_S = 0.5  # a rate measured over less time than this is noise, not an estimate


class JobContext:
    """What a job function gets: progress reporting, cancellation, and the worker's models.

    `progress(fraction, stage)` reports the job's own fraction; `span(start, end, stage)` gives
    a sub-task its [0, 1] mapped onto [start, end]. Each span, and each run of direct calls
    after one, is a stage: the time-left estimate comes from the current stage's measured rate,
    and a span's sub-stages are shown under its label ("Induction scores · Layer 3/30"), so a
    counter that restarts in a new sub-task never reads as going backwards. Fractions never
    decrease."""

    def __init__(self, job: "_Job", worker: "Worker"):
        self._job, self._worker = job, worker

    @property
    def settings(self) -> Settings:
        return self._worker.settings

    def progress(self, fraction: float, stage: str, detail: dict | None = None) -> None:
        """Report progress in [0, 1]; raises JobCancelled if the job was cancelled."""
        job = self._job
        if job.stage_info is None or job.stage_info.span:
            job.stage_info = _Stage(stage, job.fraction, job.clock(), span=False)
        job.announced = stage
        self._report(fraction, stage, detail)

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_requested.is_set()

    def span(self, start: float, end: float,
             stage: str | None = None) -> Progress:
        """A progress callback mapping a sub-task's [0, 1] onto [start, end] of this job, as a
        new stage labelled `stage` (default: the job's last `progress` text, if any)."""
        job = self._job
        label = stage or job.announced
        info = job.stage_info = _Stage(label, job.fraction, job.clock(), span=True)
        if stage:
            self._report(start, stage)

        def report(fraction: float, sub_stage: str) -> None:
            if job.stage_info is not info:  # a later stage began: this span is a new one again
                info.started, info.first, info.last = job.clock(), None, None
                job.stage_info = info
            shown = sub_stage if not label or sub_stage.startswith(label) else \
                f"{label} · {sub_stage}"
            self._report(start + (end - start) * min(max(fraction, 0.0), 1.0), shown)
        return report

    def _report(self, fraction: float, stage: str, detail: dict | None = None) -> None:
        job = self._job
        if job.cancel_requested.is_set():
            raise JobCancelled("Cancelled.")
        job.detail = dict(detail or {})
        fraction = min(max(fraction, job.fraction), 1.0)
        if fraction > job.fraction:
            job.stage_info.advanced(job.clock(), fraction)
        job.fraction, job.stage = fraction, stage
        self._worker.notify(job)

    def model(self, ref: str) -> LoadedModel:
        loaded = self._worker.models.get(ref, self.span(self._job.fraction, 0.3))
        if self._job.fraction < 0.3:  # loading is over: its share of the job is done
            self._report(0.3, f"{loaded.source.label} loaded; computing")
        return loaded


class ModelPool:
    """Loaded models by reference, least recently used evicted first (frees GPU memory)."""

    def __init__(self, settings: Settings, capacity: int = 2):
        self.settings, self.capacity = settings, capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def references(self) -> list[str]:
        """The loaded models' references, least recently used first."""
        return list(self._models)

    def get(self, ref: str, progress: Progress) -> LoadedModel:
        source = resolve_source(ref, self.settings)
        if ref in self._models and self._models[ref].fingerprint == source_fingerprint(source):
            self._models.move_to_end(ref)
            return self._models[ref]
        progress(0.0, f"Loading model {ref}")
        loaded = load_model(source, self.settings, lambda f, stage: progress(f, f"{ref}: {stage}"))
        self._models[ref] = loaded
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return loaded


class _Job:
    def __init__(self, job_id: str, fn: Callable[[JobContext], Any],
                 clock: Callable[[], float] = time.monotonic):
        self.id, self.fn, self.clock = job_id, fn, clock
        self.state, self.fraction, self.stage = "queued", 0.0, "Waiting for the worker"
        self.detail: dict = {}
        self.stage_info: _Stage | None = None
        self.announced: str | None = None  # the job's last own progress text
        self.created, self.started, self.ended = clock(), None, None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancel_requested = threading.Event()

    def status(self) -> JobStatus:
        now = self.ended or self.clock()
        elapsed = now - self.started if self.started else 0.0
        info = self.stage_info
        eta = info.eta(now, self.fraction) if info and self.state == "running" else None
        in_stage = now - info.started if info else elapsed
        error = str(self.error) if self.error else None
        if self.state == "running" and self.detail.get("eta_s") is not None:
            eta = self.detail["eta_s"]  # the stage's own measured rate
        return JobStatus(self.id, self.state, self.fraction, self.stage, elapsed, eta, error,
                         in_stage, self.detail)


class Worker:
    """Runs jobs one at a time on one device (or `parallel` at a time where jobs only wait on
    compute elsewhere, as on a Ray Serve ingress). Submitting a key already queued or running
    returns that job, so identical concurrent requests compute once. Job ids begin with the
    worker's own run id, so a job of an earlier run (before a restart) is told from a mistyped
    one."""

    def __init__(self, settings: Settings, max_models: int = 2, history: int = 256,
                 clock: Callable[[], float] = time.monotonic, parallel: int = 1):
        self.settings, self.clock = settings, clock
        self._listeners: list[Callable[[JobStatus], None]] = []
        self.models = ModelPool(settings, max_models)
        self._jobs: OrderedDict[str, _Job] = OrderedDict()  # by job id, oldest first
        self._active: dict[str, _Job] = {}  # latest job of each key
        self._serial = itertools.count()
        self.run_id = secrets.token_hex(4)
        self._history = history
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, name=f"atlas-worker-{i}", daemon=True)
                         for i in range(parallel)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: str, fn: Callable[[JobContext], Any]) -> str:
        """Queue `fn` under `key` (what makes two requests the same); returns the job id."""
        with self._lock:
            job = self._active.get(key)
            if job is not None and not job.done.is_set() and not job.cancel_requested.is_set():
                return job.id
            serial = hashlib.sha256(f"{key}\n{next(self._serial)}".encode()).hexdigest()[:12]
            job_id = f"{self.run_id}{serial}"
            job = self._active[key] = self._jobs[job_id] = _Job(job_id, fn, self.clock)
            while len(self._jobs) > self._history:
                oldest = next(iter(self._jobs.values()))
                if not oldest.done.is_set():
                    break
                self._jobs.popitem(last=False)
        self._queue.put(job)
        return job.id

    def _job(self, job_id: str) -> _Job:
        with self._lock:
            if job_id not in self._jobs:
                if not job_id.startswith(self.run_id):
                    raise JobInterrupted("The worker restarted; the analysis was interrupted.")
                raise NotFoundError(f"Unknown job '{job_id}'.")
            return self._jobs[job_id]

    def status(self, job_id: str) -> JobStatus:
        return self._job(job_id).status()

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """The job's return value; re-raises its error. Blocks up to `timeout` seconds."""
        job = self._job(job_id)
        if not job.done.wait(timeout):
            raise TimeoutError(f"Job '{job_id}' is still {job.state}.")
        if job.error is not None:
            raise job.error
        return job.result

    def listen(self, listener: Callable[[JobStatus], None]) -> Callable[[], None]:
        """Call `listener(status)` on the worker's thread at every progress report and when a
        job ends (for logs and tests; keep it quick). Returns what stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def notify(self, job: "_Job") -> None:
        if self._listeners:
            status = job.status()
            for listener in list(self._listeners):
                listener(status)

    def cancel(self, job_id: str) -> None:
        self._job(job_id).cancel_requested.set()

    @property
    def alive(self) -> bool:
        """Whether the worker's threads run jobs (False after shutdown)."""
        return all(thread.is_alive() for thread in self._threads)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel_requested.is_set():
                job.state, job.error = "cancelled", JobCancelled("Cancelled before it started.")
            else:
                self._execute(job)
            job.ended = job.clock()
            self.notify(job)
            job.done.set()
            with self._lock:
                self._active = {k: j for k, j in self._active.items() if not j.done.is_set()}

    def _execute(self, job: _Job) -> None:
        job.state, job.started, job.stage = "running", job.clock(), "Starting"
        try:
            job.result = job.fn(JobContext(job, self))
            job.state, job.fraction, job.stage = "done", 1.0, "Done"
        except JobCancelled as e:
            job.state, job.error = "cancelled", e
        except AtlasError as e:
            job.state, job.error = "failed", e
        except Exception as e:  # a bug or an unexpected model: keep serving, say what happened
            log.exception("Job %s failed", job.id)
            job.state = "failed"
            job.error = AtlasError(f"The analysis failed: {type(e).__name__}: {e}")
