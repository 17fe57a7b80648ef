"""The DuckDB results cache: round trips, migrations, threads, and a writer killed mid-save."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backend.config import REPO_ROOT
from backend.errors import AtlasError, NotFoundError
from backend.store import (MIGRATIONS, PACK_BYTES, AnalysisRecord, Store, blob_tables,
                           decode_array)


def _record(aid: str, **kw) -> AnalysisRecord:
    fields = dict(kind="attention", model="smollm2", model_fingerprint="f" * 64,
                  text="Größe — naïve 東京 \"quotes\" and 'ticks'\n",
                  params={"layer": 3, "bins": [1, 2]},
                  meta={"tokens": ["a", "·b", "↵"], "causal": True, "n": 2})
    fields.update(kw)
    return AnalysisRecord(aid, **fields)


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "attention/000": rng.random((2, 5, 5)).astype(np.float16),
        "attention/001": np.array([[np.inf, -0.0], [65504, 6e-8]], dtype=np.float16),
        "ids": rng.integers(0, 50_000, size=7).astype(np.int64),
    }


def test_round_trip_is_exact(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    arrays = _arrays(1)
    store.save(_record("a1"), arrays)
    assert store.has("a1") and not store.has("a2")
    loaded = store.load("a1")
    expected = _record("a1")
    for name in ("id", "kind", "model", "model_fingerprint", "text", "params", "meta"):
        assert getattr(loaded, name) == getattr(expected, name), name
    assert loaded.created is not None
    assert store.array_names("a1") == sorted(arrays)
    for name, array in arrays.items():
        got = store.load_array("a1", name)
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()  # bit-exact, -0.0 and inf included


def test_non_contiguous_arrays_round_trip(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    base = np.arange(60, dtype=np.float16).reshape(3, 4, 5)
    view = base.transpose(2, 0, 1)[:, ::2]
    store.save(_record("v"), {"view": view})
    np.testing.assert_array_equal(store.load_array("v", "view"), view)


def test_zero_dimensional_arrays_keep_their_shape(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    store.save(_record("s"), {"total": np.array(0.5, dtype=np.float16)})
    assert store.load_array("s", "total").shape == ()


def test_schema_version_and_reopen_keeps_data(tmp_path):
    path = tmp_path / "a.duckdb"
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    store.save(_record("keep"), _arrays(2))
    store.close()
    again = Store(path)  # migrations must not run twice on an existing file
    assert again.schema_version == len(MIGRATIONS)
    with again._cursor() as cur:
        versions = [v for (v,) in cur.execute("SELECT version FROM schema_version").fetchall()]
    assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))
    assert again.load("keep").meta == _record("keep").meta
    np.testing.assert_array_equal(again.load_array("keep", "attention/000"),
                                  _arrays(2)["attention/000"])


def test_saving_an_existing_id_is_a_no_op(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    store.save(_record("same"), {"x": np.ones(3, np.float16)})
    store.save(_record("same", text="other"), {"x": np.zeros(3, np.float16),
                                                "y": np.ones(2, np.float16)})
    assert store.load("same").text == _record("same").text
    assert store.array_names("same") == ["x"]
    np.testing.assert_array_equal(store.load_array("same", "x"), np.ones(3, np.float16))


def test_missing_ids_and_arrays_raise_not_found(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    store.save(_record("r"), {"x": np.ones(1, np.float16)})
    with pytest.raises(NotFoundError):
        store.load("nope")
    with pytest.raises(NotFoundError):
        store.load_array("r", "nope")
    with pytest.raises(NotFoundError):
        store.load_array("nope", "x")


def test_recent_lists_latest_first_and_filters_by_kind(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    for i, kind in enumerate(["attention", "rollout", "attention"]):
        store.save(_record(f"r{i}", kind=kind), {})
        time.sleep(0.01)
    assert [r.id for r in store.recent()] == ["r2", "r1", "r0"]
    assert [r.id for r in store.recent(kind="attention")] == ["r2", "r0"]
    assert [r.id for r in store.recent(limit=1)] == ["r2"]


def test_concurrent_threads_through_one_store(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    n = 8
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def arrays_of(i, round_):
        return {f"a{k}": np.full((64, 64), i * 10 + round_ + k / 8, np.float16) for k in range(4)}

    def work(i):
        try:
            barrier.wait()
            store.save(_record(f"t{i}-0", text=f"text {i}"), arrays_of(i, 0))
            barrier.wait()
            # Second round: write while the others read everyone's first round.
            store.save(_record(f"t{i}-1"), arrays_of(i, 1))
            for j in range(n):
                assert store.load(f"t{j}-0").text == f"text {j}"
                for k in range(4):
                    np.testing.assert_array_equal(store.load_array(f"t{j}-0", f"a{k}"),
                                                  arrays_of(j, 0)[f"a{k}"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors
    for i in range(n):
        for r in range(2):
            assert store.array_names(f"t{i}-{r}") == [f"a{k}" for k in range(4)]
            np.testing.assert_array_equal(store.load_array(f"t{i}-{r}", "a3"),
                                          arrays_of(i, r)["a3"])


N_LAYERS = 16
WRITER = r"""
import sys
import numpy as np
from backend.store import AnalysisRecord, Store

# Random (incompressible) layers: each analysis writes 32 MB, so a save takes a good fraction of a
# second and the kill lands inside its transaction.
base = np.random.default_rng(0).random((%d, 1024, 1024), dtype=np.float32).astype(np.float16)
store = Store(sys.argv[1])
def record(aid):
    return AnalysisRecord(aid, "attention", "m", "f", "text of " + aid, {}, {"id": aid})
store.save(record("A"), {"x": np.arange(1000, dtype=np.float16)})
print("committed", flush=True)
i = 0
while True:
    arrays = {f"layer{k:02d}": base[(k + i) %% len(base)] for k in range(len(base))}
    print(f"saving B{i}", flush=True)
    store.save(record(f"B{i}"), arrays)
    i += 1
""" % N_LAYERS


def test_killed_writer_leaves_committed_data_and_no_partial_analysis(tmp_path):
    path = tmp_path / "killed.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "committed", proc.stderr.read()
        assert proc.stdout.readline().strip() == "saving B0"
        assert proc.stdout.readline().strip() == "saving B1"  # B0 committed
        time.sleep(0.3)  # into the middle of B1's save
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    store = Store(path)  # replays the WAL
    a = store.load("A")
    assert a.text == "text of A" and a.meta == {"id": "A"}
    np.testing.assert_array_equal(store.load_array("A", "x"), np.arange(1000, dtype=np.float16))
    assert store.has("B0")
    with store._cursor() as cur:
        ids = {i for (i,) in cur.execute(
            "SELECT id FROM analyses UNION SELECT analysis_id FROM arrays").fetchall()}
    base = np.random.default_rng(0).random((N_LAYERS, 1024, 1024),
                                           dtype=np.float32).astype(np.float16)
    with store._cursor() as cur:  # nor a table of BLOBs whose analysis was not committed
        tables = {t for (t,) in cur.execute("SELECT table_name FROM duckdb_tables() WHERE "
                                             "table_name LIKE 'blobs_%'").fetchall()}
    assert {t.rsplit("_", 1)[0] for t in tables} == {blob_tables(i) for i in ids}
    b_ids = sorted(i for i in ids if i.startswith("B"))
    for bid in b_ids:
        # Never partial: a record implies all its arrays, and arrays imply their record.
        assert store.has(bid), f"arrays of {bid} without its record"
        names = store.array_names(bid)
        assert names == [f"layer{k:02d}" for k in range(N_LAYERS)], bid
        i = int(bid[1:])
        for k in range(N_LAYERS):
            got = store.load_array(bid, f"layer{k:02d}")
            np.testing.assert_array_equal(got, base[(k + i) % N_LAYERS])
    # The file is writable again.
    store.save(_record("after"), {"x": np.ones(4, np.float16)})
    store.close()
    assert Store(path).has("after")


def test_decode_refuses_pickled_object_arrays():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_array(buffer.getvalue())


def test_store_never_writes_pickles(tmp_path):
    store = Store(tmp_path / "a.duckdb")
    with pytest.raises(ValueError):
        store.save(_record("obj"), {"x": np.array([object()], dtype=object)})
    assert not store.has("obj") and store.array_names("obj") == []


def test_arrays_larger_than_the_store_memory_are_refused_clearly(tmp_path):
    store = Store(tmp_path / "a.duckdb", memory_limit_bytes=16 << 20)
    store.save(_record("fits"), {"x": np.ones(1 << 20, np.float32)})  # 4 MiB
    with pytest.raises(AtlasError, match="ATLAS_STORE_MEMORY_MB"):
        store.save(_record("big"), {"x": np.ones(16 << 20, np.float32)})  # 64 MiB
    assert not store.has("big") and store.array_names("big") == []
    np.testing.assert_array_equal(store.load_array("fits", "x"), np.ones(1 << 20, np.float32))


def test_an_analysis_is_spread_over_tables_of_bounded_size(tmp_path):
    """Each table of BLOBs holds at most PACK_BYTES, unless one array alone is larger."""
    store = Store(tmp_path / "a.duckdb")
    rng = np.random.default_rng(0)
    arrays = {f"q{i}": rng.random(size, dtype=np.float32) for i, size in
              enumerate([6 << 20, 6 << 20, 20 << 20, 1 << 10])}  # 24, 24, 80 MiB and 4 KiB
    store.save(_record("wide"), arrays)
    with store._cursor() as cur:
        parts = dict(cur.execute("SELECT part, sum(nbytes) FROM arrays WHERE analysis_id = ? "
                                 "GROUP BY part", ["wide"]).fetchall())
    assert sorted(parts) == [0, 1, 2] and parts[0] <= PACK_BYTES and parts[1] > PACK_BYTES
    for name, array in arrays.items():
        np.testing.assert_array_equal(store.load_array("wide", name), array)


def test_a_store_opened_during_a_save_never_leaves_a_broken_analysis(tmp_path):
    """Opening the file again drops BLOB tables of uncommitted saves: a save in flight then
    fails clearly, or had finished whole; either way every stored analysis loads."""
    path = tmp_path / "a.duckdb"
    first = Store(path)
    arrays = {f"x{i}": np.full(2 << 20, i, np.float32) for i in range(12)}  # 8 MiB each
    outcome = {}

    def save():
        try:
            first.save(_record("busy"), arrays)
            outcome["saved"] = True
        except AtlasError as e:
            outcome["error"] = str(e)

    writer = threading.Thread(target=save)
    writer.start()
    time.sleep(0.2)
    Store(path)  # a second Store on the same file, mid-save
    writer.join(60)
    if outcome.get("saved"):
        for name, array in arrays.items():
            np.testing.assert_array_equal(first.load_array("busy", name), array)
    else:
        assert "run the analysis again" in outcome["error"] and not first.has("busy")
        first.save(_record("busy"), arrays)
        np.testing.assert_array_equal(first.load_array("busy", "x5"), arrays["x5"])
