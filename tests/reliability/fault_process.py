"""A server process for the fault tests: the real service on a given cache, driven by a mode,
reporting what it does as JSON lines on stdout so the test can kill -9 it at a chosen moment.

python -m tests.reliability.fault_process MODE CACHE_DIR [TEXT]
  attention start an attention analysis of TEXT, print every progress stage, wait for it
  resample  start (or resume) a resampling analysis, print stages, wait for it
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.service import AtlasService

PROBLEM = "3 pencils cost $1. What do 27 cost?"
SOLUTION = "One pencil costs a third. So the answer is \\boxed{9}."  # two chunks
RESAMPLING_ROLLOUTS = 1
RESAMPLING = AnalysisRequest.make("ta_resampling", "smollm2", SOLUTION, problem=PROBLEM,
                                  answer="9", rollouts=RESAMPLING_ROLLOUTS, max_new_tokens=4)


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def follow(service: AtlasService, request: AnalysisRequest) -> str:
    """Run the request, printing each new progress stage as it appears."""
    ticket = service.submit(request)
    if ticket.analysis_id:
        return ticket.analysis_id
    last = None
    while not (status := service.job_status(ticket.job_id)).finished:
        if status.stage != last:
            say(stage=status.stage, fraction=status.fraction)
            last = status.stage
        time.sleep(0.005)
    return service.job_result(ticket.job_id)


def main(mode: str, cache_dir: str, text: str = "") -> None:
    settings = replace(Settings.from_env(), cache_dir=Path(cache_dir))
    service = AtlasService(settings)
    say(opened=True)
    if mode == "attention":
        say(done=follow(service, AnalysisRequest.make("attention", "smollm2", text)))
    elif mode == "resample":
        say(done=follow(service, RESAMPLING))
    sys.stdout.flush()
    os._exit(0)  # no teardown: the fault tests kill this process anyway


if __name__ == "__main__":
    main(*sys.argv[1:])
