"""Prometheus metrics, one registry per server (so tests can run several servers in one process)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENT_BUCKETS = (0, 1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 65536)


class BatchObserver:
    """Where the HF batcher (server/batching.py) reports; this base class records nothing."""

    def batch(self, kind: str, rows: int, padded_tokens: int, seconds: float, hook_seconds: float) -> None:
        """One engine batch of `rows` requests ran for `seconds`, `hook_seconds` of it inside hooks."""

    def queued(self, kind: str, wait_s: float) -> None:
        """A call's first rows entered a batch after waiting `wait_s` in the queue."""

    def scheduler(self, waiting: int, running: int) -> None:
        """The engine's own scheduler holds `waiting` queued and `running` scheduled requests (vLLM)."""

    def token_interval(self, seconds: float) -> None:
        """Two consecutive decode steps of a running generation started `seconds` apart: what its
        streams waited between two tokens (the step, plus any prompt-only batch or admission between)."""

    def latents(self, n: int) -> None:
        """One request (row) names n SAE latents in its interventions."""


class Metrics:
    """Requests by method/status, latency, tokens, engine time, queue depth and job progress.

    Per engine (label `engine`: "hf" or "vllm"), from the batcher: batch size, queue wait, latents
    per request, and seconds in batches and in the intervention/capture hooks (hook_seconds /
    batch_seconds = the share of engine time the interventions cost); the HF batcher's generation
    reports each admission of new rows (kind "generate", their prefill) and each decode step of the
    running rows (kind "step"). For vLLM the batcher is its
    HF side (Encode / Residuals / Loss); its own Generate / Score work is reported per model step
    (kind "step": rows, forward seconds, hook seconds) and its requests' latent counts, drained from
    the worker after each call; queue wait there is the time from the engine receiving a request to
    its first model step (kind "generate" / "score", from vLLM's stat logger, `vllm_engine/stats.py`),
    with the scheduler's waiting / running counts as gauges.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "refusal_audit_requests", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "refusal_audit_request_seconds", "RPC latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.engine_seconds = Histogram(
            "refusal_audit_engine_seconds", "time inside the engine (worker thread)", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.generated_tokens = Counter(
            "refusal_audit_generated_tokens", "generated tokens (rate() = tokens/s)", registry=r
        )
        self.items = Counter("refusal_audit_items", "request items (prompts) processed", ["method"], registry=r)
        self.tokens_per_second = Gauge(
            "refusal_audit_generate_tokens_per_second", "throughput of the last finished Generate(Stream)",
            registry=r,
        )
        self.inflight = Gauge("refusal_audit_inflight", "engine requests queued or running (queue depth)", registry=r)
        self.rejected = Counter(
            "refusal_audit_rejected", "engine requests refused because max_inflight was reached", registry=r
        )
        self.job_progress = Gauge(
            "refusal_audit_job_progress", "fraction done of a job", ["job_id", "kind"], registry=r
        )
        self.jobs_running = Gauge("refusal_audit_jobs_running", "jobs running now", registry=r)
        self.batch_size = Histogram(
            "refusal_audit_batch_size", "requests (rows) per engine batch", ["engine", "kind"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "refusal_audit_queue_wait_seconds", "time a call waited before its first batch", ["engine", "kind"],
            buckets=_WAIT_BUCKETS, registry=r,
        )
        self.scheduler_requests = Gauge(
            "refusal_audit_scheduler_requests", "requests in the engine's own scheduler (vLLM), by state",
            ["engine", "state"], registry=r,
        )
        self.latents_per_request = Histogram(
            "refusal_audit_latents_per_request", "SAE latents named by a request's interventions", ["engine"],
            buckets=_LATENT_BUCKETS, registry=r,
        )
        self.token_interval = Histogram(
            "refusal_audit_token_interval_seconds",
            "time between two decode steps of a running generation: a stream's wait between two tokens, "
            "including prompt-only batches and admissions run between the steps (HF engine)",
            ["engine"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.batch_seconds = Counter(
            "refusal_audit_batch_seconds", "seconds the engine spent running batches", ["engine", "kind"], registry=r
        )
        self.hook_seconds = Counter(
            "refusal_audit_hook_seconds", "seconds inside the intervention/capture hooks (host time)",
            ["engine", "kind"], registry=r,
        )
        self._http: Any = None
        self._lock = threading.Lock()

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC and its latency."""
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def set_job_progress(self, job_id: str, kind: str, done: int, total: int) -> None:
        """Job progress gauge (for the job runner)."""
        self.job_progress.labels(job_id, kind).set(done / total if total > 0 else 0.0)

    def clear_job(self, job_id: str, kind: str) -> None:
        """Drop a finished job's progress series."""
        with contextlib.suppress(KeyError):
            self.job_progress.remove(job_id, kind)

    def batch_observer(self, engine: str) -> BatchObserver:
        """A BatchObserver recording into this registry under `engine`."""
        return _PromObserver(self, engine)

    def render(self) -> bytes:
        """The text exposition format (what /metrics returns)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on host:port (0 = ephemeral); returns the bound port."""
        from prometheus_client import start_http_server

        with self._lock:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self._http = server
            return int(server.server_address[1])

    def stop_http(self) -> None:
        """Stop the /metrics endpoint, if started."""
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
                self._http = None


class _PromObserver(BatchObserver):
    """BatchObserver onto a Metrics registry."""

    def __init__(self, metrics: Metrics, engine: str) -> None:
        self.m = metrics
        self.engine = engine

    def batch(self, kind: str, rows: int, padded_tokens: int, seconds: float, hook_seconds: float) -> None:
        self.m.batch_size.labels(self.engine, kind).observe(rows)
        self.m.batch_seconds.labels(self.engine, kind).inc(max(0.0, seconds))
        self.m.hook_seconds.labels(self.engine, kind).inc(max(0.0, hook_seconds))

    def queued(self, kind: str, wait_s: float) -> None:
        self.m.queue_wait.labels(self.engine, kind).observe(max(0.0, wait_s))

    def token_interval(self, seconds: float) -> None:
        self.m.token_interval.labels(self.engine).observe(max(0.0, seconds))

    def scheduler(self, waiting: int, running: int) -> None:
        self.m.scheduler_requests.labels(self.engine, "waiting").set(waiting)
        self.m.scheduler_requests.labels(self.engine, "running").set(running)

    def latents(self, n: int) -> None:
        self.m.latents_per_request.labels(self.engine).observe(n)
