"""Durable job state: SQLite (WAL) `jobs.sqlite` in the server's data directory.

Two tables. `jobs` holds one row per job (kind, state, validated config, timestamps, progress,
error, attempts, result JSON, artifact ids); `checkpoints` holds the finished units of work of a
job (e.g. one prompt's verdict) as JSON under a key, PRIMARY KEY (job_id, key).

Durability rule: every write is committed (``synchronous=FULL``) before the method returns, so
whatever the server acknowledged (a StartJob, a checkpoint, a final result) survives a ``kill -9``.
One connection, guarded by a lock, is shared by the worker threads and the gRPC event loop; the
writes are small, so contention is not an issue at job granularity.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...audit.errors import LimitExceeded, NotFound

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    config_json      TEXT NOT NULL,
    created_at       REAL NOT NULL,
    started_at       REAL NOT NULL DEFAULT 0,
    finished_at      REAL NOT NULL DEFAULT 0,
    stage            TEXT NOT NULL DEFAULT '',
    done             INTEGER NOT NULL DEFAULT 0,
    total            INTEGER NOT NULL DEFAULT 0,
    eta_s            REAL NOT NULL DEFAULT 0,
    error            TEXT NOT NULL DEFAULT '',
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result_json      TEXT,
    artifact_ids     TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, key)
);
"""

_COLUMNS = (
    "id, kind, state, config_json, created_at, started_at, finished_at, stage, done, total, eta_s, "
    "error, attempts, cancel_requested, artifact_ids"
)


@dataclass
class JobRecord:
    """One job as stored (without its result JSON, fetched separately: it can be large)."""

    id: str
    kind: str
    state: str
    config_json: str
    created_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    stage: str = ""
    done: int = 0
    total: int = 0
    eta_s: float = 0.0
    error: str = ""
    attempts: int = 0
    cancel_requested: bool = False
    artifact_ids: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def copy(self) -> JobRecord:
        return replace(self, artifact_ids=list(self.artifact_ids))


def new_job_id() -> str:
    """`job_` + 16 hex digits: unique, short enough to type."""
    return "job_" + uuid.uuid4().hex[:16]


def _row_to_record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    (jid, kind, state, config_json, created, started, finished, stage, done, total, eta, error, attempts,
     cancel, artifact_ids) = row
    return JobRecord(
        id=jid, kind=kind, state=state, config_json=config_json, created_at=created, started_at=started,
        finished_at=finished, stage=stage, done=int(done), total=int(total), eta_s=float(eta), error=error,
        attempts=int(attempts), cancel_requested=bool(cancel), artifact_ids=list(json.loads(artifact_ids or "[]")),
    )


class JobStore:
    """The jobs database. Every method commits before returning (or raises)."""

    def __init__(self, data_dir: str | Path, filename: str = "jobs.sqlite") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / filename
        self._lock = threading.RLock()
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._tx() as c:
            # not executescript: it commits on its own; run the statements inside this transaction
            for stmt in filter(None, (s.strip() for s in SCHEMA.split(";"))):
                c.execute(stmt)
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version} is newer than this server ({SCHEMA_VERSION})")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction (rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ jobs

    def create(self, kind: str, config_json: str, job_id: str | None = None, max_queued: int | None = None) -> JobRecord:
        """Insert a QUEUED job (committed). With `max_queued`, raises QueueFull past that many queued jobs."""
        rec = JobRecord(id=job_id or new_job_id(), kind=kind, state=QUEUED, config_json=config_json,
                        created_at=time.time())
        with self._tx() as c:
            if max_queued is not None:
                n = c.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (QUEUED,)).fetchone()[0]
                if n >= max_queued:
                    raise QueueFull(f"{n} jobs are already queued (max_queued_jobs={max_queued}); try later")
            c.execute(
                "INSERT INTO jobs (id, kind, state, config_json, created_at) VALUES (?, ?, ?, ?, ?)",
                (rec.id, rec.kind, rec.state, rec.config_json, rec.created_at),
            )
        return rec

    def get(self, job_id: str) -> JobRecord:
        rows = self._query(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise NotFound(f"id: job {job_id!r} not found")
        return _row_to_record(rows[0])

    def exists(self, job_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM jobs WHERE id=?", (job_id,)))

    def list(self, kind: str = "", limit: int = 0, states: tuple[str, ...] = ()) -> builtins.list[JobRecord]:
        """Newest first; optionally one kind, some states, at most `limit` rows (0 = all)."""
        sql = f"SELECT {_COLUMNS} FROM jobs"
        where, args = [], []  # type: ignore[var-annotated]
        if kind:
            where.append("kind=?")
            args.append(kind)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit > 0:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_record(r) for r in self._query(sql, tuple(args))]

    def in_order(self, state: str) -> builtins.list[JobRecord]:
        """Jobs in one state, oldest first (FIFO)."""
        return [_row_to_record(r) for r in self._query(f"SELECT {_COLUMNS} FROM jobs WHERE state=? ORDER BY seq",
                                                       (state,))]

    def count(self, state: str) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE state=?", (state,))[0][0])

    def update(self, job_id: str, **fields: Any) -> None:
        """Set columns of one job (artifact_ids: a list; cancel_requested: a bool)."""
        if not fields:
            return
        cols, values = _assignments(fields)
        with self._tx() as c:
            cur = c.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*values, job_id))
            if cur.rowcount == 0:
                raise NotFound(f"id: job {job_id!r} not found")

    def transition(self, job_id: str, from_states: tuple[str, ...], **fields: Any) -> bool:
        """Compare-and-set: update only if the job is in one of `from_states`. True if it was."""
        cols, values = _assignments(fields)
        marks = ",".join("?" * len(from_states))
        with self._tx() as c:
            cur = c.execute(f"UPDATE jobs SET {cols} WHERE id=? AND state IN ({marks})",
                            (*values, job_id, *from_states))
            return cur.rowcount > 0

    def finish(self, job_id: str, state: str, *, error: str = "", result_json: str | None = None,
               artifact_ids: builtins.list[str] | None = None, progress: tuple[str, int, int] | None = None) -> None:
        """Record a terminal state (with the result, for SUCCEEDED) in one transaction."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        fields: dict[str, Any] = {"state": state, "finished_at": time.time(), "error": error, "eta_s": 0.0}
        if result_json is not None:
            fields["result_json"] = result_json
        if artifact_ids is not None:
            fields["artifact_ids"] = artifact_ids
        if progress is not None:
            fields["stage"], fields["done"], fields["total"] = progress
        self.update(job_id, **fields)

    def result_json(self, job_id: str) -> str | None:
        rows = self._query("SELECT result_json FROM jobs WHERE id=?", (job_id,))
        if not rows:
            raise NotFound(f"id: job {job_id!r} not found")
        return rows[0][0]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, job_id: str, key: str, value_json: str) -> None:
        """Durably store (or replace) one finished unit of work of a job."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO checkpoints (job_id, key, value_json, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(job_id, key) DO UPDATE SET value_json=excluded.value_json, created_at=excluded.created_at",
                (job_id, key, value_json, time.time()),
            )

    def checkpoint(self, job_id: str, key: str) -> str | None:
        rows = self._query("SELECT value_json FROM checkpoints WHERE job_id=? AND key=?", (job_id, key))
        return rows[0][0] if rows else None

    def checkpoints(self, job_id: str, prefix: str = "") -> dict[str, str]:
        """All checkpoints of a job (whose key starts with `prefix`), key -> JSON."""
        rows = self._query(
            "SELECT key, value_json FROM checkpoints WHERE job_id=? AND substr(key, 1, ?)=? ORDER BY key",
            (job_id, len(prefix), prefix),
        )
        return dict(rows)

    def count_checkpoints(self, job_id: str) -> int:
        return int(self._query("SELECT COUNT(*) FROM checkpoints WHERE job_id=?", (job_id,))[0][0])


def _assignments(fields: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """An UPDATE's ``col=?, ...`` and its values, artifact_ids as a JSON list and cancel_requested as 0/1."""
    if "artifact_ids" in fields:
        fields = {**fields, "artifact_ids": json.dumps(list(fields["artifact_ids"]))}
    if "cancel_requested" in fields:
        fields = {**fields, "cancel_requested": int(bool(fields["cancel_requested"]))}
    return ", ".join(f"{k}=?" for k in fields), tuple(fields.values())


class QueueFull(LimitExceeded):
    """Too many queued jobs (mapped to RESOURCE_EXHAUSTED)."""


# ---------------------------------------------------------------------- results with arrays

ARRAY_TAG = "__ndarray__"
RESULT_ARRAYS_FILE = "result.safetensors"


def pack_result(result: dict[str, Any], out_dir: Path, to_jsonable: Any) -> str:
    """The result as JSON, every numpy array moved to ``out_dir/result.safetensors``.

    An array becomes ``{"__ndarray__": {"file", "key", "shape", "dtype"}}`` (key = its path in
    the result, e.g. ``direction`` or ``per_layer.3``). The file is written and fsynced before the
    JSON is committed, so a stored result never points at a missing file.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf" and obj.size > 0:
            key = path or "value"
            arrays[key] = np.ascontiguousarray(obj)
            return {ARRAY_TAG: {"file": RESULT_ARRAYS_FILE, "key": key, "shape": list(obj.shape),
                                "dtype": str(obj.dtype)}}
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return obj

    packed = walk(result, "")
    if arrays:
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / (RESULT_ARRAYS_FILE + ".tmp")
        save_file(arrays, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_dir / RESULT_ARRAYS_FILE)
    return json.dumps(to_jsonable(packed), separators=(",", ":"), allow_nan=False)


def unpack_result(result_json: str, out_dir: Path, as_lists: bool = False, max_elements: int | None = None) -> Any:
    """Inverse of `pack_result`: array references become numpy arrays (or lists with `as_lists`).

    With `max_elements`, arrays larger than that stay references (a client can't take 100 MB of
    JSON); the reference then says where the array is on the server.
    """
    data = json.loads(result_json)
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(ref: dict[str, Any]) -> Any:
        n = int(np.prod(ref.get("shape") or [0]))
        if max_elements is not None and n > max_elements:
            return {ARRAY_TAG: {**ref, "omitted": f"{n} elements exceed the inline limit {max_elements}",
                                "path": str(out_dir / ref["file"])}}
        fname = ref["file"]
        if fname not in cache:
            from safetensors.numpy import load_file

            cache[fname] = load_file(str(out_dir / fname))
        arr = cache[fname][ref["key"]]
        return arr.tolist() if as_lists else arr

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {ARRAY_TAG} and isinstance(obj[ARRAY_TAG], dict):
                return load(obj[ARRAY_TAG])
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(data)
