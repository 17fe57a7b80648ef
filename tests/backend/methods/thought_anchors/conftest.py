"""Shared fixtures: the published traces (outside the repo) and the offline models, loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[4]
FIXTURES = REPO_ROOT / ".." / "shared" / "fixtures" / "thought_anchors"
TRACES = {
    "llama8b-2189": "deepseek-r1-distill-llama-8b/incorrect_base_solution/problem_2189",
    "qwen14b-2238": "deepseek-r1-distill-qwen-14b/correct_base_solution/problem_2238",
}


def require_trace(name: str) -> Path:
    """Folder of a published trace; skips the calling test when the shared fixtures are absent."""
    folder = FIXTURES / TRACES[name]
    if not folder.is_dir():
        pytest.skip(f"published Thought Anchors fixtures not found at {folder.resolve()} "
                    "(expected in ../shared/fixtures next to the repo; never copied into it)")
    return folder


@pytest.fixture(params=sorted(TRACES))
def trace_dir(request) -> Path:
    return require_trace(request.param)


@pytest.fixture
def qwen_dir() -> Path:
    return require_trace("qwen14b-2238")


@pytest.fixture(scope="session")
def embedder():
    from backend.methods.thought_anchors.embedding import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from backend.methods.thought_anchors.embedding import packaged_model_dir

    return AutoTokenizer.from_pretrained(packaged_model_dir())
