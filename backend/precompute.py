"""Compute every analysis a set of lessons shows, so a class never waits.

    python -m backend.precompute [lessons folder]      (default: the app's lessons folder)

Results go to the app's cache. While the app runs (`make app`), the jobs go through its worker
service, the only process that writes the cache file (ATLAS_WORKER_URL, or the default local
worker when it answers and serves ATLAS_CACHE_DIR); otherwise the command opens ATLAS_CACHE_DIR
itself. "Prepare every lesson" in the running app does the same (pages.lesson_preparation).
Analyses already cached are skipped, so running it again is cheap and resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from backend.config import Settings
from backend.errors import AtlasError
from backend.service import AtlasService
from backend.serving.client import WorkerClient, running_worker
from pages.lesson_files import read_lessons
from pages.lesson_preparation import precompute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.precompute",
                                     description="Cache every analysis of a lesson set.")
    parser.add_argument("folder", nargs="?", type=Path,
                        help="the lessons folder (default: ATLAS_LESSONS_DIR or ./lessons)")
    args = parser.parse_args(argv)
    try:
        service = running_worker(Settings.from_env()) or AtlasService()
    except AtlasError as e:
        print(e, file=sys.stderr)
        return 2
    folder = args.folder or service.settings.lessons_dir
    if not folder.is_dir():
        print(f"No lessons folder at {folder}.", file=sys.stderr)
        return 2
    lessons = read_lessons(folder)
    for name, error in lessons.errors.items():
        print(f"Skipped {name}: {error}", file=sys.stderr)
    steps = sum(len(lesson.steps) for lesson in lessons.lessons)
    where = f"through the worker at {service.url}" if isinstance(service, WorkerClient) else \
        "in this process"
    print(f"{len(lessons.lessons)} lessons, {steps} steps, into {service.settings.cache_dir} "
          f"({where})")
    started = time.monotonic()
    with tqdm(total=steps, unit="step") as bar:
        report = precompute(lessons, service, bar)
    print(f"Done in {time.monotonic() - started:.0f} s: {report['computed']} analyses computed, "
          f"{report['cached']} already cached.")
    for where, error in report["failed"].items():
        print(f"Failed: {where}: {error}", file=sys.stderr)
    service.close()
    return 1 if report["failed"] or lessons.errors else 0


if __name__ == "__main__":
    sys.exit(main())
