"""The published Thought Anchors trace format (spec section 6): read a trace folder, write one.

A folder holds any of problem.json, base_solution.json, chunks_labeled.json,
chunks_resampled.json, step_importance*.json and summary.json; a missing file is None. Only
`json` is used (never pickle). Malformed files raise `InputError` (a ValueError) naming the file.
Unknown fields are kept as they are, so reading and writing back loses nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.errors import InputError

_DICT_FILES = {"problem": ("problem",), "base_solution": ("solution",), "summary": ()}


@dataclass
class PublishedTrace:
    """One reasoning trace with its analyses, as the published files hold it.

    `chunks_resampled`: {chunk index: resampled first sentences}. `step_importance`: file stem
    ("step_importance", "step_importance_supp", ...) -> list per source chunk of
    {source_chunk_idx, source_chunk_text, target_impacts: [{target_chunk_idx, importance_score}]}.
    """

    problem: dict | None = None
    base_solution: dict | None = None
    chunks_labeled: list[dict] | None = None
    chunks_resampled: dict[int, list[str]] | None = None
    step_importance: dict[str, list[dict]] = field(default_factory=dict)
    summary: dict | None = None

    @property
    def chunks(self) -> list[str]:
        """The chunk texts, in order (from chunks_labeled.json)."""
        return [c["chunk"] for c in self.chunks_labeled or []]


def _fail(path: Path, why: str):
    raise InputError(f"{path.name} in {path.parent} is not a published trace file: {why}.")


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        _fail(path, f"invalid JSON ({error})")


def _check_dict(path: Path, value, required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        _fail(path, "expected a JSON object")
    for key in required:
        if not isinstance(value.get(key), str):
            _fail(path, f'field "{key}" must be a string')
    return value


def _check_chunks_labeled(path: Path, value) -> list[dict]:
    if not isinstance(value, list):
        _fail(path, "expected a list of chunks")
    for k, chunk in enumerate(value):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("chunk"), str):
            _fail(path, f'entry {k} needs a string "chunk"')
        if not isinstance(chunk.get("chunk_idx"), int):
            _fail(path, f'entry {k} needs an integer "chunk_idx"')
    return value


def _check_chunks_resampled(path: Path, value) -> dict[int, list[str]]:
    if not isinstance(value, dict):
        _fail(path, "expected an object {chunk index: [sentences]}")
    out = {}
    for key, sentences in value.items():
        if not (key.isascii() and key.isdigit()):
            _fail(path, f'key "{key}" is not a chunk index')
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            _fail(path, f'chunk "{key}" must map to a list of strings')
        out[int(key)] = sentences
    return dict(sorted(out.items()))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_step_importance(path: Path, value) -> list[dict]:
    if not isinstance(value, list):
        _fail(path, "expected a list per source chunk")
    for k, row in enumerate(value):
        if not isinstance(row, dict) or not isinstance(row.get("source_chunk_idx"), int):
            _fail(path, f'entry {k} needs an integer "source_chunk_idx"')
        impacts = row.get("target_impacts")
        if not isinstance(impacts, list) or not all(
            isinstance(t, dict) and isinstance(t.get("target_chunk_idx"), int)
            and _is_number(t.get("importance_score")) for t in impacts
        ):
            _fail(path, f"entry {k}: each target impact needs target_chunk_idx, importance_score")
    return value


def read_published_trace(folder: str | Path) -> PublishedTrace:
    """Read a published trace folder (e.g. .../correct_base_solution/problem_2238)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    trace = PublishedTrace()
    for name, required in _DICT_FILES.items():
        path = folder / f"{name}.json"
        if path.is_file():
            setattr(trace, name, _check_dict(path, _load(path), required))
    path = folder / "chunks_labeled.json"
    if path.is_file():
        trace.chunks_labeled = _check_chunks_labeled(path, _load(path))
    path = folder / "chunks_resampled.json"
    if path.is_file():
        trace.chunks_resampled = _check_chunks_resampled(path, _load(path))
    for path in sorted(folder.glob("step_importance*.json")):
        trace.step_importance[path.stem] = _check_step_importance(path, _load(path))
    if trace == PublishedTrace():
        raise InputError(f"{folder} holds none of the published trace files.")
    return trace


def write_published_trace(trace: PublishedTrace, folder: str | Path) -> None:
    """Write the parts of `trace` that are present as published JSON files into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "problem": trace.problem, "base_solution": trace.base_solution, "summary": trace.summary,
        "chunks_labeled": trace.chunks_labeled,
        "chunks_resampled": None if trace.chunks_resampled is None
        else {str(k): v for k, v in trace.chunks_resampled.items()},
        **trace.step_importance,
    }
    for name, value in files.items():
        if value is not None:
            text = json.dumps(value, indent=2, ensure_ascii=False)
            (folder / f"{name}.json").write_text(text, encoding="utf-8")


def step_importance_matrix(entries: list[dict], n_chunks: int) -> np.ndarray:
    """M[i, j] = importance_score of source i on target j, (n_chunks, n_chunks); NaN if absent."""
    m = np.full((n_chunks, n_chunks), np.nan)
    for row in entries:
        for target in row["target_impacts"]:
            m[row["source_chunk_idx"], target["target_chunk_idx"]] = target["importance_score"]
    return m


def step_importance_entries(matrix: np.ndarray, chunks: list[str]) -> list[dict]:
    """Inverse of `step_importance_matrix`: the published list (targets j > i, finite scores)."""
    return [
        {
            "source_chunk_idx": i, "source_chunk_text": text,
            "target_impacts": [
                {"target_chunk_idx": j, "importance_score": float(matrix[i, j])}
                for j in range(i + 1, len(chunks)) if math.isfinite(matrix[i, j])
            ],
        }
        for i, text in enumerate(chunks)
    ]
