"""Client side of the job RPCs: `JobsAPI(stub, metadata)`, attached as `AuditClient.jobs`.

    job = client.jobs.start("refusal_rate", {"prompt_set": "temaq-abliterated:harmful", "n": 32})
    for ev in client.jobs.watch(job.id):
        print(ev.job.stage, ev.job.done, ev.job.total, ev.job.eta_s)
    res = client.jobs.result(job.id)   # JobResult(job, result: dict, artifacts: list[Artifact])

Torch-free (grpc, protobuf, pydantic only). Errors are `RemoteError` subclasses that are also the
local error types (`InvalidRequest`, `NotFound`, `LimitExceeded`), as for the rest of the client.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import BaseModel

from ..proto.generated import audit_pb2 as pb
from .errors import RemoteError, map_error

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


@dataclass
class Job:
    """A job as the server reports it. `state` is QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED."""

    id: str
    kind: str
    state: str
    config: dict[str, Any]
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    stage: str = ""
    done: int = 0
    total: int = 0
    eta_s: float = 0.0
    error: str = ""
    artifact_ids: list[str] = field(default_factory=list)
    attempts: int = 0

    @property
    def terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.state in TERMINAL_STATES

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 0.0

    @classmethod
    def from_pb(cls, m: pb.Job) -> Job:
        try:
            config = json.loads(m.config_json) if m.config_json else {}
        except json.JSONDecodeError:
            config = {"_raw": m.config_json}
        return cls(
            id=m.id, kind=m.kind, state=pb.Job.State.Name(m.state), config=config, created_at=m.created_at,
            started_at=m.started_at, finished_at=m.finished_at, stage=m.progress.stage, done=int(m.progress.done),
            total=int(m.progress.total), eta_s=float(m.progress.eta_s), error=m.error,
            artifact_ids=list(m.artifact_ids), attempts=int(m.attempts),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for `--json` output)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class JobEvent:
    """One WatchJob event: the job's state now, and a partial result when the stage sent one."""

    job: Job
    partial: dict[str, Any] | None = None


@dataclass
class JobResult:
    """A job's result (None unless it SUCCEEDED) and the artifacts it registered."""

    job: Job
    result: dict[str, Any] | None
    artifacts: list[Any] = field(default_factory=list)  # proto.convert.Artifact

    @classmethod
    def from_pb(cls, m: pb.JobResult) -> JobResult:
        """From a GetJobResult reply (the result JSON decoded; artifacts as `proto.convert.Artifact`)."""
        from ..proto.convert import artifact_from_pb

        return cls(Job.from_pb(m.job), json.loads(m.result_json) if m.result_json else None,
                   [artifact_from_pb(a) for a in m.artifacts])


def config_json(config: dict[str, Any] | BaseModel | str | None) -> str:
    """A config as JSON: a dict, a pydantic model (e.g. RefusalDirectionConfig) or JSON text."""
    if config is None:
        return "{}"
    if isinstance(config, str):
        return config
    if isinstance(config, BaseModel):
        return config.model_dump_json(exclude_unset=True)
    return json.dumps(config)


class _JobsBase:
    """The stub, bearer metadata and per-call timeout both jobs APIs send with."""

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]] = (), timeout: float | None = 60.0) -> None:
        self.stub = stub
        self.metadata = tuple(metadata)
        self.timeout = timeout


class JobsAPI(_JobsBase):
    """The six job RPCs over an AuditService stub (plus `wait`)."""

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise map_error(exc) from None

    def start(self, kind: str, config: dict[str, Any] | BaseModel | str | None = None) -> Job:
        """Queue a job; returns once the server has durably recorded it."""
        return Job.from_pb(self._call("StartJob", pb.StartJobRequest(kind=kind, config_json=config_json(config))))

    def get(self, job_id: str) -> Job:
        return Job.from_pb(self._call("GetJob", pb.GetJobRequest(id=job_id)))

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job at once; a running one at its next safe point (watch for CANCELLED)."""
        return Job.from_pb(self._call("CancelJob", pb.CancelJobRequest(id=job_id)))

    def list(self, kind: str = "", limit: int = 0) -> list[Job]:
        """Newest first."""
        resp = self._call("ListJobs", pb.ListJobsRequest(kind=kind, limit=limit))
        return [Job.from_pb(j) for j in resp.jobs]

    def result(self, job_id: str) -> JobResult:
        """The job, its result dict (None unless SUCCEEDED) and its registered artifacts."""
        return JobResult.from_pb(self._call("GetJobResult", pb.GetJobResultRequest(id=job_id)))

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobEvent]:
        """Events until the job is terminal (the last event has the final state). `timeout` bounds
        the whole stream (DEADLINE_EXCEEDED after it)."""
        stream = self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=timeout)
        try:
            for ev in stream:
                partial = json.loads(ev.partial_json) if ev.partial_json else None
                yield JobEvent(Job.from_pb(ev.job), partial)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            stream.cancel()

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal (via WatchJob, reconnecting if the stream drops)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Job | None = None
        while True:
            left = None if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                for ev in self.watch(job_id, timeout=left):
                    last = ev.job
            except RemoteError as exc:
                if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"job {job_id} not finished after {timeout}s") from None
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.5)
            if last is not None and last.terminal:
                return last
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s")


class AsyncJobsAPI(_JobsBase):
    """The job RPCs for the asyncio client (`AsyncAuditClient.jobs`): same methods, awaitable;
    `watch` is an async iterator."""

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise map_error(exc) from None

    async def start(self, kind: str, config: dict[str, Any] | BaseModel | str | None = None) -> Job:
        return Job.from_pb(await self._call("StartJob", pb.StartJobRequest(kind=kind, config_json=config_json(config))))

    async def get(self, job_id: str) -> Job:
        return Job.from_pb(await self._call("GetJob", pb.GetJobRequest(id=job_id)))

    async def cancel(self, job_id: str) -> Job:
        return Job.from_pb(await self._call("CancelJob", pb.CancelJobRequest(id=job_id)))

    async def list(self, kind: str = "", limit: int = 0) -> list[Job]:
        resp = await self._call("ListJobs", pb.ListJobsRequest(kind=kind, limit=limit))
        return [Job.from_pb(j) for j in resp.jobs]

    async def result(self, job_id: str) -> JobResult:
        return JobResult.from_pb(await self._call("GetJobResult", pb.GetJobResultRequest(id=job_id)))

    async def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """Events until the job is terminal."""
        call = self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=timeout)
        try:
            async for ev in call:
                yield JobEvent(Job.from_pb(ev.job), json.loads(ev.partial_json) if ev.partial_json else None)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            call.cancel()

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job is terminal (one WatchJob stream)."""
        last: Job | None = None
        async for ev in self.watch(job_id, timeout=timeout):
            last = ev.job
        if last is None or not last.terminal:
            raise TimeoutError(f"job {job_id} not finished")
        return last
