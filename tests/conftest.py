"""Shared test fixtures: one fresh cache per test session, models loaded once.

Converted GGUF models are kept in the repository's cache/models between runs (they are derived
from the installed packages and take ~30 s to rebuild); everything else starts empty.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the fused capture kernels run in Triton's interpreter; Triton reads this when its
# kernels are defined, so before any test imports them. Only forced captures use them there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATLAS_CONVERTED_DIR", str(REPO_ROOT / "cache" / "models"))
# Set before anything builds Settings (AppTest runs app.py in this process).
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="atlas-test-cache-"))
os.environ["ATLAS_CACHE_DIR"] = str(_SESSION_CACHE)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def settings(cache_dir):
    from backend.config import Settings

    return Settings.from_env()


@pytest.fixture(scope="session")
def smollm2(settings):
    """SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), fp32 on the CPU."""
    from backend.models import load_model, resolve_source

    return load_model(resolve_source("smollm2", settings), settings)


@pytest.fixture(scope="session")
def minilm(settings):
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads)."""
    from backend.models import load_model, resolve_source

    return load_model(resolve_source("minilm", settings), settings)


@pytest.fixture(scope="session")
def service(settings):
    """The app's service on the session's fresh cache (what pages and AppTest use)."""
    from pages import shared

    svc = shared.service()
    assert svc.settings.cache_dir == settings.cache_dir
    yield svc
    svc.worker.shutdown()
    svc.store.close()


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    # Native thread pools (DuckDB's, torch's) can abort the interpreter's teardown after the run
    # has finished and reported ("terminate called without an active exception"): leave now,
    # with pytest's own exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
