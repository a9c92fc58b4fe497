"""The job runner: a FIFO queue, N worker threads, cancellation, watchers, resume after a crash.

Life of a job::

    StartJob -> QUEUED (row committed) -> RUNNING (attempts+1) -> SUCCEEDED | FAILED | CANCELLED

- Queue: FIFO by submission order (the `seq` column); at most `max_concurrent` jobs run at once,
  each on its own worker thread; at most `max_queued` wait (more: LimitExceeded).
- Cancel: a QUEUED job becomes CANCELLED at once; a RUNNING one gets its cancel flag set (and
  persisted) and stops at its next `ctx.check_cancelled()`.
- Failure: a runner that raises makes the job FAILED with the error message; a judge that is down
  (JudgeError) fails the job with a message naming the judge - jobs never fall back to another judge.
- Resume: on start, every job still RUNNING in the database belonged to a process that died. It is
  re-queued (ahead of the never-started ones) and, when it runs again, its context replays the
  checkpoints it committed, so finished per-prompt work is not recomputed. After `max_attempts`
  starts it is FAILED with "server restarted; attempts exhausted". A job whose cancellation was
  requested before the crash becomes CANCELLED.
- Graceful shutdown (`stop`): running jobs stop at their next `check_cancelled()` and go back to
  QUEUED without using up an attempt; they resume on the next start.
- Watchers: callbacks registered per job get a (JobRecord snapshot, partial) on every progress or
  state change. Progress is kept in memory and persisted at most every `persist_every_s` per job
  (checkpoints and state changes are always committed at once).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...audit.codec import dumps, to_jsonable
from ...audit.compute import ComputeMeter, MeteredEngine, stages_json
from ...audit.context import Cancelled
from ...audit.errors import InvalidRequest, LimitExceeded, NotFound
from ...audit.judges import Judge, JudgeError, SubstringJudge
from ...audit.judges.gate import server_gate
from .context import Interrupted, JobContext
from .inputs import CheckEnv
from .kinds import KINDS, JobKind, validate_config
from .store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobRecord,
    JobStore,
    QueueFull,
    pack_result,
    unpack_result,
)

log = logging.getLogger("refusal_audit.jobs")

Watcher = Callable[[JobRecord, "dict[str, Any] | None"], None]
RESTART_EXHAUSTED = "server restarted; attempts exhausted"


@dataclass
class _Live:
    """A running job: its in-memory record (fresher than the database) and its flags."""

    record: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    last_persist: float = 0.0
    last_stage: str = ""


class JobManager:
    """Runs jobs from a durable FIFO queue on `max_concurrent` worker threads (see module docstring)."""

    def __init__(
        self,
        store: JobStore,
        engine: Any,
        artifacts: Any = None,
        judge: Judge | None = None,
        data_dir: str | Path | None = None,
        max_concurrent: int = 1,
        max_queued: int = 64,
        max_attempts: int = 3,
        kinds: dict[str, JobKind] | None = None,
        persist_every_s: float = 0.5,
        coherence_gate: bool = True,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.store = store
        self.engine = engine
        self.artifacts = artifacts
        self.judge: Judge = judge if judge is not None else SubstringJudge()
        if coherence_gate:  # every job's verdicts pass the coherence gate (audit/judges/gate.py)
            self.judge = server_gate(self.judge, engine)
        self.data_dir = Path(data_dir) if data_dir is not None else store.data_dir
        self.jobs_dir = self.data_dir / "jobs"
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_attempts = max_attempts
        self.kinds = dict(KINDS if kinds is None else kinds)
        self.persist_every_s = persist_every_s
        self._cv = threading.Condition()
        self._queue: deque[str] = deque()
        self._live: dict[str, _Live] = {}
        self._watchers: dict[str, list[Watcher]] = {}
        self._listeners: list[Watcher] = []  # every job's changes (metrics)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover what a previous process left (RUNNING -> re-queued or FAILED), then start workers."""
        if self._started:
            return
        self._started = True
        self._recover()
        for i in range(self.max_concurrent):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _recover(self) -> None:
        resumed: list[str] = []
        for rec in self.store.in_order(RUNNING):
            if rec.cancel_requested:
                self.store.finish(rec.id, CANCELLED, error="cancelled (the server restarted while cancelling)")
            elif rec.attempts >= self.max_attempts:
                self.store.finish(rec.id, FAILED,
                                  error=f"{RESTART_EXHAUSTED} ({rec.attempts} of max_attempts={self.max_attempts})")
            else:
                self.store.update(rec.id, state=QUEUED, stage=rec.stage, eta_s=0.0)
                resumed.append(rec.id)
                log.warning("job %s was running when the server stopped; re-queued (attempt %d of %d next)",
                            rec.id, rec.attempts + 1, self.max_attempts)
        queued = [r.id for r in self.store.in_order(QUEUED) if r.id not in resumed]
        with self._cv:
            self._queue.extend(resumed + queued)
            self._cv.notify_all()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop workers: running jobs are interrupted at a safe point and stay resumable."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    close = stop

    # ------------------------------------------------------------------ API

    def submit(self, kind: str, config_json: str) -> JobRecord:
        """Validate, persist as QUEUED (committed) and enqueue. Raises InvalidRequest/LimitExceeded."""
        spec = self.kinds.get(kind)
        if spec is None:
            raise InvalidRequest(f"kind: unknown job kind {kind!r}; known kinds: {', '.join(sorted(self.kinds))}")
        cfg = validate_config(spec, config_json)
        if spec.check is not None:
            spec.check(cfg, self._env_for_checks())
        try:
            rec = self.store.create(kind, cfg.model_dump_json(), max_queued=self.max_queued)
        except QueueFull as exc:
            raise LimitExceeded(str(exc)) from None
        with self._cv:
            self._queue.append(rec.id)
            self._cv.notify()
        return rec

    def get(self, job_id: str) -> JobRecord:
        """The freshest view: the in-memory record of a running job, else the database row."""
        with self._cv:
            live = self._live.get(job_id)
            if live is not None:
                return live.record.copy()
        return self.store.get(job_id)

    def list(self, kind: str = "", limit: int = 0) -> builtins.list[JobRecord]:
        """Newest first, running jobs with their in-memory progress."""
        rows = self.store.list(kind=kind, limit=limit)
        with self._cv:
            return [self._live[r.id].record.copy() if r.id in self._live else r for r in rows]

    def cancel(self, job_id: str) -> JobRecord:
        """QUEUED -> CANCELLED now; RUNNING -> flag set (cooperative); terminal: unchanged."""
        rec = self.store.get(job_id)
        if rec.state == QUEUED and self.store.transition(job_id, (QUEUED,), state=CANCELLED, finished_at=time.time(),
                                                          error="cancelled before it started"):
            with self._cv, contextlib.suppress(ValueError):
                self._queue.remove(job_id)
            self._notify(self.store.get(job_id), None)
            return self.store.get(job_id)
        # Persist the request first, then flag the live job: `_run` registers the job as live and
        # then re-reads the flag, so a cancel racing with the job's start is never lost.
        if not self.store.transition(job_id, (RUNNING,), cancel_requested=True):
            return self.get(job_id)  # terminal (or cancelled while queued just now)
        with self._cv:
            live = self._live.get(job_id)
            if live is not None:
                live.cancel.set()
                live.record.cancel_requested = True
        if live is not None:
            self._notify(live.record.copy(), None)
        return self.get(job_id)

    def result(self, job_id: str, as_lists: bool = False, max_elements: int | None = None) -> tuple[JobRecord, Any]:
        """(record, result) of a job; result is None unless SUCCEEDED. Arrays come back as numpy
        (or lists with `as_lists`; larger than `max_elements`: a reference)."""
        rec = self.get(job_id)
        if rec.state != SUCCEEDED:
            return rec, None
        text = self.store.result_json(job_id)
        if text is None:
            return rec, None
        return rec, unpack_result(text, self.jobs_dir / job_id, as_lists=as_lists, max_elements=max_elements)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.05) -> JobRecord:
        """Block until the job is terminal (for tests and dependent jobs)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self.get(job_id)
            if rec.terminal:
                return rec
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {rec.state} after {timeout}s")
            time.sleep(poll_s)

    def subscribe(self, job_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(record, partial)` on every change of the job; returns an unsubscribe function."""
        if not self.store.exists(job_id):
            raise NotFound(f"id: job {job_id!r} not found")
        with self._cv:
            self._watchers.setdefault(job_id, []).append(watcher)

        def unsubscribe() -> None:
            with self._cv:
                lst = self._watchers.get(job_id, [])
                if watcher in lst:
                    lst.remove(watcher)
                if not lst:
                    self._watchers.pop(job_id, None)

        return unsubscribe

    def add_listener(self, listener: Watcher) -> None:
        """Call `listener(record, partial)` on every change of every job (e.g. metrics)."""
        with self._cv:
            self._listeners.append(listener)

    def running(self) -> int:
        with self._cv:
            return len(self._live)

    # ------------------------------------------------------------------ internals

    def _notify(self, rec: JobRecord, partial: dict[str, Any] | None) -> None:
        with self._cv:
            watchers = [*self._listeners, *self._watchers.get(rec.id, ())]
        for w in watchers:
            try:
                w(rec, partial)
            except Exception:  # noqa: BLE001 - a broken watcher must not break the job
                log.exception("job watcher failed")

    def _env_for_checks(self) -> CheckEnv:
        return CheckEnv(engine=self.engine, artifacts=self.artifacts, job_kind=lambda jid: self.store.get(jid).kind)

    def _next(self) -> str | None:
        with self._cv:
            while not self._queue and not self._stop.is_set():
                self._cv.wait(0.5)
            if self._stop.is_set():
                return None
            return self._queue.popleft()

    def _worker(self) -> None:
        while not self._stop.is_set():
            job_id = self._next()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # noqa: BLE001 - keep the worker alive whatever happens
                log.exception("job %s: unexpected error in the runner loop", job_id)

    def _run(self, job_id: str) -> None:
        now = time.time()
        rec = self.store.get(job_id)
        if rec.state != QUEUED:  # cancelled meanwhile
            return
        attempts = rec.attempts + 1
        if not self.store.transition(job_id, (QUEUED,), state=RUNNING, attempts=attempts,
                                     started_at=rec.started_at or now, error=""):
            return
        rec.state, rec.attempts, rec.started_at, rec.error = RUNNING, attempts, rec.started_at or now, ""
        live = _Live(record=rec, last_persist=time.monotonic(), last_stage=rec.stage)
        with self._cv:
            self._live[job_id] = live
        self._notify(rec.copy(), None)
        out_dir = self.jobs_dir / job_id
        state, error, result_json, artifact_ids = FAILED, "", None, None
        ctx: JobContext | None = None
        try:
            spec = self.kinds.get(rec.kind)
            if spec is None:
                raise RuntimeError(f"job kind {rec.kind!r} is not available on this server")
            cfg = validate_config(spec, rec.config_json)
            meter = ComputeMeter(rec.kind)  # passes and seconds per stage, for every kind (audit/compute.py)

            def on_progress(s: str, d: int, t: int, e: float, p: dict[str, Any] | None) -> None:
                meter.set_stage(s)
                self._progress(live, s, d, t, e, p)

            ctx = JobContext(job_id, self.store, out_dir, self.judge, self.artifacts, on_progress=on_progress,
                             cancel_event=live.cancel, stop_event=self._stop, job_result=self._job_result)
            if self.store.get(job_id).cancel_requested:  # cancelled between the transition and now
                live.cancel.set()
            ctx.check_cancelled()
            result, ids = spec.runner(MeteredEngine(self.engine, meter), cfg, ctx)
            if isinstance(result, dict):
                # this attempt's engine calls (a resumed job's replayed checkpoints cost nothing here)
                result.setdefault("compute", stages_json(meter.take()))
            ids = list(dict.fromkeys([*ids, *ctx.registered_artifact_ids()]))
            cal = getattr(self.judge, "calibrated", None)
            if cal is not None and isinstance(result, dict):
                result.setdefault("coherence_gate", cal.to_json())
            result_json = pack_result(result, out_dir, to_jsonable=to_jsonable)
            state, artifact_ids = SUCCEEDED, ids
        except Interrupted:
            # graceful shutdown: back to QUEUED, this attempt does not count
            self.store.update(job_id, state=QUEUED, attempts=attempts - 1, stage=live.record.stage,
                              done=live.record.done, total=live.record.total, eta_s=0.0)
            with self._cv:
                self._live.pop(job_id, None)
            self._notify(self.store.get(job_id), None)
            return
        except Cancelled:
            state, error = CANCELLED, "cancelled while running"
        except JudgeError as exc:
            state, error = FAILED, f"judge {getattr(self.judge, 'name', type(self.judge).__name__)!r} failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - any runner error fails the job, with its message
            state, error = FAILED, f"{type(exc).__name__}: {exc}"
            log.error("job %s failed: %s", job_id, "".join(traceback.format_exception(exc)))
        if artifact_ids is None and ctx is not None:  # what a failed/cancelled run registered
            artifact_ids = ctx.registered_artifact_ids()
        p = live.record
        self.store.finish(job_id, state, error=error, result_json=result_json, artifact_ids=artifact_ids,
                          progress=(p.stage, p.done, p.total))
        final = self.store.get(job_id)
        with self._cv:
            self._live.pop(job_id, None)
        self._notify(final, None)

    def _progress(self, live: _Live, stage: str, done: int, total: int, eta: float,
                  partial: dict[str, Any] | None) -> None:
        rec = live.record
        with self._cv:
            rec.stage, rec.done, rec.total, rec.eta_s = stage, done, total, eta
            snap = rec.copy()
        now = time.monotonic()
        if stage != live.last_stage or done >= total or now - live.last_persist >= self.persist_every_s:
            self.store.update(rec.id, stage=stage, done=done, total=total, eta_s=eta)
            live.last_persist, live.last_stage = now, stage
        self._notify(snap, partial)

    def _job_result(self, job_id: str, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """Another job's result for a dependent job: waits while it is queued/running (calling
        `check`, the waiting job's check_cancelled, meanwhile)."""
        rec = self.store.get(job_id)
        while rec.state not in TERMINAL:
            if check is not None:
                check()
            if self._stop.is_set():
                raise Interrupted("server shutting down while waiting for a job")
            time.sleep(0.2)
            rec = self.get(job_id)
        if rec.state != SUCCEEDED:
            raise RuntimeError(f"job {job_id} ({rec.kind}) is {rec.state}" + (f": {rec.error}" if rec.error else ""))
        _, result = self.result(job_id)
        return result


__all__ = ["JobManager", "RESTART_EXHAUSTED", "dumps"]
