"""Thought Anchors as analyses: published import, own traces on SmolLM2, resumable resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.analyses import AnalysisRequest
from backend.analyses.thought_anchors import PUBLISHED_FILES
from backend.errors import InputError, JobCancelled
from backend.methods.thought_anchors.graph import incoming, top_links
from backend.methods.thought_anchors.tags import heuristic_tag
from tests.conftest import SHARED_FIXTURES

TRACES = SHARED_FIXTURES / "thought_anchors"
QWEN = TRACES / "deepseek-r1-distill-qwen-14b" / "correct_base_solution" / "problem_2238"
SOLUTION = ("First, I need the price of one pencil. Three pencils cost $1, so one costs 1/3. "
            "Then 27 pencils cost 27/3 = 9 dollars. Let me check: 9 times 3 is 27. "
            "So the answer is \\boxed{9}.")
PROBLEM = "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?"


def published_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in PUBLISHED_FILES}


@pytest.fixture(scope="module")
def imported(service):
    if not QWEN.is_dir():
        pytest.skip(f"published fixtures not found at {QWEN}")
    return service.import_published_trace(published_files(QWEN), "DeepSeek-R1-Distill-Qwen-14B")


def test_import_keeps_the_published_chunks_metrics_and_matrices(service, imported):
    record = service.analysis(imported)
    labeled = json.loads((QWEN / "chunks_labeled.json").read_text())
    assert record.meta["chunks"] == [c["chunk"] for c in labeled]
    assert record.meta["tags"][0] == labeled[0]["function_tags"][0]
    kl = service.array(imported, "counterfactual_importance_kl")
    np.testing.assert_allclose(kl, [c["counterfactual_importance_kl"] for c in labeled])
    supp = service.array(imported, "suppression_normalized")  # (source, target)
    # The published normalisation: every target's scores over earlier sources sum to 0.
    for j in range(1, supp.shape[0]):
        assert abs(np.nansum(supp[:j, j])) < 1e-9
    # Importing the same files again gives the same analysis.
    assert service.import_published_trace(published_files(QWEN), "again") == imported


def test_import_refuses_unknown_files_and_bad_json(service):
    with pytest.raises(InputError, match="Not a published trace file"):
        service.import_published_trace({"../../etc/passwd": b"x"}, "x")
    with pytest.raises(InputError):
        service.import_published_trace({"chunks_labeled.json": b"{not json"}, "x")


def test_resampled_alternatives_of_a_published_trace(service, imported):
    resampled = json.loads((QWEN / "chunks_resampled.json").read_text())["3"]
    top = service.resampled_alternatives(imported, None, 3)
    assert top and top[0][1] == max(resampled.count(s) for s in set(resampled))


def test_own_trace_white_box_passes_on_smollm2(service):
    base = dict(problem=PROBLEM, answer="9")
    trace = service.run(AnalysisRequest.make("ta_trace", "smollm2", SOLUTION, **base))
    chunks = service.analysis(trace).meta["chunks"]
    assert len(chunks) == 5 and service.analysis(trace).meta["answer"] == "9"
    receivers = service.run(AnalysisRequest.make("ta_receivers", "smollm2", SOLUTION, **base))
    blocks = service.array(receivers, "sentence_attention")
    assert blocks.shape[:2] == (30, 9) and blocks.shape[2:] == (5, 5)
    assert np.allclose(np.triu(blocks.astype(np.float32), 1), 0)  # causal: no later sentences
    heads = service.array(receivers, "receiver_heads")
    assert len(heads) == 20 and (heads[:, 0] > 0).all()  # top 20, layer 0 excluded
    supp = service.array(service.run(AnalysisRequest.make("ta_suppression", "smollm2", SOLUTION,
                                                          **base)), "suppression_normalized")
    for j in range(1, 5):  # (source, target): each target row-centred over earlier sources
        assert abs(np.nansum(supp[:j, j])) < 1e-6


def test_resampling_resumes_where_it_stopped(service):
    from backend.analyses import analysis_id
    from backend.analyses.thought_anchors import rollout_pool
    from backend.models import resolve_source, source_fingerprint

    request = AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                   answer="9", rollouts=2, max_new_tokens=12)
    fingerprint = source_fingerprint(resolve_source("smollm2", service.settings))
    aid, pool = analysis_id(request, fingerprint), rollout_pool(request, fingerprint)
    # A previous run that saved chunk 0's rollouts, then died.
    service.store.save_rollouts(pool, [
        {"chunk_idx": 0, "forced": False, "rollout_idx": k, "continuation": "Earlier run. x",
         "chunk_resampled": "Earlier run.", "answer": None, "is_correct": False}
        for k in range(2)])
    assert service.run(request, timeout=600) == aid
    saved = service.store.load_rollouts(pool)
    chunk0 = [r for r in saved if r["chunk_idx"] == 0 and not r["forced"]]
    assert [r["continuation"] for r in chunk0] == ["Earlier run. x"] * 2  # not resampled again
    assert {(r["chunk_idx"], r["forced"]) for r in saved} == {
        (i, f) for i in range(5) for f in (False, True)}
    assert all(sum(1 for r in saved if (r["chunk_idx"], r["forced"]) == (i, f)) == 2
               for i in range(5) for f in (False, True))
    metrics = service.array(aid, "different_trajectories_fraction")
    assert metrics.shape == (5,) and ((0 <= metrics) & (metrics <= 1)).all()


def test_cancelling_resampling_while_rollouts_run_ends_cancelled_not_failed(service):
    request = AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                   answer="9", rollouts=3, max_new_tokens=64, seed=7)
    ticket = service.submit(request)
    assert ticket.job_id, "an earlier test cached this request"

    def cancel_once_rolling(status):
        if status.id == ticket.job_id and "rollouts" in status.stage.lower():
            service.cancel(ticket.job_id)

    stop = service.worker.listen(cancel_once_rolling)
    try:
        with pytest.raises(JobCancelled):
            service.job_result(ticket.job_id, timeout=600)
    finally:
        stop()
    assert service.job_status(ticket.job_id).state == "cancelled"
    assert service.cached(request) is None  # nothing stored


def test_heuristic_tags_and_links():
    assert heuristic_tag("So the answer is \\boxed{9}.") == "final_answer_emission"
    assert heuristic_tag("Wait, that seems wrong.") == "uncertainty_management"
    assert heuristic_tag("27/3 = 9") == "active_computation"
    m = np.array([[np.nan, 0.5, -0.9], [np.nan, np.nan, 0.1], [np.nan] * 3])
    assert top_links(m, 1) == [(0, 2, -0.9), (1, 2, 0.1)]
    assert incoming(m, 2, 5) == [(0, -0.9), (1, 0.1)]


def test_published_export_round_trips_through_the_importer(service, imported, tmp_path):
    import zipfile

    scores = {"counterfactual_importance_kl": service.array(imported, "counterfactual_importance_kl")}
    counterfactual = service.array(imported, "counterfactual")
    archive = service.published_zip(imported, None, scores, counterfactual, None)
    with zipfile.ZipFile(__import__("io").BytesIO(archive)) as z:
        files = {name: z.read(name) for name in z.namelist()}
    again = service.import_published_trace(files, "re-imported")
    assert service.analysis(again).meta["chunks"] == service.analysis(imported).meta["chunks"]
    np.testing.assert_allclose(service.array(again, "counterfactual_importance_kl"),
                               scores["counterfactual_importance_kl"])
    np.testing.assert_allclose(service.array(again, "counterfactual"), counterfactual)
