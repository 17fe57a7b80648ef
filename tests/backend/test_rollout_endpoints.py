"""Resampling through a real OpenAI-compatible server: `transformers serve` on the CPU.

One server for the session (it takes ~40 s to start here), loading models on demand by folder:
a copy of the packaged SmolLM2 whose generation config samples (`transformers serve` samples
only when it does), and Gemma 3 270M as the mismatched model. A server that dies mid-run is a
forwarding HTTP server in front of it that stops listening after a number of requests.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from backend.analyses import AnalysisRequest
from backend.analyses.thought_anchors import rollout_pool
from backend.errors import AtlasError
from backend.rollouts.registry import EndpointConfig, endpoint_configs

SOLUTION = ("First, I need the price of one pencil. Three pencils cost $1, so one costs 1/3. "
            "Then 27 pencils cost 27/3 = 9 dollars. Let me check: 9 times 3 is 27. "
            "So the answer is \\boxed{9}.")
PROBLEM = "A shop sells pencils at 3 for $1. How many dollars do 27 pencils cost?"
CHECK_REQUESTS = 5  # what EndpointEngine.check_model sends: 3 fingerprints, token ids, n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def converted_folder(name: str, settings) -> Path:
    from backend.models import resolve_source
    from backend.models.conversion import convert_gguf

    return convert_gguf(resolve_source(name, settings), settings, lambda *a: None)


@pytest.fixture(scope="session")
def served(settings, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    smol = tmp_path_factory.mktemp("served") / "smollm2-sampling"
    smol.mkdir()
    source = converted_folder("smollm2", settings)
    for f in source.iterdir():
        if f.name != "generation_config.json":
            (smol / f.name).symlink_to(f)
    generation = json.loads((source / "generation_config.json").read_text())
    (smol / "generation_config.json").write_text(json.dumps({**generation, "do_sample": True}))
    gemma = converted_folder("gemma3-270m", settings)
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"transformers serve did not start: {Path(log.name).read_text()[-2000:]}")
        time.sleep(1)
    yield {"url": url, "smol": str(smol.resolve()), "gemma": str(gemma.resolve())}
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:  # it may not stop on SIGTERM while a model is loaded
        server.kill()
        server.wait()
    log.close()


class DyingServer:
    """Forwards requests to `upstream`; after `limit` of them it stops listening (a server
    that died). `start()` again serves on the same port without a limit (restarted)."""

    def __init__(self, upstream: str, limit: int | None):
        self.upstream, self.limit, self.port, self.count = upstream, limit, free_port(), 0
        self.start(limit)

    def start(self, limit: int | None) -> None:
        owner = self
        self.limit = limit

        class Forward(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                owner.count += 1
                if owner.limit is not None and owner.count > owner.limit:
                    threading.Thread(target=owner.stop).start()
                    self.close_connection = True
                    return  # no answer: the connection drops
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(owner.upstream + self.path, body,
                                                 {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Forward)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def dying(served):
    proxy = DyingServer(served["url"], limit=CHECK_REQUESTS + 2)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def endpoint_service(served, dying, service, settings):
    from backend.service import AtlasService

    quick = {"retries": 1, "backoff_s": 0.2}
    endpoints = [
        {"name": "serve", "url": served["url"], "model": served["smol"], "concurrency": 4,
         **quick},
        {"name": "dying", "url": f"http://127.0.0.1:{dying.port}/v1", "model": served["smol"],
         "concurrency": 1, **quick},
        {"name": "refused", "url": f"http://127.0.0.1:{free_port()}", "model": served["smol"],
         **quick},
        {"name": "other-model", "url": served["url"], "model": served["gemma"], **quick},
    ]
    svc = AtlasService(replace(settings, rollout_endpoints=json.dumps(endpoints)),
                       store=service.store)
    yield svc
    svc.worker.shutdown()


def resampling(engine: str, rollouts: int, chunks: tuple[int, ...]) -> AnalysisRequest:
    # No forced-answer rollouts and short ones: this server decodes one request at a time.
    return AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                answer="9", engine=engine, rollouts=rollouts, chunks=chunks,
                                max_new_tokens=10, forced=False)


def pool_rows(svc, request, sentences: tuple[int, ...]) -> list[dict]:
    """Saved rollouts of `sentences` in the request's pool (one pool for every engine: the
    tests below share it, on different sentences)."""
    from backend.models import resolve_source, source_fingerprint

    fingerprint = source_fingerprint(resolve_source("smollm2", svc.settings))
    return [r for r in svc.store.load_rollouts(rollout_pool(request, fingerprint))
            if r["chunk_idx"] in sentences]


def test_resampling_through_the_server_is_saved_well_formed_and_extendable(endpoint_service):
    svc = endpoint_service
    assert [e["name"] for e in svc.rollout_engines()] == [
        "embedded", "serve", "dying", "refused", "other-model"]
    assert all("url" not in e for e in svc.rollout_engines())  # users never see addresses
    request = resampling("serve", 2, (3,))
    aid = svc.run(request, timeout=900)
    rows = pool_rows(svc, request, (3, 4))
    # sentence 3 and the next one (its importance compares the two)
    assert sorted((r["chunk_idx"], r["forced"], r["rollout_idx"]) for r in rows) == [
        (i, False, k) for i in (3, 4) for k in (0, 1)]
    plain = [r for r in rows if not r["forced"]]
    assert all(r["continuation"].strip() and r["chunk_resampled"] for r in plain)
    assert len({r["continuation"] for r in plain}) > 1  # the server samples: rollouts differ
    fraction = svc.array(aid, "different_trajectories_fraction")
    assert np.isnan(fraction[[0, 1, 2, 4]]).all() and 0 <= fraction[3] <= 1
    assert svc.analysis(aid).meta["engine"] == "serve"
    # More rollouts later: the saved ones are kept, only the third of each is sampled.
    svc.run(resampling("serve", 3, (3,)), timeout=900)
    again = pool_rows(svc, request, (3, 4))
    assert len(again) == 6 and all(r in again for r in rows)
    estimate = svc.resampling_estimate(_trace(svc), "serve", 5, (3,), max_new_tokens=10,
                                       forced=False)
    assert (estimate["rollouts_saved"], estimate["rollouts_to_sample"]) == (6, 4)
    assert estimate["forced_to_sample"] == 0 and estimate["rollouts_total"] == 10
    assert estimate["seconds"] > 0  # from the rate measured above


def _trace(svc) -> str:
    return svc.run(AnalysisRequest.make("ta_trace", "smollm2", SOLUTION, problem=PROBLEM,
                                        answer="9"), timeout=300)


def test_a_server_that_dies_keeps_what_it_sent_and_the_job_resumes(endpoint_service, dying):
    svc = endpoint_service
    request = resampling("dying", 2, (1,))
    with pytest.raises(AtlasError, match="were saved: run the analysis again to resume"):
        svc.run(request, timeout=900)
    kept = pool_rows(svc, request, (1, 2))
    assert len(kept) == 2  # the requests answered before it died, one rollout each
    dying.start(limit=None)  # the server is back
    svc.run(request, timeout=900)
    rows = pool_rows(svc, request, (1, 2))
    assert len(rows) == 4 and all(r in rows for r in kept)


def test_an_endpoint_that_does_not_answer_is_refused(endpoint_service):
    with pytest.raises(AtlasError, match="'refused' does not answer"):
        endpoint_service.run(resampling("refused", 2, (0,)), timeout=300)


def test_an_endpoint_serving_another_model_is_refused(endpoint_service):
    with pytest.raises(AtlasError, match="serves another model"):
        endpoint_service.run(resampling("other-model", 2, (0,)), timeout=600)
    assert not pool_rows(endpoint_service, resampling("other-model", 2, (0,)), (0,))


def test_endpoint_settings_from_json_and_toml(tmp_path, settings):
    toml = tmp_path / "endpoints.toml"
    toml.write_text('[[endpoint]]\nname = "lab"\nurl = "http://gpu:8000"\nmodel = "m"\n'
                    'api_key_env = "LAB_KEY"\nconcurrency = 64\n')
    [lab] = endpoint_configs(replace(settings, rollout_endpoints=str(toml)))
    assert lab == EndpointConfig("lab", "http://gpu:8000", "m", "LAB_KEY", 64)
    assert lab.base_url == "http://gpu:8000/v1"
    for bad in ('[{"name": "embedded", "url": "http://x", "model": "m"}]',
                '[{"name": "a", "url": "file:///etc/passwd", "model": "m"}]',
                '[{"name": "a"}]', "[not json"):
        with pytest.raises(AtlasError, match="ATLAS_ROLLOUT_ENDPOINTS"):
            endpoint_configs(replace(settings, rollout_endpoints=bad))
