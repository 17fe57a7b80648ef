"""The results cache: one DuckDB file, the only module that speaks SQL.

Tensors are stored as npy BLOBs (never pickled); DuckDB array columns cap at 100,000 elements and
are slower. The `arrays` table is the catalogue (name, dtype, shape, bytes); each analysis's BLOBs
live in a table of their own, because DuckDB rewrites a table's last row group at every
checkpoint: with one shared table of BLOBs, every save cost time and resident memory in
proportion to the whole cache. One connection per process, a cursor per call (DuckDB cursors are
per-thread connections). An analysis and its arrays are written in one transaction, so a process
killed mid-write leaves either all of it or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np

from backend.errors import AtlasError, CacheFileError, CacheInUseError, CorruptCacheError, NotFoundError


# Most bytes of BLOBs per table: DuckDB rewrites (and holds in memory) a table's last row group at
# every checkpoint, so a table that only grew would make every save cost as much as all before it.
PACK_BYTES = 64 << 20


def blob_tables(analysis_id: str) -> str:
    """The prefix of the tables of one analysis's BLOBs (a safe identifier whatever the id)."""
    return "blobs_" + hashlib.sha256(analysis_id.encode()).hexdigest()[:32]


class _BlobWriter:
    """Writes one analysis's BLOBs into tables of about PACK_BYTES (the last may hold one larger
    array); each INSERT commits on its own, since DuckDB keeps a transaction's data in memory."""

    def __init__(self, cur, analysis_id: str):
        self.cur, self.prefix, self.part, self.used = cur, blob_tables(analysis_id), -1, 0
        _drop_tables(cur, self.prefix)  # left by a save that was interrupted

    def write(self, name: str, blob: bytes) -> int:
        """Store `blob` under `name`; returns the part (table) it went to."""
        if self.part < 0 or (self.used and self.used + len(blob) > PACK_BYTES):
            self.part, self.used = self.part + 1, 0
            self.cur.execute(f"CREATE TABLE {self.prefix}_{self.part} "
                             "(name VARCHAR PRIMARY KEY, data BLOB NOT NULL)")
        self.cur.execute(f"INSERT INTO {self.prefix}_{self.part} VALUES (?, ?)", [name, blob])
        self.used += len(blob)
        return self.part


def _tables(cur, prefix: str) -> list[str]:
    return [t for (t,) in cur.execute("SELECT table_name FROM duckdb_tables() WHERE starts_with("
                                      "table_name, ?)", [prefix + "_"]).fetchall()]


def _drop_tables(cur, prefix: str) -> None:
    for table in _tables(cur, prefix):
        cur.execute(f"DROP TABLE {table}")


def _pack_old_blobs(cur) -> None:
    """Schema 4, before its transaction: copy each BLOB of the shared `arrays` table into its
    analysis's tables, noting the part in `array_parts` (run again from the start if stopped)."""
    cur.execute("DROP TABLE IF EXISTS array_parts")
    cur.execute("CREATE TABLE array_parts (analysis_id VARCHAR, name VARCHAR, part INTEGER)")
    for (aid,) in cur.execute("SELECT DISTINCT analysis_id FROM arrays").fetchall():
        writer = _BlobWriter(cur, aid)
        names = [n for (n,) in cur.execute("SELECT name FROM arrays WHERE analysis_id = ? "
                                           "ORDER BY name", [aid]).fetchall()]
        for name in names:  # one BLOB in memory at a time
            blob = cur.execute("SELECT data FROM arrays WHERE analysis_id = ? AND name = ?",
                               [aid, name]).fetchone()[0]
            cur.execute("INSERT INTO array_parts VALUES (?, ?, ?)",
                        [aid, name, writer.write(name, blob)])


# Each migration moves the schema from version i to i + 1: SQL run in one transaction, or
# (a function of a cursor that runs first, outside it, SQL); never edit a released one.
MIGRATIONS: list[str | tuple[Callable, str]] = [
    """
    CREATE TABLE analyses (
        id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        text VARCHAR NOT NULL,
        params JSON NOT NULL,
        meta JSON NOT NULL,
        created TIMESTAMP NOT NULL DEFAULT current_timestamp
    );
    CREATE TABLE arrays (
        analysis_id VARCHAR NOT NULL,
        name VARCHAR NOT NULL,
        dtype VARCHAR NOT NULL,
        shape INTEGER[] NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (analysis_id, name)
    );
    """,
    # Thought Anchors rollouts, saved as they are sampled so a stopped job resumes.
    """
    CREATE TABLE rollouts (
        analysis_id VARCHAR NOT NULL,
        chunk_idx INTEGER NOT NULL,
        forced BOOLEAN NOT NULL,
        rollout_idx INTEGER NOT NULL,
        continuation VARCHAR NOT NULL,
        chunk_resampled VARCHAR NOT NULL,
        answer VARCHAR,
        is_correct BOOLEAN NOT NULL,
        PRIMARY KEY (analysis_id, chunk_idx, forced, rollout_idx)
    );
    """,
    # Bytes of each stored array, so the size of an analysis is known without reading its BLOBs
    # (attention analyses now store query and key instead of full maps: see analyses.attention).
    """
    ALTER TABLE arrays ADD COLUMN nbytes BIGINT;
    UPDATE arrays SET nbytes = octet_length(data);
    """,
    # BLOBs move to tables of each analysis's own (see PACK_BYTES); `arrays` keeps the catalogue.
    (_pack_old_blobs, """
    CREATE TABLE catalogue AS SELECT a.analysis_id, a.name, a.dtype, a.shape, a.nbytes, p.part
        FROM arrays a JOIN array_parts p USING (analysis_id, name);
    DROP TABLE arrays;
    DROP TABLE array_parts;
    CREATE TABLE arrays (
        analysis_id VARCHAR NOT NULL,
        name VARCHAR NOT NULL,
        dtype VARCHAR NOT NULL,
        shape INTEGER[] NOT NULL,
        nbytes BIGINT NOT NULL,
        part INTEGER NOT NULL,
        PRIMARY KEY (analysis_id, name)
    );
    INSERT INTO arrays SELECT * FROM catalogue;
    DROP TABLE catalogue;
    """),
]

ROLLOUT_COLUMNS = ("chunk_idx", "forced", "rollout_idx", "continuation", "chunk_resampled",
                   "answer", "is_correct")


@dataclass(frozen=True)
class AnalysisRecord:
    """One cached analysis. `meta` holds what the views need besides arrays (tokens, sizes)."""

    id: str
    kind: str
    model: str
    model_fingerprint: str
    text: str
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    created: datetime | None = None


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _cache_file_error(path: Path, error: Exception) -> CacheFileError:
    if "lock" in str(error).lower():
        return CacheInUseError(
            f"The cache {path} is in use by another process ({error}). DuckDB lets one process "
            "use a cache file: stop the process holding it (a running app?) or set "
            "ATLAS_CACHE_DIR to another folder.", path)
    return CorruptCacheError(
        f"The cache file {path} cannot be read: it is truncated or damaged ({error}). Move it "
        "aside (it is kept, renamed) and start a new, empty cache.", path)


class Store:
    def __init__(self, path: Path | str, memory_limit_bytes: int | None = None):
        """memory_limit_bytes: DuckDB's own buffers (it keeps pages it read or wrote until this
        limit; left out, 80% of the machine's memory). Must exceed the largest single array."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
            if memory_limit_bytes:
                self._con.execute(f"SET memory_limit = '{int(memory_limit_bytes)}B'")
        except duckdb.Error as e:
            raise _cache_file_error(self.path, e) from None
        self._lock = threading.Lock()  # serialises writers; readers use their own cursors
        try:
            self._migrate()
            self._drop_unfinished_saves()
            self.has("")  # reads the catalogue: a torn file fails here, not in a page later
        except duckdb.Error as e:
            self._con.close()
            raise _cache_file_error(self.path, e) from None

    def close(self) -> None:
        self._con.close()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        return self._con.cursor()

    @property
    def schema_version(self) -> int:
        with self._cursor() as cur:
            return cur.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0

    def _migrate(self) -> None:
        with self._lock, self._cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = cur.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
                prepare, sql = step if isinstance(step, tuple) else (None, step)
                if prepare:
                    prepare(cur)
                cur.execute("BEGIN TRANSACTION")
                try:
                    cur.execute(sql)
                    cur.execute("INSERT INTO schema_version VALUES (?)", [version])
                    cur.execute("COMMIT")
                except Exception:
                    cur.execute("ROLLBACK")
                    raise

    def has(self, analysis_id: str) -> bool:
        with self._cursor() as cur:
            return cur.execute("SELECT count(*) FROM analyses WHERE id = ?",
                               [analysis_id]).fetchone()[0] > 0

    def save(self, record: AnalysisRecord, arrays: dict[str, np.ndarray]) -> None:
        """Write the record and its arrays; saving an existing id is a no-op. Each BLOB is
        committed on its own (DuckDB holds a transaction's data in memory until it commits, and
        analyses of long inputs hold gigabytes); the catalogue and the record come last, in one
        transaction, so an analysis exists whole or not at all (the BLOBs of a save that never
        finished are dropped when the store next opens)."""
        with self._lock, self._cursor() as cur:
            if cur.execute("SELECT count(*) FROM analyses WHERE id = ?",
                           [record.id]).fetchone()[0]:
                return
            writer = _BlobWriter(cur, record.id)
            catalogue = []
            try:
                for name, array in arrays.items():  # one encoded copy in memory at a time
                    blob = encode_array(array)
                    catalogue.append([record.id, name, str(array.dtype), list(array.shape),
                                      len(blob), writer.write(name, blob)])
                    del blob
            except duckdb.OutOfMemoryException as e:
                _drop_tables(cur, writer.prefix)
                raise AtlasError(f"The cache could not hold an array of this analysis in memory "
                                 f"({e}). Raise ATLAS_STORE_MEMORY_MB above its largest "
                                 "array.") from None
            except duckdb.Error as e:  # e.g. its tables dropped by another Store on this file
                _drop_tables(cur, writer.prefix)
                raise AtlasError(f"The analysis could not be saved ({e}); run the analysis "
                                 "again.") from None
            cur.execute("BEGIN TRANSACTION")
            try:
                if len(_tables(cur, writer.prefix)) != writer.part + 1:
                    # another Store on this file opened meanwhile and took them for leftovers
                    raise AtlasError("The cache file was opened again while this analysis was "
                                     "being saved; run the analysis again.")
                if catalogue:
                    cur.executemany("INSERT INTO arrays (analysis_id, name, dtype, shape, "
                                    "nbytes, part) VALUES (?, ?, ?, ?, ?, ?)", catalogue)
                cur.execute(
                    "INSERT INTO analyses (id, kind, model, model_fingerprint, text, params, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [record.id, record.kind, record.model, record.model_fingerprint, record.text,
                     json.dumps(record.params), json.dumps(record.meta)])
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

    def _drop_unfinished_saves(self) -> None:
        """Drop tables of BLOBs whose analysis was never committed (a save killed midway)."""
        with self._lock, self._cursor() as cur:
            committed = {blob_tables(i) for (i,) in cur.execute("SELECT id FROM analyses")
                         .fetchall()}
            for (table,) in cur.execute("SELECT table_name FROM duckdb_tables() WHERE "
                                        "starts_with(table_name, 'blobs_')").fetchall():
                if table.rsplit("_", 1)[0] not in committed:
                    cur.execute(f"DROP TABLE {table}")

    def load(self, analysis_id: str) -> AnalysisRecord:
        with self._cursor() as cur:
            row = cur.execute(
                "SELECT id, kind, model, model_fingerprint, text, params, meta, created"
                " FROM analyses WHERE id = ?", [analysis_id]).fetchone()
        if row is None:
            raise NotFoundError(f"No analysis '{analysis_id}' in this server's cache.")
        return AnalysisRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]),
                              json.loads(row[6]), row[7])

    def load_array(self, analysis_id: str, name: str) -> np.ndarray:
        with self._cursor() as cur:
            part = cur.execute("SELECT part FROM arrays WHERE analysis_id = ? AND name = ?",
                               [analysis_id, name]).fetchone()
            row = part and cur.execute(f"SELECT data FROM {blob_tables(analysis_id)}_{part[0]} "
                                       "WHERE name = ?", [name]).fetchone()
        if row is None:
            raise NotFoundError(f"Analysis '{analysis_id}' has no array '{name}'.")
        return decode_array(row[0])

    def stored_bytes(self, analysis_id: str) -> int:
        """Bytes of an analysis's arrays in the cache."""
        with self._cursor() as cur:
            return int(cur.execute("SELECT coalesce(sum(nbytes), 0) FROM arrays WHERE "
                                   "analysis_id = ?", [analysis_id]).fetchone()[0])

    def array_names(self, analysis_id: str) -> list[str]:
        with self._cursor() as cur:
            rows = cur.execute("SELECT name FROM arrays WHERE analysis_id = ? ORDER BY name",
                               [analysis_id]).fetchall()
        return [r[0] for r in rows]

    def save_rollouts(self, analysis_id: str, rows: list[dict]) -> None:
        """Append sampled rollouts (dicts with ROLLOUT_COLUMNS) of a running analysis at once."""
        with self._lock, self._cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                cur.executemany(
                    f"INSERT INTO rollouts (analysis_id, {', '.join(ROLLOUT_COLUMNS)}) "
                    f"VALUES (?, {', '.join('?' * len(ROLLOUT_COLUMNS))})",
                    [[analysis_id] + [row[c] for c in ROLLOUT_COLUMNS] for row in rows])
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

    def load_rollouts(self, analysis_id: str) -> list[dict]:
        """Saved rollouts of an analysis, by chunk, forced flag and order of sampling."""
        with self._cursor() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE analysis_id = ? "
                "ORDER BY chunk_idx, forced, rollout_idx", [analysis_id]).fetchall()
        return [dict(zip(ROLLOUT_COLUMNS, row)) for row in rows]

    def recent(self, kind: str | None = None, limit: int = 20) -> list[AnalysisRecord]:
        """Latest analyses first, without their arrays."""
        with self._cursor() as cur:
            ids = cur.execute(
                "SELECT id FROM analyses WHERE ? IS NULL OR kind = ? ORDER BY created DESC LIMIT ?",
                [kind, kind, limit]).fetchall()
        return [self.load(i) for (i,) in ids]
