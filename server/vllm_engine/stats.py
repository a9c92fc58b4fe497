"""vLLM's own scheduler stats into the server's metrics: how long each request waited in vLLM's
queue before its first model step, and how many requests wait and run at each step.

vLLM schedules the Generate / Score work itself (continuous batching), so the queue wait a load
test wants to see is its scheduler's: from the request entering the waiting queue to its first
scheduled step (`FinishedRequestStats.queued_time`, engine-core timestamps). It is read through
vLLM's stat-logger interface (`StatLoggerBase`, passed to the `AsyncLLM` as a custom logger), which
turns on vLLM's per-request timestamps without its periodic log lines.
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


def record_stats(observer: BatchObserver | None, scheduler_stats: Any, iteration_stats: Any) -> None:
    """Hand one engine-core iteration's stats to `observer`: a queue wait per finished request (kind
    from its id), and the scheduler's waiting / running counts."""
    if observer is None:
        return
    for fin in getattr(iteration_stats, "finished_requests", None) or ():
        if fin.queued_time >= 0:  # negative: never scheduled (aborted while queued), no wait to report
            observer.queued(request_kind(getattr(fin, "request_id", None)), float(fin.queued_time))
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
