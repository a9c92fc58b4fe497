from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Messages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    messages: Messages
    def __init__(self, text: _Optional[str] = ..., messages: _Optional[_Union[Messages, _Mapping]] = ...) -> None: ...

class TokenScope(_message.Message):
    __slots__ = ("kind", "n", "positions")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALL: _ClassVar[TokenScope.Kind]
        PROMPT: _ClassVar[TokenScope.Kind]
        GENERATED: _ClassVar[TokenScope.Kind]
        LAST_N_PROMPT: _ClassVar[TokenScope.Kind]
        POSITIONS: _ClassVar[TokenScope.Kind]
    ALL: TokenScope.Kind
    PROMPT: TokenScope.Kind
    GENERATED: TokenScope.Kind
    LAST_N_PROMPT: TokenScope.Kind
    POSITIONS: TokenScope.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    kind: TokenScope.Kind
    n: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[TokenScope.Kind, str]] = ..., n: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerLatents(_message.Message):
    __slots__ = ("layer", "latents", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    latents: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., latents: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class AblateLatents(_message.Message):
    __slots__ = ("latents", "latent_set_id")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    LATENT_SET_ID_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    latent_set_id: str
    def __init__(self, latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., latent_set_id: _Optional[str] = ...) -> None: ...

class ClampLatents(_message.Message):
    __slots__ = ("latents", "value", "latent_set_id")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LATENT_SET_ID_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    value: float
    latent_set_id: str
    def __init__(self, latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., value: _Optional[float] = ..., latent_set_id: _Optional[str] = ...) -> None: ...

class ScaleLatents(_message.Message):
    __slots__ = ("latents", "factor", "latent_set_id")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    LATENT_SET_ID_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    factor: float
    latent_set_id: str
    def __init__(self, latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., factor: _Optional[float] = ..., latent_set_id: _Optional[str] = ...) -> None: ...

class DirectionRef(_message.Message):
    __slots__ = ("values", "direction_id")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_ID_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    direction_id: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., direction_id: _Optional[str] = ...) -> None: ...

class AblateDirection(_message.Message):
    __slots__ = ("direction", "layers")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    direction: DirectionRef
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, direction: _Optional[_Union[DirectionRef, _Mapping]] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class AddDirection(_message.Message):
    __slots__ = ("direction", "layer", "coefficient")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    direction: DirectionRef
    layer: int
    coefficient: float
    def __init__(self, direction: _Optional[_Union[DirectionRef, _Mapping]] = ..., layer: _Optional[int] = ..., coefficient: _Optional[float] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("ablate_latents", "clamp_latents", "ablate_direction", "add_direction", "scale_latents", "scope")
    ABLATE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    CLAMP_LATENTS_FIELD_NUMBER: _ClassVar[int]
    ABLATE_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ADD_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SCALE_LATENTS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ablate_latents: AblateLatents
    clamp_latents: ClampLatents
    ablate_direction: AblateDirection
    add_direction: AddDirection
    scale_latents: ScaleLatents
    scope: TokenScope
    def __init__(self, ablate_latents: _Optional[_Union[AblateLatents, _Mapping]] = ..., clamp_latents: _Optional[_Union[ClampLatents, _Mapping]] = ..., ablate_direction: _Optional[_Union[AblateDirection, _Mapping]] = ..., add_direction: _Optional[_Union[AddDirection, _Mapping]] = ..., scale_latents: _Optional[_Union[ScaleLatents, _Mapping]] = ..., scope: _Optional[_Union[TokenScope, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SAEInfo(_message.Message):
    __slots__ = ("layer", "source", "architecture", "d_in", "d_sae", "separable")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    SEPARABLE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    source: str
    architecture: str
    d_in: int
    d_sae: int
    separable: bool
    def __init__(self, layer: _Optional[int] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., separable: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "architecture", "n_layers", "d_model", "vocab_size", "saes", "bos_token_id", "eos_token_ids", "pad_token_id", "n_post_instruction_tokens", "engine", "dtype", "limits", "special_token_ids", "server_version", "batch_invariant")
    class SpecialTokenIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAES_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    N_POST_INSTRUCTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    saes: _containers.RepeatedCompositeFieldContainer[SAEInfo]
    bos_token_id: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pad_token_id: int
    n_post_instruction_tokens: int
    engine: str
    dtype: str
    limits: Limits
    special_token_ids: _containers.ScalarMap[str, int]
    server_version: str
    batch_invariant: bool
    def __init__(self, model: _Optional[str] = ..., architecture: _Optional[str] = ..., n_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., vocab_size: _Optional[int] = ..., saes: _Optional[_Iterable[_Union[SAEInfo, _Mapping]]] = ..., bos_token_id: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., pad_token_id: _Optional[int] = ..., n_post_instruction_tokens: _Optional[int] = ..., engine: _Optional[str] = ..., dtype: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., special_token_ids: _Optional[_Mapping[str, int]] = ..., server_version: _Optional[str] = ..., batch_invariant: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_new_tokens", "max_batch_items", "max_latents_per_request", "max_concurrent_jobs", "max_attribution_steps")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTION_STEPS_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_new_tokens: int
    max_batch_items: int
    max_latents_per_request: int
    max_concurrent_jobs: int
    max_attribution_steps: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., max_latents_per_request: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ..., max_attribution_steps: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed", "has_seed", "stop_token_ids", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    has_seed: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateItem(_message.Message):
    __slots__ = ("prompt", "interventions", "sampling")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    sampling: SamplingParams
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[GenerateItem]
    def __init__(self, items: _Optional[_Iterable[_Union[GenerateItem, _Mapping]]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions",)
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...

class GenerateStreamEvent(_message.Message):
    __slots__ = ("index", "text_delta", "token_ids", "finished", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text_delta: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    def __init__(self, index: _Optional[int] = ..., text_delta: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "interventions")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "token_ids", "top_k", "return_full_logprobs")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    return_full_logprobs: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., token_ids: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., return_full_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("logprobs", "top_token_ids", "top_logprobs", "full_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    full_logprobs: Tensor
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., full_logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "layers", "top_k", "latents")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    layers: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ...) -> None: ...

class TokenLatents(_message.Message):
    __slots__ = ("indices", "values")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerActivations(_message.Message):
    __slots__ = ("layer", "tokens", "values", "latents")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens: _containers.RepeatedCompositeFieldContainer[TokenLatents]
    values: Tensor
    latents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[TokenLatents, _Mapping]]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., latents: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("token_ids", "tokens", "layers")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerActivations]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[LayerActivations, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ResidualsRequest(_message.Message):
    __slots__ = ("items", "layers", "positions")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    layers: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class ResidualsResponse(_message.Message):
    __slots__ = ("residuals",)
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    residuals: Tensor
    def __init__(self, residuals: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LossItem(_message.Message):
    __slots__ = ("prompt", "completion", "interventions")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    completion: str
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., completion: _Optional[str] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ...) -> None: ...

class LossRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LossItem]
    def __init__(self, items: _Optional[_Iterable[_Union[LossItem, _Mapping]]] = ...) -> None: ...

class LossResult(_message.Message):
    __slots__ = ("loss", "n_tokens")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    n_tokens: int
    def __init__(self, loss: _Optional[float] = ..., n_tokens: _Optional[int] = ...) -> None: ...

class LossResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LossResult]
    def __init__(self, results: _Optional[_Iterable[_Union[LossResult, _Mapping]]] = ...) -> None: ...

class LogitDiffMetric(_message.Message):
    __slots__ = ("positive", "negative")
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    positive: int
    negative: int
    def __init__(self, positive: _Optional[int] = ..., negative: _Optional[int] = ...) -> None: ...

class LogProbMetric(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: int
    def __init__(self, token: _Optional[int] = ...) -> None: ...

class AttributionMetric(_message.Message):
    __slots__ = ("logit_diff", "logprob")
    LOGIT_DIFF_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    logit_diff: LogitDiffMetric
    logprob: LogProbMetric
    def __init__(self, logit_diff: _Optional[_Union[LogitDiffMetric, _Mapping]] = ..., logprob: _Optional[_Union[LogProbMetric, _Mapping]] = ...) -> None: ...

class AttributionScope(_message.Message):
    __slots__ = ("kind", "n", "positions")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        AFTER_BOS: _ClassVar[AttributionScope.Kind]
        ALL: _ClassVar[AttributionScope.Kind]
        LAST_N: _ClassVar[AttributionScope.Kind]
        POSITIONS: _ClassVar[AttributionScope.Kind]
    AFTER_BOS: AttributionScope.Kind
    ALL: AttributionScope.Kind
    LAST_N: AttributionScope.Kind
    POSITIONS: AttributionScope.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    kind: AttributionScope.Kind
    n: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[AttributionScope.Kind, str]] = ..., n: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ...) -> None: ...

class AttributionBaseline(_message.Message):
    __slots__ = ("kind", "reference_set_id", "interventions")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ZERO: _ClassVar[AttributionBaseline.Kind]
        MEAN: _ClassVar[AttributionBaseline.Kind]
        INTERVENTIONS: _ClassVar[AttributionBaseline.Kind]
    ZERO: AttributionBaseline.Kind
    MEAN: AttributionBaseline.Kind
    INTERVENTIONS: AttributionBaseline.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: AttributionBaseline.Kind
    reference_set_id: str
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    def __init__(self, kind: _Optional[_Union[AttributionBaseline.Kind, str]] = ..., reference_set_id: _Optional[str] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ...) -> None: ...

class AttributeItem(_message.Message):
    __slots__ = ("prompt", "metric")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    metric: AttributionMetric
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., metric: _Optional[_Union[AttributionMetric, _Mapping]] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("items", "metric", "method", "n_steps", "rule", "baseline", "layers", "scope", "top_k", "latents", "per_position")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    N_STEPS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AttributeItem]
    metric: AttributionMetric
    method: str
    n_steps: int
    rule: str
    baseline: AttributionBaseline
    layers: _containers.RepeatedScalarFieldContainer[int]
    scope: AttributionScope
    top_k: int
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    per_position: bool
    def __init__(self, items: _Optional[_Iterable[_Union[AttributeItem, _Mapping]]] = ..., metric: _Optional[_Union[AttributionMetric, _Mapping]] = ..., method: _Optional[str] = ..., n_steps: _Optional[int] = ..., rule: _Optional[str] = ..., baseline: _Optional[_Union[AttributionBaseline, _Mapping]] = ..., layers: _Optional[_Iterable[int]] = ..., scope: _Optional[_Union[AttributionScope, _Mapping]] = ..., top_k: _Optional[int] = ..., latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., per_position: _Optional[bool] = ...) -> None: ...

class LayerAttribution(_message.Message):
    __slots__ = ("layer", "latents", "scores", "error", "total", "per_position", "error_per_position")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    layer: int
    latents: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    error: float
    total: float
    per_position: Tensor
    error_per_position: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., latents: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., error: _Optional[float] = ..., total: _Optional[float] = ..., per_position: _Optional[_Union[Tensor, _Mapping]] = ..., error_per_position: _Optional[_Iterable[float]] = ...) -> None: ...

class AttributionResult(_message.Message):
    __slots__ = ("metric_clean", "metric_baseline", "metric_patched", "positions", "token_ids", "layers")
    METRIC_CLEAN_FIELD_NUMBER: _ClassVar[int]
    METRIC_BASELINE_FIELD_NUMBER: _ClassVar[int]
    METRIC_PATCHED_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    metric_clean: float
    metric_baseline: float
    metric_patched: float
    positions: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerAttribution]
    def __init__(self, metric_clean: _Optional[float] = ..., metric_baseline: _Optional[float] = ..., metric_patched: _Optional[float] = ..., positions: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[_Union[LayerAttribution, _Mapping]]] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("results", "forward_passes", "backward_passes", "wall_s")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AttributionResult]
    forward_passes: int
    backward_passes: int
    wall_s: float
    def __init__(self, results: _Optional[_Iterable[_Union[AttributionResult, _Mapping]]] = ..., forward_passes: _Optional[int] = ..., backward_passes: _Optional[int] = ..., wall_s: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("prompts", "raw")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    raw: bool
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., raw: _Optional[bool] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class SAERowsRequest(_message.Message):
    __slots__ = ("layers", "latents", "direction", "top_k", "abs_cosine", "decoder", "encoder")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ABS_COSINE_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    direction: DirectionRef
    top_k: int
    abs_cosine: bool
    decoder: bool
    encoder: bool
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., direction: _Optional[_Union[DirectionRef, _Mapping]] = ..., top_k: _Optional[int] = ..., abs_cosine: _Optional[bool] = ..., decoder: _Optional[bool] = ..., encoder: _Optional[bool] = ...) -> None: ...

class SAERows(_message.Message):
    __slots__ = ("layer", "latents", "cosines", "decoder", "encoder")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    COSINES_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    latents: _containers.RepeatedScalarFieldContainer[int]
    cosines: _containers.RepeatedScalarFieldContainer[float]
    decoder: Tensor
    encoder: Tensor
    def __init__(self, layer: _Optional[int] = ..., latents: _Optional[_Iterable[int]] = ..., cosines: _Optional[_Iterable[float]] = ..., decoder: _Optional[_Union[Tensor, _Mapping]] = ..., encoder: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SAERowsResponse(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[SAERows]
    def __init__(self, layers: _Optional[_Iterable[_Union[SAERows, _Mapping]]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("id", "kind", "name", "created_at", "direction", "direction_layer", "latents", "metadata_json", "source_job_id", "prompts")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_LAYER_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    name: str
    created_at: float
    direction: _containers.RepeatedScalarFieldContainer[float]
    direction_layer: int
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    metadata_json: str
    source_job_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., created_at: _Optional[float] = ..., direction: _Optional[_Iterable[float]] = ..., direction_layer: _Optional[int] = ..., latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., metadata_json: _Optional[str] = ..., source_job_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ...) -> None: ...

class RegisterDirectionRequest(_message.Message):
    __slots__ = ("name", "values", "layer", "metadata_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    layer: int
    metadata_json: str
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., layer: _Optional[int] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class RegisterLatentSetRequest(_message.Message):
    __slots__ = ("name", "latents", "metadata_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    latents: _containers.RepeatedCompositeFieldContainer[LayerLatents]
    metadata_json: str
    def __init__(self, name: _Optional[str] = ..., latents: _Optional[_Iterable[_Union[LayerLatents, _Mapping]]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class RegisterPromptSetRequest(_message.Message):
    __slots__ = ("name", "prompts", "metadata_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    metadata_json: str
    def __init__(self, name: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("kind", "config_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    config_json: str
    def __init__(self, kind: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "eta_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    eta_s: float
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., eta_s: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "config_json", "created_at", "started_at", "finished_at", "progress", "error", "artifact_ids", "attempts")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    state: Job.State
    config_json: str
    created_at: float
    started_at: float
    finished_at: float
    progress: JobProgress
    error: str
    artifact_ids: _containers.RepeatedScalarFieldContainer[str]
    attempts: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., config_json: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., error: _Optional[str] = ..., artifact_ids: _Optional[_Iterable[str]] = ..., attempts: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "partial_json")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_JSON_FIELD_NUMBER: _ClassVar[int]
    job: Job
    partial_json: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., partial_json: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("kind", "limit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    limit: int
    def __init__(self, kind: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class GetJobResultRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job", "result_json", "artifacts")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    result_json: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., result_json: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...
