import json

import numpy as np
import pytest

from backend.methods.thought_anchors.published import (
    PublishedTrace,
    read_published_trace,
    step_importance_entries,
    step_importance_matrix,
    write_published_trace,
)


def test_read_published_trace(trace_dir):
    trace = read_published_trace(trace_dir)
    assert trace.problem["gt_answer"] and trace.base_solution["solution"]
    assert len(trace.chunks) == len(trace.chunks_resampled) == trace.summary["num_chunks"]
    assert all(isinstance(k, int) for k in trace.chunks_resampled)
    expected = {p.stem for p in trace_dir.glob("step_importance*.json")}
    assert set(trace.step_importance) == expected and "step_importance" in expected


def test_round_trip(trace_dir, tmp_path):
    trace = read_published_trace(trace_dir)
    write_published_trace(trace, tmp_path)
    again = read_published_trace(tmp_path)
    assert again == trace
    for original in trace_dir.glob("*.json"):  # every file holds the same JSON as the original
        written = tmp_path / original.name
        assert json.loads(written.read_text()) == json.loads(original.read_text())


def test_partial_folder_and_matrix_round_trip(trace_dir, tmp_path):
    trace = read_published_trace(trace_dir)
    entries = trace.step_importance["step_importance"]
    m = step_importance_matrix(entries, len(trace.chunks))
    assert m[0, 1] == entries[0]["target_impacts"][0]["importance_score"]
    assert np.isnan(m[np.tril_indices(len(m))]).all()
    assert step_importance_entries(m, trace.chunks) == entries
    write_published_trace(PublishedTrace(chunks_labeled=trace.chunks_labeled), tmp_path)
    only = read_published_trace(tmp_path)
    assert only.chunks == trace.chunks and only.problem is None and only.step_importance == {}


@pytest.mark.parametrize(
    "name, content",
    [
        ("problem.json", "{not json"),
        ("problem.json", json.dumps(["a list"])),
        ("base_solution.json", json.dumps({"solution": 3})),
        ("chunks_labeled.json", json.dumps([{"chunk": "x"}])),
        ("chunks_resampled.json", json.dumps({"zero": ["a"]})),
        ("chunks_resampled.json", json.dumps({"0": "a"})),
        ("step_importance.json",
         json.dumps([{"source_chunk_idx": 0, "target_impacts": [{"target_chunk_idx": 1}]}])),
        ("summary.json", b"\xff\xfe"),
    ],
)
def test_malformed_files_raise_value_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=name):
        read_published_trace(tmp_path)


def test_empty_or_missing_folder_raises_value_error(tmp_path):
    with pytest.raises(ValueError):
        read_published_trace(tmp_path)
    with pytest.raises(ValueError):
        read_published_trace(tmp_path / "absent")
