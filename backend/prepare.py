"""Set-up, once per machine: convert the packaged GGUF models and cache the ready examples, so
the app's first chart needs no conversion and no model run.

    python -m backend.prepare            (`make app` and `make test` run it)

Converted models go to ATLAS_CONVERTED_DIR (default cache/models), the examples' analyses to the
app's cache (ATLAS_CACHE_DIR), through the worker service when one runs (ATLAS_WORKER_URL, or
the default local worker on that cache), else in this process. Both are skipped when already
there, so a second run takes about a second.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.errors import AtlasError
from pages.examples import EXAMPLES
from backend.models import PACKAGED, resolve_source
from backend.models.conversion import convert_gguf, is_converted

POLL_S = 0.3


def convert_packaged_models(settings: Settings) -> None:
    """Every packaged GGUF model converted, each with a progress bar in the terminal."""
    for alias, packaged in PACKAGED.items():
        if not packaged.gguf_file:
            continue
        source = resolve_source(alias, settings)
        if is_converted(source, settings):
            print(f"{packaged.label}: already converted")
            continue
        with tqdm(total=1.0, desc=packaged.label, unit="", bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")) as bar:
            def report(fraction: float, stage: str) -> None:
                bar.n = fraction
                bar.set_postfix_str(stage, refresh=True)
            convert_gguf(source, settings, report)


def cache_examples() -> None:
    """The sidebar's examples analysed into the app's cache (the app opens on the first)."""
    from backend.service import AtlasService  # opens the cache: only once models are ready
    from backend.serving.client import running_worker

    service = running_worker(Settings.from_env()) or AtlasService()
    try:
        for name, (model, text) in EXAMPLES.items():
            ticket = service.submit(AnalysisRequest.make("attention", model, text))
            if ticket.analysis_id:
                print(f"Example “{name}”: already cached")
                continue
            with tqdm(total=1.0, desc=f"Example “{name}”", bar_format=(
                    "{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")) as bar:
                while not (status := service.job_status(ticket.job_id)).finished:
                    bar.n = status.fraction
                    bar.set_postfix_str(status.stage, refresh=True)
                    time.sleep(POLL_S)
                service.job_result(ticket.job_id)  # raises the job's error
                bar.n = 1.0
    finally:
        service.close()


def main() -> int:
    started = time.monotonic()
    try:
        convert_packaged_models(Settings.from_env())
        cache_examples()
    except AtlasError as e:
        print(f"Set-up failed: {e}", file=sys.stderr)
        return 1
    print(f"Models and examples ready ({time.monotonic() - started:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
