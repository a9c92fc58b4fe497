"""Engine replicas as Ray actors behind the one gRPC server (`serve --ray ADDRESS --replicas N`).

Imported only when the server config has a `ray` section (the optional `[ray]` extra); without it
nothing in the project imports Ray.

- `EngineReplica` (a Ray actor, `num_cpus`/`num_gpus` per replica, `max_restarts`) loads the model
  and SAEs itself with the same loader as the single-engine server (`app.build_engine`), or with
  `ray.engine_factory`. It runs engine calls and job work units (`run_unit`) and reports the time
  it spent in each.
- `ReplicaSet` implements the engine protocol the servicer and the jobs use. Each call goes to the
  least-loaded live replica (fewest calls in flight from this head, then fewest calls so far). The
  servicer validates and admits requests exactly as for one engine; the replica's own engine
  applies the same limits, so every status code and message is the single engine's. Registered
  artifacts are resolved on the head (unknown id -> NOT_FOUND before anything is sent) and travel
  with the call, so every replica, a restarted one too, sees every latent set and direction.
- A replica that dies is restarted by Ray (`max_restarts`); a call that was on it is re-run (on
  whichever replica is least loaded) up to `max_retries` times. Engine calls are pure functions
  of their requests, so a re-run returns the same answer.
- `submit_unit` runs one job work unit (an engine method or a `module:function(engine, **payload)`)
  and returns a future of ``(result, replica_name)``; `server/jobs/fanout.py` schedules them.
- Per-replica queue depth, calls, busy seconds, failures and liveness are exported under the
  server's one `/metrics` (`register_metrics`).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from ..audit.engine import (
    Completion,
    EncodeResult,
    Engine,
    LossResult,
    ModelInfo,
    RankBy,
    SAERows,
    ScoreResult,
)
from ..audit.errors import NotFound
from ..audit.spec import Prompt, Request
from .config import RayConfig, ServerConfig
from .jobs.fanout import ReplicaLost

log = logging.getLogger("refusal_audit.ray")

ARTIFACT_FIELDS = (("latent_set_id", "latent_set"), ("direction_id", "direction"))


class NoReplicas(RuntimeError):
    """Every replica is dead (restarts exhausted)."""


# ---------------------------------------------------------------------------- on the replica


class PushedArtifacts:
    """The replica side of the artifact store: what the head sent with the calls (by id)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Any] = {}

    def add(self, artifacts: dict[tuple[str, str], Any]) -> None:
        self._items.update(artifacts)

    def latent_set(self, set_id: str) -> dict[int, list[int]]:
        got = self._items.get(("latent_set", set_id))
        if got is None:
            raise NotFound(f"latent_set_id {set_id!r} is not registered")
        return {int(k): list(v) for k, v in got.items()}

    def direction(self, direction_id: str) -> np.ndarray:
        got = self._items.get(("direction", direction_id))
        if got is None:
            raise NotFound(f"direction_id {direction_id!r} is not registered")
        return np.asarray(got, dtype=np.float32)


def _import(path: str) -> Callable[..., Any]:
    mod, _, name = path.partition(":")
    if not name:
        raise ValueError(f"{path!r}: expected 'module:function'")
    return getattr(importlib.import_module(mod), name)  # type: ignore[no-any-return]


def load_engine(config: ServerConfig) -> Engine:
    """The engine one replica serves: `ray.engine_factory(config)` or the server's own loader."""
    factory = config.ray.engine_factory if config.ray is not None else None
    one = config.model_copy(update={"ray": None})  # this replica's own engine, not another replica set
    if factory:
        return _import(factory)(one)  # type: ignore[no-any-return]
    from .app import build_engine

    return build_engine(one)


class EngineReplica:
    """One engine in a Ray actor (see the module docstring); wrapped with `ray.remote` at start."""

    def __init__(self, config_json: str, name: str) -> None:
        config = ServerConfig.model_validate_json(config_json)
        rc = config.ray or RayConfig()
        threads = rc.torch_threads or max(1, int(rc.num_cpus))
        import torch

        torch.set_num_threads(threads)
        self.name = name
        self.engine = load_engine(config)
        self.artifacts = PushedArtifacts()
        if hasattr(self.engine, "resolver"):
            self.engine.resolver = self.artifacts
        self.busy_s = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def hello(self) -> dict[str, Any]:
        """Who and where this replica is (for logs, metrics and `job show`)."""
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "busy_s": self.busy_s, "calls": self.calls}

    def info(self) -> ModelInfo:
        return self.engine.info

    def set_limits(self, limits: Any) -> None:
        if hasattr(self.engine, "limits"):
            self.engine.limits = limits

    def limits(self) -> Any:
        return getattr(self.engine, "limits", None)

    def run_unit(self, fn: str, payload: dict[str, Any], artifacts: dict[tuple[str, str], Any]) -> tuple[Any, float]:
        """An engine method (`fn` = its name) or `module:function(engine, **payload)`; (result, seconds)."""
        self.artifacts.add(artifacts)
        t0 = time.perf_counter()
        try:
            call = _import(fn) if ":" in fn else None
            out = call(self.engine, **payload) if call is not None else getattr(self.engine, fn)(**payload)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.busy_s += dt
                self.calls += 1
        return out, dt


# ---------------------------------------------------------------------------- on the head


@dataclass
class ReplicaStats:
    """The head's view of one replica."""

    name: str
    inflight: int = 0  # calls sent and not answered (the replica's queue depth)
    calls: int = 0
    busy_s: float = 0.0  # seconds the replica spent in engine calls / units (as it reported)
    failures: int = 0  # calls lost because the replica died
    alive: bool = True  # False once Ray gave up restarting it
    restarting: bool = False  # lost a call; no new work until it answers again
    restarts: int = 0  # times it came back in a new process
    pid: int = 0


def connect(rc: RayConfig) -> None:
    """ray.init for the configured address (no-op when this process is already connected)."""
    if ray.is_initialized():
        return
    kw = dict(rc.init_kwargs)
    kw.setdefault("ignore_reinit_error", True)
    kw.setdefault("log_to_driver", True)
    if rc.address and rc.address != "local":
        kw["address"] = rc.address
    ray.init(**kw)


def _unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception (InvalidRequest, NotFound, ...) out of Ray's wrapper."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def _interventions_in(obj: Any, depth: int = 0) -> Iterable[Any]:
    """Every pydantic object with an artifact-id field inside `obj` (lists, tuples, dicts, models)."""
    from pydantic import BaseModel

    if depth > 8:
        return
    if isinstance(obj, BaseModel):
        if any(hasattr(obj, attr) for attr, _ in ARTIFACT_FIELDS):
            yield obj
        for name in type(obj).model_fields:
            yield from _interventions_in(getattr(obj, name, None), depth + 1)
    elif isinstance(obj, (list, tuple)):
        if obj and isinstance(obj[0], (int, float)):
            return  # a vector or an id list
        for x in obj:
            yield from _interventions_in(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _interventions_in(x, depth + 1)


class ReplicaSet:
    """The engine protocol over N `EngineReplica` actors (see the module docstring)."""

    def __init__(self, config: ServerConfig, resolver: Any = None) -> None:
        if config.ray is None:
            raise ValueError("ReplicaSet needs a server config with a `ray` section")
        self.config = config
        self.rc: RayConfig = config.ray
        connect(self.rc)
        actor_cls: Any = ray.remote(EngineReplica)
        cfg_json = config.model_dump_json()
        self._names = [f"replica-{i}" for i in range(self.rc.replicas)]
        self._actors: list[Any] = [
            actor_cls.options(
                num_cpus=self.rc.num_cpus, num_gpus=self.rc.num_gpus, max_restarts=self.rc.max_restarts,
                max_task_retries=0, max_concurrency=self.rc.max_concurrency,
            ).remote(cfg_json, name)
            for name in self._names
        ]
        self._stats = {n: ReplicaStats(n) for n in self._names}
        self._lock = threading.Lock()
        self._rr = 0
        hellos = ray.get([a.hello.remote() for a in self._actors])
        for h in hellos:
            self._stats[h["name"]].pid = int(h["pid"])
        infos: list[ModelInfo] = ray.get([a.info.remote() for a in self._actors])
        if any(i != infos[0] for i in infos[1:]):
            raise RuntimeError("the replicas loaded different models (ModelInfo differs)")
        self._info = infos[0]
        self._limits = ray.get(self._actors[0].limits.remote())
        self.resolver = resolver
        log.info("%d engine replicas on Ray (%s): pids %s", len(self._actors), self.rc.address,
                 [s.pid for s in self._stats.values()])

    # ------------------------------------------------------------------ protocol

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def limits(self) -> Any:
        return self._limits

    @limits.setter
    def limits(self, value: Any) -> None:
        """Every replica enforces the server's limits (the config is the one source of truth)."""
        self._limits = value
        ray.get([a.set_limits.remote(value) for a in self._actors])

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return self.call("generate", requests=list(requests))  # type: ignore[no-any-return]

    def score(self, requests: Sequence[Request], token_ids: Sequence[int], top_k: int = 0,
              return_full_logprobs: bool = False) -> list[ScoreResult]:
        return self.call("score", requests=list(requests), token_ids=list(token_ids), top_k=top_k,  # type: ignore[no-any-return]
                         return_full_logprobs=return_full_logprobs)

    def encode(self, requests: Sequence[Request], layers: Sequence[int] | None = None, top_k: int = 16,
               latents: dict[int, Sequence[int]] | None = None) -> list[EncodeResult]:
        return self.call("encode", requests=list(requests), layers=None if layers is None else list(layers),  # type: ignore[no-any-return]
                         top_k=top_k, latents=latents)

    def residuals(self, requests: Sequence[Request], layers: Sequence[int] | None = None,
                  positions: Sequence[int] = (-1,)) -> np.ndarray:
        return self.call("residuals", requests=list(requests), layers=None if layers is None else list(layers),  # type: ignore[no-any-return]
                         positions=list(positions))

    def loss(self, requests: Sequence[Request], completions: Sequence[str | None]) -> list[LossResult]:
        return self.call("loss", requests=list(requests), completions=list(completions))  # type: ignore[no-any-return]

    def tokenize(self, prompts: Sequence[Prompt], raw: bool = False) -> list[list[int]]:
        return self.call("tokenize", prompts=list(prompts), raw=raw)  # type: ignore[no-any-return]

    def sae_rows(self, layers: Sequence[int] | None = None, latents: Mapping[int, Sequence[int]] | None = None,
                 direction: Sequence[float] | np.ndarray | None = None, top_k: int = 0, rank_by: RankBy = "cosine",
                 decoder: bool = True, encoder: bool = False) -> dict[int, SAERows]:
        return self.call("sae_rows", layers=None if layers is None else list(layers),  # type: ignore[no-any-return]
                         latents=None if latents is None else {int(k): list(v) for k, v in latents.items()},
                         direction=None if direction is None else np.asarray(direction), top_k=top_k,
                         rank_by=rank_by, decoder=decoder, encoder=encoder)

    def attribute(self, request: Any) -> Any:
        """Gradient attribution (the HF engine's), on one replica; baselines' artifacts travel too."""
        return self.call("attribute", request=request)

    def latent_edges(self, request: Any, max_back: int = 3) -> Any:
        """Latent-to-latent edges (the HF engine's), on one replica."""
        return self.call("latent_edges", request=request, max_back=max_back)

    # ------------------------------------------------------------------ dispatch

    @property
    def replica_names(self) -> list[str]:
        return list(self._names)

    def live_replicas(self) -> list[str]:
        """Replicas Ray has not given up on (restarting ones included)."""
        with self._lock:
            return [n for n in self._names if self._stats[n].alive]

    def ready_replicas(self) -> list[str]:
        """Replicas that take work now (alive and not restarting)."""
        with self._lock:
            return [n for n in self._names if self._stats[n].alive and not self._stats[n].restarting]

    def inflight(self, name: str) -> int:
        with self._lock:
            return self._stats[name].inflight

    def stats(self) -> list[ReplicaStats]:
        with self._lock:
            return [ReplicaStats(**vars(s)) for s in self._stats.values()]

    def _pick(self, wait_s: float = 600.0) -> str:
        """The least-loaded ready replica (waits while every live one is restarting)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                live = [n for n in self._names if self._stats[n].alive]
                ready = [n for n in live if not self._stats[n].restarting]
                if ready:
                    self._rr += 1
                    k = self._rr
                    return min(ready, key=lambda n: (self._stats[n].inflight, self._stats[n].calls,
                                                     (self._names.index(n) - k) % len(self._names)))
            if not live:
                raise NoReplicas("every engine replica is dead (Ray's max_restarts exhausted)")
            if time.monotonic() > deadline:
                raise NoReplicas(f"no engine replica came back within {wait_s:.0f}s")
            time.sleep(0.1)

    def _artifacts(self, payload: dict[str, Any]) -> dict[tuple[str, str], Any]:
        """Registered latent sets/directions named anywhere in the payload (requests, attribution
        baselines...), resolved here: an unknown id is NOT_FOUND before anything is sent."""
        out: dict[tuple[str, str], Any] = {}
        for iv in _interventions_in(list(payload.values())):
            for attr, kind in ARTIFACT_FIELDS:
                aid = getattr(iv, attr, None)
                if aid and (kind, aid) not in out:
                    if self.resolver is None:
                        raise NotFound(f"{attr} {aid!r} is not registered (no artifact store)")
                    out[(kind, aid)] = (self.resolver.latent_set(aid) if kind == "latent_set"
                                        else np.asarray(self.resolver.direction(aid), dtype=np.float32))
        return out

    def _send(self, name: str, fn: str, payload: dict[str, Any], artifacts: dict[tuple[str, str], Any],
              method: bool = False) -> Any:
        actor = self._actors[self._names.index(name)]
        with self._lock:
            self._stats[name].inflight += 1
        if method:
            return getattr(actor, fn).remote()
        return actor.run_unit.remote(fn, payload, artifacts)

    def _done(self, name: str, busy: float | None, lost: bool) -> None:
        with self._lock:
            s = self._stats[name]
            s.inflight = max(0, s.inflight - 1)
            if lost:
                s.failures += 1
            else:
                s.calls += 1
                s.busy_s += busy or 0.0

    def _lost(self, name: str) -> None:
        """A call was lost on `name`: stop sending it work and watch it come back (or not)."""
        with self._lock:
            st = self._stats[name]
            if st.restarting or not st.alive:
                return
            st.restarting = True
        threading.Thread(target=self._watch_restart, args=(name,), daemon=True, name=f"watch-{name}").start()

    def _watch_restart(self, name: str, timeout_s: float = 600.0) -> None:
        """Poll the replica until Ray has restarted it (back to work) or declared it dead."""
        actor = self._actors[self._names.index(name)]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                h = ray.get(actor.hello.remote(), timeout=30)
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.5)  # restarting (reloading the model)
                continue
            except (ActorDiedError, RayActorError) as exc:
                if isinstance(exc, ActorUnavailableError):
                    time.sleep(0.5)
                    continue
                with self._lock:
                    self._stats[name].alive = False
                    self._stats[name].restarting = False
                log.error("replica %s is dead (Ray's max_restarts=%d exhausted): %s", name, self.rc.max_restarts, exc)
                return
            with self._lock:
                st = self._stats[name]
                st.restarting = False
                if int(h["pid"]) != st.pid:
                    st.restarts += 1
                st.pid = int(h["pid"])
            log.warning("replica %s is back (pid %s)", name, h["pid"])
            return
        with self._lock:
            self._stats[name].alive = False
            self._stats[name].restarting = False
        log.error("replica %s did not come back within %.0fs", name, timeout_s)

    def call(self, fn: str, _method: bool = False, **payload: Any) -> Any:
        """Run one engine call on the least-loaded replica (re-run elsewhere if that replica dies)."""
        artifacts = {} if _method else self._artifacts(payload)
        for attempt in range(self.rc.max_retries + 1):
            name = self._pick()
            ref = self._send(name, fn, payload, artifacts, method=_method)
            try:
                got = ray.get(ref)
            except RayActorError as exc:
                self._done(name, None, lost=True)
                log.warning("replica %s died during %s (attempt %d): %s", name, fn, attempt + 1, exc)
                self._lost(name)
                continue
            except RayTaskError as exc:
                self._done(name, None, lost=False)
                raise _unwrap(exc) from None
            except BaseException:
                self._done(name, None, lost=False)
                raise
            if _method:
                self._done(name, 0.0, lost=False)
                return got
            out, busy = got
            self._done(name, busy, lost=False)
            return out
        raise ReplicaLost(f"{fn}: the replica died {self.rc.max_retries + 1} times in a row")

    def submit_unit(self, fn: str, payload: dict[str, Any], replica: str | None = None) -> Future[tuple[Any, str]]:
        """Start one work unit on `replica` (default: the least loaded); a future of (result, replica).

        The future raises ReplicaLost if the replica died meanwhile (the caller re-submits), or the
        unit's own exception."""
        artifacts = self._artifacts(payload)
        name = replica or self._pick()
        ref = self._send(name, fn, payload, artifacts)
        out: Future[tuple[Any, str]] = Future()

        def done(f: Future[Any]) -> None:
            try:
                res, busy = f.result()
            except RayActorError as exc:
                self._done(name, None, lost=True)
                self._lost(name)
                out.set_exception(ReplicaLost(f"replica {name} died running {fn}: {exc}"))
                return
            except BaseException as exc:  # noqa: BLE001 - carried to the caller
                self._done(name, None, lost=False)
                out.set_exception(_unwrap(exc))
                return
            self._done(name, busy, lost=False)
            out.set_result((res, name))

        ref.future().add_done_callback(done)
        return out

    def replica_pid(self, name: str) -> int:
        """The process id of a replica's actor now (tests kill it to simulate a crash)."""
        h = ray.get(self._actors[self._names.index(name)].hello.remote())
        return int(h["pid"])

    def close(self) -> None:
        """Kill the replica actors (the Ray cluster itself stays)."""
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("killing a replica failed")

    # ------------------------------------------------------------------ metrics

    def register_metrics(self, metrics: Any) -> None:
        """Per-replica gauges/counters under the server's one registry (read at scrape time)."""
        metrics.registry.register(_ReplicaCollector(self))


class _ReplicaCollector:
    """prometheus-client custom collector over `ReplicaSet.stats()`."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.replicas.stats()
        q = GaugeMetricFamily("refusal_audit_replica_queue_depth", "calls sent to a replica and not answered",
                              labels=["replica"])
        up = GaugeMetricFamily("refusal_audit_replica_up", "1 while the replica takes work", labels=["replica"])
        calls = CounterMetricFamily("refusal_audit_replica_calls", "engine calls and job units a replica ran",
                                    labels=["replica"])
        busy = CounterMetricFamily("refusal_audit_replica_busy_seconds", "seconds a replica spent running calls",
                                   labels=["replica"])
        lost = CounterMetricFamily("refusal_audit_replica_lost_calls", "calls lost because the replica died",
                                   labels=["replica"])
        restarts = CounterMetricFamily("refusal_audit_replica_restarts", "times Ray restarted a replica",
                                       labels=["replica"])
        for s in stats:
            restarts.add_metric([s.name], s.restarts)
            q.add_metric([s.name], s.inflight)
            up.add_metric([s.name], 1.0 if s.alive and not s.restarting else 0.0)
            calls.add_metric([s.name], s.calls)
            busy.add_metric([s.name], s.busy_s)
            lost.add_metric([s.name], s.failures)
        yield from (q, up, calls, busy, lost, restarts)


def build_replicas(config: ServerConfig) -> ReplicaSet:
    """`app.build_engine` for a config with a `ray` section."""
    return ReplicaSet(config)
