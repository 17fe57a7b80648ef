"""Progress that tells the truth: fractions never go back, counters never restart under one label,
the time left comes from the current stage's measured rate and counts down, and a stage that
cannot measure itself (one library call) gives no estimate at all.

The worker's rules are checked on a job driven by a fake clock (exact, no sleeps); then every
analysis kind is run through the real service on small inputs with every progress event recorded.
"""

from __future__ import annotations

import dataclasses
import re
import threading

import pytest

from backend.analyses.long_context import probe_request
from backend.analyses import KINDS, AnalysisRequest
from backend.worker import Worker

COUNTER = re.compile(r"(\d+)/(\d+)")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(settings):
    clock = FakeClock()
    worker = Worker(settings, clock=clock)
    events = []
    worker.listen(events.append)
    yield worker, clock, events
    worker.shutdown()


def test_eta_comes_from_the_current_stage_and_counts_down(clocked):
    worker, clock, events = clocked
    seen, go = [], threading.Event()

    def job(ctx):
        go.wait(5)
        ctx.progress(0.0, "Tokenising")
        steady = ctx.span(0.0, 0.5, "Steady work")
        for step in range(1, 11):                       # 0.05 of the job per second
            clock.now += 1.0
            steady(step / 10, f"Step {step}/10")
            seen.append(worker.status(job_id))
        clock.now += 0.5                                # between two reports: counts down
        seen.append(worker.status(job_id))
        ctx.progress(0.6, "One library call")           # no fraction of its own
        for _ in range(3):
            clock.now += 5.0
            seen.append(worker.status(job_id))
        ctx.progress(0.3, "Reported late")              # a lower fraction is ignored
        seen.append(worker.status(job_id))

    job_id = worker.submit("k", job)
    go.set()
    worker.result(job_id, timeout=10)
    steady, between, single, late = seen[:10], seen[10], seen[11:14], seen[14]
    assert [s.stage for s in steady[:2]] == ["Steady work · Step 1/10", "Steady work · Step 2/10"]
    assert steady[0].eta_s is None                     # one report: no rate yet
    for status in steady[1:]:                          # rate 0.05/s: (1 - fraction) / 0.05
        assert status.eta_s == pytest.approx((1 - status.fraction) / 0.05)
    assert between.eta_s == pytest.approx(steady[-1].eta_s - 0.5)
    assert all(s.eta_s is None for s in single)         # elapsed only, never a guess
    assert [s.stage_elapsed_s for s in single] == pytest.approx([5.0, 10.0, 15.0])
    assert [s.elapsed_s for s in single] == pytest.approx([15.5, 20.5, 25.5])
    assert late.fraction == 0.6 and late.stage == "Reported late"
    assert events[-1].state == "done" and events[-1].fraction == 1.0


def test_a_span_without_reports_shows_its_label_and_elapsed_time(clocked):
    worker, clock, _ = clocked
    seen = []

    def job(ctx):
        ctx.span(0.3, 0.9, "Suppressing each sentence")  # a sub-task that reports only at the end
        clock.now += 12.0
        seen.append(worker.status(job_id))

    job_id = worker.submit("span", job)
    worker.result(job_id, timeout=10)
    assert seen[0].stage == "Suppressing each sentence" and seen[0].fraction == 0.3
    assert seen[0].eta_s is None and seen[0].stage_elapsed_s == pytest.approx(12.0)


# --- every analysis kind through the real service ---------------------------------------------
SHORT = "The cat sat on the mat. It was warm there."
SOLUTION = ("One pencil costs 1/3 dollar. So 27 pencils cost 27/3 = 9 dollars. "
            "The answer is \\boxed{9}.")
PROBLEM = "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?"
TA = {"problem": PROBLEM, "answer": "9"}
REQUESTS = [
    AnalysisRequest.make("attention", "smollm2", SHORT),
    AnalysisRequest.make("attention_flow", "smollm2", SHORT, head_fusion="mean"),
    AnalysisRequest.make("gradient_rollout", "smollm2", SHORT),
    *(AnalysisRequest.make("head_importance", "smollm2", SHORT, method=m)
      for m in ("gradient", "confidence", "entropy")),
    AnalysisRequest.make("head_importance", "minilm", SHORT, method="ablation"),
    AnalysisRequest.make("head_roles", "smollm2", SHORT),
    # ablation's own counter (gate settings k/72), then the curve's (k/42): two labels
    AnalysisRequest.make("pruning_curve", "minilm", SHORT + " Again.", method="ablation"),
    AnalysisRequest.make("pruning_curve", "minilm", SHORT, method="confidence", recompute=True),
    AnalysisRequest.make("ta_trace", "smollm2", SOLUTION, **TA),
    AnalysisRequest.make("ta_generate", "smollm2", PROBLEM, max_new_tokens=16),
    AnalysisRequest.make("ta_receivers", "smollm2", SOLUTION, **TA),
    AnalysisRequest.make("ta_suppression", "smollm2", SOLUTION, **TA),
    AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, rollouts=1, max_new_tokens=8,
                         **TA),
    probe_request("smollm2", lengths=[300], depths=[0.5], max_new_tokens=8, bins=64,
                  passkey_length=300, sink=8, recent=32),  # one small haystack trial
]


def test_every_kind_is_covered():
    assert {r.kind for r in REQUESTS} == set(KINDS)


def _counter_restarts(stages: list[str]) -> list[tuple[str, str]]:
    """Consecutive reports whose counter went down while the text around it stayed the same."""
    restarts = []
    for before, after in zip(stages, stages[1:]):
        a, b = COUNTER.search(before), COUNTER.search(after)
        same_label = COUNTER.sub("#", before) == COUNTER.sub("#", after)
        if a and b and same_label and int(b[1]) < int(a[1]):
            restarts.append((before, after))
    return restarts


@pytest.fixture(scope="module")
def own_cache(service, tmp_path_factory):
    """The session's worker (its models already loaded) over a cache file of this module's own,
    so every kind below runs a real job whatever earlier tests cached."""
    from backend.service import AtlasService
    from backend.store import Store

    settings = dataclasses.replace(service.settings,
                                   cache_dir=tmp_path_factory.mktemp("progress-cache"))
    fresh = AtlasService(settings, store=Store(settings.database_path), worker=service.worker)
    yield fresh
    fresh.store.close()


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.kind}-{r.model}-"
                         f"{dict(r.params).get('method', '')}")
def test_progress_of_every_kind_only_moves_forward(own_cache, request_):
    seen = []
    stop = own_cache.worker.listen(seen.append)  # before submitting: no early report is missed
    try:
        ticket = own_cache.submit(request_)
        assert ticket.job_id, "a fresh cache has nothing stored: a job must run"
        own_cache.job_result(ticket.job_id, timeout=600)
    finally:
        stop()
    events = [e for e in seen if e.id == ticket.job_id]
    fractions = [e.fraction for e in events]
    assert events and events[-1].state == "done" and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions), fractions
    stages = [e.stage for e in events]
    assert not _counter_restarts(stages), _counter_restarts(stages)
    assert all(e.eta_s is None or e.eta_s >= 0 for e in events)
