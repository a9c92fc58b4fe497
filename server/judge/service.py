"""JudgeService: the HarmBench classifier as a gRPC sidecar (batched, bounded queue, deadlines, health, reflection).

Run it with `refusal-audit judge serve --model cais/HarmBench-Llama-2-13b-cls --port 50052`, or
`python -m refusal_audit.server.judge.service --model ... --port ...`. It prints one line
`refusal-audit judge listening on HOST:PORT` (the bound port, also for `--port 0`) once it serves.

Requests put their items on one bounded queue (`max_queue` items); a single worker thread takes
up to `max_batch` items at a time, from any number of requests, and runs them in one padded
forward pass. A request whose items do not fit gets RESOURCE_EXHAUSTED at once; one whose deadline
passes gets DEADLINE_EXCEEDED and its items still waiting are dropped, never run.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from refusal_audit.proto.generated import judge_pb2, judge_pb2_grpc

from ...audit.errors import InvalidRequest, LimitExceeded
from ..status import abort_with_sync
from ..undecodable import SyncDecodeErrorInterceptor
from .classifier import DEFAULT_MAX_BATCH_TOKENS, MAX_GENERATION_TOKENS, ClassifierInput, ClassifierOutput

log = logging.getLogger("refusal_audit.judge")

SERVICE_NAME = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name
SERVER_VERSION = "0.1.0"
READY_PREFIX = "refusal-audit judge listening on "
DEFAULT_PORT = 50052


class Classifier(Protocol):
    """What the servicer needs from a classifier (HarmBenchClassifier, or a fake in tests)."""

    def classify(self, items: Sequence[ClassifierInput]) -> list[ClassifierOutput]:
        """One output per item, in order."""
        ...

    def info(self) -> dict[str, Any]:
        """Fields of JudgeInfo."""
        ...


class QueueFull(LimitExceeded):
    """The batcher's queue cannot take a request's items now (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Work:
    """One Classify request in flight: its items, results so far, deadline and completion event."""

    items: list[ClassifierInput]
    deadline: float | None  # time.monotonic() seconds, or None
    results: list[ClassifierOutput | None] = field(default_factory=list)
    pending: int = 0
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.pending = len(self.items)

    def expired(self, now: float) -> bool:
        """True when the request was cancelled or its deadline has passed."""
        return self.cancelled or (self.deadline is not None and now >= self.deadline)


class Batcher:
    """A bounded queue of items and one worker thread that classifies them in batches of at most max_batch."""

    def __init__(self, classifier: Classifier, max_batch: int, max_queue: int) -> None:
        """Start the worker thread."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: deque[tuple[_Work, int]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.batches_run = 0
        self.items_run = 0
        self.items_dropped = 0
        self._thread = threading.Thread(target=self._loop, name="judge-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        """Items waiting (not counting the batch being run)."""
        with self._cv:
            return len(self._queue)

    def submit(self, work: _Work) -> None:
        """Enqueue all of a request's items or none (QueueFull)."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the judge is shutting down")
            if len(self._queue) + len(work.items) > self.max_queue:
                raise QueueFull(
                    f"judge queue full: {len(self._queue)} of {self.max_queue} items waiting, "
                    f"request has {len(work.items)}; retry later"
                )
            self._queue.extend((work, i) for i in range(len(work.items)))
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work, let the worker finish what is queued, and join it."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[_Work, int]] | None:
        """Block for the next batch of live items; expired items are dropped here, never run."""
        with self._cv:
            while True:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return None
                batch: list[tuple[_Work, int]] = []
                now = time.monotonic()
                while self._queue and len(batch) < self.max_batch:
                    work, i = self._queue.popleft()
                    if work.expired(now):
                        self.items_dropped += 1
                        continue
                    batch.append((work, i))
                if batch:
                    return batch

    def _loop(self) -> None:
        """Worker: take a batch, classify it (one item at a time if the batch fails), deliver results."""
        while (batch := self._take()) is not None:
            items = [work.items[i] for work, i in batch]
            try:
                outputs = self.classifier.classify(items)
            except Exception as exc:  # reported per item, never swallowed
                log.exception("classifier failed on a batch of %d items", len(items))
                outputs = [self._classify_one(item, exc) for item in items] if len(items) > 1 else [
                    ClassifierOutput(yes=None, error=f"classifier failed: {type(exc).__name__}: {exc}")
                ]
            self.batches_run += 1
            self.items_run += len(items)
            for (work, i), out in zip(batch, outputs, strict=True):
                work.results[i] = out
                work.pending -= 1
                if work.pending == 0:
                    work.done.set()

    def _classify_one(self, item: ClassifierInput, batch_exc: Exception) -> ClassifierOutput:
        """Retry one item alone after its batch failed (e.g. out of memory); an error output if it fails again."""
        try:
            return self.classifier.classify([item])[0]
        except Exception as exc:
            return ClassifierOutput(yes=None, error=f"classifier failed: {type(exc).__name__}: {exc} (batch: {batch_exc})")


def output_to_proto(out: ClassifierOutput) -> judge_pb2.ClassifyResult:
    """ClassifierOutput -> ClassifyResult (classification, or an error for this item). Non-finite
    probabilities are an error for the item (a verdict read from NaN is no verdict) and are sent as 0."""
    finite = math.isfinite(out.p_yes) and math.isfinite(out.p_no)
    if out.yes is None or not finite:
        return judge_pb2.ClassifyResult(
            error=judge_pb2.ItemError(
                message=(out.error or "no verdict") if finite else "the classifier's probabilities are not finite (NaN/inf)",
                truncated=out.truncated,
                p_yes=out.p_yes if finite else 0.0,
                p_no=out.p_no if finite else 0.0,
                top_token=out.top_token or "",
            )
        )
    return judge_pb2.ClassifyResult(
        classification=judge_pb2.Classification(
            yes=out.yes,
            p_yes=out.p_yes,
            p_no=out.p_no,
            truncated=out.truncated,
            generation_tokens=out.generation_tokens,
        )
    )


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer):
    """GetInfo and Classify over a Batcher."""

    def __init__(self, classifier: Classifier, *, max_batch: int = 8, max_queue: int = 256) -> None:
        """Start the batcher for this classifier."""
        self.classifier = classifier
        self.batcher = Batcher(classifier, max_batch=max_batch, max_queue=max_queue)
        self._info = classifier.info()
        self.deadlines_exceeded = 0  # requests answered DEADLINE_EXCEEDED (their waiting items are dropped)

    def GetInfo(self, request: judge_pb2.GetJudgeInfoRequest, context: grpc.ServicerContext) -> judge_pb2.JudgeInfo:
        """Judge, model, template version and limits."""
        fields = {k: v for k, v in self._info.items() if k in judge_pb2.JudgeInfo.DESCRIPTOR.fields_by_name}
        return judge_pb2.JudgeInfo(
            max_batch=self.batcher.max_batch,
            max_queue=self.batcher.max_queue,
            server_version=SERVER_VERSION,
            **fields,
        )

    def Classify(self, request: judge_pb2.ClassifyRequest, context: grpc.ServicerContext) -> judge_pb2.ClassifyResponse:
        """Queue the items, wait for their results within the deadline, return them in order."""
        n = len(request.items)
        if n == 0:
            return judge_pb2.ClassifyResponse()
        try:
            if n > self.batcher.max_queue:
                raise InvalidRequest(
                    f"request has {n} items; this judge takes at most {self.batcher.max_queue} per request (split it)"
                )
            items = []
            for i, it in enumerate(request.items):
                if not it.behavior.strip():
                    raise InvalidRequest(f"item {i}: behavior is empty")
                items.append(ClassifierInput(it.behavior, it.generation, it.context if it.HasField("context") else None))
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            work = _Work(items=items, deadline=deadline)
            context.add_callback(lambda: setattr(work, "cancelled", True))
            self.batcher.submit(work)
        except (InvalidRequest, LimitExceeded) as exc:
            abort_with_sync(context, exc, "Classify")
        if not work.done.wait(timeout=remaining):
            work.cancelled = True
            self.deadlines_exceeded += 1
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"judge deadline exceeded with {work.pending} of {n} items unfinished")
        return judge_pb2.ClassifyResponse(results=[output_to_proto(r) for r in work.results if r is not None])


@dataclass
class JudgeServer:
    """A started judge gRPC server: the grpc.Server, its bound port, the servicer and the health servicer."""

    server: grpc.Server
    port: int
    servicer: JudgeServicer
    health: health.HealthServicer

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, stop accepting RPCs, let in-flight ones finish within `grace`, stop the batcher."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.servicer.batcher.stop()


def start_judge_server(
    classifier: Classifier,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_batch: int = 8,
    max_queue: int = 256,
    max_workers: int = 16,
    reflection: bool = True,
) -> JudgeServer:
    """Build, bind and start the server (health SERVING once it returns); port 0 picks a free port."""
    servicer = JudgeServicer(classifier, max_batch=max_batch, max_queue=max_queue)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="judge-rpc"),
        maximum_concurrent_rpcs=max_workers,
        interceptors=[SyncDecodeErrorInterceptor()],
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    judge_pb2_grpc.add_JudgeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        from grpc_reflection.v1alpha import reflection as grpc_reflection

        grpc_reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, grpc_reflection.SERVICE_NAME),
            server,
        )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        servicer.batcher.stop()
        raise RuntimeError(f"could not bind the judge to {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return JudgeServer(server=server, port=bound, servicer=servicer, health=health_servicer)


def serve_judge(
    model: str,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    max_batch: int = 8,
    max_queue: int = 256,
    *,
    template: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_generation_tokens: int = MAX_GENERATION_TOKENS,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_workers: int = 16,
    local_files_only: bool = False,
    grace: float = 5.0,
    on_ready: Callable[[JudgeServer], None] | None = None,
) -> None:
    """Load the classifier, serve until SIGTERM/SIGINT, then drain gracefully. Blocks."""
    from .classifier import HarmBenchClassifier

    classifier = HarmBenchClassifier.load(
        model,
        template=template,
        device=device,
        dtype=dtype,
        max_generation_tokens=max_generation_tokens,
        max_batch_tokens=max_batch_tokens,
        local_files_only=local_files_only,
    )
    js = start_judge_server(
        classifier, host=host, port=port, max_batch=max_batch, max_queue=max_queue, max_workers=max_workers
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    info = classifier.info()
    print(f"{READY_PREFIX}{host}:{js.port} (model={model} template={info['template_version']})", flush=True)
    if on_ready is not None:
        on_ready(js)
    try:
        stop.wait()
    finally:
        js.stop(grace)


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m refusal_audit.server.judge.service` (same as `refusal-audit judge serve`)."""
    p = argparse.ArgumentParser(prog="python -m refusal_audit.server.judge.service", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id or local path, e.g. cais/HarmBench-Llama-2-13b-cls")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 = a free port (printed on the ready line)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--template", choices=["llama2", "mistral"], default=None, help="default: from the architecture")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-generation-tokens", type=int, default=MAX_GENERATION_TOKENS)
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS)
    p.add_argument("--local-files-only", action="store_true", help="never reach the hub")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for `python -m refusal_audit.server.judge.service`."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_judge(
        args.model,
        port=args.port,
        host=args.host,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        template=args.template,
        device=args.device,
        dtype=args.dtype,
        max_generation_tokens=args.max_generation_tokens,
        max_batch_tokens=args.max_batch_tokens,
        local_files_only=args.local_files_only,
    )


if __name__ == "__main__":
    main()
