"""The gRPC AuditService servicer (grpc.aio): convert, admit, run the engine in a worker thread, map errors.

Error mapping (the message always names the field): InvalidRequest / pydantic ValidationError ->
INVALID_ARGUMENT, NotFound -> NOT_FOUND, LimitExceeded and a full in-flight queue ->
RESOURCE_EXHAUSTED, anything else -> INTERNAL with the traceback logged. The server keeps serving.

Engine calls are synchronous and run on a dedicated thread pool; at most `max_inflight` of them
may be queued or running. Generation runs token by token through `engine.generate_iter` with a
cancel flag checked between tokens, so a cancelled stream (or a unary Generate whose client went
away or whose deadline passed) stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np

from ..audit.engine import Completion, StreamEvent
from ..audit.errors import InvalidRequest, LimitExceeded, non_finite
from ..audit.spec import Request
from ..proto import convert
from ..proto.generated import audit_pb2 as pb
from ..proto.generated import audit_pb2_grpc as pb_grpc
from .artifacts import ArtifactStore
from .batching import cancel_scope
from .config import ServerConfig
from .engine_base import ServingEngine
from .metrics import Metrics
from .status import RpcCancelled, status_for

log = logging.getLogger("refusal_audit.server")

T = TypeVar("T")


class _Failure:
    """An exception carried from the producer thread to the stream consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class Admission:
    """A bounded in-flight count: engine requests queued or running; over the bound -> RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self._n = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Requests admitted and not yet finished (the queue depth)."""
        return self._n

    def acquire(self) -> None:
        """Take a slot or raise LimitExceeded."""
        with self._lock:
            if self._n >= self.limit:
                self.metrics.rejected.inc()
                raise LimitExceeded(
                    f"server busy: {self._n} requests in flight (max_inflight={self.limit}); retry later"
                )
            self._n += 1
            self.metrics.inflight.set(self._n)

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._n = max(0, self._n - 1)
            self.metrics.inflight.set(self._n)


def guard_finite(reqs: Sequence[Request], per_item: Sequence[Sequence[Any]], what: str) -> None:
    """The last line before a response: never answer OK with NaN/inf. InvalidRequest when the item's
    interventions can have caused it, else NonFiniteOutput (INTERNAL)."""
    for i, (r, values) in enumerate(zip(reqs, per_item, strict=True)):
        for v in values:
            if v is not None and not np.isfinite(np.asarray(v, dtype=np.float64)).all():
                raise non_finite(i, what, bool(r.interventions))


def _context_code(context: grpc.aio.ServicerContext) -> str:
    try:
        code = context.code()
    except Exception:  # pragma: no cover - older grpc
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


Req = TypeVar("Req")
S = TypeVar("S", bound="AuditServicer")


def unary_rpc(
    handler: Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[T]],
) -> Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[T]]:
    """A unary RPC: its handler runs under `AuditServicer._unary` (error mapping and metrics, labelled
    with the handler's name, which is the RPC's)."""

    @functools.wraps(handler)
    async def rpc(self: S, request: Req, context: grpc.aio.ServicerContext) -> T:
        return await self._unary(handler.__name__, context, lambda: handler(self, request, context))

    return rpc


class AuditServicer(pb_grpc.AuditServiceServicer):
    """AuditService over an Engine, an ArtifactStore and (optionally) a jobs service."""

    def __init__(
        self,
        engine: ServingEngine,
        artifacts: ArtifactStore,
        config: ServerConfig,
        metrics: Metrics | None = None,
        jobs: Any = None,
        server_version: str = "",
    ) -> None:
        self.engine = engine
        self.artifacts = artifacts
        self.config = config
        self.metrics = metrics or Metrics()
        self.jobs = jobs
        self.server_version = server_version
        self.admission = Admission(config.max_inflight, self.metrics)
        # one thread per admitted call: with a batching engine they mostly wait for their batch, and
        # fewer threads than concurrent callers would cap the batch size
        self.executor = ThreadPoolExecutor(max_workers=max(2, config.max_inflight), thread_name_prefix="engine")
        self._stopping = threading.Event()
        lim = config.limits
        self._default_new = min(lim.default_max_new_tokens, lim.max_new_tokens)

    def shutdown(self) -> None:
        """Tell running generations to stop and release the worker threads."""
        self._stopping.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]]) -> T:
        """Run a unary handler body with error mapping and metrics."""
        t0 = time.perf_counter()
        code = "OK"
        try:
            return await body()
        except grpc.aio.AbortError:
            code = _context_code(context)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, msg = status_for(exc, method)
            code = status.name
            await context.abort(status, msg)
            raise  # pragma: no cover - abort raises
        finally:
            self.metrics.observe(method, code, time.perf_counter() - t0)

    async def _stream(
        self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], AsyncGenerator[T, None]]
    ) -> AsyncIterator[T]:
        """Run a server-streaming handler body with error mapping and metrics."""
        t0 = time.perf_counter()
        code = "OK"
        agen = body()
        try:
            async for msg in agen:
                yield msg
        except grpc.aio.AbortError:
            code = _context_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, msg_text = status_for(exc, method)
            code = status.name
            await context.abort(status, msg_text)
        finally:
            await agen.aclose()  # runs the body's cleanup (sets its cancel flag) promptly
            self.metrics.observe(method, code, time.perf_counter() - t0)

    async def _in_engine(self, method: str, fn: Callable[[threading.Event], T], context: grpc.aio.ServicerContext) -> T:
        """Admit, then run fn(cancel_event) on the engine pool; cancellation sets the event."""
        self.admission.acquire()
        cancel = threading.Event()
        released = threading.Event()

        def release_once() -> None:
            if not released.is_set():
                released.set()
                self.admission.release()

        def work() -> T:
            t0 = time.perf_counter()
            try:
                if self._stopping.is_set():
                    raise RpcCancelled()
                with cancel_scope(cancel):  # a batching engine drops the call from its batch when set
                    return fn(cancel)
            finally:
                self.metrics.engine_seconds.labels(method).observe(time.perf_counter() - t0)
                release_once()

        try:
            cf: Future[T] = self.executor.submit(work)
        except RuntimeError:  # executor shut down: the server is draining
            release_once()
            raise RpcCancelled() from None
        cf.add_done_callback(lambda f: release_once() if f.cancelled() else None)
        context.add_done_callback(lambda _ctx: cancel.set())
        try:
            return await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            cancel.set()
            raise

    # ------------------------------------------------------------------ validation shared by RPCs

    def _check_items(self, n: int, field: str = "items") -> None:
        """1 to max_batch_items items (prompts, for Tokenize) per request."""
        lim = self.config.limits.max_batch_items
        if n > lim:
            raise LimitExceeded(f"{field}: {n} {field} exceed max_batch_items={lim}")
        if n == 0:
            raise InvalidRequest(f"{field}: empty request")

    def _check_token_ids(self, ids: Sequence[int], where: str) -> None:
        vocab = self.engine.info.vocab_size
        for t in ids:
            if not 0 <= int(t) < vocab:
                raise InvalidRequest(f"{where}: unknown token id {t} (vocab size {vocab})")

    def _generate_requests(self, request: pb.GenerateRequest) -> list[Request]:
        self._check_items(len(request.items))
        reqs = convert.requests_from_pb(request.items, self._default_new)
        lim = self.config.limits.max_new_tokens
        for i, r in enumerate(reqs):
            if r.sampling.max_new_tokens > lim:
                raise InvalidRequest(
                    f"items[{i}].sampling.max_new_tokens={r.sampling.max_new_tokens} exceeds the limit {lim}"
                )
            self._check_token_ids(r.sampling.stop_token_ids, f"items[{i}].sampling.stop_token_ids")
        return reqs

    def _items(self, items: Any) -> list[Request]:
        self._check_items(len(items))
        return convert.requests_from_pb(items)

    def _count_tokens(self, n: int, t0: float) -> None:
        """Add `n` generated tokens to the metrics, and their rate since `t0`."""
        if n:
            self.metrics.generated_tokens.inc(n)
        dt = time.perf_counter() - t0
        if dt > 0 and n:
            self.metrics.tokens_per_second.set(n / dt)

    # ------------------------------------------------------------------ info

    @unary_rpc
    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return convert.model_info_to_pb(self.engine.info, self.config.wire_limits, self.server_version)

    # ------------------------------------------------------------------ generate

    def _generate_sync(self, reqs: list[Request], cancel: threading.Event) -> list[Completion]:
        """Generate token by token, stopping when cancelled."""
        t0 = time.perf_counter()
        it = getattr(self.engine, "generate_iter", None)
        if it is None:
            out = self.engine.generate(reqs)
            n_tok = sum(len(c.token_ids) for c in out)
        else:
            results: list[Completion | None] = [None] * len(reqs)
            n_tok = 0
            gen = it(reqs)
            try:
                for ev in gen:
                    if cancel.is_set() or self._stopping.is_set():
                        raise RpcCancelled()
                    n_tok += len(ev.token_ids)
                    if ev.finished:
                        results[ev.index] = ev.completion
            finally:
                gen.close()
            out = [c for c in results if c is not None]
        self._count_tokens(n_tok, t0)
        return out

    @unary_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        reqs = self._generate_requests(request)
        self.metrics.items.labels("Generate").inc(len(reqs))
        comps = await self._in_engine("Generate", lambda c: self._generate_sync(reqs, c), context)
        return pb.GenerateResponse(completions=[convert.completion_to_pb(c) for c in comps])

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamEvent]:
        async for ev in self._stream("GenerateStream", context, lambda: self._stream_events(request, context)):
            yield ev

    async def _stream_events(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.GenerateStreamEvent, None]:
        reqs = self._generate_requests(request)
        self.metrics.items.labels("GenerateStream").inc(len(reqs))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped)
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce(cancel: threading.Event) -> None:
            t0 = time.perf_counter()
            n_tok = 0
            try:
                if cancel.is_set() or self._stopping.is_set():  # cancelled while queued
                    return
                it = getattr(self.engine, "generate_iter", None)
                if it is None:
                    for i, c in enumerate(self.engine.generate(reqs)):
                        put(StreamEvent(i, c.text, list(c.token_ids), True, c.finish_reason))
                        n_tok += len(c.token_ids)
                else:
                    gen = it(reqs)
                    try:
                        for ev in gen:
                            if cancel.is_set() or self._stopping.is_set():
                                return
                            n_tok += len(ev.token_ids)
                            put(ev)
                    finally:
                        gen.close()
                put(_DONE)
            except BaseException as exc:  # carried to the consumer, which maps it to a status
                put(_Failure(exc))
            finally:
                self._count_tokens(n_tok, t0)

        self.admission.acquire()
        cancel = threading.Event()
        context.add_done_callback(lambda _ctx: cancel.set())

        def work() -> None:
            try:
                with cancel_scope(cancel):
                    produce(cancel)
            finally:
                self.admission.release()

        try:
            self.executor.submit(work)
        except RuntimeError:
            self.admission.release()
            raise RpcCancelled() from None
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield convert.stream_event_to_pb(item)
        finally:
            cancel.set()

    # ------------------------------------------------------------------ score / encode / residuals / loss

    @unary_rpc
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        reqs = self._items(request.items)
        token_ids = [int(t) for t in request.token_ids]
        if not token_ids and request.top_k <= 0 and not request.return_full_logprobs:
            raise InvalidRequest("token_ids: empty (give token_ids, top_k or return_full_logprobs)")
        self._check_token_ids(token_ids, "token_ids")
        if request.top_k < 0:
            raise InvalidRequest(f"top_k: must be >= 0, got {request.top_k}")
        self.metrics.items.labels("Score").inc(len(reqs))
        results = await self._in_engine(
            "Score",
            lambda _c: self.engine.score(reqs, token_ids, request.top_k, request.return_full_logprobs),
            context,
        )
        guard_finite(reqs, [(r.logprobs, r.top_logprobs, r.full_logprobs) for r in results], "log-probs")
        return pb.ScoreResponse(results=[convert.score_result_to_pb(r) for r in results])

    @unary_rpc
    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        reqs = self._items(request.items)
        latents = convert.encode_latents_from_pb(request)
        if latents:
            n = sum(len(v) for v in latents.values())
            lim = self.config.limits.max_latents_per_request
            if n > lim:
                raise InvalidRequest(f"latents: {n} latents exceed the limit of {lim} per request")
        top_k = request.top_k or 16
        layers = list(request.layers) or None
        self.metrics.items.labels("Encode").inc(len(reqs))
        results = await self._in_engine(
            "Encode", lambda _c: self.engine.encode(reqs, layers, top_k, latents), context
        )
        guard_finite(reqs, [[v for la in r.layers.values() for v in (la.values, *(la.top_values or ()))]
                            for r in results], "SAE activations")
        return pb.EncodeResponse(results=[convert.encode_result_to_pb(r) for r in results])

    @unary_rpc
    async def Residuals(self, request: pb.ResidualsRequest, context: grpc.aio.ServicerContext) -> pb.ResidualsResponse:
        reqs = self._items(request.items)
        layers = list(request.layers) or None
        positions = list(request.positions) or [-1]
        self.metrics.items.labels("Residuals").inc(len(reqs))
        arr = await self._in_engine(
            "Residuals", lambda _c: self.engine.residuals(reqs, layers, positions), context
        )
        guard_finite(reqs, [(a,) for a in np.asarray(arr)], "residuals")
        return pb.ResidualsResponse(residuals=convert.tensor_to_pb(np.asarray(arr)))

    @unary_rpc
    async def Loss(self, request: pb.LossRequest, context: grpc.aio.ServicerContext) -> pb.LossResponse:
        reqs = self._items(request.items)
        completions: list[str | None] = [it.completion or None for it in request.items]
        self.metrics.items.labels("Loss").inc(len(reqs))
        results = await self._in_engine("Loss", lambda _c: self.engine.loss(reqs, completions), context)
        guard_finite(reqs, [(r.loss,) for r in results], "loss")
        return pb.LossResponse(results=[convert.loss_result_to_pb(r) for r in results])

    @unary_rpc
    async def Attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        self._check_items(len(request.items))
        req = convert.attribute_request_from_pb(request)
        fn = getattr(self.engine, "attribute", None)
        if fn is None:
            raise NotImplementedError("this engine cannot attribute (no gradients)")
        self.metrics.items.labels("Attribute").inc(len(req.items))
        resp = await self._in_engine("Attribute", lambda _c: fn(req), context)
        return convert.attribute_response_to_pb(resp)

    @unary_rpc
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._check_items(len(request.prompts), "prompts")
        prompts = convert.tokenize_prompts_from_pb(request)
        ids = await self._in_engine("Tokenize", lambda _c: self.engine.tokenize(prompts, request.raw), context)
        return pb.TokenizeResponse(results=[pb.TokenIds(token_ids=t) for t in ids])

    @unary_rpc
    async def SAERows(self, request: pb.SAERowsRequest, context: grpc.aio.ServicerContext) -> pb.SAERowsResponse:
        latents = convert.latents_from_pb(request.latents) if request.latents else None
        direction: np.ndarray | None = None
        if request.HasField("direction"):
            ref = request.direction
            if ref.values and ref.direction_id:
                raise InvalidRequest("direction: give values or direction_id, not both")
            if ref.direction_id:
                direction = await asyncio.to_thread(self.artifacts.direction, ref.direction_id)
            elif ref.values:
                direction = np.asarray(ref.values, dtype=np.float32)
            else:
                raise InvalidRequest("direction: empty (give values or direction_id)")
        if latents is None and direction is None:
            raise InvalidRequest("latents: give chosen latents or a direction to rank by")
        d = self.engine.info.d_model
        if direction is not None and direction.shape != (d,):
            raise InvalidRequest(f"direction: {direction.size} values, expected d_model={d}")
        if request.top_k < 0:
            raise InvalidRequest(f"top_k: must be >= 0, got {request.top_k}")
        self._check_rows_size(request, latents)
        rows = await self._in_engine("SAERows", lambda _c: self.engine.sae_rows(
            list(request.layers) or None, latents, direction, request.top_k,
            "abs_cosine" if request.abs_cosine else "cosine", request.decoder, request.encoder), context)
        return convert.sae_rows_to_pb(rows)

    def _check_rows_size(self, request: pb.SAERowsRequest, latents: dict[int, list[int]] | None) -> None:
        """Weight rows are d_model floats each: bound their count and the response's size up front."""
        if not (request.decoder or request.encoder):
            return
        info = self.engine.info
        layers = list(request.layers) or (sorted(latents) if latents else list(info.sae_layers))
        if latents is not None:
            n = sum(len(latents.get(ly, ())) for ly in set(layers))
        else:
            sizes = {s.layer: s.d_sae for s in info.saes}
            n = sum(min(request.top_k or sizes.get(ly, 0), sizes.get(ly, 0)) for ly in set(layers))
        lim = self.config.limits.max_latents_per_request
        if n > lim:
            raise LimitExceeded(f"latents: {n} weight rows exceed max_latents_per_request={lim}")
        nbytes = n * info.d_model * 4 * (int(request.decoder) + int(request.encoder))
        max_bytes = self.config.max_message_mb * 1024 * 1024
        if nbytes > max_bytes * 0.9:
            raise LimitExceeded(f"latents: {n} rows of d_model={info.d_model} are {nbytes >> 20} MiB, over the "
                                f"{self.config.max_message_mb} MiB message limit; ask for fewer (top_k, latents, layers)")

    # ------------------------------------------------------------------ artifacts

    @unary_rpc
    async def RegisterDirection(self, request: pb.RegisterDirectionRequest, context: grpc.aio.ServicerContext) -> pb.Artifact:
        if not request.values:
            raise InvalidRequest("values: empty direction")
        values = np.asarray(request.values, dtype=np.float32)
        meta = convert.parse_metadata(request.metadata_json)
        rec = await asyncio.to_thread(
            self.artifacts.register_direction, request.name, values, request.layer, meta
        )
        return convert.artifact_to_pb(rec)

    @unary_rpc
    async def RegisterLatentSet(self, request: pb.RegisterLatentSetRequest, context: grpc.aio.ServicerContext) -> pb.Artifact:
        latents = convert.latents_from_pb(request.latents, "latents")
        meta = convert.parse_metadata(request.metadata_json)
        rec = await asyncio.to_thread(self.artifacts.register_latent_set, request.name, latents, meta)
        return convert.artifact_to_pb(rec)

    @unary_rpc
    async def RegisterPromptSet(self, request: pb.RegisterPromptSetRequest, context: grpc.aio.ServicerContext) -> pb.Artifact:
        prompts = [convert.prompt_from_pb(p, f"prompts[{i}]") for i, p in enumerate(request.prompts)]
        meta = convert.parse_metadata(request.metadata_json)
        rec = await asyncio.to_thread(self.artifacts.register_prompt_set, request.name, prompts, meta)
        return convert.artifact_to_pb(rec, with_payload=False)

    @unary_rpc
    async def GetArtifact(self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext) -> pb.Artifact:
        if not request.id:
            raise InvalidRequest("id: empty artifact id")
        rec = await asyncio.to_thread(self.artifacts.get, request.id)
        return convert.artifact_to_pb(rec)

    @unary_rpc
    async def ListArtifacts(self, request: pb.ListArtifactsRequest, context: grpc.aio.ServicerContext) -> pb.ListArtifactsResponse:
        recs = await asyncio.to_thread(self.artifacts.list, request.kind or None)
        return pb.ListArtifactsResponse(artifacts=[convert.artifact_to_pb(r, with_payload=False) for r in recs])

    # ------------------------------------------------------------------ jobs (delegated)

    def _jobs_method(self, name: str) -> Callable[..., Any]:
        if self.jobs is None:
            raise NotImplementedError("jobs are not enabled on this server")
        fn = getattr(self.jobs, name, None)
        if fn is None:
            raise NotImplementedError(f"the jobs service has no {name}")
        return fn  # type: ignore[no-any-return]

    async def _delegate(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(name, context, lambda: self._jobs_method(name)(request, context))

    async def StartJob(self, request: pb.StartJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._delegate("StartJob", request, context)  # type: ignore[no-any-return]

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._delegate("GetJob", request, context)  # type: ignore[no-any-return]

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._delegate("CancelJob", request, context)  # type: ignore[no-any-return]

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        return await self._delegate("ListJobs", request, context)  # type: ignore[no-any-return]

    async def GetJobResult(self, request: pb.GetJobResultRequest, context: grpc.aio.ServicerContext) -> pb.JobResult:
        return await self._delegate("GetJobResult", request, context)  # type: ignore[no-any-return]

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        async def body() -> AsyncGenerator[pb.JobEvent, None]:
            result = self._jobs_method("WatchJob")(request, context)
            if hasattr(result, "__aiter__"):
                async for ev in result:
                    yield ev
            else:  # a coroutine that writes with context.write
                await result

        async for ev in self._stream("WatchJob", context, body):
            yield ev

