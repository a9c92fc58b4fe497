"""vLLM's own request stats into the server's metrics: how long each request waited before its
first model step, and how many requests wait and run in vLLM's scheduler.

vLLM schedules the Generate / Score work itself (continuous batching), so the queue wait a load
test wants is the time from the engine receiving a request to the first model step that computes
it: the step in flight when it arrived (the engine core takes new requests between steps) plus any
time in the scheduler's waiting queue. vLLM's own `queued_time` covers only the latter (nearly
always 0 below its batch limits), so the wait is taken as the request's end-to-end latency minus
its inference time (first scheduled step to last token), both from vLLM's `FinishedRequestStats`.
The stats come through vLLM's stat-logger interface (`StatLoggerBase`, passed to the `AsyncLLM` as
a custom logger), which turns on vLLM's per-request timestamps without its periodic log lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..metrics import BatchObserver

REQUEST_ID_PREFIX = "ra"  # request ids are "ra-<kind>-<tag>-<i>" (engine._submit)


def request_kind(request_id: str | None) -> str:
    """The call kind ("generate", "score") encoded in one of this engine's request ids, else "other"."""
    parts = (request_id or "").split("-")
    return parts[1] if len(parts) > 2 and parts[0] == REQUEST_ID_PREFIX else "other"


def wait_before_first_step(fin: Any) -> float | None:
    """Seconds from the engine receiving a finished request to its first scheduled step, or None when
    it never ran to a token (aborted while queued or during its prefill): its end-to-end latency
    minus its inference time. The remainder also holds the last output's trip to the front end
    (well under a millisecond), so it is clamped at 0."""
    if fin.queued_time < 0 or fin.inference_time < 0 or fin.num_generation_tokens <= 0:
        return None
    return max(0.0, float(fin.e2e_latency) - float(fin.inference_time))


def record_stats(observer: BatchObserver | None, scheduler_stats: Any, iteration_stats: Any) -> None:
    """Hand one engine-core iteration's stats to `observer`: a queue wait per finished request (kind
    from its id), and the scheduler's waiting / running counts."""
    if observer is None:
        return
    for fin in getattr(iteration_stats, "finished_requests", None) or ():
        wait = wait_before_first_step(fin)
        if wait is not None:
            observer.queued(request_kind(getattr(fin, "request_id", None)), wait)
    if scheduler_stats is not None:
        observer.scheduler(int(scheduler_stats.num_waiting_reqs), int(scheduler_stats.num_running_reqs))


def stat_logger_factory(observer: Callable[[], BatchObserver | None]) -> Callable[[Any, int], Any]:
    """A per-engine stat-logger factory for `AsyncLLM(stat_loggers=[...])` that reports through
    `observer()` (looked up at each record: the server sets the engine's observer after start-up).
    Runs on vLLM's output-handler task, so it only forwards numbers."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _ObserverStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            record_stats(observer(), scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    def factory(vllm_config: Any, engine_index: int) -> Any:
        return _ObserverStatLogger(vllm_config, engine_index)

    return factory
