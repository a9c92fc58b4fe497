"""asyncio client for AuditService: the same typed API as `AuditClient`, every call awaitable.

Construct it inside a running event loop (grpc.aio channels bind to the loop that creates them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from ..audit.attribution import AttributionRequest, AttributionResponse, LogitDiff, LogProb
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
from ..proto.convert import Artifact
from . import _calls as calls
from ._calls import Call, PromptLike, T
from ._channel import ClientBase
from .errors import map_error
from .jobs import AsyncJobsAPI


class AsyncAuditClient(ClientBase):
    """Async client. `async with AsyncAuditClient("host:port", token=...) as c: await c.generate(...)`."""

    _grpc = grpc.aio
    _jobs_api = AsyncJobsAPI
    jobs: AsyncJobsAPI

    # ------------------------------------------------------------------ plumbing

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise map_error(exc) from None

    async def _run(self, call: Call[T], timeout: float | None = None) -> T:
        """Send a unary call and convert its reply."""
        return call.unpack(await self._call(call.method, call.request, timeout))

    async def _stream(self, call: Call[T], timeout: float | None) -> AsyncIterator[T]:
        """Send a server-streaming call and convert each message; leaving the loop early cancels the RPC."""
        stream = getattr(self.stub, call.method)(call.request, metadata=self.metadata, timeout=self._timeout(timeout))
        try:
            async for msg in stream:
                yield call.unpack(msg)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            stream.cancel()

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
            self._info, self._limits = await self._run(calls.get_info())
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
        return await self._run(calls.generate(prompts, interventions, sampling), timeout)

    async def generate_stream(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Token deltas of all items interleaved; leaving the loop early cancels the RPC."""
        async for event in self._stream(calls.generate_stream(prompts, interventions, sampling), timeout):
            yield event

    # ------------------------------------------------------------------ score / encode / residuals / loss

    async def score(
        self, prompts: PromptLike | Sequence[PromptLike], token_ids: Sequence[int], top_k: int = 0,
        return_full_logprobs: bool = False, *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Next-token log-probabilities of `token_ids` after each prompt."""
        return await self._run(calls.score(prompts, token_ids, top_k, return_full_logprobs, interventions), timeout)

    async def p_token(
        self, prompts: PromptLike | Sequence[PromptLike], token_id: int, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> np.ndarray:
        """P(next token = token_id) per prompt."""
        return await self._run(calls.p_token(prompts, token_id, interventions), timeout)

    async def tokenize(
        self, prompts: PromptLike | Sequence[PromptLike], raw: bool = False, *, timeout: float | None = None
    ) -> list[list[int]]:
        """Token ids per prompt as the engine runs it, or (raw) text without special tokens."""
        return await self._run(calls.tokenize(prompts, raw), timeout)

    async def sae_rows(
        self, layers: Sequence[int] | None = None, latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None, top_k: int = 0, rank_by: RankBy = "cosine",
        decoder: bool = True, encoder: bool = False, *, direction_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[int, SAERows]:
        """SAE weights per layer, or the top-k latents by decoder cosine with a direction (see AuditClient)."""
        call = calls.sae_rows(layers, latents, direction, direction_id, top_k, rank_by, decoder, encoder)
        return await self._run(call, timeout)

    async def encode(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None, top_k: int = 16,
        latents: Mapping[int, Sequence[int]] | None = None, *, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> list[EncodeResult]:
        """SAE activations per token and layer."""
        return await self._run(calls.encode(prompts, layers, top_k, latents, interventions), timeout)

    async def residuals(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,), *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> np.ndarray:
        """Residual vectors [n_items, n_layers, n_positions, d_model]."""
        return await self._run(calls.residuals(prompts, layers, positions, interventions), timeout)

    async def loss(
        self, prompts: PromptLike | Sequence[PromptLike], completions: Sequence[str | None], *,
        interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[LossResult]:
        """Mean CE of each completion given its prompt."""
        return await self._run(calls.loss(prompts, completions, interventions), timeout)

    async def attribute(
        self, prompts: PromptLike | Sequence[PromptLike] | AttributionRequest,
        metric: LogitDiff | LogProb | Sequence[LogitDiff | LogProb] | None = None, *,
        timeout: float | None = None, **options: Any,
    ) -> AttributionResponse:
        """Attribute a metric to SAE latents (AtP / integrated gradients, docs/attribution.md).

        Either a ready AttributionRequest, or prompts + a metric (one, or one per prompt) + the
        request's options (method, n_steps, rule, baseline, layers, scope, top_k, latents, per_position).
        """
        return await self._run(calls.attribute(prompts, metric, options), timeout)

    # ------------------------------------------------------------------ artifacts

    async def register_direction(
        self, name: str, values: Sequence[float] | np.ndarray, layer: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Register a direction; use `.id` as direction_id."""
        return await self._run(calls.register_direction(name, values, layer, metadata))

    async def register_latent_set(
        self, name: str, latents: Mapping[int, Sequence[int]], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a latent set; use `.id` as latent_set_id."""
        return await self._run(calls.register_latent_set(name, latents, metadata))

    async def register_prompt_set(
        self, name: str, prompts: Sequence[PromptLike], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a prompt set (e.g. a mean attribution baseline's reference set); use `.id`."""
        return await self._run(calls.register_prompt_set(name, prompts, metadata))

    async def artifact(self, artifact_id: str) -> Artifact:
        """One artifact with its payload."""
        return await self._run(calls.artifact(artifact_id))

    async def artifacts(self, kind: str | None = None) -> list[Artifact]:
        """Registered artifacts without payloads."""
        return await self._run(calls.artifacts(kind))
