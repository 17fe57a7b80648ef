"""The worker on Ray Serve, on a real local Ray cluster on the CPU: the ingress owning a fresh
cache and two model-worker replicas, driven through the ingress's HTTP API with the app's own
client (and once with the app itself in a browser)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import ray
import torch
from playwright.sync_api import expect
from ray import serve

from backend.analyses import AnalysisRequest
from backend.errors import AtlasError, JobInterrupted, WorkerUnavailable
from backend.methods.hooks import attention_implementation
from backend.serving.client import STATUS_TIMEOUT_S, WorkerClient
from backend.serving.ray_serve import APP_NAME, build_app
from backend.store import Store
# The browser's launch options (Debian's chromium) and the app server, as in tests/e2e.
from tests.e2e.conftest import browser_type_launch_args, running_streamlit, wait_idle  # noqa: F401
from tests.serving.worker_process import free_port

pytestmark = pytest.mark.timeout(900)

SESSIONS = 20

TEXT = "The trophy did not fit in the suitcase because it was too big."
PROBLEM = "A train leaves at 3 pm and travels 60 miles per hour. How far has it gone by 6 pm?"
SOLUTION = ("The train travels from 3 pm to 6 pm, so for three hours. Each hour it covers 60 "
            "miles. Three hours give 3 times 60 miles. So the answer is \\boxed{180}.")
TRACE = AnalysisRequest.make("ta_trace", "smollm2", SOLUTION, problem=PROBLEM, answer="180")
RESAMPLING_PARAMS = {"rollouts": 2, "max_new_tokens": 12}
RESAMPLING_LONG = AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                       answer="180", **RESAMPLING_PARAMS)
# About 420 tokens: a job of seconds on two CPU cores, long enough to act during it.
LONG_TEXT = " ".join(f"Line {i} of the ledger lists barrels of salt shipped north." for i in
                     range(30))


@dataclass
class RayWorker:
    url: str
    client: WorkerClient
    cache: Path
    committed: set[str] = field(default_factory=set)  # analyses the tests saw finish
    pools: dict[str, int] = field(default_factory=dict)  # rollout pool -> rollouts it must hold

    @staticmethod
    def replicas() -> list[dict]:
        """Each model-worker replica's info (id, pid, models, its jobs' states); they answer
        between jobs."""
        handle = serve.get_deployment_handle("ModelWorker", app_name=APP_NAME)
        return sorted(_own_thread(lambda: handle.broadcast("info").results()),
                      key=lambda r: r["replica"])

    @staticmethod
    def ingress_pid() -> int:
        handle = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
        return _own_thread(lambda: handle.info.remote().result())["pid"]

    def env(self) -> dict[str, str]:
        """The environment of a client process (the app): its own cache folder, never used."""
        return {**os.environ, "ATLAS_CACHE_DIR": str(self.cache / "client"), "HF_HUB_OFFLINE": "1"}

    def jobs(self) -> int:
        return sum(len(r["jobs"]) for r in self.replicas())


def _own_thread(call):
    """call() on a thread of its own: a handle's sync calls refuse a thread whose event loop
    runs (the browser tests' Playwright leaves one on the main thread)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(call).result()


@pytest.fixture(scope="module")
def ray_worker(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ray-cache")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(replicas_min=2, replicas_max=2, gpus_per_replica=0,
                        cpus_per_replica=1, env={"ATLAS_CACHE_DIR": str(cache)}),
              name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        yield RayWorker(url, WorkerClient(url), cache)
    finally:
        serve.shutdown()
        ray.shutdown()


def follow(client: WorkerClient, request: AnalysisRequest, timeout: float = 300,
           on_status=None) -> str:
    """Submit, poll until the job ends (calling `on_status(status)` each time), the id."""
    ticket = client.submit(request)
    if ticket.analysis_id:
        return ticket.analysis_id
    deadline = time.monotonic() + timeout
    while not (status := client.job_status(ticket.job_id)).finished:
        assert time.monotonic() < deadline, f"still {status}"
        if on_status:
            on_status(status)
        time.sleep(0.05)
    return client.job_result(ticket.job_id)


def test_an_attention_analysis_through_ray_equals_eager_attention(ray_worker, smollm2):
    aid = ray_worker.client.run(AnalysisRequest.make("attention", "smollm2", TEXT), timeout=300)
    ray_worker.committed.add(aid)
    ids = smollm2.tokenizer(TEXT)["input_ids"]
    with attention_implementation(smollm2.model, "eager"), torch.inference_mode():
        eager = smollm2.model(torch.tensor([ids]), output_attentions=True).attentions
    assert len(ray_worker.client.analysis(aid).meta["tokens"]) == len(ids)
    for layer, head in ((0, 0), (13, 8), (29, 4)):
        np.testing.assert_allclose(ray_worker.client.attention_matrix(aid, layer, head),
                                   eager[layer][0, head].numpy(), atol=2e-5)
    # The whole map's overview (stored by the replica, pooled by the ingress) is the eager
    # map's block means.
    overview = ray_worker.client.attention_overview(aid, 13, None, bins=4)
    mean = eager[13][0].mean(0).numpy()
    q, k = overview.query_edges, overview.key_edges
    expected = [[mean[q[i]:q[i + 1], k[j]:k[j + 1]].mean() for j in range(4)] for i in range(4)]
    np.testing.assert_allclose(overview.values, expected, atol=1e-5)


def _sessions(url: str, work) -> list:
    """work(i, own client) in SESSIONS threads released together (each a session of the app)
    -> their results in order."""
    clients = [WorkerClient(url) for _ in range(SESSIONS)]
    start = threading.Barrier(SESSIONS)

    def session(i: int):
        start.wait()
        return work(i, clients[i])
    with ThreadPoolExecutor(SESSIONS) as pool:
        return list(pool.map(session, range(SESSIONS)))


def test_twenty_identical_requests_compute_once_across_replicas(ray_worker):
    request = AnalysisRequest.make("attention", "smollm2", "Twenty students ask the same thing.")
    before = ray_worker.jobs()
    ids = _sessions(ray_worker.url, lambda i, own: follow(own, request))
    assert len(set(ids)) == 1
    ray_worker.committed.update(ids)
    assert ray_worker.jobs() == before + 1  # one compute on one replica, for all twenty


def test_twenty_distinct_requests_all_complete_on_both_replicas(ray_worker):
    texts = [f"Student {i} asks about the word number {i}." for i in range(SESSIONS)]
    before = {r["replica"]: len(r["jobs"]) for r in ray_worker.replicas()}
    ids = _sessions(ray_worker.url, lambda i, own: follow(
        own, AnalysisRequest.make("attention", "smollm2", texts[i])))
    assert len(set(ids)) == SESSIONS
    ray_worker.committed.update(ids)
    assert [ray_worker.client.analysis(aid).text for aid in ids] == texts  # none lost or mixed
    after = {r["replica"]: len(r["jobs"]) for r in ray_worker.replicas()}
    assert sum(after.values()) - sum(before.values()) == SESSIONS
    assert all(after[r] > before[r] for r in after), (before, after)  # both replicas computed
    assert all(r["models"] == ["smollm2"] for r in ray_worker.replicas())


def test_cancel_stops_the_job_on_its_replica(ray_worker):
    client = ray_worker.client
    ticket = client.submit(AnalysisRequest.make("attention", "smollm2", LONG_TEXT + " Cancel."))
    deadline = time.monotonic() + 120
    while "replica" not in (status := client.job_status(ticket.job_id)).detail:
        assert time.monotonic() < deadline and not status.finished, status
        time.sleep(0.02)
    client.cancel(ticket.job_id)
    while not (status := client.job_status(ticket.job_id)).finished:
        time.sleep(0.05)
    assert status.state == "cancelled"
    replica = status.detail["replica"]
    deadline = time.monotonic() + 60
    while (jobs := next(r["jobs"] for r in ray_worker.replicas() if r["replica"] == replica)
           )[-1] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert jobs[-1] == "cancelled"  # it stopped there too, not ran on to the end


def test_a_replica_killed_mid_job_is_retried_on_another(ray_worker):
    client = ray_worker.client
    killed: list[int] = []
    after: set[int] = set()  # replica processes the job reported from after the kill

    def kill_its_replica(status) -> None:
        pid = status.detail.get("replica_pid")
        if killed:
            after.add(pid)
        elif status.stage.startswith("Running the model"):
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    aid = follow(client, AnalysisRequest.make("attention", "smollm2", LONG_TEXT),
                 on_status=kill_its_replica)
    assert killed, "the job ended before its replica could be killed"
    assert after - {None, killed[0]}, "no other replica ran the job after the kill"
    ray_worker.committed.add(aid)
    record = client.analysis(aid)
    assert record.text == LONG_TEXT and record.meta["n_layers"] == 30
    assert client.attention_row(aid, 3, 0, 5).sum() == pytest.approx(1, abs=1e-4)


def test_a_replica_killed_during_resampling_keeps_the_saved_rollouts(ray_worker):
    client = ray_worker.client
    trace = client.run(TRACE, timeout=300)
    ray_worker.committed.add(trace)
    saved = lambda: client.resampling_estimate(trace, **RESAMPLING_PARAMS)  # noqa: E731
    ticket = client.submit(RESAMPLING_LONG)
    deadline = time.monotonic() + 300
    # Killed once the ingress has saved some of the rollouts (they stream in as they are
    # sampled), while the replica samples the others.
    while (estimate := saved())["rollouts_saved"] == 0:
        status = client.job_status(ticket.job_id)
        assert not status.finished and time.monotonic() < deadline, status
        time.sleep(0.02)
    status = client.job_status(ticket.job_id)
    assert not status.finished, "the job ended before its replica could be killed"
    os.kill(status.detail["replica_pid"], signal.SIGKILL)
    aid = client.job_result(ticket.job_id, timeout=300)
    ray_worker.committed.add(aid)
    after = saved()
    # Every rollout is saved once: the retry sampled only the missing ones, if any (sampling a
    # saved one again would have failed the job on the rollout table's primary key).
    assert after["rollouts_saved"] == after["rollouts_total"] and after["forced_to_sample"] == 0
    assert client.analysis(aid).meta["rollouts"] == RESAMPLING_PARAMS["rollouts"]
    pool = client.analysis(aid).meta["rollout_pool"]
    ray_worker.pools[pool] = 2 * after["rollouts_total"]  # free and forced


def test_the_app_analyses_a_text_on_the_ray_worker(ray_worker, page):
    """The Streamlit app pointed at the ingress (ATLAS_WORKER_URL), in a real browser."""
    text = "A browser session asks the cluster about this sentence."
    with running_streamlit(ray_worker) as app_url:
        page.goto(app_url)
        wait_idle(page)
        area = page.get_by_label("Text")
        area.fill(text)
        area.press("Control+Enter")
        page.get_by_role("button", name="Analyse").click()
        wait_idle(page)
        expect(page).to_have_url(re.compile(r"[?&]a=[0-9a-f]{24}"), timeout=120_000)
        expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
        aid = parse_qs(urlparse(page.url).query)["a"][0]
    assert ray_worker.client.analysis(aid).text == text  # computed and kept by the cluster
    assert not (ray_worker.cache / "client" / "atlas.duckdb").exists()  # all of it is remote
    ray_worker.committed.add(aid)


def test_a_job_whose_replicas_die_twice_fails_with_a_message(ray_worker):
    killed: list[int] = []

    def kill_each_replica(status) -> None:
        pid = status.detail.get("replica_pid")
        if pid not in killed and len(killed) < 2 and status.stage.startswith("Running the model"):
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(AtlasError, match="stopped, twice") as error:
        follow(ray_worker.client, AnalysisRequest.make("attention", "smollm2",
                                                       LONG_TEXT + " Twice."),
               on_status=kill_each_replica)
    assert len(killed) == 2 and "submit it again" in str(error.value)


def _killed_ingress(ray_worker, job_id: str) -> JobInterrupted:
    """kill -9 of the ingress, then what polling `job_id` gives: "unavailable", within seconds
    each time (what the app shows), while Serve starts a new ingress on the same cache, then
    that the job was interrupted."""
    client, killed = ray_worker.client, ray_worker.ingress_pid()
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            client.job_status(job_id)  # (answered by the killed one before it was gone)
        except WorkerUnavailable:
            pass
        except JobInterrupted as e:
            assert ray_worker.ingress_pid() != killed
            return e
        # the client's status timeout and its retries, with room for a loaded machine
        assert time.monotonic() - began < STATUS_TIMEOUT_S + 5, "a poll hung"
        time.sleep(0.05)
    raise AssertionError("no new ingress")


def _loads_as_before(client: WorkerClient, analyses: dict[str, tuple]) -> None:
    """Each analysis's record and a sample of its arrays, read again, equal what was read
    before."""
    for aid, (record, names, arrays) in analyses.items():
        loaded = client.analysis(aid)
        assert (loaded.kind, loaded.text, loaded.meta) == (record.kind, record.text, record.meta)
        assert client.array_names(aid) == names
        for name, values in arrays.items():
            np.testing.assert_array_equal(client.array(aid, name), values)


def _read(client: WorkerClient, aids) -> dict[str, tuple]:
    """aid -> (record, array names, {name: array} of its first and last array)."""
    read = {}
    for aid in aids:
        names = client.array_names(aid)
        read[aid] = (client.analysis(aid), names,
                     {name: client.array(aid, name) for name in names[:1] + names[-1:]})
    return read


def test_the_ingress_killed_while_it_saves_restarts_on_an_intact_cache(ray_worker):
    """kill -9 of the ingress, the cache file's only writer, while it writes an analysis."""
    client = ray_worker.client
    before = _read(client, ray_worker.committed)
    request = AnalysisRequest.make("attention", "smollm2", LONG_TEXT + " Saved?")
    ticket = client.submit(request)
    deadline = time.monotonic() + 300
    while (status := client.job_status(ticket.job_id)).stage != "Saving to the cache":
        assert not status.finished and time.monotonic() < deadline, status
        time.sleep(0.005)
    error = _killed_ingress(ray_worker, ticket.job_id)
    assert "interrupted" in str(error)
    _loads_as_before(client, before)
    saved = client.cached(request)
    if saved is not None:  # the commit made it before the kill: then all of it
        other = client.run(AnalysisRequest.make("attention", "smollm2", TEXT), timeout=300)
        assert client.array_names(saved) == client.array_names(other)
    aid = client.run(request, timeout=300)  # submitted again, as the app does
    assert client.analysis(aid).text == request.text
    ray_worker.committed.add(aid)


def test_the_ingress_killed_mid_job_keeps_the_rollouts_and_frees_the_replicas(ray_worker):
    """kill -9 of the ingress while one replica runs a long job and the other samples rollouts
    that it streams in: the rollouts saved stay saved, the resampling submitted again resumes
    from them, and the long job stops on its replica (no one reads its stream any more)."""
    client = ray_worker.client
    trace = client.run(TRACE, timeout=300)
    # Every head ablated in turn on about 100 tokens: minutes on this CPU, progress every pass.
    ablation = client.submit(AnalysisRequest.make(
        "head_importance", "smollm2", " ".join(LONG_TEXT.split()[:90]), method="ablation"))
    deadline = time.monotonic() + 300
    while "replica" not in (status := client.job_status(ablation.job_id)).detail:
        assert not status.finished and time.monotonic() < deadline, status
        time.sleep(0.05)
    busy = status.detail["replica"]
    params = {**RESAMPLING_PARAMS, "max_new_tokens": 10}  # a pool of its own
    request = AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                   answer="180", **params)
    saved = lambda: client.resampling_estimate(trace, **params)  # noqa: E731
    resampling = client.submit(request)
    # Killed once the ingress has saved some of the rollouts, while the other replica samples
    # the rest.
    while (estimate := saved())["rollouts_saved"] == 0:
        status = client.job_status(resampling.job_id)
        assert not status.finished and time.monotonic() < deadline, status
        time.sleep(0.02)
    assert not client.job_status(resampling.job_id).finished, "it ended before the kill"
    assert not client.job_status(ablation.job_id).finished, "it ended before the kill"
    _killed_ingress(ray_worker, resampling.job_id)
    with pytest.raises(JobInterrupted):
        client.job_status(ablation.job_id)
    # A replica answers between jobs: the ablation's has stopped it, not run it to its end.
    assert next(r["jobs"] for r in ray_worker.replicas() if r["replica"] == busy)[-1] == \
        "cancelled"
    assert saved()["rollouts_saved"] >= estimate["rollouts_saved"]
    aid = client.run(request, timeout=300)
    after = saved()
    # Every rollout saved once: the resumed job sampled only those missing (sampling a saved
    # one again would have failed it on the rollout table's primary key).
    assert after["rollouts_saved"] == after["rollouts_total"] and after["forced_to_sample"] == 0
    ray_worker.committed.add(aid)
    ray_worker.pools[client.analysis(aid).meta["rollout_pool"]] = 2 * after["rollouts_total"]


def test_every_committed_analysis_loads_after_the_service_stops(ray_worker):
    served = {aid: (ray_worker.client.analysis(aid), ray_worker.client.array_names(aid))
              for aid in ray_worker.committed}
    serve.shutdown()  # the ingress releases the cache file
    store = Store(ray_worker.cache / "atlas.duckdb")
    try:
        for aid, (record, names) in served.items():
            loaded = store.load(aid)
            assert (loaded.kind, loaded.text) == (record.kind, record.text)
            assert store.array_names(aid) == names
            for name in names[:1] + names[-1:]:  # (each read is a query: a sample of them)
                values = store.load_array(aid, name)  # whole: npy, never pickled
                assert record.kind != "attention" or np.isfinite(values).all()
        for pool, count in ray_worker.pools.items():  # each rollout saved once
            assert len(store.load_rollouts(pool)) == count
    finally:
        store.close()
