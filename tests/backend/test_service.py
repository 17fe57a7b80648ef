"""The service with its real worker, the packaged SmolLM2 and a DuckDB file: jobs, cache, slices."""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from dataclasses import replace
from itertools import count

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import backend.analyses as analyses
from backend.analyses import AnalysisRequest, analysis_id
from backend.config import REPO_ROOT, Settings
from backend.errors import AtlasError, ModelLoadError, NotFoundError
from backend.models import load_model, resolve_source, source_fingerprint
from backend.models.fingerprint import file_sha256
from backend.models.sources import packaged_model_dir
from backend.service import AtlasService, Ticket
from backend.worker import JobCancelled, Worker

_serial = count()


def _text(words: int = 12) -> str:
    """A text no other test asks for, so each test starts from an empty cache entry."""
    base = ("the river bends past the old mill where children count the passing boats "
            "while evening light settles on the water ").split()
    return f"Run {next(_serial)} at {time.monotonic_ns()}: " + " ".join(
        base[i % len(base)] for i in range(words))


def _request(text: str | None = None, model: str = "smollm2") -> AnalysisRequest:
    return AnalysisRequest.make("attention", model, text or _text())


def _wait(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the real attention analysis; `gate` holds a call until it is set."""
    real = analyses.KINDS["attention"]
    calls: list[str] = []
    gate = threading.Event()
    gate.set()

    def counting(ctx, task):
        calls.append(task.request.text)
        assert gate.wait(60)
        return real.compute(ctx, task)

    monkeypatch.setitem(analyses.KINDS, "attention", replace(real, compute=counting))
    yield calls, gate
    gate.set()


@pytest.fixture
def blocker(service):
    """Occupies the worker with a job until released, so the next submission stays queued."""
    release = threading.Event()
    started = threading.Event()

    def hold(ctx):
        started.set()
        assert release.wait(60)
        return "held"

    job = service.worker.submit(f"blocker-{next(_serial)}", hold)
    assert started.wait(60)
    yield job, release
    release.set()


# --- one computation per request ------------------------------------------------------------

def test_identical_concurrent_submissions_compute_once(service, counted):
    calls, gate = counted
    gate.clear()
    text = _text()
    # Equal requests, however they were typed.
    requests = [_request(text), AnalysisRequest.make("attention", " smollm2 ", text)]
    barrier = threading.Barrier(2)
    tickets: list[Ticket] = [None, None]

    def submit(i):
        barrier.wait()
        tickets[i] = service.submit(requests[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert tickets[0].job_id is not None and tickets[0].analysis_id is None
    assert tickets[1] == tickets[0]
    job_id = tickets[0].job_id

    _wait(lambda: len(calls) == 1)  # the job is inside the computation now
    assert service.job_status(job_id).state == "running"
    assert service.submit(_request(text)) == Ticket(job_id=job_id)  # joins the running job

    gate.set()
    aid = service.job_result(job_id, timeout=120)
    assert calls == [text]
    assert service.submit(_request(text)) == Ticket(analysis_id=aid, job_id=None)
    assert service.run(_request(text), timeout=60) == aid
    assert calls == [text]
    record = service.analysis(aid)
    assert (record.id, record.text, record.model, record.kind) == (aid, text, "smollm2",
                                                                   "attention")


def test_a_restarted_service_reuses_the_stored_result(service, settings, counted):
    calls, _ = counted
    request = _request()
    aid = service.run(request, timeout=120)
    assert len(calls) == 1
    # A new process: empty memory, same database, a fresh worker.
    fresh = AtlasService(service.settings, store=service.store, worker=Worker(service.settings))
    try:
        # The weights' fingerprint finds the stored result at once: no job, no recomputation.
        assert fresh.submit(request) == Ticket(analysis_id=aid)
        assert len(calls) == 1
        fp = source_fingerprint(resolve_source("smollm2", settings))
        assert aid == analysis_id(request, fp)
    finally:
        fresh.worker.shutdown()


# --- results --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def computed(service, smollm2):
    text = _text(40)
    aid = service.run(_request(text), timeout=180)
    n_tokens = len(smollm2.tokenizer(text)["input_ids"])
    return aid, text, n_tokens


def test_stored_analysis_describes_the_model_and_tokens(service, computed, smollm2):
    aid, text, n = computed
    meta = service.analysis(aid).meta
    assert (meta["n_layers"], meta["n_heads"], meta["causal"]) == (30, 9, True)
    assert meta["token_ids"] == smollm2.tokenizer(text)["input_ids"]
    assert len(meta["tokens"]) == len(meta["offsets"]) == n
    for layer in (0, 29):
        attn = service.attention_layer(aid, layer)
        assert attn.shape == (9, n, n) and attn.dtype == np.float32
        np.testing.assert_allclose(attn.astype(np.float64).sum(-1), 1, atol=1e-5)
    with pytest.raises(NotFoundError):
        service.attention_layer(aid, 30)


def test_head_none_is_the_mean_over_heads(service, computed):
    aid, _, n = computed
    for layer in (0, 13):
        layer_attn = service.attention_layer(aid, layer).astype(np.float32)
        mean = service.attention_matrix(aid, layer, None)
        assert mean.shape == (n, n) and mean.dtype == np.float32
        np.testing.assert_allclose(mean, layer_attn.sum(0) / 9, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(service.attention_matrix(aid, layer, 4), layer_attn[4])


def test_windows_slice_queries_and_keys(service, computed):
    aid, _, n = computed
    layer_attn = service.attention_layer(aid, 5).astype(np.float32)
    q, k = slice(10, 25), slice(3, 17)
    window = service.attention_matrix(aid, 5, 2, q, k)
    assert window.shape == (15, 14)
    np.testing.assert_array_equal(window, layer_attn[2, 10:25, 3:17])
    mean_window = service.attention_matrix(aid, 5, None, slice(n - 4, None), slice(0, 4))
    # Both are recomputed from query and key; products of other shapes round differently.
    np.testing.assert_allclose(mean_window, layer_attn[:, n - 4:, :4].mean(0), rtol=1e-5)


@pytest.mark.parametrize("head", [None, 0, 8])
@pytest.mark.parametrize("bins", [1, 7, 10_000])
def test_overview_preserves_row_mass(service, computed, head, bins):
    aid, _, n = computed
    full = service.attention_matrix(aid, 11, head).astype(np.float64)
    overview = service.attention_overview(aid, 11, head, bins)
    qe, ke = overview.query_edges, overview.key_edges
    nb = min(bins, n)
    assert overview.values.shape == (nb, nb)
    assert qe[0] == ke[0] == 0 and qe[-1] == ke[-1] == n
    assert (np.diff(qe) > 0).all() and (np.diff(ke) > 0).all()
    # Rows of the overview times key-bin widths: the attention mass of a query, which is 1.
    np.testing.assert_allclose(overview.values @ np.diff(ke), 1.0, atol=5e-3)
    # Each cell is the mean of its block, computed here cell by cell.
    for i in range(nb):
        for j in range(nb):
            block = full[qe[i]:qe[i + 1], ke[j]:ke[j + 1]]
            assert overview.values[i, j] == pytest.approx(block.mean(), rel=1e-4, abs=1e-6)


def test_unknown_analysis_ids_raise_not_found(service):
    for aid in ("0" * 24, "not-an-id", ""):
        with pytest.raises(NotFoundError):
            service.analysis(aid)
        with pytest.raises(NotFoundError):
            service.attention_layer(aid, 0)


# --- bad model references -------------------------------------------------------------------

@pytest.mark.parametrize("ref, message", [
    ("/etc/passwd", "model folders"),
    ("../../etc", "model folders"),
    ("nonexistent-org/nonexistent-model", "Cannot reach"),
])
def test_bad_model_references_fail_fast_with_a_clear_message(service, ref, message):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=message) as info:
        service.run(_request(model=ref), timeout=60)
    assert time.monotonic() - start < 5
    assert ref in str(info.value)
    assert str(REPO_ROOT) not in str(info.value)  # server paths stay private


class _Trap:
    """Unpickling this calls open(path, "w"): proof that a checkpoint was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture
def local_settings(tmp_path, settings) -> Settings:
    models = tmp_path / "models"
    models.mkdir()
    return replace(settings, model_dirs=(models.resolve(),), cache_dir=tmp_path / "cache")


TINY_LLAMA = ('{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, '
              '"intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, '
              '"num_key_value_heads": 1, "vocab_size": 32}')


def test_pickle_checkpoints_are_refused_unopened(local_settings, tmp_path):
    folder = local_settings.model_dirs[0] / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(TINY_LLAMA)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Trap(marker)}))
    source = resolve_source("./pickled", local_settings)
    with pytest.raises(ModelLoadError, match="safetensors") as info:
        load_model(source, local_settings)
    assert "refused" in str(info.value)
    assert not marker.exists()


def test_folder_with_only_a_pickle_checkpoint_is_refused(local_settings, tmp_path):
    folder = local_settings.model_dirs[0] / "only-bin"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(resolve_source(str(folder), local_settings), local_settings)
    assert not marker.exists()


def _safetensors(folder):
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))


def test_unknown_model_type_is_an_unsupported_architecture(local_settings):
    folder = local_settings.model_dirs[0] / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "not-a-real-model"}')
    _safetensors(folder)
    with pytest.raises(ModelLoadError, match="(?i)unsupported architecture") as info:
        load_model(resolve_source("./unknown", local_settings), local_settings)
    assert "not-a-real-model" in str(info.value)


def test_custom_code_in_a_model_folder_never_runs(local_settings, tmp_path):
    folder = local_settings.model_dirs[0] / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}')
    _safetensors(folder)
    with pytest.raises(ModelLoadError):
        load_model(resolve_source("./custom", local_settings), local_settings)
    assert not marker.exists()


# --- the worker -----------------------------------------------------------------------------

def test_a_first_submit_leaves_reading_the_weights_to_its_job(local_settings):
    """Weights never hashed in this process (a model folder of new files): submit answers at
    once with a job, its own thread reading no weight file, and the job finds the id the
    weights' fingerprint gives."""
    folder = local_settings.model_dirs[0] / "minilm-copy"
    folder.mkdir()
    for path in packaged_model_dir("minilm", local_settings).iterdir():
        if not path.is_file():
            continue
        try:  # a new path: file hashes are memoised by path, size and time
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy(path, folder / path.name)
    service = AtlasService(local_settings)
    release, started = threading.Event(), threading.Event()
    service.worker.submit("blocker", lambda ctx: started.set() or release.wait(60))
    request = _request(model=str(folder))
    try:
        assert started.wait(60)
        assert service.cached(request) is None
        ticket = service.submit(request)
        assert ticket.analysis_id is None and ticket.job_id is not None
        # The job is queued behind the blocker: nothing has read the weights yet.
        assert file_sha256(folder / "model.safetensors", read=False) is None
        assert service.job_status(ticket.job_id).state == "queued"
        release.set()
        aid = service.job_result(ticket.job_id, timeout=300)
        source = resolve_source(str(folder), local_settings)
        assert aid == analysis_id(request, source_fingerprint(source))
        assert service.submit(request) == Ticket(analysis_id=aid)
        assert service.cached(request) == aid
    finally:
        release.set()
        service.close()


def test_progress_is_monotone_within_zero_and_one(service):
    ticket = service.submit(_request(_text(150)))
    samples = []
    while True:
        status = service.job_status(ticket.job_id)
        samples.append((status.state, status.fraction, status.stage))
        if status.finished:
            break
        time.sleep(0.002)
    states = [s for s, _, _ in samples]
    fractions = [f for _, f, _ in samples]
    assert states[-1] == "done" and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), fractions
    order = {"queued": 0, "running": 1, "done": 2}
    assert all(order[a] <= order[b] for a, b in zip(states, states[1:])), states
    assert any(0.0 < f < 1.0 for f in fractions)  # intermediate progress was visible
    assert service.job_result(ticket.job_id, timeout=1)


def test_cancelling_a_queued_job(service, counted, blocker):
    calls, _ = counted
    blocker_job, release = blocker
    request = _request()
    ticket = service.submit(request)
    assert service.job_status(ticket.job_id).state == "queued"
    service.cancel(ticket.job_id)
    release.set()
    assert service.worker.result(blocker_job, timeout=30) == "held"
    with pytest.raises(JobCancelled):
        service.job_result(ticket.job_id, timeout=30)
    status = service.job_status(ticket.job_id)
    assert status.state == "cancelled" and status.finished
    assert calls == []
    # Asking again later computes it.
    again = service.submit(request)
    assert service.job_result(again.job_id, timeout=120)
    assert service.job_status(again.job_id).state == "done"
    assert calls == [request.text]


def test_resubmitting_right_after_a_cancel_computes(service, blocker):
    _, release = blocker
    request = _request()
    first = service.submit(request)
    service.cancel(first.job_id)
    second = service.submit(request)  # the user presses "run" again before the queue moves
    release.set()
    with pytest.raises(JobCancelled):
        service.job_result(first.job_id, timeout=60)
    assert service.job_result(second.job_id, timeout=120)


def test_cancelling_a_running_job_stores_nothing(service, settings, counted):
    calls, gate = counted
    gate.clear()
    request = _request()
    ticket = service.submit(request)
    _wait(lambda: len(calls) == 1)
    service.cancel(ticket.job_id)
    gate.set()
    with pytest.raises(JobCancelled):
        service.job_result(ticket.job_id, timeout=60)
    assert service.job_status(ticket.job_id).state == "cancelled"
    aid = analysis_id(request, source_fingerprint(resolve_source("smollm2", settings)))
    assert not service.store.has(aid)


def test_a_failing_job_leaves_the_worker_serving(service):
    def broken(ctx):
        ctx.progress(0.5, "About to fail")
        raise RuntimeError("boom")

    job = service.worker.submit(f"broken-{next(_serial)}", broken)
    with pytest.raises(AtlasError, match="RuntimeError: boom"):
        service.worker.result(job, timeout=30)
    status = service.worker.status(job)
    assert status.state == "failed" and "boom" in status.error
    # A failing analysis (bad model) and then a good one, on the same worker.
    with pytest.raises(ModelLoadError):
        service.run(_request(model="/etc"), timeout=30)
    aid = service.run(_request(), timeout=120)
    assert service.analysis(aid).meta["n_layers"] == 30
