"""The results cache: one DuckDB file, the only module that speaks SQL.

Tensors are stored as float16 npy BLOBs (never pickled) with shape and dtype columns; DuckDB array
columns cap at 100,000 elements and are slower. One connection per process, a cursor per call
(DuckDB cursors are per-thread connections). An analysis and its arrays are written in one
transaction, so a process killed mid-write leaves either all of it or none.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np

from backend.errors import CacheFileError, CacheInUseError, CorruptCacheError, NotFoundError

# Each migration moves the schema from version i to i + 1; never edit a released one.
MIGRATIONS: list[str] = [
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
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.Error as e:
            raise _cache_file_error(self.path, e) from None
        self._lock = threading.Lock()  # serialises writers; readers use their own cursors
        try:
            self._migrate()
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
            for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
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
        """Write the record and its arrays atomically; saving an existing id is a no-op."""
        with self._lock, self._cursor() as cur:
            if cur.execute("SELECT count(*) FROM analyses WHERE id = ?",
                           [record.id]).fetchone()[0]:
                return
            cur.execute("BEGIN TRANSACTION")
            try:
                for name, array in arrays.items():  # one encoded copy in memory at a time
                    blob = encode_array(array)
                    cur.execute("INSERT INTO arrays (analysis_id, name, dtype, shape, data, nbytes)"
                                " VALUES (?, ?, ?, ?, ?, ?)",
                                [record.id, name, str(array.dtype), list(array.shape), blob,
                                 len(blob)])
                    del blob
                cur.execute(
                    "INSERT INTO analyses (id, kind, model, model_fingerprint, text, params, meta)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [record.id, record.kind, record.model, record.model_fingerprint, record.text,
                     json.dumps(record.params), json.dumps(record.meta)])
                cur.execute("COMMIT")
            except Exception:
                cur.execute("ROLLBACK")
                raise

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
            row = cur.execute("SELECT data FROM arrays WHERE analysis_id = ? AND name = ?",
                              [analysis_id, name]).fetchone()
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
