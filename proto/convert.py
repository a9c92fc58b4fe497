"""Conversion between the pydantic/dataclass vocabulary (`audit.spec`, `audit.engine`) and protobuf.

Torch-free: the thin client and the server share it. Conversion *from* protobuf validates; a
pydantic ValidationError becomes `InvalidRequest` naming the field (e.g. `items[2].sampling.top_p`).
Also home to the few plain records the API has beyond `audit.engine` (artifacts, stream events,
limits), so client and server agree on them without either importing the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..audit.attribution import (
    AttributionItem,
    AttributionRequest,
    AttributionResponse,
    AttributionResult,
    AttributionScope,
    Baseline,
    LayerAttribution,
    LogitDiff,
    LogProb,
)
from ..audit.codec import reject_json_constant
from ..audit.engine import (
    Completion,
    EncodeResult,
    LayerActivations,
    Limits,
    LossResult,
    ModelInfo,
    RankBy,
    SAEInfo,
    SAERows,
    ScoreResult,
    StreamEvent,
)
from ..audit.errors import InvalidRequest, validation_message
from ..audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ChatMessage,
    ClampLatents,
    Intervention,
    Prompt,
    Request,
    SamplingParams,
    ScaleLatents,
    TokenScope,
)
from .generated import audit_pb2 as pb

DEFAULT_MAX_NEW_TOKENS = 64

# ---------------------------------------------------------------- plain records


@dataclass
class Artifact:
    """A registered direction, latent set or prompt set (payload absent in listings)."""

    id: str
    kind: str  # "direction" | "latent_set"
    name: str
    created_at: float
    direction: np.ndarray | None = None  # [d_model] float32
    direction_layer: int = 0
    latents: dict[int, list[int]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source_job_id: str = ""
    prompts: list[Prompt] | None = None  # kind "prompt_set"


# ---------------------------------------------------------------- helpers


def _build(cls: Any, where: str, **kwargs: Any) -> Any:
    """Construct a pydantic model, turning ValidationError into InvalidRequest naming `where`."""
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, where)) from None


def parse_metadata(text: str, where: str = "metadata_json") -> dict[str, Any]:
    """Parse a metadata JSON object ('' = {})."""
    if not text:
        return {}
    try:
        value = json.loads(text, parse_constant=lambda c: reject_json_constant(c, where))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: must be a JSON object")
    return value


# ---------------------------------------------------------------- tensors


def tensor_to_pb(arr: np.ndarray) -> pb.Tensor:
    """A float32 little-endian row-major Tensor message."""
    a = np.ascontiguousarray(np.asarray(arr, dtype="<f4"))
    return pb.Tensor(shape=list(a.shape), dtype="float32", data=a.tobytes())


def tensor_from_pb(msg: pb.Tensor, where: str = "tensor") -> np.ndarray:
    """A numpy array from a Tensor message (validates dtype and size)."""
    dtype = msg.dtype or "float32"
    if dtype not in ("float32", "float16", "int32", "int64"):
        raise InvalidRequest(f"{where}.dtype: unsupported dtype {dtype!r}")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    shape = tuple(int(s) for s in msg.shape)
    n = int(np.prod(shape)) if shape else 1
    if not shape and not msg.data:
        return np.zeros((0,), dtype=np.dtype(dtype))
    if any(s < 0 for s in shape) or n * np_dtype.itemsize != len(msg.data):
        raise InvalidRequest(f"{where}: {len(msg.data)} bytes do not match shape {shape} of {dtype}")
    return np.frombuffer(msg.data, dtype=np_dtype).reshape(shape).astype(np.dtype(dtype))


# ---------------------------------------------------------------- prompts


def prompt_to_pb(prompt: Prompt) -> pb.Prompt:
    """Raw text or chat messages as a Prompt message."""
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    return pb.Prompt(
        messages=pb.Messages(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in prompt])
    )


def prompt_from_pb(msg: pb.Prompt, where: str = "prompt") -> Prompt:
    """A Prompt from its message; an unset, empty text or empty message list is rejected."""
    kind = msg.WhichOneof("kind")
    if kind == "text":
        if not msg.text:
            raise InvalidRequest(f"{where}.text: empty prompt")
        return str(msg.text)
    if kind == "messages":
        if not msg.messages.messages:
            raise InvalidRequest(f"{where}.messages: empty message list")
        out = []
        for i, m in enumerate(msg.messages.messages):
            out.append(_build(ChatMessage, f"{where}.messages[{i}]", role=m.role, content=m.content))
        if not any(m.content for m in out):
            raise InvalidRequest(f"{where}.messages: every message is empty")
        return tuple(out)
    raise InvalidRequest(f"{where}: empty prompt (set text or messages)")


# ---------------------------------------------------------------- scopes and interventions

_SCOPE_TO_PB = {
    "all": pb.TokenScope.ALL,
    "prompt": pb.TokenScope.PROMPT,
    "generated": pb.TokenScope.GENERATED,
    "last_n_prompt": pb.TokenScope.LAST_N_PROMPT,
    "positions": pb.TokenScope.POSITIONS,
}
_SCOPE_FROM_PB = {v: k for k, v in _SCOPE_TO_PB.items()}


def scope_to_pb(scope: TokenScope) -> pb.TokenScope:
    """TokenScope -> message."""
    return pb.TokenScope(kind=_SCOPE_TO_PB[scope.kind], n=scope.n, positions=list(scope.positions))


def scope_from_pb(msg: pb.TokenScope, where: str = "scope") -> TokenScope:
    """Message -> TokenScope (validated)."""
    kind = _SCOPE_FROM_PB.get(msg.kind)
    if kind is None:
        raise InvalidRequest(f"{where}.kind: unknown scope kind {msg.kind}")
    return _build(TokenScope, where, kind=kind, n=msg.n, positions=tuple(msg.positions))  # type: ignore[no-any-return]


def _layer_latents_to_pb(latents: Mapping[int, Sequence[int]], values: Mapping[int, Sequence[float]] | None = None) -> list[pb.LayerLatents]:
    out = []
    for layer in sorted(latents):
        vals = list(values.get(layer, ())) if values else []
        out.append(pb.LayerLatents(layer=int(layer), latents=[int(i) for i in latents[layer]], values=vals))
    return out


def _layer_latents_from_pb(
    entries: Iterable[pb.LayerLatents], where: str
) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[float, ...]]]:
    """Merge repeated LayerLatents (same layer may repeat) into latents/values dicts."""
    latents: dict[int, list[int]] = {}
    values: dict[int, list[float]] = {}
    for j, e in enumerate(entries):
        if e.values and len(e.values) != len(e.latents):
            raise InvalidRequest(f"{where}[{j}].values: {len(e.values)} values for {len(e.latents)} latents")
        latents.setdefault(int(e.layer), []).extend(int(i) for i in e.latents)
        if e.values:
            values.setdefault(int(e.layer), []).extend(float(v) for v in e.values)
    for layer, vals in values.items():
        if len(vals) != len(latents[layer]):
            raise InvalidRequest(f"{where}: layer {layer} mixes entries with and without values")
    return {k: tuple(v) for k, v in latents.items()}, {k: tuple(v) for k, v in values.items()}


def intervention_to_pb(iv: Intervention) -> pb.Intervention:
    """An intervention as a message."""
    scope = scope_to_pb(iv.scope)
    if isinstance(iv, AblateLatents):
        return pb.Intervention(
            ablate_latents=pb.AblateLatents(
                latents=_layer_latents_to_pb(iv.latents), latent_set_id=iv.latent_set_id or ""
            ),
            scope=scope,
        )
    if isinstance(iv, ClampLatents):
        return pb.Intervention(
            clamp_latents=pb.ClampLatents(
                latents=_layer_latents_to_pb(iv.latents, iv.values),
                value=iv.value,
                latent_set_id=iv.latent_set_id or "",
            ),
            scope=scope,
        )
    if isinstance(iv, ScaleLatents):
        return pb.Intervention(
            scale_latents=pb.ScaleLatents(
                latents=_layer_latents_to_pb(iv.latents), factor=iv.factor, latent_set_id=iv.latent_set_id or ""
            ),
            scope=scope,
        )
    if isinstance(iv, AblateDirection):
        ref = pb.DirectionRef(values=list(iv.direction), direction_id=iv.direction_id or "")
        return pb.Intervention(ablate_direction=pb.AblateDirection(direction=ref, layers=list(iv.layers)), scope=scope)
    if isinstance(iv, AddDirection):
        ref = pb.DirectionRef(values=list(iv.direction), direction_id=iv.direction_id or "")
        return pb.Intervention(
            add_direction=pb.AddDirection(direction=ref, layer=iv.layer, coefficient=iv.coefficient), scope=scope
        )
    raise TypeError(f"not an intervention: {iv!r}")


def intervention_from_pb(msg: pb.Intervention, where: str = "intervention") -> Intervention:
    """A validated intervention from its message (InvalidRequest names the field)."""
    kind = msg.WhichOneof("kind")
    scope = scope_from_pb(msg.scope, f"{where}.scope")
    if kind == "ablate_latents":
        m = msg.ablate_latents
        latents, values = _layer_latents_from_pb(m.latents, f"{where}.ablate_latents.latents")
        if values:
            raise InvalidRequest(f"{where}.ablate_latents.latents.values: only clamp_latents takes values")
        return _build(  # type: ignore[no-any-return]
            AblateLatents, f"{where}.ablate_latents", latents=latents,
            latent_set_id=m.latent_set_id or None, scope=scope,
        )
    if kind == "clamp_latents":
        m = msg.clamp_latents
        latents, values = _layer_latents_from_pb(m.latents, f"{where}.clamp_latents.latents")
        return _build(  # type: ignore[no-any-return]
            ClampLatents, f"{where}.clamp_latents", latents=latents, values=values, value=m.value,
            latent_set_id=m.latent_set_id or None, scope=scope,
        )
    if kind == "scale_latents":
        m = msg.scale_latents
        latents, values = _layer_latents_from_pb(m.latents, f"{where}.scale_latents.latents")
        if values:
            raise InvalidRequest(f"{where}.scale_latents.latents.values: only clamp_latents takes values")
        if not m.HasField("factor"):
            raise InvalidRequest(f"{where}.scale_latents.factor must be set (0 ablates; it is not a default)")
        return _build(  # type: ignore[no-any-return]
            ScaleLatents, f"{where}.scale_latents", latents=latents, factor=m.factor,
            latent_set_id=m.latent_set_id or None, scope=scope,
        )
    if kind == "ablate_direction":
        m = msg.ablate_direction
        return _build(  # type: ignore[no-any-return]
            AblateDirection, f"{where}.ablate_direction", direction=tuple(m.direction.values),
            direction_id=m.direction.direction_id or None, layers=tuple(m.layers), scope=scope,
        )
    if kind == "add_direction":
        m = msg.add_direction
        return _build(  # type: ignore[no-any-return]
            AddDirection, f"{where}.add_direction", direction=tuple(m.direction.values),
            direction_id=m.direction.direction_id or None, layer=m.layer, coefficient=m.coefficient,
            scope=scope,
        )
    raise InvalidRequest(f"{where}: no intervention kind set")


# ---------------------------------------------------------------- sampling and requests


def sampling_to_pb(sp: SamplingParams) -> pb.SamplingParams:
    """SamplingParams -> message; a max_new_tokens left at its default is sent as 0 (the server's default)."""
    return pb.SamplingParams(
        max_new_tokens=sp.max_new_tokens if "max_new_tokens" in sp.model_fields_set else 0,
        temperature=sp.temperature,
        top_p=sp.top_p,
        seed=sp.seed or 0,
        has_seed=sp.seed is not None,
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
    )


def sampling_from_pb(
    msg: pb.SamplingParams, where: str = "sampling", default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> SamplingParams:
    """Message -> SamplingParams; 0 means the server default (max_new_tokens) or off (top_p)."""
    return _build(  # type: ignore[no-any-return]
        SamplingParams,
        where,
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,
        seed=int(msg.seed) if msg.has_seed else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
    )


def _interventions_from_pb(entries: Iterable[pb.Intervention], where: str) -> tuple[Intervention, ...]:
    return tuple(intervention_from_pb(iv, f"{where}.interventions[{k}]") for k, iv in enumerate(entries))


def request_from_item(
    item: pb.GenerateItem | pb.ScoreItem | pb.LossItem,
    where: str,
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Request:
    """A Request from a GenerateItem / ScoreItem / LossItem message."""
    prompt = prompt_from_pb(item.prompt, f"{where}.prompt")
    ivs = _interventions_from_pb(item.interventions, where)
    if isinstance(item, pb.GenerateItem):
        sp = sampling_from_pb(item.sampling, f"{where}.sampling", default_max_new_tokens)
        return _build(Request, where, prompt=prompt, interventions=ivs, sampling=sp)  # type: ignore[no-any-return]
    return _build(Request, where, prompt=prompt, interventions=ivs)  # type: ignore[no-any-return]


def requests_from_pb(
    items: Sequence[Any],
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[Request]:
    """Every item of a request as a Request (raises InvalidRequest naming `items[i]...`)."""
    if not items:
        raise InvalidRequest("items: empty request")
    return [request_from_item(it, f"items[{i}]", default_max_new_tokens) for i, it in enumerate(items)]


def generate_item_to_pb(r: Request) -> pb.GenerateItem:
    """Request -> GenerateItem."""
    return pb.GenerateItem(
        prompt=prompt_to_pb(r.prompt),
        interventions=[intervention_to_pb(iv) for iv in r.interventions],
        sampling=sampling_to_pb(r.sampling),
    )


def score_item_to_pb(r: Request) -> pb.ScoreItem:
    """Request -> ScoreItem (sampling is not sent)."""
    return pb.ScoreItem(prompt=prompt_to_pb(r.prompt), interventions=[intervention_to_pb(iv) for iv in r.interventions])


def generate_request_to_pb(requests: Sequence[Request]) -> pb.GenerateRequest:
    return pb.GenerateRequest(items=[generate_item_to_pb(r) for r in requests])


def score_request_to_pb(
    requests: Sequence[Request], token_ids: Sequence[int], top_k: int = 0, return_full_logprobs: bool = False
) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        items=[score_item_to_pb(r) for r in requests],
        token_ids=[int(t) for t in token_ids],
        top_k=top_k,
        return_full_logprobs=return_full_logprobs,
    )


def encode_request_to_pb(
    requests: Sequence[Request],
    layers: Sequence[int] | None = None,
    top_k: int = 16,
    latents: Mapping[int, Sequence[int]] | None = None,
) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        items=[score_item_to_pb(r) for r in requests],
        layers=list(layers or ()),
        top_k=top_k,
        latents=_layer_latents_to_pb(latents or {}),
    )


def encode_latents_from_pb(msg: pb.EncodeRequest) -> dict[int, list[int]] | None:
    """The chosen-latents mode of an EncodeRequest (None in top-k mode)."""
    if not msg.latents:
        return None
    latents, values = _layer_latents_from_pb(msg.latents, "latents")
    if values:
        raise InvalidRequest("latents.values: Encode takes no values")
    return {k: list(v) for k, v in latents.items()}


def residuals_request_to_pb(
    requests: Sequence[Request], layers: Sequence[int] | None = None, positions: Sequence[int] = (-1,)
) -> pb.ResidualsRequest:
    return pb.ResidualsRequest(
        items=[score_item_to_pb(r) for r in requests], layers=list(layers or ()), positions=list(positions)
    )


def loss_request_to_pb(requests: Sequence[Request], completions: Sequence[str | None]) -> pb.LossRequest:
    if len(completions) != len(requests):
        raise InvalidRequest("completions must align with items")
    return pb.LossRequest(
        items=[
            pb.LossItem(
                prompt=prompt_to_pb(r.prompt),
                completion=c or "",
                interventions=[intervention_to_pb(iv) for iv in r.interventions],
            )
            for r, c in zip(requests, completions, strict=True)
        ]
    )


# ---------------------------------------------------------------- results


def completion_to_pb(c: Completion) -> pb.Completion:
    return pb.Completion(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens)


def completion_from_pb(m: pb.Completion) -> Completion:
    return Completion(text=m.text, token_ids=list(m.token_ids), finish_reason=m.finish_reason, prompt_tokens=m.prompt_tokens)


def stream_event_to_pb(ev: Any) -> pb.GenerateStreamEvent:
    """An engine stream event (anything with index/text_delta/token_ids/finished/finish_reason)."""
    return pb.GenerateStreamEvent(
        index=ev.index,
        text_delta=ev.text_delta,
        token_ids=[int(t) for t in ev.token_ids],
        finished=ev.finished,
        finish_reason=ev.finish_reason,
    )


def stream_event_from_pb(m: pb.GenerateStreamEvent) -> StreamEvent:
    return StreamEvent(m.index, m.text_delta, list(m.token_ids), m.finished, m.finish_reason)


def score_result_to_pb(r: ScoreResult) -> pb.ScoreResult:
    msg = pb.ScoreResult(logprobs=[float(x) for x in np.asarray(r.logprobs).ravel()])
    if r.top_token_ids is not None and r.top_logprobs is not None:
        msg.top_token_ids.extend(int(x) for x in np.asarray(r.top_token_ids).ravel())
        msg.top_logprobs.extend(float(x) for x in np.asarray(r.top_logprobs).ravel())
    if r.full_logprobs is not None:
        msg.full_logprobs.CopyFrom(tensor_to_pb(r.full_logprobs))
    return msg


def score_result_from_pb(m: pb.ScoreResult) -> ScoreResult:
    return ScoreResult(
        logprobs=np.asarray(m.logprobs, dtype=np.float32),
        top_token_ids=np.asarray(m.top_token_ids, dtype=np.int64) if m.top_token_ids else None,
        top_logprobs=np.asarray(m.top_logprobs, dtype=np.float32) if m.top_token_ids else None,
        full_logprobs=tensor_from_pb(m.full_logprobs, "full_logprobs") if m.HasField("full_logprobs") else None,
    )


def encode_result_to_pb(r: EncodeResult) -> pb.EncodeResult:
    msg = pb.EncodeResult(token_ids=[int(t) for t in r.token_ids], tokens=list(r.tokens))
    for layer in sorted(r.layers):
        la = r.layers[layer]
        out = pb.LayerActivations(layer=layer)
        if la.values is not None and la.latents is not None:
            out.values.CopyFrom(tensor_to_pb(la.values))
            out.latents.extend(int(i) for i in np.asarray(la.latents).ravel())
        else:
            for inds, vals in zip(la.top_indices or [], la.top_values or [], strict=True):
                out.tokens.append(
                    pb.TokenLatents(
                        indices=[int(i) for i in np.asarray(inds).ravel()],
                        values=[float(v) for v in np.asarray(vals).ravel()],
                    )
                )
        msg.layers.append(out)
    return msg


def encode_result_from_pb(m: pb.EncodeResult) -> EncodeResult:
    layers: dict[int, LayerActivations] = {}
    for la in m.layers:
        if la.HasField("values"):
            layers[la.layer] = LayerActivations(
                la.layer,
                latents=np.asarray(la.latents, dtype=np.int64),
                values=tensor_from_pb(la.values, "values"),
            )
        else:
            layers[la.layer] = LayerActivations(
                la.layer,
                top_indices=[np.asarray(t.indices, dtype=np.int64) for t in la.tokens],
                top_values=[np.asarray(t.values, dtype=np.float32) for t in la.tokens],
            )
    return EncodeResult(token_ids=list(m.token_ids), tokens=list(m.tokens), layers=layers)


def loss_result_to_pb(r: LossResult) -> pb.LossResult:
    return pb.LossResult(loss=r.loss, n_tokens=r.n_tokens)


def loss_result_from_pb(m: pb.LossResult) -> LossResult:
    return LossResult(loss=float(m.loss), n_tokens=int(m.n_tokens))


# ---------------------------------------------------------------- info


def limits_to_pb(lim: Limits) -> pb.Limits:
    return pb.Limits(
        max_prompt_tokens=lim.max_prompt_tokens,
        max_new_tokens=lim.max_new_tokens,
        max_batch_items=lim.max_batch_items,
        max_latents_per_request=lim.max_latents_per_request,
        max_concurrent_jobs=lim.max_concurrent_jobs,
        max_attribution_steps=lim.max_attribution_steps,
    )


def limits_from_pb(m: pb.Limits) -> Limits:
    # not re-validated: what the server reports is what it enforces
    return Limits.model_construct(max_prompt_tokens=m.max_prompt_tokens, max_new_tokens=m.max_new_tokens,
                  max_batch_items=m.max_batch_items, max_latents_per_request=m.max_latents_per_request,
                  max_concurrent_jobs=m.max_concurrent_jobs,
                  max_attribution_steps=m.max_attribution_steps or Limits().max_attribution_steps)


def model_info_to_pb(info: ModelInfo, limits: Limits | None = None, server_version: str = "") -> pb.ModelInfo:
    msg = pb.ModelInfo(
        model=info.model,
        architecture=info.architecture,
        n_layers=info.n_layers,
        d_model=info.d_model,
        vocab_size=info.vocab_size,
        saes=[
            pb.SAEInfo(layer=s.layer, source=s.source, architecture=s.architecture, d_in=s.d_in, d_sae=s.d_sae,
                       separable=s.separable)
            for s in info.saes
        ],
        bos_token_id=info.bos_token_id,
        eos_token_ids=list(info.eos_token_ids),
        pad_token_id=info.pad_token_id,
        n_post_instruction_tokens=info.n_post_instruction_tokens,
        engine=info.engine,
        dtype=info.dtype,
        special_token_ids=dict(info.special_token_ids),
        server_version=server_version,
        batch_invariant=info.batch_invariant,
    )
    if limits is not None:
        msg.limits.CopyFrom(limits_to_pb(limits))
    return msg


def model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=m.model,
        architecture=m.architecture,
        n_layers=m.n_layers,
        d_model=m.d_model,
        vocab_size=m.vocab_size,
        saes=tuple(SAEInfo(s.layer, s.source, s.architecture, s.d_in, s.d_sae, s.separable) for s in m.saes),
        bos_token_id=m.bos_token_id,
        eos_token_ids=tuple(m.eos_token_ids),
        pad_token_id=m.pad_token_id,
        n_post_instruction_tokens=m.n_post_instruction_tokens,
        engine=m.engine,
        dtype=m.dtype,
        special_token_ids=dict(m.special_token_ids),
        batch_invariant=m.batch_invariant,
    )


# ---------------------------------------------------------------- tokenize / SAE rows


def tokenize_request_to_pb(prompts: Sequence[Prompt], raw: bool = False) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(prompts=[prompt_to_pb(p) for p in prompts], raw=raw)


def tokenize_prompts_from_pb(msg: pb.TokenizeRequest) -> list[Prompt]:
    return [prompt_from_pb(p, f"prompts[{i}]") for i, p in enumerate(msg.prompts)]


def sae_rows_request_to_pb(
    layers: Sequence[int] | None, latents: Mapping[int, Sequence[int]] | None,
    direction: Sequence[float] | np.ndarray | None, direction_id: str | None, top_k: int, rank_by: RankBy,
    decoder: bool, encoder: bool,
) -> pb.SAERowsRequest:
    ref = None
    if direction is not None or direction_id:
        vals = [] if direction is None else [float(x) for x in np.asarray(direction, dtype=np.float32).ravel()]
        ref = pb.DirectionRef(values=vals, direction_id=direction_id or "")
    return pb.SAERowsRequest(
        layers=[int(ly) for ly in layers or ()], latents=latents_to_pb(latents) if latents else [], direction=ref,
        top_k=int(top_k), abs_cosine=rank_by == "abs_cosine", decoder=decoder, encoder=encoder,
    )


def sae_rows_to_pb(rows: Mapping[int, SAERows]) -> pb.SAERowsResponse:
    out = []
    for ly in sorted(rows):
        r = rows[ly]
        m = pb.SAERows(layer=int(ly), latents=[int(i) for i in r.latents],
                       cosines=[] if r.cosines is None else [float(c) for c in r.cosines])
        if r.decoder is not None:
            m.decoder.CopyFrom(tensor_to_pb(r.decoder))
        if r.encoder is not None:
            m.encoder.CopyFrom(tensor_to_pb(r.encoder))
        out.append(m)
    return pb.SAERowsResponse(layers=out)


def sae_rows_from_pb(msg: pb.SAERowsResponse) -> dict[int, SAERows]:
    out = {}
    for m in msg.layers:
        out[int(m.layer)] = SAERows(
            int(m.layer), np.asarray(m.latents, dtype=np.int64),
            np.asarray(m.cosines, dtype=np.float32) if len(m.cosines) else None,
            tensor_from_pb(m.decoder, "decoder") if m.HasField("decoder") else None,
            tensor_from_pb(m.encoder, "encoder") if m.HasField("encoder") else None,
        )
    return out


# ---------------------------------------------------------------- artifacts


def latents_to_pb(latents: Mapping[int, Sequence[int]]) -> list[pb.LayerLatents]:
    """A latent set (layer -> ids) as LayerLatents messages."""
    return _layer_latents_to_pb(latents)


def latents_from_pb(entries: Iterable[pb.LayerLatents], where: str = "latents") -> dict[int, list[int]]:
    """LayerLatents messages as a latent set (values are not allowed)."""
    latents, values = _layer_latents_from_pb(entries, where)
    if values:
        raise InvalidRequest(f"{where}.values: a latent set has no values")
    return {k: list(v) for k, v in latents.items()}


def artifact_to_pb(a: Artifact, with_payload: bool = True) -> pb.Artifact:
    msg = pb.Artifact(
        id=a.id,
        kind=a.kind,
        name=a.name,
        created_at=a.created_at,
        direction_layer=a.direction_layer,
        metadata_json=json.dumps(a.metadata, sort_keys=True),
        source_job_id=a.source_job_id,
    )
    if with_payload:
        if a.direction is not None:
            msg.direction.extend(float(x) for x in np.asarray(a.direction, dtype=np.float32).ravel())
        if a.latents is not None:
            msg.latents.extend(latents_to_pb(a.latents))
        if a.prompts is not None:
            msg.prompts.extend(prompt_to_pb(p) for p in a.prompts)
    return msg


def artifact_from_pb(m: pb.Artifact) -> Artifact:
    return Artifact(
        id=m.id,
        kind=m.kind,
        name=m.name,
        created_at=m.created_at,
        direction=np.asarray(m.direction, dtype=np.float32) if m.direction else None,
        direction_layer=m.direction_layer,
        latents=latents_from_pb(m.latents) if m.latents else None,
        metadata=json.loads(m.metadata_json) if m.metadata_json else {},
        source_job_id=m.source_job_id,
        prompts=[prompt_from_pb(p, f"prompts[{i}]") for i, p in enumerate(m.prompts)] if m.prompts else None,
    )


# ---------------------------------------------------------------- attribution

_ASCOPE_TO_PB = {
    "after_bos": pb.AttributionScope.AFTER_BOS,
    "all": pb.AttributionScope.ALL,
    "last_n": pb.AttributionScope.LAST_N,
    "positions": pb.AttributionScope.POSITIONS,
}
_ASCOPE_FROM_PB = {v: k for k, v in _ASCOPE_TO_PB.items()}
_BASELINE_TO_PB = {
    "zero": pb.AttributionBaseline.ZERO,
    "mean": pb.AttributionBaseline.MEAN,
    "interventions": pb.AttributionBaseline.INTERVENTIONS,
}
_BASELINE_FROM_PB = {v: k for k, v in _BASELINE_TO_PB.items()}


def metric_to_pb(m: LogitDiff | LogProb) -> pb.AttributionMetric:
    """An attribution metric as a message."""
    if isinstance(m, LogitDiff):
        return pb.AttributionMetric(logit_diff=pb.LogitDiffMetric(positive=m.positive, negative=m.negative))
    return pb.AttributionMetric(logprob=pb.LogProbMetric(token=m.token))


def metric_from_pb(msg: pb.AttributionMetric, where: str) -> LogitDiff | LogProb | None:
    """Message -> metric (None when unset)."""
    kind = msg.WhichOneof("kind")
    if kind == "logit_diff":
        return _build(LogitDiff, where, positive=msg.logit_diff.positive, negative=msg.logit_diff.negative)  # type: ignore[no-any-return]
    if kind == "logprob":
        return _build(LogProb, where, token=msg.logprob.token)  # type: ignore[no-any-return]
    return None


def attribute_request_to_pb(req: AttributionRequest) -> pb.AttributeRequest:
    """AttributionRequest -> message."""
    items = []
    for it in req.items:
        item = pb.AttributeItem(prompt=prompt_to_pb(it.prompt))
        if it.metric is not None:
            item.metric.CopyFrom(metric_to_pb(it.metric))
        items.append(item)
    msg = pb.AttributeRequest(
        items=items, method=req.method, n_steps=req.n_steps, rule=req.rule, layers=list(req.layers),
        scope=pb.AttributionScope(kind=_ASCOPE_TO_PB[req.scope.kind], n=req.scope.n, positions=list(req.scope.positions)),
        baseline=pb.AttributionBaseline(
            kind=_BASELINE_TO_PB[req.baseline.kind], reference_set_id=req.baseline.reference_set_id,
            interventions=[intervention_to_pb(iv) for iv in req.baseline.interventions],
        ),
        top_k=req.top_k, latents=_layer_latents_to_pb(req.latents), per_position=req.per_position,
    )
    if req.top_k == 0 and not req.latents:
        raise InvalidRequest("top_k: 0 and no latents chosen (nothing to return)")
    if req.metric is not None:
        msg.metric.CopyFrom(metric_to_pb(req.metric))
    return msg


def attribute_request_from_pb(msg: pb.AttributeRequest) -> AttributionRequest:
    """Message -> AttributionRequest (validated; errors name the field)."""
    if not msg.items:
        raise InvalidRequest("items: empty request")
    items = []
    for i, it in enumerate(msg.items):
        where = f"items[{i}]"
        prompt = prompt_from_pb(it.prompt, f"{where}.prompt")
        metric = metric_from_pb(it.metric, f"{where}.metric") if it.HasField("metric") else None
        items.append(_build(AttributionItem, where, prompt=prompt, metric=metric))
    scope_kind = _ASCOPE_FROM_PB.get(msg.scope.kind)
    if scope_kind is None:
        raise InvalidRequest(f"scope.kind: unknown attribution scope kind {msg.scope.kind}")
    scope = _build(AttributionScope, "scope", kind=scope_kind, n=msg.scope.n, positions=tuple(msg.scope.positions))
    base_kind = _BASELINE_FROM_PB.get(msg.baseline.kind)
    if base_kind is None:
        raise InvalidRequest(f"baseline.kind: unknown baseline kind {msg.baseline.kind}")
    if base_kind == "mean" and not msg.baseline.reference_set_id:
        raise InvalidRequest("baseline.reference_set_id: required for a mean baseline (a registered prompt set)")
    if base_kind == "interventions" and not msg.baseline.interventions:
        raise InvalidRequest("baseline.interventions: empty (an interventions baseline needs at least one)")
    baseline = _build(
        Baseline, "baseline", kind=base_kind, reference_set_id=msg.baseline.reference_set_id,
        interventions=_interventions_from_pb(msg.baseline.interventions, "baseline"),
    )
    latents, values = _layer_latents_from_pb(msg.latents, "latents")
    if values:
        raise InvalidRequest("latents.values: chosen latents have no values")
    metric = metric_from_pb(msg.metric, "metric") if msg.HasField("metric") else None
    if msg.top_k < 0:
        raise InvalidRequest(f"top_k: must be >= 0, got {msg.top_k}")
    top_k = msg.top_k or (0 if latents else AttributionRequest.model_fields["top_k"].default)
    return _build(  # type: ignore[no-any-return]
        AttributionRequest, "request", items=tuple(items), metric=metric, method=msg.method or "ig",
        n_steps=msg.n_steps, rule=msg.rule or "left", baseline=baseline, layers=tuple(msg.layers), scope=scope,
        top_k=top_k, latents=latents, per_position=msg.per_position,
    )


def layer_attribution_to_pb(la: LayerAttribution) -> pb.LayerAttribution:
    msg = pb.LayerAttribution(
        layer=la.layer, latents=[int(i) for i in la.latents], scores=[float(v) for v in la.scores],
        error=la.error, total=la.total,
    )
    if la.per_position is not None:
        msg.per_position.CopyFrom(tensor_to_pb(np.asarray(la.per_position, dtype=np.float32)))
    if la.error_per_position is not None:
        msg.error_per_position.extend(float(v) for v in la.error_per_position)
    return msg


def attribute_response_to_pb(resp: AttributionResponse) -> pb.AttributeResponse:
    """AttributionResponse -> message."""
    return pb.AttributeResponse(
        results=[
            pb.AttributionResult(
                metric_clean=r.metric_clean, metric_baseline=r.metric_baseline, metric_patched=r.metric_patched,
                positions=r.positions, token_ids=r.token_ids,
                layers=[layer_attribution_to_pb(r.layers[ly]) for ly in sorted(r.layers)],
            )
            for r in resp.results
        ],
        forward_passes=resp.forward_passes, backward_passes=resp.backward_passes, wall_s=resp.wall_s,
    )


def attribute_response_from_pb(msg: pb.AttributeResponse) -> AttributionResponse:
    """Message -> AttributionResponse."""
    results = []
    for r in msg.results:
        layers = {}
        for la in r.layers:
            layers[la.layer] = LayerAttribution(
                layer=la.layer, latents=np.asarray(la.latents, dtype=np.int64),
                scores=np.asarray(la.scores, dtype=np.float32), error=la.error, total=la.total,
                per_position=tensor_from_pb(la.per_position, "per_position") if la.HasField("per_position") else None,
                error_per_position=np.asarray(la.error_per_position, dtype=np.float32) if la.error_per_position else None,
            )
        results.append(AttributionResult(
            metric_clean=r.metric_clean, metric_baseline=r.metric_baseline, metric_patched=r.metric_patched,
            positions=list(r.positions), token_ids=list(r.token_ids), layers=layers,
        ))
    return AttributionResponse(results, int(msg.forward_passes), int(msg.backward_passes), float(msg.wall_s))
