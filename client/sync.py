"""Synchronous gRPC client for AuditService, with typed helpers that hide the protobuf messages.

`AuditClient` also satisfies `audit.engine.Engine` (info / generate / score / encode / residuals /
loss with the same signatures and return types as the in-process HF engine), so audit code runs
unchanged against a remote server. Server errors come back as `RemoteError` subclasses that are
also the local error types (`InvalidRequest`, `NotFound`, `LimitExceeded`), so the same `except`
clauses work in-process and remotely.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import TypeAdapter, ValidationError

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
from ..audit.spec import ChatMessage, Intervention, Prompt, Request, SamplingParams
from ..proto import convert
from ..proto.convert import Artifact
from ..proto.generated import audit_pb2 as pb
from ..proto.generated import audit_pb2_grpc as pb_grpc
from .errors import RemoteError, map_error
from .jobs import JobsAPI

log = logging.getLogger("refusal_audit.client")

__all__ = ["AuditClient", "RemoteError", "map_error", "as_prompt", "as_requests"]

SERVER_ENV = "REFUSAL_AUDIT_SERVER"
TOKEN_ENV = "REFUSAL_AUDIT_TOKEN"
DEFAULT_ADDRESS = "localhost:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditService"].full_name

PromptLike = Any  # str | tuple[ChatMessage, ...] | list[dict] | Request
"""A prompt: raw text, chat messages (ChatMessage or {'role','content'} dicts), or a full Request."""

# ---------------------------------------------------------------------------- errors


# ---------------------------------------------------------------------------- request building (shared with aio)

_INTERVENTIONS = TypeAdapter(tuple[Intervention, ...])


def _is_messages(p: Any) -> bool:
    return isinstance(p, (tuple, list)) and bool(p) and all(isinstance(m, (ChatMessage, dict)) for m in p)


def as_prompt(p: Any) -> Prompt:
    """Normalise a prompt: raw text, or messages (ChatMessage objects or role/content dicts)."""
    if isinstance(p, str):
        return p
    if _is_messages(p):
        return tuple(m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in p)
    raise TypeError(f"not a prompt: {p!r}")


def as_prompts(prompts: Any) -> list[Prompt]:
    """One prompt or a list of prompts (text, messages, or Requests, whose prompt is taken)."""
    if isinstance(prompts, (str, Request)) or _is_messages(prompts):
        prompts = [prompts]
    return [p.prompt if isinstance(p, Request) else as_prompt(p) for p in prompts]


def as_interventions(interventions: Sequence[Any]) -> tuple[Intervention, ...]:
    """Interventions as spec objects (dicts are validated)."""
    try:
        return _INTERVENTIONS.validate_python(tuple(interventions))
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, "interventions")) from None


def _sampling_defaults(sampling: dict[str, Any]) -> dict[str, Any]:
    """The per-call sampling fields: `sampling=SamplingParams(...)|dict` (its set fields), then the
    keyword fields (max_new_tokens=..., temperature=...), which win; None values are dropped."""
    out: dict[str, Any] = {}
    base = sampling.pop("sampling", None)
    if isinstance(base, SamplingParams):
        out.update(base.model_dump(include=base.model_fields_set))
    elif isinstance(base, Mapping):
        out.update(base)
    elif base is not None:
        raise InvalidRequest(f"sampling: expected SamplingParams or a dict, got {type(base).__name__}")
    out.update({k: v for k, v in sampling.items() if v is not None})
    unknown = sorted(set(out) - set(SamplingParams.model_fields))
    if unknown:
        raise InvalidRequest(f"sampling: unknown field(s) {unknown}; known: {sorted(SamplingParams.model_fields)}")
    return out


def _sampling(defaults: dict[str, Any], own: SamplingParams | None, where: str) -> SamplingParams:
    try:
        if own is None:
            return SamplingParams(**defaults)
        return SamplingParams(**{**defaults, **own.model_dump(include=own.model_fields_set)})
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, where)) from None


def as_requests(prompts: Any, interventions: Sequence[Any] | None = None, **sampling: Any) -> list[Request]:
    """Requests from one prompt, a list of prompts, or Requests (mixed freely).

    `interventions` and the sampling keywords (`max_new_tokens=`, `temperature=`, `top_p=`, `seed=`,
    `stop_token_ids=`, or a whole `sampling=SamplingParams(...)`) given alongside are per-call
    defaults. Precedence, most specific first:

    * interventions: a Request that sets `interventions` itself (even to `()`, i.e. none) keeps
      its own; a plain prompt, or a Request that leaves the field unset, gets the call's.
    * sampling, field by field: a field set in the Request's own `SamplingParams` wins over the
      call's keyword, which wins over `SamplingParams`'s default. E.g.
      `generate([Request(prompt=p, sampling=SamplingParams(temperature=0.7))], max_new_tokens=64)`
      samples at temperature 0.7 for 64 tokens.
    """
    if isinstance(prompts, (str, Request)) or _is_messages(prompts):
        prompts = [prompts]
    ivs = as_interventions(interventions) if interventions else ()
    defaults = _sampling_defaults(dict(sampling))
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Request):
            own_ivs = p.interventions if "interventions" in p.model_fields_set else ivs
            own_sp = p.sampling if "sampling" in p.model_fields_set else None
            out.append(Request(prompt=p.prompt, interventions=own_ivs,
                               sampling=_sampling(defaults, own_sp, f"items[{i}].sampling")))
        else:
            out.append(Request(prompt=as_prompt(p), interventions=ivs, sampling=_sampling(defaults, None, "sampling")))
    return out


def channel_credentials(tls_ca: str | bytes | os.PathLike[str] | None, tls: bool) -> grpc.ChannelCredentials | None:
    """TLS credentials (a CA file/PEM, or system roots when tls=True); None for plaintext."""
    if tls_ca is None and not tls:
        return None
    root: bytes | None = None
    if isinstance(tls_ca, bytes):
        root = tls_ca
    elif tls_ca is not None:
        with open(tls_ca, "rb") as f:
            root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Large messages (residuals, full logprobs) plus any extra options."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        *extra,
    ]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The `authorization: Bearer` metadata for a token (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def resolve_address(address: str | None) -> str:
    return address or os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS


def resolve_token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


# ---------------------------------------------------------------------------- the client


class AuditClient:
    """Blocking client. `AuditClient("host:port", token=..., tls_ca="ca.pem", timeout=60)`."""

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
            grpc.secure_channel(self.address, creds, options=opts)
            if creds is not None
            else grpc.insecure_channel(self.address, options=opts)
        )
        self.stub = pb_grpc.AuditServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._info: ModelInfo | None = None
        self._limits: Limits | None = None
        self.jobs = JobsAPI(self.stub, self.metadata)

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=timeout if timeout is not None else self.timeout
            )
        except grpc.RpcError as exc:
            raise map_error(exc) from None

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
            msg = self._call("GetInfo", pb.GetInfoRequest())
            self._info = convert.model_info_from_pb(msg)
            self._limits = convert.limits_from_pb(msg.limits)
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
        temperature, top_p, seed, stop_token_ids, or sampling=SamplingParams) are per-call defaults
        that a Request's own fields override (precedence: `as_requests`)."""
        reqs = as_requests(prompts, interventions, **sampling)
        resp = self._call("Generate", convert.generate_request_to_pb(reqs), timeout)
        return [convert.completion_from_pb(c) for c in resp.completions]

    def generate_stream(
        self, prompts: PromptLike | Sequence[PromptLike], interventions: Sequence[Any] = (), *,
        timeout: float | None = None, **sampling: Any,
    ) -> Iterator[StreamEvent]:
        """Token deltas of all items interleaved (tagged by index); closing the iterator cancels the RPC."""
        reqs = as_requests(prompts, interventions, **sampling)
        call = self.stub.GenerateStream(
            convert.generate_request_to_pb(reqs), metadata=self.metadata,
            timeout=timeout if timeout is not None else self.timeout,
        )
        try:
            for msg in call:
                yield convert.stream_event_from_pb(msg)
        except grpc.RpcError as exc:
            raise map_error(exc) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------------ score / encode / residuals / loss

    def score(
        self, prompts: PromptLike | Sequence[PromptLike], token_ids: Sequence[int], top_k: int = 0,
        return_full_logprobs: bool = False, *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Next-token log-probabilities of `token_ids` after each prompt (plus top-k / the full distribution)."""
        reqs = as_requests(prompts, interventions)
        msg = convert.score_request_to_pb(reqs, token_ids, top_k, return_full_logprobs)
        resp = self._call("Score", msg, timeout)
        return [convert.score_result_from_pb(r) for r in resp.results]

    def p_token(
        self, prompts: PromptLike | Sequence[PromptLike], token_id: int, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> np.ndarray:
        """P(next token = token_id) per prompt, e.g. P("I") as the refusal score."""
        res = self.score(prompts, [token_id], interventions=interventions, timeout=timeout)
        return np.exp(np.array([float(r.logprobs[0]) for r in res], dtype=np.float64))

    def tokenize(
        self, prompts: PromptLike | Sequence[PromptLike], raw: bool = False, *, timeout: float | None = None
    ) -> list[list[int]]:
        """Token ids per prompt as the engine runs it (BOS / chat template: the positions a TokenScope
        counts); `raw=True`: text without BOS or special tokens (e.g. the id of "I")."""
        resp = self._call("Tokenize", convert.tokenize_request_to_pb(as_prompts(prompts), raw), timeout)
        return [list(r.token_ids) for r in resp.results]

    def sae_rows(
        self, layers: Sequence[int] | None = None, latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None, top_k: int = 0, rank_by: RankBy = "cosine",
        decoder: bool = True, encoder: bool = False, *, direction_id: str | None = None,
        timeout: float | None = None,
    ) -> dict[int, SAERows]:
        """SAE weights per layer: the chosen `latents`' W_dec rows (and W_enc columns), or the `top_k`
        latents ranked server-side by cos(direction, W_dec[i]) (`direction` or a registered
        `direction_id`); `decoder=False` returns ids and cosines only (stage 1's ranking)."""
        msg = convert.sae_rows_request_to_pb(layers, latents, direction, direction_id, top_k, rank_by, decoder, encoder)
        return convert.sae_rows_from_pb(self._call("SAERows", msg, timeout))

    def encode(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None, top_k: int = 16,
        latents: Mapping[int, Sequence[int]] | None = None, *, interventions: Sequence[Any] = (),
        timeout: float | None = None,
    ) -> list[EncodeResult]:
        """SAE activations per token and layer: top-k latents, or the chosen `latents` ({layer: ids})."""
        reqs = as_requests(prompts, interventions)
        resp = self._call("Encode", convert.encode_request_to_pb(reqs, layers, top_k, latents), timeout)
        return [convert.encode_result_from_pb(r) for r in resp.results]

    def residuals(
        self, prompts: PromptLike | Sequence[PromptLike], layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,), *, interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> np.ndarray:
        """Residual vectors [n_items, n_layers, n_positions, d_model] (layer -1 = embeddings)."""
        reqs = as_requests(prompts, interventions)
        resp = self._call("Residuals", convert.residuals_request_to_pb(reqs, layers, positions), timeout)
        return convert.tensor_from_pb(resp.residuals, "residuals")

    def loss(
        self, prompts: PromptLike | Sequence[PromptLike], completions: Sequence[str | None], *,
        interventions: Sequence[Any] = (), timeout: float | None = None,
    ) -> list[LossResult]:
        """Mean CE of each completion given its prompt (None/'' = LM loss of the prompt itself)."""
        reqs = as_requests(prompts, interventions)
        resp = self._call("Loss", convert.loss_request_to_pb(reqs, completions), timeout)
        return [convert.loss_result_from_pb(r) for r in resp.results]

    def attribute(
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
        resp = self._call("Attribute", convert.attribute_request_to_pb(req), timeout)
        return convert.attribute_response_from_pb(resp)

    # ------------------------------------------------------------------ artifacts

    def register_direction(
        self, name: str, values: Sequence[float] | np.ndarray, layer: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Register a direction (d_model floats); use the returned `.id` as direction_id."""
        msg = pb.RegisterDirectionRequest(
            name=name, values=[float(v) for v in np.asarray(values, dtype=np.float32).ravel()], layer=layer,
            metadata_json=_metadata_json(metadata),
        )
        return convert.artifact_from_pb(self._call("RegisterDirection", msg))

    def register_latent_set(
        self, name: str, latents: Mapping[int, Sequence[int]], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a latent set ({layer: latent ids}); use the returned `.id` as latent_set_id."""
        msg = pb.RegisterLatentSetRequest(
            name=name, latents=convert.latents_to_pb(latents), metadata_json=_metadata_json(metadata)
        )
        return convert.artifact_from_pb(self._call("RegisterLatentSet", msg))

    def register_prompt_set(
        self, name: str, prompts: Sequence[PromptLike], metadata: Mapping[str, Any] | None = None
    ) -> Artifact:
        """Register a prompt set (e.g. a mean attribution baseline's reference set); use `.id`."""
        msg = pb.RegisterPromptSetRequest(
            name=name, prompts=[convert.prompt_to_pb(as_prompt(p)) for p in prompts],
            metadata_json=_metadata_json(metadata),
        )
        return convert.artifact_from_pb(self._call("RegisterPromptSet", msg))

    def artifact(self, artifact_id: str) -> Artifact:
        """One artifact with its payload."""
        return convert.artifact_from_pb(self._call("GetArtifact", pb.GetArtifactRequest(id=artifact_id)))

    def artifacts(self, kind: str | None = None) -> list[Artifact]:
        """Registered artifacts (newest first, without payloads), optionally 'direction' or 'latent_set'."""
        resp = self._call("ListArtifacts", pb.ListArtifactsRequest(kind=kind or ""))
        return [convert.artifact_from_pb(a) for a in resp.artifacts]


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    """Metadata as the JSON object the server expects."""
    return json.dumps(dict(metadata or {}), sort_keys=True)
