"""`JobsService`: the six job RPCs of AuditService (grpc.aio), delegated to by `AuditServicer`.

StartJob / GetJob / WatchJob / CancelJob / ListJobs / GetJobResult, each ``async (request,
context)`` returning the protobuf messages of `audit_pb2`. Database work runs in a thread
(`asyncio.to_thread`) so the event loop never waits on an fsync; the jobs themselves run on the
manager's worker threads, where calling the engine is safe (the HF engine has its own lock).

Status codes: a bad config -> INVALID_ARGUMENT naming the field (``config.n: ...``); an unknown
kind -> INVALID_ARGUMENT listing the kinds; an unknown id -> NOT_FOUND; the queue full ->
RESOURCE_EXHAUSTED. WatchJob streams one event per change until the job is terminal or the
client goes away; events are hints, the job row is the truth: a slow watcher may miss
intermediate progress events but always gets the current state and the final one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ...audit.codec import dumps
from ...audit.errors import InvalidRequest, NotFound
from ...audit.judges import Judge
from ...proto import convert
from ...proto.generated import audit_pb2 as pb
from ..status import abort_with
from .manager import JobManager
from .store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobStore

log = logging.getLogger("refusal_audit.jobs")
T = TypeVar("T")

STATE_TO_PB = {
    QUEUED: pb.Job.QUEUED, RUNNING: pb.Job.RUNNING, SUCCEEDED: pb.Job.SUCCEEDED,
    FAILED: pb.Job.FAILED, CANCELLED: pb.Job.CANCELLED,
}
RESULT_INLINE_MAX_ELEMENTS = 1 << 20  # arrays above this stay server-side references in GetJobResult
WATCH_POLL_S = 1.0  # re-read the job at least this often while watching (events are hints)
WATCH_QUEUE = 256  # events buffered per watcher before progress events are dropped


def job_to_pb(rec: JobRecord) -> pb.Job:
    """The wire form of a job record."""
    return pb.Job(
        id=rec.id, kind=rec.kind, state=STATE_TO_PB.get(rec.state, pb.Job.STATE_UNSPECIFIED),
        config_json=rec.config_json, created_at=rec.created_at, started_at=rec.started_at,
        finished_at=rec.finished_at,
        progress=pb.JobProgress(stage=rec.stage, done=rec.done, total=rec.total, eta_s=rec.eta_s),
        error=rec.error, artifact_ids=list(rec.artifact_ids), attempts=rec.attempts,
    )


def artifact_to_pb(rec: Any) -> pb.Artifact:
    """An ArtifactStore record -> pb.Artifact (with its payload)."""
    return convert.artifact_to_pb(rec, with_payload=True)


class JobsService:
    """Job RPCs over a `JobManager` whose state lives in ``data_dir/jobs.sqlite``."""

    def __init__(
        self,
        engine: Any,
        artifacts: Any = None,
        judge: Judge | None = None,
        data_dir: str | Path = "data",
        max_concurrent: int = 1,
        max_queued: int = 64,
        max_attempts: int = 3,
        metrics: Any = None,
        kinds: dict[str, Any] | None = None,
        start: bool = True,
    ) -> None:
        self.store = JobStore(data_dir)
        self.metrics = metrics
        self.manager = JobManager(
            self.store, engine, artifacts=artifacts, judge=judge, data_dir=data_dir, max_concurrent=max_concurrent,
            max_queued=max_queued, max_attempts=max_attempts, kinds=kinds,
        )
        self.artifacts = artifacts
        if metrics is not None:
            self.manager.add_listener(self._observe)
        if start:
            self.manager.start()

    def _observe(self, rec: JobRecord, partial: dict[str, Any] | None) -> None:
        """Prometheus job gauges (the server's Metrics), best effort."""
        m = self.metrics
        with contextlib.suppress(Exception):
            if rec.terminal:
                m.clear_job(rec.id, rec.kind)
            elif rec.state == RUNNING:
                m.set_job_progress(rec.id, rec.kind, rec.done, rec.total)
            m.jobs_running.set(self.manager.running())

    def start(self) -> None:
        """Recover unfinished jobs and start the workers (idempotent; done by __init__ by default)."""
        self.manager.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Interrupt running jobs at a safe point (they resume on the next start) and stop workers."""
        self.manager.stop(timeout)

    close = shutdown = stop

    async def aclose(self, timeout: float | None = 10.0) -> None:
        """`stop` without blocking the event loop (the server's drain calls this)."""
        await asyncio.to_thread(self.manager.stop, timeout)

    # ------------------------------------------------------------------ RPCs

    async def _call(self, context: grpc.aio.ServicerContext, method: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a worker thread (the store is sqlite); any error aborts the RPC with its status."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            await abort_with(context, exc, method)
            raise  # pragma: no cover - abort raises

    async def StartJob(self, request: pb.StartJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        """Validate and enqueue; the job row is committed before this returns."""
        return job_to_pb(await self._call(context, "StartJob", self._submit, request.kind, request.config_json))

    def _submit(self, kind: str, config_json: str) -> JobRecord:
        if not kind:
            raise InvalidRequest(f"kind: required; known kinds: {', '.join(sorted(self.manager.kinds))}")
        return self.manager.submit(kind, config_json)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return job_to_pb(await self._call(context, "GetJob", self.manager.get, request.id))

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        """QUEUED -> CANCELLED at once; RUNNING -> stops at its next check (state still RUNNING here)."""
        return job_to_pb(await self._call(context, "CancelJob", self.manager.cancel, request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        recs = await self._call(context, "ListJobs", self._list, request.kind, request.limit)
        return pb.ListJobsResponse(jobs=[job_to_pb(r) for r in recs])

    def _list(self, kind: str, limit: int) -> list[JobRecord]:
        if limit < 0:
            raise InvalidRequest("limit: must be >= 0")
        if kind and kind not in self.manager.kinds:
            raise InvalidRequest(f"kind: unknown job kind {kind!r}; known kinds: {', '.join(sorted(self.manager.kinds))}")
        return self.manager.list(kind, limit)

    async def GetJobResult(self, request: pb.GetJobResultRequest, context: grpc.aio.ServicerContext) -> pb.JobResult:
        """The job, its result JSON (arrays inlined as lists up to a size) and its artifacts.

        A job that has not succeeded has an empty result_json (its state and error say why)."""
        return await self._call(context, "GetJobResult", self._result, request.id)

    def _result(self, job_id: str) -> pb.JobResult:
        rec, result = self.manager.result(job_id, True, RESULT_INLINE_MAX_ELEMENTS)
        text = json.dumps(result, separators=(",", ":")) if result is not None else ""
        return pb.JobResult(job=job_to_pb(rec), result_json=text, artifacts=self._artifacts(rec.artifact_ids))

    def _artifacts(self, ids: list[str]) -> list[pb.Artifact]:
        out: list[pb.Artifact] = []
        if self.artifacts is None:
            return out
        for aid in ids:
            try:
                out.append(artifact_to_pb(self.artifacts.get(aid)))
            except NotFound:
                log.warning("artifact %s of a job is missing from the artifact store", aid)
        return out

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        """Current state first, then one event per change, until the job is terminal."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[JobRecord, dict[str, Any] | None]] = asyncio.Queue(WATCH_QUEUE)

        def push(item: tuple[JobRecord, dict[str, Any] | None]) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # dropped progress: the poll catches up
                queue.put_nowait(item)

        def on_change(rec: JobRecord, partial: dict[str, Any] | None) -> None:
            # from a worker thread; after the loop closed there is nobody to tell
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(push, (rec, partial))

        unsubscribe = await self._call(context, "WatchJob", self.manager.subscribe, request.id, on_change)
        try:
            current = await asyncio.to_thread(self.manager.get, request.id)
            last = _key(current)
            yield pb.JobEvent(job=job_to_pb(current))
            while not current.terminal:
                try:
                    rec, partial = await asyncio.wait_for(queue.get(), WATCH_POLL_S)
                except asyncio.TimeoutError:
                    rec, partial = await asyncio.to_thread(self.manager.get, request.id), None
                if partial is None and _key(rec) == last:
                    continue
                if rec.terminal:  # the final row (with finished_at, artifacts) from the store
                    rec = await asyncio.to_thread(self.manager.get, request.id)
                current, last = rec, _key(rec)
                yield pb.JobEvent(job=job_to_pb(rec), partial_json=dumps(partial) if partial is not None else "")
        finally:
            unsubscribe()


def _key(rec: JobRecord) -> tuple[Any, ...]:
    return (rec.state, rec.stage, rec.done, rec.total, rec.attempts, rec.error, rec.cancel_requested)
