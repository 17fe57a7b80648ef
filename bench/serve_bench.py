"""Cached views through the worker service vs in-process, with 1, 10 and 50 concurrent clients.

    python -m bench.serve_bench [--tokens 512] [--clients 1 10 50] [--requests 20]

One cached SmolLM2 attention analysis (about --tokens tokens) on a fresh cache. Two views of it:
a 256 x 256 `attention_matrix` tile of one head (recomputed from query and key at each request)
and the whole-input `attention_overview` of a layer's head mean (from the stored overview).
Each client is a thread doing --requests requests of a view, over layers and heads in turn,
after one warm-up pass over every layer and head.
First through the real worker service (`python -m backend.serving`, one WorkerClient per
client), then, with the worker stopped, in this process (one AtlasService shared by the
threads, as Streamlit sessions share it) on the same cache file. Prints requests/s and p50/p95
latency of both and their ratios (service / in-process). Not a timed test.

    python -m bench.serve_bench --replicas [--jobs 12] [--job-tokens 128] [--gpus-per-replica 0]
        [--random qwen2.5-1.5b [--layers N] [--tokenizer DIR]]

`--replicas` measures instead the throughput of distinct attention jobs on Ray Serve with 1 vs
2 model-worker replicas (see `distinct_jobs`), of the packaged SmolLM2 or, with `--random`, of a
published architecture with random weights (see `random_model`; no hub needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.serving.client import WorkerClient
from bench.ablation_bench import PRESETS
from tests.serving.worker_process import WorkerProcess, free_port

PARAGRAPH = ("Attention lets every token look back at the tokens before it. Each head learns its "
             "own pattern: some follow the previous word, some jump to the first token, and some "
             "copy what came after an earlier occurrence of the current word. ")
TILE = 256


def views(aid: str, n_tokens: int) -> dict:
    """view name -> fn(service, i): the i-th request of that view."""
    start = max(0, n_tokens - TILE)
    window = slice(start, start + TILE)
    return {
        f"{TILE}x{TILE} tile": lambda s, i: s.attention_matrix(aid, i % 30, i % 9, window,
                                                               window),
        "overview": lambda s, i: s.attention_overview(aid, i % 30, None, 64),
    }


def warm(service, view) -> None:
    """Every layer and head of a view once: what the service keeps in memory is loaded."""
    for i in range(30 * 9):
        view(service, i)


def measure(make_service, view, clients: int, requests: int) -> dict:
    """requests/s over all clients and p50/p95 latency (ms) of one view."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        service = make_service()
        view(service, c)  # warm: its connection
        start.wait()
        own = []
        for r in range(requests):
            began = time.perf_counter()
            view(service, c * requests + r)
            own.append(time.perf_counter() - began)
        with lock:
            latencies.extend(own)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        start.wait()
        began = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / wall, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95))}


def random_model(preset: str, layers: int | None, tokenizer: str | None) -> str:
    """The model reference of a folder in the first model folder (kept between runs) holding
    `preset`'s architecture (bench.ablation_bench.PRESETS; its first `layers` layers) with
    random bf16 weights and the tokenizer of folder `tokenizer` (default: the packaged SmolLM2's
    converted copy). Job time depends on the shapes, not on the weight values."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from backend.models import resolve_source
    from backend.models.conversion import converted_folder

    settings = Settings.from_env()
    name = f"random-{preset}" + (f"-{layers}-layers" if layers else "")
    folder = settings.model_dirs[0] / name
    if (folder / "config.json").is_file():
        return name
    fields = {**PRESETS[preset], **({"num_hidden_layers": layers} if layers else {})}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    words = AutoTokenizer.from_pretrained(
        tokenizer or converted_folder(resolve_source("smollm2", settings), settings))
    if len(words) > config.vocab_size:
        raise SystemExit(f"The tokenizer has {len(words)} tokens, {preset} embeds only "
                         f"{config.vocab_size}: give another --tokenizer.")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(f"{name}.partial")  # renamed once whole: no torn folder
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    words.save_pretrained(partial)
    partial.rename(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the device is for the replicas
    return name


def distinct_jobs(args) -> None:
    """Throughput of distinct attention jobs (--jobs of about --job-tokens tokens each, all
    submitted at once through the ingress's HTTP API) on Ray Serve with 1 vs 2 model-worker
    replicas of --gpus-per-replica GPUs each (0: CPU replicas of one core each; 0.5: two sharing
    one GPU), each on a fresh cache after a warm-up that loads the model on every replica.
    The model: SmolLM2, or with --random a random one (`random_model`). Prints jobs/s of both
    and their ratio."""
    import ray
    from ray import serve

    from backend.serving.ray_serve import APP_NAME, build_app

    os.environ.setdefault("ATLAS_CONVERTED_DIR", str(Settings.from_env().converted_models_dir))
    model = random_model(args.random, args.layers, args.tokenizer) if args.random else "smollm2"
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = WorkerClient(f"http://127.0.0.1:{port}")
    words = max(1, args.job_tokens // 12)

    def texts(tag: str, n: int) -> list[str]:
        return [f"Job {tag}-{i}: " + " ".join(f"The {tag} ledger {i} lists barrels of salt."
                                            for _ in range(words)) for i in range(n)]

    def run_all(batch: list[str]) -> tuple[float, int]:
        """Seconds to complete all of `batch`, and the tokens of its first job."""
        began = time.perf_counter()
        tickets = [client.submit(AnalysisRequest.make("attention", model, t)) for t in batch]
        ids = [client.job_result(ticket.job_id, timeout=1800) for ticket in tickets]
        return time.perf_counter() - began, len(client.analysis(ids[0]).meta["tokens"])

    rates = {}
    try:
        for replicas in (1, 2):
            cache = tempfile.mkdtemp(prefix=f"serve-bench-ray{replicas}-")
            serve.run(build_app(replicas, replicas, args.gpus_per_replica, 1.0,
                                env={"ATLAS_CACHE_DIR": cache}), name=APP_NAME, route_prefix="/")
            run_all(texts(f"warm{replicas}", 2 * replicas))  # every replica loads the model
            wall, tokens = run_all(texts(f"run{replicas}", args.jobs))
            rates[replicas] = args.jobs / wall
            print(f"{model}, {replicas} replica(s): {args.jobs} distinct jobs of {tokens} tokens "
                  f"in {wall:.1f} s, {rates[replicas]:.2f} jobs/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"2 vs 1 replicas: {rates[2] / rates[1]:.2f}x the jobs/s "
          f"({args.gpus_per_replica:g} GPU per replica)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_bench")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--requests", type=int, default=20, help="per client and view")
    parser.add_argument("--replicas", action="store_true",
                        help="distinct attention jobs with 1 vs 2 Ray Serve replicas")
    parser.add_argument("--jobs", type=int, default=12, help="with --replicas: jobs per run")
    parser.add_argument("--job-tokens", type=int, default=128,
                        help="with --replicas: about this many tokens per job")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="with --replicas: 0 on the CPU, 0.5 for two sharing one GPU")
    parser.add_argument("--random", choices=sorted(PRESETS),
                        help="with --replicas: this architecture with random weights")
    parser.add_argument("--layers", type=int, help="with --random: only the first N layers")
    parser.add_argument("--tokenizer", help="with --random: a tokenizer folder (default: the "
                                            "packaged SmolLM2's)")
    args = parser.parse_args()
    if args.replicas:
        return distinct_jobs(args)
    cache = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    # The fresh cache shares the converted packaged models (they depend on the weights only).
    os.environ.setdefault("ATLAS_CONVERTED_DIR", str(Settings.from_env().converted_models_dir))
    text = PARAGRAPH * max(1, args.tokens // 45)
    worker = WorkerProcess(cache).start()
    results: dict[tuple[str, int], dict] = {}
    try:
        client = WorkerClient(worker.url)
        aid = client.run(AnalysisRequest.make("attention", "smollm2", text), timeout=900)
        n_tokens = len(client.analysis(aid).meta["tokens"])
        print(f"SmolLM2, {n_tokens} tokens, cached; {args.requests} requests per client and view")
        for name, view in views(aid, n_tokens).items():
            warm(client, view)
            for clients in args.clients:
                results[name, clients] = {"service": measure(
                    lambda: WorkerClient(worker.url), view, clients, args.requests)}
    finally:
        worker.stop()
    from backend.service import AtlasService  # the cache file is free again

    service = AtlasService(replace(Settings.from_env(), cache_dir=cache))
    try:
        for name, view in views(aid, n_tokens).items():
            warm(service, view)
            for clients in args.clients:
                results[name, clients]["in-process"] = measure(lambda: service, view, clients,
                                                               args.requests)
    finally:
        service.close()
    print(f"{'view':>16} {'clients':>7} | {'service req/s':>13} {'p50 ms':>7} {'p95 ms':>7} | "
          f"{'in-proc req/s':>13} {'p50 ms':>7} {'p95 ms':>7} | {'req/s ratio':>11} "
          f"{'p50 ratio':>9}")
    for (name, clients), r in results.items():
        s, p = r["service"], r["in-process"]
        print(f"{name:>16} {clients:>7} | {s['rps']:>13.1f} {s['p50']:>7.1f} {s['p95']:>7.1f} | "
              f"{p['rps']:>13.1f} {p['p50']:>7.1f} {p['p95']:>7.1f} | "
              f"{s['rps'] / p['rps']:>11.2f} {s['p50'] / p['p50']:>9.2f}")


if __name__ == "__main__":
    main()
