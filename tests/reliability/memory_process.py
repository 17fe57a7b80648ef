"""Resident memory of a server process over 50 distinct analyses, each viewed layer by layer.

python -m tests.reliability.memory_process CACHE_DIR BUDGET_MB STORE_MB N
Prints one JSON line: the budget (the service's caches and DuckDB's), the resident memory once the model is loaded and one
analysis viewed (models, libraries, code), after N more, the bytes the caches hold and the bytes
of all arrays the views were given.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import psutil

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.service import AtlasService

MODEL = "minilm"  # 6 layers: fifty analyses stay quick on a CPU
WORDS = ("river mill boat light water evening children count passing bends old settles "
         "under over quietly north").split()


def text(i: int) -> str:
    """A distinct text of about 120 tokens."""
    return f"Text {i}: " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(110))


def view(service: AtlasService, aid: str) -> int:
    """What the views ask of an analysis (every layer, a head's map, the rollout); returns the
    bytes of the arrays they were given."""
    n_layers = service.analysis(aid).meta["n_layers"]
    layers = sum(service.attention_layer(aid, layer).nbytes for layer in range(n_layers))
    service.attention_matrix(aid, 0, 0)
    return layers + service.rollout(aid).nbytes


def main(cache_dir: str, budget_mb: str, store_mb: str, n: str) -> None:
    settings = replace(Settings.from_env(), cache_dir=Path(cache_dir),
                       memory_budget_bytes=int(budget_mb) << 20,
                       store_memory_bytes=int(store_mb) << 20)
    service = AtlasService(settings)
    process = psutil.Process()
    view(service, service.run(AnalysisRequest.make("attention", MODEL, text(-1)),
                              timeout=600))
    gc.collect()
    baseline = process.memory_info().rss
    viewed = 0
    for i in range(int(n)):
        viewed += view(service, service.run(AnalysisRequest.make("attention", MODEL, text(i)),
                                            timeout=600))
    gc.collect()
    print(json.dumps({"budget": settings.memory_budget_bytes + settings.store_memory_bytes, "baseline": baseline,
                      "after": process.memory_info().rss, "cached": service.memory.bytes_held,
                      "viewed": viewed}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
