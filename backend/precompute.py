"""Compute every analysis a set of lessons shows, so a class never waits.

    python -m backend.precompute [lessons folder]      (default: the app's lessons folder)

Results go to the app's cache. While the app runs (`make app`), the jobs go through its worker
service, the only process that writes the cache file (ATLAS_WORKER_URL, or the default local
worker when it answers and serves ATLAS_CACHE_DIR); otherwise the command opens ATLAS_CACHE_DIR
itself. "Prepare every lesson" in the running app does the same (`Preparation`). Analyses already
cached are skipped, so running it again is cheap and resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from backend.config import Settings
from backend.errors import AtlasError
from backend.lessons import LessonSet, read_lessons, step_requests
from backend.service import AtlasService
from backend.serving.client import WorkerClient, running_worker

POLL_S = 0.5


def precompute(lessons: LessonSet, service: AtlasService, bar=None) -> dict:
    """Run every step's requests; returns counts of computed, cached and failed analyses
    (failures keep their message). `bar`: a tqdm bar or a Preparation, told of the progress."""
    report = {"computed": 0, "cached": 0, "failed": {}}
    seen: set[str] = set()  # steps share analyses: count each once
    for lesson in lessons.lessons:
        for number, step in enumerate(lesson.steps, 1):
            where = f"{lesson.slug} step {number}"
            if bar is not None:
                bar.set_description(where)
            try:
                for request in step_requests(lesson, step, service):
                    if request.canonical() not in seen:
                        seen.add(request.canonical())
                        _run(request, service, report, bar)
            except AtlasError as e:
                report["failed"][where] = str(e)
            if bar is not None:
                bar.update(1)
    return report


def _run(request, service: AtlasService, report: dict, bar) -> None:
    ticket = service.submit(request)
    if ticket.analysis_id:
        report["cached"] += 1
        return
    while not (status := service.job_status(ticket.job_id)).finished:
        if bar is not None:
            bar.set_postfix_str(f"{request.kind}: {status.stage} {status.fraction:.0%}",
                                refresh=True)
        time.sleep(POLL_S)
    service.job_result(ticket.job_id)  # raises the job's error
    report["computed"] += 1
    if bar is not None:
        bar.set_postfix_str("")


class Preparation:
    """precompute() on a background thread of a running app. It stands in for the command's
    progress bar (the three calls precompute makes), so pages can read how far it got."""

    def __init__(self, lessons: LessonSet, service: AtlasService):
        self.total = sum(len(lesson.steps) for lesson in lessons.lessons)
        self.done, self.where, self.detail = 0, "", ""
        self.report: dict | None = None
        self._thread = threading.Thread(target=self._run, args=(lessons, service), daemon=True,
                                        name="atlas-lessons")
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def set_description(self, where: str) -> None:
        self.where = where

    def set_postfix_str(self, detail: str, refresh: bool = True) -> None:
        self.detail = detail

    def update(self, steps: int) -> None:
        self.done += steps

    def _run(self, lessons: LessonSet, service: AtlasService) -> None:
        try:
            self.report = precompute(lessons, service, self)
        except Exception as e:  # keep the page able to say what happened
            self.report = {"computed": 0, "cached": 0, "failed": {"preparation": str(e)}}


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
