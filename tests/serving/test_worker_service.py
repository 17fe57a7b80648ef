"""The worker service as a real process (`python -m backend.serving`) and its client.

Results over HTTP are checked against eager attention of the same model in this process and
against the in-process service's own refusals; then the service's security (token, bind), its
wire format (no pickle either way), twenty concurrent sessions, and a kill -9 during a cache
write followed by a restart on the same file.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from backend.analyses import AnalysisRequest
from backend.api import Atlas
from backend.errors import (AtlasError, InputError, JobInterrupted, NotFoundError,
                            WorkerUnavailable)
from backend.methods.binning import bin_matrix
from backend.local_reductions import exclude_first_token
from backend.service import AtlasService
from backend.serving.client import WorkerClient
from backend.serving.methods import EXPORTED
from tests.serving.worker_process import WorkerProcess

TOKEN = "a-shared-token-for-tests"
TEXT = "The trophy did not fit in the suitcase because it was too big."
SESSIONS = 20


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The service, with a token, on its own fresh cache."""
    process = WorkerProcess(tmp_path_factory.mktemp("worker-cache"), token=TOKEN).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(worker):
    client = WorkerClient(worker.url, TOKEN)
    yield client
    client.close()


@pytest.fixture(scope="module")
def analysed(client):
    return client.run(AnalysisRequest.make("attention", "smollm2", TEXT), timeout=300)


@pytest.fixture(scope="module")
def eager(smollm2):
    """(layer, head, query, key) float32 of `output_attentions=True` in eager mode."""
    ids = smollm2.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = smollm2.model(ids, output_attentions=True)
    return torch.stack(out.attentions)[:, 0].float().numpy()


def _post(url: str, method: str, body, token: str | None = TOKEN):
    """(status, content type, body bytes) of a raw POST /api/<method>."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/api/{method}", data, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


# What stays in the worker (objects, not results) and the whole (layer, head, T, T) tensor.
NOT_EXPORTED = {"maps", "attention", "ready", "close"}


def test_every_public_service_method_is_exported_and_none_is_a_static_pass_through():
    public = {name for name in dir(AtlasService) if not name.startswith("_")
              and callable(getattr(AtlasService, name))}
    assert public - set(EXPORTED) - NOT_EXPORTED - {"run", "job_result"} == set()
    assert set(EXPORTED) <= set(dir(WorkerClient))
    # Pure functions are imported where used (pages: backend.local_reductions), not wrapped.
    assert [name for name in public if isinstance(inspect.getattr_static(AtlasService, name),
                                                  staticmethod)] == []
    for name in ("run", "job_result", "ready", "close"):  # written out in the client
        assert name in vars(WorkerClient)


# --- results over HTTP ------------------------------------------------------------------------

def test_views_over_http_equal_eager_attention(client, analysed, eager):
    record = client.analysis(analysed)
    assert record.id == analysed and record.text == TEXT and record.kind == "attention"
    n = len(record.meta["tokens"])
    assert eager.shape == (30, 9, n, n)
    window = client.attention_matrix(analysed, 13, 8, slice(2, 9), slice(0, 6))
    assert window.dtype == np.float32
    np.testing.assert_allclose(window, eager[13, 8, 2:9, :6], atol=1e-5)
    np.testing.assert_allclose(client.attention_matrix(analysed, 4, None), eager[4].mean(0),
                               atol=1e-5)
    np.testing.assert_allclose(client.attention_row(analysed, 7, 3, 5), eager[7, 3, 5],
                               atol=1e-5)
    np.testing.assert_allclose(client.attention_column(analysed, 7, None, 2),
                               eager[7].mean(0)[:, 2], atol=1e-5)
    strongest = client.strongest_keys(analysed, 7, 3, 9, k=3)
    assert [k for k, _ in strongest] == list(np.argsort(-eager[7, 3, 9], kind="stable")[:3])
    overview = client.attention_overview(analysed, 20, 1, 4)
    expected = bin_matrix(eager[20, 1], 4)
    np.testing.assert_array_equal(overview.query_edges, expected.query_edges)
    np.testing.assert_allclose(overview.values, expected.values, atol=2e-3)  # stored 64-bin mean
    thumbnails = client.head_thumbnails(analysed, 4)
    assert thumbnails.shape == (30, 9, 4, 4)
    stats = client.head_statistics(analysed)
    assert set(stats) == {"entropy", "sink", "previous_token", "diagonal"}
    first_token = eager[:, :, 2:, 0].mean(-1)  # queries from 2 on (0 and 1 have no choice)
    np.testing.assert_allclose(stats["sink"], first_token, atol=1e-4)


def test_jobs_tickets_arrays_and_reductions_over_http(client, analysed):
    request = AnalysisRequest.make("attention", "smollm2", TEXT)
    assert client.submit(request).analysis_id == analysed  # cached: no job
    assert client.cached(request) == analysed
    assert analysed in [r.id for r in client.recent(limit=5)]
    names = client.array_names(analysed)
    assert "query/000" in names and "stats/entropy" in names
    assert client.array(analysed, "stats/entropy").shape == (30, 9)
    rows = client.target_rollout(analysed, 3)
    assert rows.shape[0] == 30
    np.testing.assert_allclose(rows.sum(-1), 1, atol=1e-4)
    # a page's own reduction of what the client gave
    matrix = client.attention_matrix(analysed, 0, None)
    np.testing.assert_allclose(exclude_first_token(matrix[5:]).sum(-1), 1, atol=1e-5)
    assert client.settings.max_tokens > 0 and client.rollout_engines()[0]["name"] == "embedded"


def test_the_notebook_api_through_the_worker(worker, analysed, eager):
    with Atlas(worker_url=worker.url, worker_token=TOKEN, progress=False) as atlas:
        result = atlas.attention("smollm2", TEXT)
        assert result.id == analysed and result.n_layers == 30
        np.testing.assert_allclose(result.matrix(13, head=8), eager[13, 8], atol=1e-5)
        assert atlas.load(analysed).text == TEXT
    with pytest.raises(InputError, match="either worker_url or settings"):
        Atlas(worker_url=worker.url, cache_dir="elsewhere")


def test_refusals_carry_the_services_own_messages(client, service, analysed):
    """The same bad requests, to the in-process service and through HTTP: same class, same
    message."""
    bad = [lambda s: s.submit(AnalysisRequest.make("no_such_kind", "smollm2", "A text.")),
           lambda s: s.submit(AnalysisRequest.make("attention", "smollm2", "")),
           lambda s: s.submit(AnalysisRequest.make("attention", "smollm2", "x", bins=3)),
           lambda s: s.analysis("0123456789abcdef01234567")]
    for call in bad:
        with pytest.raises(AtlasError) as local:
            call(service)
        with pytest.raises(AtlasError) as remote:
            call(client)
        assert type(remote.value) is type(local.value)
        assert str(remote.value) == str(local.value)
    with pytest.raises(InputError, match="empty or strided"):
        client.attention_matrix(analysed, 0, 0, slice(6, 2))
    with pytest.raises(InputError, match="Head 99 does not exist"):
        client.attention_matrix(analysed, 0, 99)


def test_bad_requests_are_4xx_with_a_json_message(worker, analysed):
    cases = [
        ("submit", {"request": {"kind": "attention", "model": "smollm2", "text": ""}}, 400,
         "The text is empty"),
        ("submit", {"request": {"kind": "nope", "model": "smollm2", "text": "x"}}, 400,
         "Unknown analysis kind 'nope'"),
        ("attention_matrix", {"aid": analysed, "layer": 0, "head": 0, "query": [1]}, 422,
         "query.1: Field required"),
        ("attention_matrix", {"aid": analysed, "layer": "top", "head": 0}, 422,
         "layer: Input should be a valid integer"),
        ("attention_matrix", {"aid": analysed, "layer": 0, "head": 0, "query": [5, 2]}, 400,
         "empty or strided"),
        ("analysis", {"aid": "0" * 24}, 404, "No analysis"),
        ("analysis", {"aid": "0" * 24, "extra": 1}, 422, "extra: Extra inputs are not permitted"),
        ("no_such_method", {}, 404, "Not Found"),
        ("analysis", b"{not json", 422, "JSON"),
    ]
    for method, body, status, message in cases:
        got, content_type, data = _post(worker.url, method, body)
        assert (got, content_type) == (status, "application/json"), (method, body, data)
        assert message in json.loads(data)["message"], (method, body, data)


def test_the_token_is_required_on_every_route_but_health(worker, analysed):
    for token in (None, "wrong-token"):
        status, _, data = _post(worker.url, "analysis", {"aid": analysed}, token=token)
        assert status == 401 and "ATLAS_WORKER_TOKEN" in json.loads(data)["message"]
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"{worker.url}/ready", timeout=10)
        assert ready.value.code == 401
    assert urllib.request.urlopen(f"{worker.url}/health", timeout=10).status == 200
    assert _post(worker.url, "analysis", {"aid": analysed})[0] == 200
    with pytest.raises(AtlasError, match="ATLAS_WORKER_TOKEN"):
        WorkerClient(worker.url).analysis(analysed)


def test_a_public_bind_without_a_token_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backend.serving", "--host", "0.0.0.0"],
                          env=WorkerProcess(tmp_path).env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "without a token" in done.stderr and "ATLAS_WORKER_TOKEN" in done.stderr
    assert not (tmp_path / "atlas.duckdb").exists()  # refused before opening anything


def test_no_pickle_on_the_wire(worker, analysed):
    status, content_type, body = _post(worker.url, "array", {"aid": analysed,
                                                            "name": "stats/entropy"})
    assert (status, content_type) == (200, "application/x-npy")
    assert body.startswith(b"\x93NUMPY")
    assert np.load(io.BytesIO(body), allow_pickle=False).shape == (30, 9)
    status, content_type, body = _post(worker.url, "head_statistics", {"aid": analysed})
    assert (status, content_type) == (200, "application/x-npz")
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        assert sorted(archive.files) == ["diagonal", "entropy", "previous_token", "sink"]
    status, content_type, body = _post(worker.url, "analysis", {"aid": analysed})
    assert (status, content_type) == (200, "application/json")
    # An object array (which needs pickle to load) sent to the worker is refused unread.
    npy = io.BytesIO()
    np.save(npy, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    membership = {"$ndarray": base64.b64encode(npy.getvalue()).decode()}
    status, _, body = _post(worker.url, "aligned_matrix", {"aid": analysed, "layer": 0,
                                                          "head": None, "membership": membership})
    assert status == 422 and "pickle" in json.loads(body)["message"]


def _wait_for(condition, every: float = 0.02, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(every)


# --- many sessions ----------------------------------------------------------------------------

@pytest.fixture
def sessions(worker):
    """fn(index, own client) in SESSIONS threads released at once -> their results in order."""
    def run(fn):
        start = threading.Barrier(SESSIONS)

        def session(i):
            own = WorkerClient(worker.url, TOKEN)
            start.wait()
            try:
                return fn(i, own)
            finally:
                own.close()
        with ThreadPoolExecutor(SESSIONS) as pool:
            return list(pool.map(session, range(SESSIONS)))
    return run


def test_twenty_identical_requests_compute_once(sessions, client):
    request = AnalysisRequest.make("attention", "smollm2", f"Shared by all {time.time_ns()}.")
    tickets = sessions(lambda i, own: own.submit(request))
    jobs = {t.job_id for t in tickets if t.job_id}
    assert len(jobs) == 1  # one job, joined by every session that did not find it cached
    aid = client.job_result(jobs.pop(), timeout=300)
    assert {t.analysis_id for t in tickets if t.analysis_id} <= {aid}
    assert [r.id for r in client.recent(limit=50)].count(aid) == 1


def test_twenty_distinct_requests_all_complete(sessions, client):
    texts = [f"Session {i} asks about boat {i} at {time.time_ns()}." for i in range(SESSIONS)]
    ids = sessions(lambda i, own: own.run(AnalysisRequest.make("attention", "smollm2",
                                                              texts[i]), timeout=600))
    assert len(set(ids)) == SESSIONS
    assert [client.analysis(aid).text for aid in ids] == texts


def test_a_cached_view_answers_while_a_long_job_runs(worker, client, analysed):
    other = WorkerClient(worker.url, TOKEN)  # another session
    ablation = AnalysisRequest.make("head_importance", "smollm2", f"Heads {time.time_ns()}.",
                                    method="ablation")  # every head ablated in turn: long
    long_job = client.submit(ablation).job_id
    try:
        _wait_for(lambda: client.job_status(long_job).state == "running")
        started = time.perf_counter()
        overview = other.attention_overview(analysed, 13, None, 64)
        tile = other.attention_matrix(analysed, 13, 8)
        elapsed = time.perf_counter() - started
        assert client.job_status(long_job).state == "running"  # it ran meanwhile
    finally:
        client.cancel(long_job)
        other.close()
    assert overview.values.shape[0] == tile.shape[0] == len(client.analysis(analysed).meta[
        "tokens"])
    assert elapsed < 2.0, f"a cached view took {elapsed:.2f} s beside a running job"


# --- kill -9 during a cache write, then a restart on the same file ----------------------------

def test_kill_during_a_cache_write_then_restart(worker, client, analysed):
    """Last in this module: it kills the module's worker and starts it again."""
    committed = {r.id: r for r in client.recent(limit=100)}  # what the tests above computed
    assert len(committed) >= SESSIONS + 2
    queries = {aid: client.array(aid, "query/005") for aid in list(committed)[:3]}
    long_text = " ".join(f"Sentence {i} of a longer input about saving." for i in range(25))
    ticket = client.submit(AnalysisRequest.make("attention", "smollm2", long_text))

    def saving() -> bool:
        status = client.job_status(ticket.job_id)
        assert not status.finished, f"the job ended before it was seen saving: {status}"
        return status.stage == "Saving to the cache"
    _wait_for(saving, every=0.005)
    worker.kill()  # while Store.save writes the analysis
    with pytest.raises(WorkerUnavailable):
        client.job_status(ticket.job_id)
    worker.start()  # the same cache file, the same port
    with pytest.raises(JobInterrupted, match="The worker restarted; the analysis was "
                                             "interrupted"):
        client.job_status(ticket.job_id)
    for aid, record in committed.items():
        loaded = client.analysis(aid)
        assert (loaded.text, loaded.meta) == (record.text, record.meta)
    for aid, query in queries.items():
        np.testing.assert_array_equal(client.array(aid, "query/005"), query)
    saved = client.cached(AnalysisRequest.make("attention", "smollm2", long_text))
    if saved is not None:  # the commit made it before the kill: then all of it
        assert client.array_names(saved) == client.array_names(analysed)
    with pytest.raises(NotFoundError):
        client.analysis("0" * 24)
