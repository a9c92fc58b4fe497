"""The persistent StageContext a server job runs with.

Implements `refusal_audit.audit.context.StageContext` on top of the job store:

- `checkpoint` / `save_checkpoint`: SQLite rows, committed before `save_checkpoint` returns, so a
  finished unit of work (one prompt) survives a `kill -9` and is not recomputed on resume;
- `progress`: forwarded to the manager (watchers, throttled persistence) with an ETA from a
  sliding window of recent (done, time) samples of the current stage, so items replayed from
  checkpoints after a resume do not make the ETA optimistic for long;
- `check_cancelled`: raises `Cancelled` after CancelJob, `Interrupted` (a `Cancelled`) when the
  server is draining; the manager tells the two apart;
- `register_direction` / `register_latent_set`: through the server's ArtifactStore with
  `source_job_id`; idempotent across resumes (the artifact id is itself checkpointed);
- `out_dir`: ``data_dir/jobs/<id>/`` for the job's arrays (safetensors).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...audit.codec import to_jsonable
from ...audit.context import Cancelled
from ...audit.judges import Judge
from .store import JobStore

ARTIFACT_KEY_PREFIX = "__artifact__/"
ETA_WINDOW = 32  # progress samples per stage used for the rate


class Interrupted(Cancelled):
    """The server is shutting down: the job stops at a safe point and resumes on the next start."""


class EtaEstimator:
    """Seconds left in the current stage from the last `window` (done, t) samples of that stage."""

    def __init__(self, window: int = ETA_WINDOW) -> None:
        self.window = window
        self.stage: str | None = None
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def update(self, stage: str, done: int, total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if stage != self.stage or (self.samples and done < self.samples[-1][0]):
            self.stage = stage
            self.samples.clear()
        self.samples.append((done, now))
        if total <= 0 or done >= total or len(self.samples) < 2:
            return 0.0
        (d0, t0), (d1, t1) = self.samples[0], self.samples[-1]
        if d1 <= d0 or t1 <= t0:
            return 0.0
        return (total - done) * (t1 - t0) / (d1 - d0)


ProgressSink = Callable[[str, int, int, float, "dict[str, Any] | None"], None]


class JobContext:
    """StageContext of one job attempt (see the module docstring)."""

    def __init__(
        self,
        job_id: str,
        store: JobStore,
        out_dir: Path,
        judge: Judge,
        artifacts: Any,
        on_progress: ProgressSink,
        cancel_event: threading.Event,
        stop_event: threading.Event,
        job_result: Callable[[str, Callable[[], None] | None], dict[str, Any]] | None = None,
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.judge = judge
        self.artifacts = artifacts
        self._on_progress = on_progress
        self._cancel = cancel_event
        self._stop = stop_event
        self._job_result = job_result
        self._eta = EtaEstimator()
        self._lock = threading.Lock()
        # All checkpoints of the job, loaded once: resume reads them in bulk, not one query each.
        self._cache: dict[str, Any] = {k: json.loads(v) for k, v in store.checkpoints(job_id).items()}
        self.restored = len([k for k in self._cache if not k.startswith(ARTIFACT_KEY_PREFIX)])

    # ------------------------------------------------------------------ StageContext

    def progress(self, stage: str, done: int, total: int, partial: dict[str, Any] | None = None) -> None:
        """Report progress; watchers get it at once, the database at most every ~0.5 s per job."""
        eta = self._eta.update(stage, int(done), int(total))
        self._on_progress(stage, int(done), int(total), eta, partial)

    def checkpoint(self, key: str) -> Any | None:
        """The saved result of a finished unit of work, or None."""
        with self._lock:
            return self._cache.get(key)

    def save_checkpoint(self, key: str, value: Any) -> None:
        """Commit one finished unit's JSON-able result before the stage moves on."""
        plain = to_jsonable(value)
        self.store.save_checkpoint(self.job_id, key, json.dumps(plain, separators=(",", ":"), allow_nan=False))
        with self._lock:
            self._cache[key] = plain

    def checkpoints(self, prefix: str = "") -> dict[str, Any]:
        """Every checkpoint whose key starts with `prefix` (a bulk read for resuming loops)."""
        with self._lock:
            return {k: v for k, v in self._cache.items() if k.startswith(prefix)}

    def check_cancelled(self) -> None:
        """Raise Cancelled (CancelJob) or Interrupted (server draining) at a safe point."""
        if self._cancel.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled")
        if self._stop.is_set():
            raise Interrupted(f"job {self.job_id} interrupted by a server shutdown")

    def register_direction(self, name: str, values: np.ndarray, layer: int, metadata: dict[str, Any]) -> str:
        """Register (once per job and name, even across resumes) a direction artifact; its id."""
        key = f"{ARTIFACT_KEY_PREFIX}direction/{name}"
        known = self._known_artifact(key)
        if known:
            return known
        rec = self._store().register_direction(
            name, np.asarray(values, dtype=np.float32), int(layer), dict(metadata), source_job_id=self.job_id
        )
        self.save_checkpoint(key, rec.id)
        return str(rec.id)

    def register_latent_set(self, name: str, latents: dict[int, list[int]], metadata: dict[str, Any]) -> str:
        """Register (once per job and name, even across resumes) a latent-set artifact; its id."""
        key = f"{ARTIFACT_KEY_PREFIX}latent_set/{name}"
        known = self._known_artifact(key)
        if known:
            return known
        clean = {int(k): sorted({int(i) for i in v}) for k, v in latents.items()}
        rec = self._store().register_latent_set(name, clean, dict(metadata), source_job_id=self.job_id)
        self.save_checkpoint(key, rec.id)
        return str(rec.id)

    # ------------------------------------------------------------------ helpers for job kinds

    def job_result(self, job_id: str) -> dict[str, Any]:
        """The result of another (succeeded) job, arrays as numpy; waits while it is queued/running."""
        if self._job_result is None:
            raise RuntimeError("this context cannot read other jobs' results")
        return self._job_result(job_id, self.check_cancelled)

    def registered_artifact_ids(self) -> list[str]:
        """Ids of every artifact this job registered (in any attempt)."""
        with self._lock:
            return [str(v) for k, v in sorted(self._cache.items()) if k.startswith(ARTIFACT_KEY_PREFIX)]

    def _store(self) -> Any:
        if self.artifacts is None:
            raise RuntimeError("this server has no artifact store: cannot register artifacts")
        return self.artifacts

    def _known_artifact(self, key: str) -> str | None:
        aid = self.checkpoint(key)
        if not aid or self.artifacts is None:
            return None
        try:
            self.artifacts.get(aid)
        except Exception:  # noqa: BLE001 - deleted / unknown: register again
            return None
        return str(aid)
