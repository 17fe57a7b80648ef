"""Twenty concurrent sessions on one service (threads, as Streamlit runs sessions): identical
requests compute once, distinct ones all complete, and a cached view renders in another session
while a long job runs."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from streamlit.testing.v1 import AppTest

import backend.analyses as analyses
from backend.analyses import AnalysisRequest
from tests.conftest import REPO_ROOT

SESSIONS = 20
LAUNCHER = "from app import main\nmain()"


@pytest.fixture
def computations(monkeypatch):
    """Texts the real attention computation was called for."""
    real, calls = analyses.KINDS["attention"], []

    def counting(ctx, task):
        calls.append(task.request.text)
        return real.compute(ctx, task)

    monkeypatch.setitem(analyses.KINDS, "attention", dataclasses.replace(real, compute=counting))
    return calls


def _sessions(fn):
    """fn(session index) in SESSIONS threads released at once; their results in order."""
    start = threading.Barrier(SESSIONS)

    def session(i):
        start.wait()
        return fn(i)
    with ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(session, range(SESSIONS)))


def test_identical_requests_from_twenty_sessions_compute_once(service, computations):
    request = AnalysisRequest.make("attention", "smollm2", f"Shared by all {time.time_ns()}.")
    ids = _sessions(lambda i: service.run(request, timeout=300))
    assert len(set(ids)) == 1 and service.analysis(ids[0]).text == request.text
    assert computations.count(request.text) == 1


def test_twenty_distinct_requests_all_complete(service, computations):
    texts = [f"Session {i} asks about boat {i} at {time.time_ns()}." for i in range(SESSIONS)]
    ids = _sessions(lambda i: service.run(AnalysisRequest.make("attention", "smollm2",
                                                               texts[i]), timeout=600))
    assert len(set(ids)) == SESSIONS
    assert [service.analysis(aid).text for aid in ids] == texts
    assert sorted(computations) == sorted(texts)  # each computed exactly once


def test_a_cached_view_renders_while_a_long_job_runs(service):
    cached = service.run(AnalysisRequest.make("attention", "smollm2", "A cached view."),
                         timeout=300)
    at = AppTest.from_string(LAUNCHER, default_timeout=60)
    at.query_params["a"] = cached
    at.run()
    at.switch_page(str(REPO_ROOT / "pages" / "explore.py")).run()  # imports done, page warm
    long_job = service.submit(AnalysisRequest.make(
        "head_importance", "smollm2", f"Every head ablated in turn {time.time_ns()}.",
        method="ablation"))
    try:
        while service.job_status(long_job.job_id).state != "running":
            time.sleep(0.01)
        started = time.perf_counter()
        at.run()
        elapsed = time.perf_counter() - started
        assert service.job_status(long_job.job_id).state == "running"  # it ran meanwhile
    finally:
        service.cancel(long_job.job_id)
    assert not at.exception
    assert at.slider(key="layer") is not None  # the view itself, not a waiting message
    assert elapsed < 2.0, f"the cached view took {elapsed:.2f} s beside a running job"
