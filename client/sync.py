"""Synchronous gRPC client for AuditService, with typed helpers that hide the protobuf messages.

`AuditClient` also satisfies `audit.engine.Engine` (info / generate / score / encode / residuals /
loss with the same signatures and return types as the in-process HF engine), so audit code runs
unchanged against a remote server. Server errors come back as `RemoteError` subclasses that are
also the local error types (`InvalidRequest`, `NotFound`, `LimitExceeded`), so the same `except`
clauses work in-process and remotely.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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
from ._calls import Call, PromptLike, T, as_prompt, as_requests
from ._channel import DEFAULT_ADDRESS, SERVER_ENV, TOKEN_ENV, ClientBase
from .errors import RemoteError, map_error
from .jobs import JobsAPI

__all__ = ["AuditClient", "RemoteError", "map_error", "as_prompt", "as_requests",
           "PromptLike", "DEFAULT_ADDRESS", "SERVER_ENV", "TOKEN_ENV"]


class AuditClient(ClientBase):
    """Blocking client. `AuditClient("host:port", token=..., tls_ca="ca.pem", timeout=60)`."""

    _grpc = grpc
    _jobs_api = JobsAPI
    jobs: JobsAPI

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise map_error(exc) from None

    def _run(self, call: Call[T], timeout: float | None = None) -> T:
        """Send a unary call and convert its reply."""
        return call.unpack(self._call(call.method, call.request, timeout))

    def _stream(self, call: Call[T], timeout: float | None) -> Iterator[T]:
        """Send a server-streaming call and convert each message; closing the iterator cancels the RPC."""
        stream = getattr(self.stub, call.method)(call.request, metadata=self.metadata, timeout=self._timeout(timeout))
        try:
            for msg in stream:
                yield call.unpack(msg)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            stream.cancel()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (raises RemoteError UNAVAILABLE on timeout)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise RemoteError(grpc.StatusCode.UNAVAILABLE, f"no server at {self.address} after {timeout}s") from None

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The health status name ('SERVING', 'NOT_SERVING', ...); needs no token."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    # ------------------------------------------------------------------ info

    def get_info(self, refresh: bool = True) -> ModelInfo:
        """Model, layers, SAEs, special token ids (fetched; cached for `info`)."""
        if refresh or self._info is None:
            self._info, self._limits = self._run(calls.get_info())
        return self._info

    @property
    def info(self) -> ModelInfo:
        """The server's ModelInfo (Engine protocol; fetched once)."""
        return self.get_info(refresh=False)

    @property
    def limits(self) -> Limits:
        """The server's configured limits."""
        if self._limits is None:
            self.get_info()
        assert self._limits is not None
        return self._limits

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> list[Completion]:
        """Completions, one per prompt/Request. `interventions` and the sampling keywords (max_new_tokens,
        temperature, top_p, seed, stop_token_ids, ignore_eos, or sampling=SamplingParams) are per-call defaults
        that a Request's own fields override (precedence: `as_requests`)."""
        return self._run(calls.generate(prompts, interventions, sampling), timeout)

    def generate_stream(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> Iterator[StreamEvent]:
        """Token deltas of all items interleaved (tagged by index); closing the iterator cancels the RPC."""
        yield from self._stream(calls.generate_stream(prompts, interventions, sampling), timeout)

    # ------------------------------------------------------------------ score / encode / residuals / loss

    def score(
        self, prompts: PromptLike | Sequence[PromptLike], token_ids: Sequence[int], top_k: int = 0,
        return_full_logprobs: bool = False, *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Next-token log-probabilities of `token_ids` after each prompt (plus top-k / the full distribution)."""
        return self._run(calls.score(prompts, token_ids, top_k, return_full_logprobs, interventions), timeout)

    def p_token(
        self, prompts: PromptLike | Sequence[PromptLike], token_id: int, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> np.ndarray:
        """P(next token = token_id) per prompt, e.g. P("I") as the refusal score."""
        return self._run(calls.p_token(prompts, token_id, interventions), timeout)

    def tokenize(
        self, prompts: PromptLike | Sequence[PromptLike], raw: bool = False, *, timeout: float | None = None
    ) -> list[list[int]]:
        """Token ids per prompt as the engine runs it (BOS / chat template: the positions a TokenScope
        counts); `raw=True`: text without BOS or special tokens (e.g. the id of "I")."""
        return self._run(calls.tokenize(prompts, raw), timeout)

    def sae_rows(
        self, layers: Sequence[int] | None = None, latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None, top_k: int = 0, rank_by: RankBy = "cosine",
        decoder: bool = True, encoder: bool = False, *, direction_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[int, SAERows]:
        """SAE weights per layer: the chosen `latents`' W_dec rows (and W_enc columns), or the `top_k`
        latents ranked server-side by cos(direction, W_dec[i]) (`direction` or a registered
        `direction_id`); `decoder=False` returns ids and cosines only (stage 1's ranking)."""
        call = calls.sae_rows(layers, latents, direction, direction_id, top_k, rank_by, decoder, encoder)
        return self._run(call, timeout)

    def encode(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None, top_k: int = 16,
        latents: Mapping[int, Sequence[int]] | None = None, *, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> list[EncodeResult]:
        """SAE activations per token and layer: top-k latents, or the chosen `latents` ({layer: ids})."""
        return self._run(calls.encode(prompts, layers, top_k, latents, interventions), timeout)

    def residuals(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,), *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> np.ndarray:
        """Residual vectors [n_items, n_layers, n_positions, d_model] (layer -1 = embeddings)."""
        return self._run(calls.residuals(prompts, layers, positions, interventions), timeout)

    def loss(
        self, prompts: PromptLike | Sequence[PromptLike], completions: Sequence[str | None], *,
        interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[LossResult]:
        """Mean CE of each completion given its prompt (None/'' = LM loss of the prompt itself)."""
        return self._run(calls.loss(prompts, completions, interventions), timeout)

    def attribute(
        self, prompts: PromptLike | Sequence[PromptLike] | AttributionRequest,
        metric: LogitDiff | LogProb | Sequence[LogitDiff | LogProb] | None = None, *,
        timeout: float | None = None, **options: Any,
    ) -> AttributionResponse:
        """Attribute a metric to SAE latents (AtP / integrated gradients, docs/attribution.md).

        Either a ready AttributionRequest, or prompts + a metric (one, or one per prompt) + the
        request's options (method, n_steps, rule, baseline, layers, scope, top_k, latents, per_position).
        """
        return self._run(calls.attribute(prompts, metric, options), timeout)

    # ------------------------------------------------------------------ artifacts

    def register_direction(
        self, name: str, values: Sequence[float] | np.ndarray, layer: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Register a direction (d_model floats); use the returned `.id` as direction_id."""
        return self._run(calls.register_direction(name, values, layer, metadata))

    def register_latent_set(
        self, name: str, latents: Mapping[int, Sequence[int]], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a latent set ({layer: latent ids}); use the returned `.id` as latent_set_id."""
        return self._run(calls.register_latent_set(name, latents, metadata))

    def register_prompt_set(
        self, name: str, prompts: Sequence[PromptLike], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a prompt set (e.g. a mean attribution baseline's reference set); use `.id`."""
        return self._run(calls.register_prompt_set(name, prompts, metadata))

    def artifact(self, artifact_id: str) -> Artifact:
        """One artifact with its payload."""
        return self._run(calls.artifact(artifact_id))

    def artifacts(self, kind: str | None = None) -> list[Artifact]:
        """Registered artifacts (newest first, without payloads), optionally 'direction' or 'latent_set'."""
        return self._run(calls.artifacts(kind))
