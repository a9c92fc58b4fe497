"""asyncio client for AuditService: the same typed API as `AuditClient`, every call awaitable.

Construct it inside a running event loop (grpc.aio channels bind to the loop that creates them).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from ..audit.attribution import (
    AttributionRequest,
    AttributionResponse,
    LogitDiff,
    LogProb,
    attribution_request,
)
from ..audit.engine import (
    Completion,
    EncodeResult,
    Limits,
    LossResult,
    ModelInfo,
    RankBy,
    SAERows,
    ScoreResult,
    StreamEvent,
)
from ..audit.errors import InvalidRequest, validation_message
from ..proto import convert
from ..proto.convert import Artifact
from ..proto.generated import audit_pb2 as pb
from ..proto.generated import audit_pb2_grpc as pb_grpc
from .errors import map_error
from .jobs import AsyncJobsAPI
from .sync import (
    PromptLike,
    _metadata_json,
    as_prompt,
    as_prompts,
    as_requests,
    auth_metadata,
    channel_credentials,
    channel_options,
    resolve_address,
    resolve_token,
)


class AsyncAuditClient:
    """Async client. `async with AsyncAuditClient("host:port", token=...) as c: await c.generate(...)`."""

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        tls_ca: str | bytes | os.PathLike[str] | None = None,
        timeout: float | None = None,
        *,
        tls: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self.metadata = auth_metadata(resolve_token(token))
        creds = channel_credentials(tls_ca, tls)
        opts = channel_options(options)
        self.channel = (
            grpc.aio.secure_channel(self.address, creds, options=opts)
            if creds is not None
            else grpc.aio.insecure_channel(self.address, options=opts)
        )
        self.stub = pb_grpc.AuditServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._info: ModelInfo | None = None
        self._limits: Limits | None = None
        self.jobs = AsyncJobsAPI(self.stub, self.metadata)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=timeout if timeout is not None else self.timeout
            )
        except grpc.RpcError as exc:
            raise map_error(exc) from None

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncAuditClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The health status name ('SERVING', ...); needs no token."""
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    # ------------------------------------------------------------------ info

    async def get_info(self, refresh: bool = True) -> ModelInfo:
        """Model, layers, SAEs, special token ids (cached for `info`)."""
        if refresh or self._info is None:
            msg = await self._call("GetInfo", pb.GetInfoRequest())
            self._info = convert.model_info_from_pb(msg)
            self._limits = convert.limits_from_pb(msg.limits)
        return self._info

    @property
    def info(self) -> ModelInfo:
        """The ModelInfo from the last `await get_info()`."""
        if self._info is None:
            raise RuntimeError("call `await client.get_info()` first")
        return self._info

    @property
    def limits(self) -> Limits:
        """The limits from the last `await get_info()`."""
        if self._limits is None:
            raise RuntimeError("call `await client.get_info()` first")
        return self._limits

    # ------------------------------------------------------------------ generation

    async def generate(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> list[Completion]:
        """Completions, one per prompt/Request; interventions/sampling given alongside are per-call
        defaults that a Request's own fields override (precedence: `sync.as_requests`)."""
        reqs = as_requests(prompts, interventions, **sampling)
        resp = await self._call("Generate", convert.generate_request_to_pb(reqs), timeout)
        return [convert.completion_from_pb(c) for c in resp.completions]

    async def generate_stream(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Token deltas of all items interleaved; leaving the loop early cancels the RPC."""
        reqs = as_requests(prompts, interventions, **sampling)
        call = self.stub.GenerateStream(
            convert.generate_request_to_pb(reqs), metadata=self.metadata,
            timeout=timeout if timeout is not None else self.timeout,
        )
        try:
            async for msg in call:
                yield convert.stream_event_from_pb(msg)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------------ score / encode / residuals / loss

    async def score(
        self, prompts: PromptLike | Sequence[PromptLike], token_ids: Sequence[int], top_k: int = 0,
        return_full_logprobs: bool = False, *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Next-token log-probabilities of `token_ids` after each prompt."""
        reqs = as_requests(prompts, interventions)
        msg = convert.score_request_to_pb(reqs, token_ids, top_k, return_full_logprobs)
        resp = await self._call("Score", msg, timeout)
        return [convert.score_result_from_pb(r) for r in resp.results]

    async def p_token(
        self, prompts: PromptLike | Sequence[PromptLike], token_id: int, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> np.ndarray:
        """P(next token = token_id) per prompt."""
        res = await self.score(prompts, [token_id], interventions=interventions, timeout=timeout)
        return np.exp(np.array([float(r.logprobs[0]) for r in res], dtype=np.float64))

    async def tokenize(
        self, prompts: PromptLike | Sequence[PromptLike], raw: bool = False, *, timeout: float | None = None
    ) -> list[list[int]]:
        """Token ids per prompt as the engine runs it, or (raw) text without special tokens."""
        resp = await self._call("Tokenize", convert.tokenize_request_to_pb(as_prompts(prompts), raw), timeout)
        return [list(r.token_ids) for r in resp.results]

    async def sae_rows(
        self, layers: Sequence[int] | None = None, latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None, top_k: int = 0, rank_by: RankBy = "cosine",
        decoder: bool = True, encoder: bool = False, *, direction_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[int, SAERows]:
        """SAE weights per layer, or the top-k latents by decoder cosine with a direction (see AuditClient)."""
        msg = convert.sae_rows_request_to_pb(layers, latents, direction, direction_id, top_k, rank_by, decoder, encoder)
        return convert.sae_rows_from_pb(await self._call("SAERows", msg, timeout))

    async def encode(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None, top_k: int = 16,
        latents: Mapping[int, Sequence[int]] | None = None, *, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> list[EncodeResult]:
        """SAE activations per token and layer."""
        reqs = as_requests(prompts, interventions)
        resp = await self._call("Encode", convert.encode_request_to_pb(reqs, layers, top_k, latents), timeout)
        return [convert.encode_result_from_pb(r) for r in resp.results]

    async def residuals(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,), *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> np.ndarray:
        """Residual vectors [n_items, n_layers, n_positions, d_model]."""
        reqs = as_requests(prompts, interventions)
        resp = await self._call("Residuals", convert.residuals_request_to_pb(reqs, layers, positions), timeout)
        return convert.tensor_from_pb(resp.residuals, "residuals")

    async def loss(
        self, prompts: PromptLike | Sequence[PromptLike], completions: Sequence[str | None], *,
        interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[LossResult]:
        """Mean CE of each completion given its prompt."""
        reqs = as_requests(prompts, interventions)
        resp = await self._call("Loss", convert.loss_request_to_pb(reqs, completions), timeout)
        return [convert.loss_result_from_pb(r) for r in resp.results]

    async def attribute(
        self, prompts: PromptLike | Sequence[PromptLike] | AttributionRequest,
        metric: LogitDiff | LogProb | Sequence[LogitDiff | LogProb] | None = None, *,
        timeout: float | None = None, **options: Any,
    ) -> AttributionResponse:
        """Attribute a metric to SAE latents (AtP / integrated gradients, docs/attribution.md).

        Either a ready AttributionRequest, or prompts + a metric (one, or one per prompt) + the
        request's options (method, n_steps, rule, baseline, layers, scope, top_k, latents, per_position).
        """
        if isinstance(prompts, AttributionRequest):
            req = prompts
        else:
            if metric is None:
                raise ValueError("metric is required (LogitDiff or LogProb)")
            try:
                req = attribution_request(as_prompts(prompts), metric, **options)
            except ValidationError as exc:
                raise InvalidRequest(validation_message(exc, "request")) from None
        resp = await self._call("Attribute", convert.attribute_request_to_pb(req), timeout)
        return convert.attribute_response_from_pb(resp)

    # ------------------------------------------------------------------ artifacts

    async def register_direction(
        self, name: str, values: Sequence[float] | np.ndarray, layer: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Register a direction; use `.id` as direction_id."""
        msg = pb.RegisterDirectionRequest(
            name=name, values=[float(v) for v in np.asarray(values, dtype=np.float32).ravel()], layer=layer,
            metadata_json=_metadata_json(metadata),
        )
        return convert.artifact_from_pb(await self._call("RegisterDirection", msg))

    async def register_latent_set(
        self, name: str, latents: Mapping[int, Sequence[int]], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a latent set; use `.id` as latent_set_id."""
        msg = pb.RegisterLatentSetRequest(
            name=name, latents=convert.latents_to_pb(latents), metadata_json=_metadata_json(metadata)
        )
        return convert.artifact_from_pb(await self._call("RegisterLatentSet", msg))

    async def register_prompt_set(
        self, name: str, prompts: Sequence[PromptLike], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a prompt set (e.g. a mean attribution baseline's reference set); use `.id`."""
        msg = pb.RegisterPromptSetRequest(
            name=name, prompts=[convert.prompt_to_pb(as_prompt(p)) for p in prompts],
            metadata_json=_metadata_json(metadata),
        )
        return convert.artifact_from_pb(await self._call("RegisterPromptSet", msg))

    async def artifact(self, artifact_id: str) -> Artifact:
        """One artifact with its payload."""
        return convert.artifact_from_pb(await self._call("GetArtifact", pb.GetArtifactRequest(id=artifact_id)))

    async def artifacts(self, kind: str | None = None) -> list[Artifact]:
        """Registered artifacts without payloads."""
        resp = await self._call("ListArtifacts", pb.ListArtifactsRequest(kind=kind or ""))
        return [convert.artifact_from_pb(a) for a in resp.artifacts]
