"""The import rules of the pages, read from the source (ast), so they stay true: pages reach the
backend through the service (or the worker service's client) and the public types of the
analysis kinds, never its model, SQL or job internals;
nothing uses Streamlit's private runtime or runs files with runpy; the backend never imports
Streamlit, even through the view modules it shares with the pages."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

FORBIDDEN_IN_PAGES = ("torch", "duckdb", "transformers", "backend.methods", "backend.store",
                      "backend.worker")
# What of the backend pages may import: the service with what its calls take and give, its
# client, the analysis kinds' typed requests, parameters and results, and the pure reductions
# of arrays a page holds.
BACKEND_FOR_PAGES = ("backend.service", "backend.serving.client", "backend.analyses",
                     "backend.local_reductions")
PAGES = sorted((REPO_ROOT / "pages").glob("*.py"))
APP = [REPO_ROOT / "app.py", *PAGES]
SOURCES = sorted(p for folder in ("app.py", "pages", "backend", "viz", "bench", "tests")
                 for p in ([REPO_ROOT / folder] if folder.endswith(".py")
                           else (REPO_ROOT / folder).rglob("*.py")))


def imported(path) -> set[str]:
    """Every module `path` imports, at any depth of its code (`from a.b import c` gives a.b
    and a.b.c: c may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_imported_reads_every_kind_of_import(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import torch.nn as nn\nfrom backend import store\n"
                      "def f():\n    from backend.worker import Worker\n")
    found = imported(source)
    assert {"torch.nn", "backend.store", "backend.worker"} <= found
    assert within("torch.nn", "torch") and not within("torchvision", "torch")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_pages_import_no_model_sql_or_job_internals(path):
    bad = sorted(name for name in imported(path)
                 if any(within(name, package) for package in FORBIDDEN_IN_PAGES))
    assert bad == [], f"{path.name} imports {bad}: go through backend.service instead"


def past_the_service(path) -> list[str]:
    """The backend modules `path` imports besides BACKEND_FOR_PAGES."""
    return sorted(name for name in imported(path) if within(name, "backend") and not any(
        within(name, allowed) for allowed in BACKEND_FOR_PAGES))


def test_past_the_service_tells_the_service_from_the_rest_of_the_backend(tmp_path):
    source = tmp_path / "page.py"
    source.write_text("from backend import store\nfrom backend.service import AtlasService\n"
                      "from backend.analyses.heads import METHODS\nimport backend.lessons\n")
    assert past_the_service(source) == ["backend", "backend.lessons", "backend.store"]


@pytest.mark.parametrize("path", APP, ids=lambda p: p.name)
def test_pages_reach_the_backend_only_through_the_service(path):
    bad = past_the_service(path)
    assert bad == [], f"{path.name} imports {bad}: only {', '.join(BACKEND_FOR_PAGES)}"


def test_nothing_uses_streamlits_private_runtime_or_runpy():
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(
        name for name in imported(path)
        if within(name, "streamlit.runtime") or within(name, "runpy"))
        for path in SOURCES}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_backend_never_imports_streamlit():
    for path in (REPO_ROOT / "backend").rglob("*.py"):
        assert not any(within(name, "streamlit") for name in imported(path)), path
    # Also through what it imports: the view states and requests it shares with the pages.
    check = ("import sys, backend.precompute, pages.lesson_files, pages.lesson_preparation; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'streamlit'))")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert loaded == "[]"
