"""Computing every analysis a set of lessons shows, so a class never waits: for the command
(`python -m backend.precompute`, with a progress bar) and for "Prepare every lesson" in the
running app (`Preparation`, on a thread of its own). Streamlit-free: it only talks to the
service (submit, job status and result), which the command and the app share.
"""

from __future__ import annotations

import threading
import time

from backend.service import AtlasError, AtlasService
from pages.lesson_files import LessonSet, step_requests

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
