"""Every AuditService call as data: the RPC's name, its request message, and how its reply becomes
the typed result.

`AuditClient` (blocking) and `AsyncAuditClient` (asyncio) differ only in how they send a call and
wait for the reply. Everything else (normalising prompts, per-call defaults, validation, building
the protobuf request, converting the reply) is written once here, so the two clients cannot drift.
All functions are pure: they raise `InvalidRequest` for bad arguments before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
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

T = TypeVar("T")

PromptLike = Any  # str | tuple[ChatMessage, ...] | list[dict] | Request
"""A prompt: raw text, chat messages (ChatMessage or {'role','content'} dicts), or a full Request."""


@dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC: `method` on the AuditService stub, its `request` message, and `unpack`, which turns
    the reply (of a streaming RPC: each streamed message) into the client's result."""

    method: str
    request: Any
    unpack: Callable[[Any], T]


# ---------------------------------------------------------------------------- argument normalisation

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
    `stop_token_ids=`, `ignore_eos=`, or a whole `sampling=SamplingParams(...)`) given alongside are per-call
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


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    """Metadata as the JSON object the server expects."""
    return json.dumps(dict(metadata or {}), sort_keys=True)


# ---------------------------------------------------------------------------- the calls
# One per client method, with its name and arguments (the client method's docstring says what it does).


def get_info() -> Call[tuple[ModelInfo, Limits]]:
    return Call("GetInfo", pb.GetInfoRequest(), lambda m: (convert.model_info_from_pb(m), convert.limits_from_pb(m.limits)))


def generate(prompts: Any, interventions: Sequence[Any], sampling: dict[str, Any]) -> Call[list[Completion]]:
    msg = convert.generate_request_to_pb(as_requests(prompts, interventions, **sampling))
    return Call("Generate", msg, lambda r: [convert.completion_from_pb(c) for c in r.completions])


def generate_stream(prompts: Any, interventions: Sequence[Any], sampling: dict[str, Any]) -> Call[StreamEvent]:
    return Call("GenerateStream", generate(prompts, interventions, sampling).request, convert.stream_event_from_pb)


def score(prompts: Any, token_ids: Sequence[int], top_k: int, full: bool, interventions: Sequence[Any]) -> Call[list[ScoreResult]]:
    msg = convert.score_request_to_pb(as_requests(prompts, interventions), token_ids, top_k, full)
    return Call("Score", msg, lambda r: [convert.score_result_from_pb(x) for x in r.results])


def p_token(prompts: Any, token_id: int, interventions: Sequence[Any]) -> Call[np.ndarray]:
    s = score(prompts, [token_id], 0, False, interventions)
    return Call(s.method, s.request, lambda r: np.exp(np.array([float(x.logprobs[0]) for x in s.unpack(r)], dtype=np.float64)))


def tokenize(prompts: Any, raw: bool) -> Call[list[list[int]]]:
    return Call("Tokenize", convert.tokenize_request_to_pb(as_prompts(prompts), raw), lambda r: [list(x.token_ids) for x in r.results])


def sae_rows(
    layers: Sequence[int] | None, latents: Mapping[int, Sequence[int]] | None,
    direction: Sequence[float] | np.ndarray | None, direction_id: str | None, top_k: int, rank_by: RankBy,
    decoder: bool, encoder: bool,
) -> Call[dict[int, SAERows]]:
    msg = convert.sae_rows_request_to_pb(layers, latents, direction, direction_id, top_k, rank_by, decoder, encoder)
    return Call("SAERows", msg, convert.sae_rows_from_pb)


def encode(prompts: Any, layers: Sequence[int] | None, top_k: int, latents: Mapping[int, Sequence[int]] | None,
           interventions: Sequence[Any]) -> Call[list[EncodeResult]]:
    msg = convert.encode_request_to_pb(as_requests(prompts, interventions), layers, top_k, latents)
    return Call("Encode", msg, lambda r: [convert.encode_result_from_pb(x) for x in r.results])


def residuals(prompts: Any, layers: Sequence[int] | None, positions: Sequence[int], interventions: Sequence[Any]) -> Call[np.ndarray]:
    msg = convert.residuals_request_to_pb(as_requests(prompts, interventions), layers, positions)
    return Call("Residuals", msg, lambda r: convert.tensor_from_pb(r.residuals, "residuals"))


def loss(prompts: Any, completions: Sequence[str | None], interventions: Sequence[Any]) -> Call[list[LossResult]]:
    msg = convert.loss_request_to_pb(as_requests(prompts, interventions), completions)
    return Call("Loss", msg, lambda r: [convert.loss_result_from_pb(x) for x in r.results])


def attribute(prompts: Any, metric: LogitDiff | LogProb | Sequence[LogitDiff | LogProb] | None,
              options: dict[str, Any]) -> Call[AttributionResponse]:
    if isinstance(prompts, AttributionRequest):
        req = prompts
    else:
        if metric is None:
            raise ValueError("metric is required (LogitDiff or LogProb)")
        try:
            req = attribution_request(as_prompts(prompts), metric, **options)
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc, "request")) from None
    return Call("Attribute", convert.attribute_request_to_pb(req), convert.attribute_response_from_pb)


def register_direction(name: str, values: Sequence[float] | np.ndarray, layer: int, metadata: Mapping[str, Any] | None) -> Call[Artifact]:
    msg = pb.RegisterDirectionRequest(name=name, values=[float(v) for v in np.asarray(values, dtype=np.float32).ravel()],
                                      layer=layer, metadata_json=_metadata_json(metadata))
    return Call("RegisterDirection", msg, convert.artifact_from_pb)


def register_latent_set(name: str, latents: Mapping[int, Sequence[int]], metadata: Mapping[str, Any] | None) -> Call[Artifact]:
    msg = pb.RegisterLatentSetRequest(name=name, latents=convert.latents_to_pb(latents), metadata_json=_metadata_json(metadata))
    return Call("RegisterLatentSet", msg, convert.artifact_from_pb)


def register_prompt_set(name: str, prompts: Sequence[Any], metadata: Mapping[str, Any] | None) -> Call[Artifact]:
    msg = pb.RegisterPromptSetRequest(name=name, prompts=[convert.prompt_to_pb(as_prompt(p)) for p in prompts],
                                      metadata_json=_metadata_json(metadata))
    return Call("RegisterPromptSet", msg, convert.artifact_from_pb)


def artifact(artifact_id: str) -> Call[Artifact]:
    return Call("GetArtifact", pb.GetArtifactRequest(id=artifact_id), convert.artifact_from_pb)


def artifacts(kind: str | None) -> Call[list[Artifact]]:
    return Call("ListArtifacts", pb.ListArtifactsRequest(kind=kind or ""), lambda r: [convert.artifact_from_pb(a) for a in r.artifacts])
