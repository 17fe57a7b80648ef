"""A client of the worker service with AtlasService's interface, so pages work with either.

    client = WorkerClient("http://127.0.0.1:8600", token=None)
    aid = client.run(AnalysisRequest.make("attention", "smollm2", "Hello world"))
    client.attention_matrix(aid, 3, head=None, query=slice(0, 8))   # (query, key) float32

Every exported method (backend.serving.methods.EXPORTED) forwards to the worker with the
service's own signature and docstring (pages compute the pure reductions of what they hold
themselves: backend.local_reductions). The service's errors come back as the same classes
with the same messages. A worker that does not answer (stopped, restarting) is retried
briefly, then raises WorkerUnavailable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from urllib.parse import urlsplit

import urllib3

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.errors import AtlasError, CacheFileError, InputError, WorkerUnavailable
from backend.serving import DEFAULT_PORT, codec
from backend.serving.methods import METHODS, Method
from backend.worker import JobStatus

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
RETRY_DELAYS_S = (0.2, 0.5, 1.0)  # about 2 s of retries before a call says the worker is down
LONG_POLL_S = 10.0  # a wait for a job's result is split into requests of at most this long
# A job's status is read from the worker's memory: a worker that takes longer than this to say it
# is not answering (a Ray Serve proxy holds requests while the ingress restarts, for as long as
# that takes), and the page says so instead of hanging.
STATUS_TIMEOUT_S = 5.0


class WorkerClient:
    """AtlasService's interface over HTTP. Thread-safe: sessions of one app share one client
    (and its pool of connections)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 300.0,
                 connect_timeout_s: float = 2.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"The worker URL must be http(s)://host:port, not {url!r}.")
        self.url = url.rstrip("/")
        self._headers = {"Content-Type": codec.JSON}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._connect_timeout_s = connect_timeout_s
        self._http = urllib3.PoolManager(
            maxsize=64, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=timeout_s))
        self._settings: Settings | None = None

    def __repr__(self) -> str:
        return f"WorkerClient({self.url!r})"

    # --- transport ------------------------------------------------------------------------
    def _send(self, verb: str, path: str, body: bytes | None = None,
              read_timeout_s: float | None = None) -> urllib3.BaseHTTPResponse:
        """The worker's response, after retrying connection failures and 'starting' answers.
        `read_timeout_s`: this request's (default: the client's)."""
        reason = ""
        timeout = None if read_timeout_s is None else urllib3.Timeout(
            connect=self._connect_timeout_s, read=read_timeout_s)
        for delay in (*RETRY_DELAYS_S, None):
            try:
                response = self._http.request(verb, self.url + path, body=body,
                                              headers=self._headers, timeout=timeout)
            except urllib3.exceptions.ReadTimeoutError:
                raise WorkerUnavailable(f"The worker at {self.url} took too long to answer.") \
                    from None
            except urllib3.exceptions.HTTPError as e:  # refused, reset, unreachable
                reason = _reason(e)
            else:
                error = codec.error_from(503, response.data) if response.status == 503 else None
                if error is None or isinstance(error, CacheFileError):
                    return response
                reason = str(error)  # starting, or a proxy's "unavailable": worth a retry
            if delay is not None:
                time.sleep(delay)
        raise WorkerUnavailable(f"The worker at {self.url} does not answer ({reason}).")

    def _call(self, method: Method, *args, read_timeout_s: float | None = None, **kwargs):
        body = json.dumps(method.encode(*args, **kwargs)).encode()
        return _result(self._send("POST", f"/api/{method.name}", body, read_timeout_s))

    def ready(self) -> bool:
        """Whether the worker answers and serves requests now (one quick try, never raises)."""
        try:
            return self._http.request("GET", f"{self.url}/ready", headers=self._headers,
                                      timeout=2.0).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    def close(self) -> None:
        self._http.clear()

    # --- what is not a plain forward ------------------------------------------------------
    @property
    def settings(self) -> Settings:
        """The worker's settings (its limits and device), read once; `lessons_dir` is this
        process's own, since lesson files are read where the app runs."""
        if self._settings is None:
            remote = _result(self._send("GET", "/api/settings"))
            self._settings = dataclasses.replace(remote,
                                                 lessons_dir=Settings.from_env().lessons_dir)
        return self._settings

    def job_status(self, job_id: str) -> JobStatus:
        """The job's state, progress and time left; WorkerUnavailable when the worker does not
        answer within STATUS_TIMEOUT_S."""
        return self._call(METHODS["job_status"], job_id, read_timeout_s=STATUS_TIMEOUT_S)

    def job_result(self, job_id: str, timeout: float | None = None) -> str:
        """The analysis id a finished job produced (raises the job's error). Blocks up to
        `timeout` seconds, in requests of at most LONG_POLL_S."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_S if deadline is None else deadline - time.monotonic()
            try:
                return self._call(METHODS["job_result"], job_id, max(0.0, min(left, LONG_POLL_S)))
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def run(self, request: AnalysisRequest, timeout: float | None = None) -> str:
        """Submit and wait: the analysis id. For scripts, benchmarks and tests."""
        ticket = self.submit(request)
        return ticket.analysis_id or self.job_result(ticket.job_id, timeout)


def _result(response: urllib3.BaseHTTPResponse):
    if response.status >= 400:
        raise codec.error_from(response.status, response.data)
    return codec.decode(response.data, response.headers.get("Content-Type", ""))


def _reason(error: Exception) -> str:
    text = str(error)
    if "refused" in text.lower():
        return "connection refused"
    return text.split(": ", 1)[-1][:200] or type(error).__name__


def _forward(method: Method):
    def call(self: WorkerClient, *args, **kwargs):
        return self._call(method, *args, **kwargs)

    call.__name__ = call.__qualname__ = method.name
    call.__doc__ = method.doc
    call.__signature__ = method.signature
    return call


for _method in METHODS.values():  # the table's methods, except the ones written out above
    if _method.name not in vars(WorkerClient):
        setattr(WorkerClient, _method.name, _forward(_method))


def worker_from_env() -> WorkerClient | None:
    """A client of the worker named by ATLAS_WORKER_URL (token: ATLAS_WORKER_TOKEN), or None
    when it is not set."""
    url = os.environ.get("ATLAS_WORKER_URL", "").strip()
    return WorkerClient(url, os.environ.get("ATLAS_WORKER_TOKEN") or None) if url else None


def running_worker(settings: Settings) -> WorkerClient | None:
    """The worker a command on this machine should use: ATLAS_WORKER_URL's, else the default
    local worker if one answers and serves the cache folder of `settings`; else None."""
    client = worker_from_env()
    if client is not None:
        return client
    local = WorkerClient(DEFAULT_URL, os.environ.get("ATLAS_WORKER_TOKEN") or None,
                         connect_timeout_s=0.5)
    try:
        if local.ready() and local.settings.cache_dir == settings.cache_dir:
            return local
    except (AtlasError, ValueError):  # something else on that port: not our worker
        pass
    local.close()
    return None
