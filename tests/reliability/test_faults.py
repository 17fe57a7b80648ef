"""Faults with real processes: a server killed with SIGKILL during an attention job, during a
cache write and during resampling; damaged cache files; a second process on the same cache."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from backend.analyses import AnalysisRequest, analysis_id
from backend.analyses.thought_anchors import rollout_pool
from backend.errors import CacheInUseError, CorruptCacheError
from backend.methods.thought_anchors.segmentation import split_into_chunks
from backend.models import resolve_source, source_fingerprint
from backend.service import AtlasService
from backend.store import Store
from pages import shared
from tests.conftest import REPO_ROOT
from tests.reliability.fault_process import RESAMPLING, RESAMPLING_ROLLOUTS, SOLUTION

N_CHUNKS = len(split_into_chunks(SOLUTION))

LONG_TEXT = " ".join(f"Sentence {i} tells how the river bends past mill number {i}."
                     for i in range(16))  # about 240 tokens: a write of ~30 MB


# Another process keeping the cache open (the store alone: no torch import to wait for).
HOLD = ("import sys, time; from backend.store import Store; s = Store(sys.argv[1]); "
        "print('{\"holding\": true}', flush=True); time.sleep(600)")


class Server:
    """A fault_process child whose JSON lines are read as they come."""

    def __init__(self, mode: str, cache: Path, text: str = ""):
        command = (["-c", HOLD, str(cache / "atlas.duckdb")] if mode == "hold" else
                   ["-m", "tests.reliability.fault_process", mode, str(cache), text])
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.events: list[dict] = []

    def until(self, predicate, timeout: float = 300) -> dict:
        """Read events until one satisfies `predicate`; returns it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the process ended early; events: {self.events[-5:]}")
            if line.startswith("{"):
                self.events.append(json.loads(line))
                if predicate(self.events[-1]):
                    return self.events[-1]
        raise AssertionError(f"timed out; events: {self.events[-5:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, key: str) -> dict:
        event = self.until(lambda e: key in e)
        self.proc.wait(60)
        return event


@contextlib.contextmanager
def service_on(cache: Path, settings):
    """The service of a restarted server: this test process opening the killed one's cache."""
    svc = AtlasService(replace(settings, cache_dir=cache))
    try:
        yield svc
    finally:
        svc.worker.shutdown()
        svc.store.close()


def _contents(svc: AtlasService) -> dict:
    """Every analysis in the cache with all its arrays loaded: {id: (kind, layers, arrays)}."""
    return {record.id: (record.kind, record.meta.get("n_layers"),
                        len([svc.array(record.id, name) for name in svc.array_names(record.id)]))
            for record in svc.recent(limit=10_000)}


def test_kills_during_an_attention_job_and_during_a_cache_write(tmp_path, settings):
    with service_on(tmp_path, settings) as svc:
        committed = svc.run(AnalysisRequest.make("attention", "smollm2", "Committed first."),
                            timeout=300)
        before = _contents(svc)[committed]
    for moment, text in (("Running the model", "during the job"), ("Saving", "during the write")):
        server = Server("attention", tmp_path, f"{LONG_TEXT} Killed {text}.")
        server.until(lambda e: moment in e.get("stage", ""))
        if moment == "Saving":
            time.sleep(0.05)  # inside the transaction that writes the layers
        server.kill()
        with service_on(tmp_path, settings) as svc:  # the restart: the database opens
            found = _contents(svc)
        assert found[committed] == before  # the committed analysis loads with all its arrays
        # A killed analysis is absent, or complete if its commit came first: never partial.
        assert all(what == before for what in found.values())


def test_kill_during_resampling_resumes_without_redoing_saved_rollouts(tmp_path, settings):
    server = Server("resample", tmp_path)
    # Killed once its rollouts are saved (they are saved as they arrive) and before the
    # analysis is: the embedded engine finishes a sentence's rollouts together, in one batch.
    server.until(lambda e: e.get("stage", "").startswith("Embedding resampled sentences"))
    server.kill()
    with service_on(tmp_path, settings) as svc:
        fingerprint = source_fingerprint(resolve_source("smollm2", settings))
        aid = analysis_id(RESAMPLING, fingerprint)
        pool = rollout_pool(RESAMPLING, fingerprint)
        saved_before = svc.store.load_rollouts(pool)
        assert saved_before, "rollouts were saved before the kill"
        ticket = svc.submit(RESAMPLING)
        assert svc.job_result(ticket.job_id, timeout=600) == aid
        saved_after = svc.store.load_rollouts(pool)
        assert svc.analysis(aid).meta["n_chunks"] == N_CHUNKS
    key = lambda r: (r["chunk_idx"], r["forced"], r["rollout_idx"])  # noqa: E731
    after = {key(r): r for r in saved_after}
    assert all(after[key(r)] == r for r in saved_before)  # kept as they were, not redone
    per_chunk = RESAMPLING_ROLLOUTS * 2  # free and forced
    assert len(saved_after) == len(after) == N_CHUNKS * per_chunk  # each sampled once


def _damage(cache: Path, how: str) -> Path:
    path = cache / "atlas.duckdb"
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        path.write_bytes(b"this is not a database" * 1000)
    elif how == "empty":
        path.write_bytes(b"")
    return path


@pytest.fixture
def damaged(tmp_path, request):
    store = Store(tmp_path / "atlas.duckdb")
    store.close()
    return _damage(tmp_path, request.param)


@pytest.mark.parametrize("damaged", ["truncated", "garbage", "empty"], indirect=True)
def test_a_damaged_cache_file_gives_a_clear_message(damaged):
    with pytest.raises(CorruptCacheError, match="truncated or damaged") as info:
        Store(damaged)
    assert info.value.path == damaged and damaged.exists()  # never deleted


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A cache folder whose file another process holds open."""
    folder = tmp_path_factory.mktemp("held")
    Store(folder / "atlas.duckdb").close()
    holder = Server("hold", folder)
    holder.until(lambda e: "holding" in e)
    yield folder
    holder.kill()


def test_a_second_process_on_the_same_cache_is_told_it_is_in_use(held):
    with pytest.raises(CacheInUseError, match="in use by another process") as info:
        Store(held / "atlas.duckdb")
    assert "PID" in str(info.value)  # which process: DuckDB names it


LAUNCHER = "from app import main\nmain()"


@pytest.fixture
def app_on(monkeypatch, settings):
    """AppTest of the app whose service opens the cache in `folder` (the real Store)."""
    made = []

    def start(folder: Path) -> AppTest:
        def service():
            if not made:
                made.append(AtlasService(replace(settings, cache_dir=folder)))
            return made[0]
        monkeypatch.setattr(shared, "_service", service)
        at = AppTest.from_string(LAUNCHER, default_timeout=120)
        at.run()
        return at
    yield start
    for svc in made:
        svc.worker.shutdown()
        svc.store.close()


def test_the_app_offers_to_move_a_damaged_cache_aside(tmp_path, app_on):
    Store(tmp_path / "atlas.duckdb").close()
    path = _damage(tmp_path, "truncated")
    damaged_bytes = path.read_bytes()
    at = app_on(tmp_path)
    assert not at.exception
    assert "truncated or damaged" in at.error[0].value
    assert path.read_bytes() == damaged_bytes  # nothing moved or deleted without asking
    at.button[0].click().run()
    assert not at.exception
    kept = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged_bytes
    assert kept[0].name in at.success[0].value
    at.run()
    assert not at.exception and not at.error  # a new, empty cache serves the app


def test_the_app_says_when_another_process_holds_the_cache(held, app_on):
    at = app_on(held)
    assert not at.exception
    assert "in use by another process" in at.error[0].value
    assert [b.label for b in at.button] == ["Try again"]
