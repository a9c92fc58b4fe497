"""Server configuration: one pydantic model, filled by `refusal-audit serve` options or by tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..audit.engine import Limits

TOKEN_ENV = "REFUSAL_AUDIT_TOKEN"


class LimitsConfig(Limits):
    """The server's limits: the one `Limits` plus the server-side default for a request that
    says max_new_tokens = 0. `max_concurrent_jobs` mirrors `ServerConfig.max_concurrent_jobs`."""

    default_max_new_tokens: int = Field(default=64, gt=0)  # when a request says 0


class RayConfig(BaseModel):
    """Engine replicas as Ray actors (the optional `ray` extra): `serve --ray ADDRESS --replicas N`.

    Each replica loads the model and SAEs on its own resources; the server's gRPC front end, job
    store and artifact store stay in the head process (see `server/ray_replicas.py`)."""

    model_config = ConfigDict(extra="forbid")

    address: str = "auto"  # "auto" (a running cluster), "local" (start one here), "ray://host:10001", host:port
    replicas: int = Field(default=2, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)  # per replica
    num_gpus: float = Field(default=0.0, ge=0)  # per replica (1 on a GPU cluster)
    torch_threads: int | None = Field(default=None, ge=1)  # per replica; None = num_cpus (at least 1)
    max_restarts: int = Field(default=3, ge=-1)  # Ray restarts a dead replica this often (-1: always)
    max_retries: int = Field(default=3, ge=0)  # re-runs of one call / job unit after its replica died
    max_concurrency: int = Field(default=4, ge=1)  # calls one replica accepts at once (interactive + job units)
    unit_window: int = Field(default=1, ge=1)  # job units in flight per replica (the rest wait at the head)
    init_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra ray.init arguments (e.g. num_cpus)
    engine_factory: str | None = None  # "module:function(config) -> Engine" instead of the built-in loader


class ServerConfig(BaseModel):
    """Everything `serve` needs: model and SAEs, network, auth/TLS, limits, jobs, metrics."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # batch_interleave may be inf

    model: str = ""  # hub id or local path (load_model)
    saes: list[str] = Field(default_factory=list)  # "LAYER=release:sae_id" | "LAYER=/path"
    engine: Literal["hf", "vllm"] = "hf"
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"  # use 0.0.0.0 in a container
    port: int = Field(default=50051, ge=0, le=65535)  # 0 = ephemeral
    data_dir: Path = Path("data")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth_token: str | None = None  # also from $REFUSAL_AUDIT_TOKEN; None = no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_inflight: int = Field(default=64, gt=0)  # engine requests queued or running; more -> RESOURCE_EXHAUSTED
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None = no metrics endpoint; 0 = ephemeral
    metrics_host: str = "0.0.0.0"
    judge: str = "substring"  # "substring" or "host:port" of a JudgeService
    max_concurrent_jobs: int = Field(default=1, gt=0)
    grace_s: float = Field(default=10.0, ge=0)  # drain period on SIGTERM
    max_message_mb: int = Field(default=256, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)  # --engine vllm: ranks per model (vLLM's own executor)
    distributed_executor_backend: Literal["mp", "ray"] | None = None  # vLLM's TP executor (None: vLLM's default)
    # --engine vllm: run the model compiled (torch.compile; piecewise CUDA graphs on GPU) with the hooks as a
    # custom op. Off by default: on CPU compiling costs ~2 min of start-up for no speed (docs/engines.md)
    vllm_compiled: bool = False
    # --engine vllm on CPU: the latent hook's decode tokens through the fused C kernel (server/fused_hook.py)
    vllm_fused_hook: bool = True
    ray: RayConfig | None = None  # None: one in-process engine (the default; Ray is never imported)
    # cross-request batching on the HF engine (server/batching.py); max rows = limits.max_batch_items
    batch_window_ms: float = Field(default=5.0, ge=0)  # collect until no call arrived for this long (or a
    # tenth of a decode step, if longer); 0 = none
    batch_max_wait_ms: float = Field(default=50.0, ge=0)  # ... but at most this long
    batch_max_tokens: int = Field(default=16384, gt=0)  # rows x longest (prompt + new) tokens per batch
    # continuous batching: Generate calls join a running generation once they number this x its rows ...
    batch_join_ratio: float = Field(default=0.25, ge=0)
    batch_join_wait_steps: int = Field(default=4, ge=0)  # ... or have waited this many decode steps
    # while rows generate, a prompt-only batch or a join (its prefill) between two decode steps takes about this
    # x a step (inf: the whole token budget at once, holding the streams for it)
    batch_interleave: float = Field(default=4.0, gt=0)
    batching: bool = True  # False: every call runs alone, in arrival order
    # HF engine (and the vLLM engine's HF side): every row bit-identical to the row run alone, whatever
    # shares its batch (server/batch_invariant.py; docs/engines.md, "Batch-invariant mode", for its cost)
    batch_invariant: bool | None = None  # None: on where the BLAS and attention allow it, else off (warned)

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if self.auth_token is None and os.environ.get(TOKEN_ENV):
            self.auth_token = os.environ[TOKEN_ENV]
        if self.auth_token == "":
            self.auth_token = None
        if "max_concurrent_jobs" in self.limits.model_fields_set:  # one value, whichever was given
            self.max_concurrent_jobs = self.limits.max_concurrent_jobs
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @property
    def wire_limits(self) -> Limits:
        """The limits as reported by GetInfo."""
        return Limits(**self.limits.model_dump(exclude={"default_max_new_tokens", "max_concurrent_jobs"}),
                      max_concurrent_jobs=self.max_concurrent_jobs)
