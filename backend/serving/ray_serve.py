"""The worker service on Ray Serve: one ingress that owns the cache, model-worker replicas that
compute, on as many GPUs and hosts as the Ray cluster has.

    python -m backend.serving.ray_serve [--address auto] [--replicas-min 1 --replicas-max 2]
        [--gpus-per-replica 1] [--host 127.0.0.1 --port 8600]

- `Ingress` (one replica, on the head node): the worker's HTTP API (backend.serving.http_api)
  around an AtlasService whose jobs run their compute through `RayCompute`. It keeps everything
  that must be in one place: the DuckDB file (it is its only writer), the job table, one job per
  analysis id (identical requests join it) and each job's progress.
- `ModelWorker` (autoscaled between a minimum and a maximum, `num_gpus` each, fractional to share
  a GPU): loads models and runs one job at a time on its device. Serve's model multiplexing
  routes a job to a replica that already holds its model (by reference and weights
  fingerprint). A job is a stream of events: progress, rollouts to save as they come, finally
  the record and its arrays (through Ray's own transport between the cluster's processes).
- Faults: a replica that dies mid-job is retried once on another (or the restarted one) with
  the rollouts saved so far; a second loss fails the job with a message saying so. Nothing is
  written to the cache until the ingress saves a whole result in one transaction. An ingress
  that dies takes its job table along: Serve starts a new one on the same cache file, its
  jobs report that they were interrupted (the app submits them again; resampling resumes from
  the rollouts saved), and the replicas stop the jobs it had sent them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import replace

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve._private.constants import SERVE_NAMESPACE  # where Serve's actors are named

from backend import analyses
from backend.analyses import AnalysisRequest
from backend.config import REPO_ROOT, Settings
from backend.errors import AtlasError
from backend.models import LoadedModel, resolve_source, source_fingerprint
from backend.serving.__main__ import is_loopback
from backend.serving.client import DEFAULT_PORT
from backend.serving.http_api import create_app
from backend.serving.rollout_log import RolloutLog
from backend.service import AtlasService
from backend.store import Store
from backend.worker import JobCancelled, JobContext, JobStatus, Worker

log = logging.getLogger(__name__)

APP_NAME = "atlas"
MODELS_PER_REPLICA = 2  # the model pool's size on each replica (the Worker's default)
HEARTBEAT_S = 0.5  # a replica re-sends its job's status this often, so a cancel is seen soon
CALLER_CHECK_S = 2.0  # and checks this often that the ingress reading its job's stream lives
ATTEMPTS = 2  # a job whose replica dies is retried once
JOBS_PER_REPLICA = 4  # ingress jobs in flight per replica: the queue Serve autoscales on
# What replicas need of the starting process's environment (Ray workers may be started by
# `ray start` in another shell or on another host).
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


def model_id(ref: str, fingerprint: str) -> str:
    """The multiplexed model id of a model reference at given weights (new weights: new id)."""
    return f"{fingerprint} {ref}"


def model_ref(multiplexed_id: str) -> str:
    return multiplexed_id.split(" ", 1)[1]


@serve.deployment(max_ongoing_requests=1)  # one job at a time per device; others wait in Serve
class ModelWorker:
    """A replica: its own Worker (model pool, job thread, progress, cancel) on its device."""

    def __init__(self):
        self.worker = Worker(Settings.from_env(), max_models=MODELS_PER_REPLICA)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.jobs: deque[str] = deque(maxlen=128)  # the latest job ids, oldest first

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def model(self, multiplexed_id: str) -> LoadedModel:
        # Loaded as a job of the replica's Worker: its pool is only ever touched by that thread.
        ref = model_ref(multiplexed_id)
        job = self.worker.submit(f"load {multiplexed_id}", lambda ctx: ctx.model(ref))
        return await asyncio.to_thread(self.worker.result, job)

    async def compute(self, request: AnalysisRequest, aid: str, saved: dict[str, list[dict]],
                      caller: str | None = None):
        """Events of one job, as dicts: {"status": JobStatus} (also every HEARTBEAT_S),
        {"rollouts": pool, "rows": [...]} (sampled rows to save), then {"result": (record,
        arrays)} or {"failed": message} or {"cancelled": message}. Closing the stream cancels
        the job: it raises JobCancelled at its next progress report. So does the death of
        `caller` (the ingress's actor name), checked every CALLER_CHECK_S: Ray does not end a
        stream whose reader died, and the job would hold the device for nobody."""
        yield {"status": self._status(f"Loading {request.model} on a model worker")}
        try:
            await self.model(serve.get_multiplexed_model_id())
        except AtlasError as e:
            yield {"failed": str(e)}
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        put = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
        rollouts = RolloutLog(saved, lambda pool, rows: put({"rollouts": pool, "rows": rows}))
        job = self.worker.submit(aid, lambda ctx: analyses.compute(ctx, request, aid, rollouts))
        self.jobs.append(job)
        stop = self.worker.listen(lambda status: status.id == job and put({"status": status}))
        finished = False
        checked = loop.time()
        try:
            while not finished:
                try:
                    event = await asyncio.wait_for(events.get(), HEARTBEAT_S)
                except TimeoutError:
                    event = {"status": self.worker.status(job)}
                if caller and loop.time() - checked > CALLER_CHECK_S:
                    checked = loop.time()
                    if not await asyncio.to_thread(_alive, caller):
                        log.warning("The ingress of job %s is gone: cancelling it", aid)
                        return  # (the job is cancelled below)
                status = event.get("status")
                finished = status is not None and status.finished
                if not finished:
                    yield self._tagged(event)
            yield await asyncio.to_thread(self._outcome, job)
        finally:
            stop()
            if not finished:  # the ingress closed the stream: a cancel, or it went away
                self.worker.cancel(job)

    def _outcome(self, job: str) -> dict:
        try:
            return {"result": self.worker.result(job)}
        except JobCancelled as e:
            return {"cancelled": str(e)}
        except AtlasError as e:
            return {"failed": str(e)}

    def _status(self, stage: str) -> JobStatus:
        return JobStatus("", "running", 0.0, stage, 0.0, None)

    def _tagged(self, event: dict) -> dict:
        """Status events carry the replica (its id and process, for logs and fault drills) and
        its stage's own time-left estimate."""
        if "status" in event:
            status = event["status"]
            event = {"status": replace(status, detail={
                **status.detail, "eta_s": status.eta_s, "replica": self.replica,
                "replica_pid": os.getpid()})}
        return event

    def info(self) -> dict:
        """This replica: id, process id, models held, and its latest jobs' states (oldest
        first)."""
        return {"replica": self.replica, "pid": os.getpid(),
                "models": self.worker.models.references(),
                "jobs": [self.worker.status(j).state for j in self.jobs]}


def _alive(replica_actor: str) -> bool:
    """Whether the Serve replica of this actor name lives (Serve never restarts a replica's
    actor: it starts a new one, under a new name)."""
    try:
        ray.get_actor(replica_actor, SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


class RayCompute:
    """An AtlasService executor: each job's compute on a ModelWorker replica holding its model.

    The ingress's job thread follows the replica's stream: progress into the job's context,
    rollouts into the store as they come, the result back to the service, which saves it."""

    def __init__(self, model_worker):
        self.model_worker = model_worker  # a DeploymentHandle of ModelWorker
        self._pool_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __call__(self, ctx: JobContext, request: AnalysisRequest, aid: str, store: Store):
        fingerprint = source_fingerprint(resolve_source(request.model, ctx.settings))
        pools = analyses.rollout_pools(request, fingerprint)
        handle = self.model_worker.options(stream=True,
                                           multiplexed_model_id=model_id(request.model,
                                                                         fingerprint))
        caller = ray.get_runtime_context().get_actor_name()  # the ingress's, in Serve
        with self._pools_held(pools, ctx):
            for attempt in range(1, ATTEMPTS + 1):
                # Read again on a retry: rows the lost replica sent are saved and not redone.
                saved = {pool: store.load_rollouts(pool) for pool in pools}
                try:
                    return self._follow(ctx, handle.compute.remote(request, aid, saved, caller),
                                        store)
                except RayActorError as e:
                    log.warning("Model worker lost during job for %s (attempt %d): %s", aid,
                                attempt, e)
                    if attempt == ATTEMPTS:
                        raise AtlasError(
                            f"The model worker computing this analysis stopped, twice (the "
                            f"second time: {type(e).__name__}). Rollouts it sampled are saved; "
                            "submit it again to resume.") from None
                    ctx.progress(0.0, "A model worker stopped; retrying on another")

    @staticmethod
    def _follow(ctx: JobContext, stream, store: Store):
        try:
            for event in stream:
                if "status" in event:
                    status = event["status"]
                    ctx.progress(status.fraction, status.stage, status.detail)  # cancel: raises
                elif "rollouts" in event:
                    store.save_rollouts(event["rollouts"], event["rows"])
                elif "result" in event:
                    return event["result"]
                elif "cancelled" in event:
                    raise JobCancelled(event["cancelled"])
                else:
                    raise AtlasError(event["failed"])
            raise AtlasError("The model worker's stream ended without a result.")
        finally:
            stream.cancel()  # no-op once it has finished; stops the replica's job otherwise

    @contextmanager
    def _pools_held(self, pools: list[str], ctx: JobContext):
        """Jobs extending one rollout pool run one after another (the later one then reuses
        the earlier one's rollouts instead of sampling the same indices twice)."""
        with self._lock:
            locks = [self._pool_locks.setdefault(pool, threading.Lock()) for pool in pools]
        held = []
        try:
            for lock in locks:
                while not lock.acquire(timeout=HEARTBEAT_S):
                    ctx.progress(0.0, "Waiting for another job sampling the same rollouts")
                held.append(lock)
            yield
        finally:
            for lock in held:
                lock.release()


@serve.deployment(num_replicas=1, max_ongoing_requests=256)  # one: it owns the cache file
@serve.ingress()
class Ingress:
    """The worker's HTTP API on Serve's proxy, over an AtlasService computing on ModelWorker."""

    def __init__(self, model_worker, parallel: int, token: str | None):
        settings = Settings.from_env()
        self.token = token
        self.service = AtlasService(settings, worker=Worker(settings, parallel=parallel),
                                    executor=RayCompute(model_worker))

    def __serve_build_asgi_app__(self):
        return create_app(self.service, token=self.token)

    def info(self) -> dict:
        """This replica: process id and cache file (for logs and fault drills)."""
        return {"pid": os.getpid(), "cache": str(self.service.store.path)}


def build_app(replicas_min: int = 1, replicas_max: int = 1, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, token: str | None = None,
              env: dict[str, str] | None = None):
    """The Serve application: Ingress bound to an autoscaled ModelWorker. `env`: environment
    variables for every replica (default: the ATLAS_* and hub settings of this process)."""
    if not 0 <= replicas_min <= replicas_max or replicas_max < 1:
        raise ValueError("Replicas: need 0 <= minimum <= maximum and a maximum of at least 1.")
    env_vars = {**_passed_env(), **(env or {})}
    # Ray gives each GPU replica its device (CUDA_VISIBLE_DEVICES): "cuda" is that one.
    device = {"ATLAS_DEVICE": "cuda" if gpus_per_replica > 0 else "cpu"}
    scaling = ({"num_replicas": replicas_max} if replicas_min == replicas_max else
               {"autoscaling_config": {"min_replicas": replicas_min,
                                       "max_replicas": replicas_max,
                                       "target_ongoing_requests": 1}})
    worker = ModelWorker.options(
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica,
                           "runtime_env": {"env_vars": {**env_vars, **device}}}, **scaling)
    ingress = Ingress.options(ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": env_vars},
        "resources": {"node:__internal_head__": 0.001}})  # the cache file is on the head node
    return ingress.bind(worker.bind(), JOBS_PER_REPLICA * replicas_max, token)


def _passed_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("ATLAS_") or k in PASSED_ENV}
    # Replicas import this checkout (on other hosts: the same path, or see the README).
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([path] if path else []))
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m backend.serving.ray_serve",
        description="Serve the model worker on Ray Serve: an ingress owning the cache and "
                    "model-worker replicas (one per GPU by default).")
    parser.add_argument("--address", default=None,
                        help='a running cluster: "auto" (this host\'s) or ray://head:10001; '
                             "default: start a local one")
    parser.add_argument("--replicas-min", type=int, default=1)
    parser.add_argument("--replicas-max", type=int, default=None,
                        help="default: the minimum (no autoscaling)")
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="1 on GPU hosts (default when the cluster has GPUs), 0.5 for two "
                             "replicas sharing one, 0 on the CPU")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    token = os.environ.get("ATLAS_WORKER_TOKEN") or None
    if token is None and not is_loopback(args.host):
        parser.error(f"listening on {args.host} needs ATLAS_WORKER_TOKEN (give the app the same "
                     "value), or listen on 127.0.0.1.")
    ray.init(address=args.address, include_dashboard=False)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args.replicas_min, args.replicas_max or args.replicas_min, gpus,
                        args.cpus_per_replica, token), name=APP_NAME, route_prefix="/")
    print(f"Serving on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    serve.delete(APP_NAME)
    if args.address is None:  # the cluster this command started
        serve.shutdown()


if __name__ == "__main__":
    main()
