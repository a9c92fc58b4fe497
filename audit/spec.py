"""The language of requests: prompts, token scopes and interventions, as pydantic models.

Torch-free, so the thin client, the server and the audit code share one validated vocabulary.
The math each intervention stands for is in docs/interventions.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (argmax), as vLLM does: dividing logits by a smaller T
overflows float32 and the distribution is a point mass anyway."""


def _finite(values: Iterable[float], what: str = "entry") -> None:
    """Raise (naming the entry's index when there are several) when a value is NaN or infinite."""
    vals = list(values)
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"{what} {i} must be finite, got {v}" if len(vals) > 1 else f"must be finite, got {v}")


def _finite_vector(v: tuple[float, ...]) -> tuple[float, ...]:
    """A field validator: the vector, when every entry is finite."""
    _finite(v)
    return v


def _finite_float(v: float) -> float:
    """A field validator: the value, when finite."""
    _finite([v])
    return v


_FiniteFloat = Annotated[float, AfterValidator(_finite_float)]
_FiniteVector = Annotated[tuple[float, ...], AfterValidator(_finite_vector)]  # a direction's entries


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | tuple[ChatMessage, ...]
"""Raw text (tokenized as is, with BOS) or chat messages (template + generation prompt)."""


def user_prompt(instruction: str) -> tuple[ChatMessage, ...]:
    """A one-turn chat prompt, the form the refusal papers use."""
    return (ChatMessage(role="user", content=instruction),)


class TokenScope(_Frozen):
    """Which tokens an intervention touches. Positions are 0-based over the unpadded sequence."""

    kind: Literal["all", "prompt", "generated", "last_n_prompt", "positions"] = "all"
    n: int = 0
    positions: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> TokenScope:
        if self.kind == "last_n_prompt" and self.n <= 0:
            raise ValueError("scope.n must be > 0 for kind 'last_n_prompt'")
        if self.kind == "positions" and not self.positions:
            raise ValueError("scope.positions must be non-empty for kind 'positions'")
        if self.kind != "positions" and self.positions:
            raise ValueError(f"scope.positions are only read for kind 'positions' (kind is {self.kind!r})")
        if self.kind != "last_n_prompt" and self.n:
            raise ValueError(f"scope.n is only read for kind 'last_n_prompt' (kind is {self.kind!r})")
        return self


ALL_TOKENS = TokenScope()


class _LatentEdit(_Frozen):
    """The rule every SAE-latent edit shares: latents given inline ({layer: ids}) or as a registered
    latent set, at least one. (Each subclass declares its fields, in its own order.)"""

    if TYPE_CHECKING:
        type: str
        latents: dict[int, tuple[int, ...]]
        latent_set_id: str | None

    @model_validator(mode="after")
    def _needs_latents(self) -> _LatentEdit:
        if not self.latents and not self.latent_set_id:
            raise ValueError(f"{self.type} needs latents or latent_set_id")
        return self


class _DirectionEdit(_Frozen):
    """The rule every direction edit shares: a direction given inline or as a registered one."""

    if TYPE_CHECKING:
        type: str
        direction: tuple[float, ...]
        direction_id: str | None

    @model_validator(mode="after")
    def _needs_direction(self) -> _DirectionEdit:
        if not self.direction and not self.direction_id:
            raise ValueError(f"{self.type} needs direction or direction_id")
        return self


class AblateLatents(_LatentEdit):
    """Zero-ablate SAE latents, keeping the error term: h' = h - sum_{i in S} z_i W_dec[i]."""

    type: Literal["ablate_latents"] = "ablate_latents"
    latents: dict[int, tuple[int, ...]] = Field(default_factory=dict)  # layer -> latent ids
    latent_set_id: str | None = None
    scope: TokenScope = ALL_TOKENS


class ClampLatents(_LatentEdit):
    """Clamp SAE latents to values: h' = h + sum_i (c_i - z_i) W_dec[i]."""

    type: Literal["clamp_latents"] = "clamp_latents"
    latents: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    values: dict[int, tuple[float, ...]] = Field(default_factory=dict)  # per layer, aligned
    value: _FiniteFloat = 0.0  # for latents without their own value (and for latent_set_id)
    latent_set_id: str | None = None
    scope: TokenScope = ALL_TOKENS

    @model_validator(mode="after")
    def _check(self) -> ClampLatents:
        for layer, vals in self.values.items():
            if vals and len(vals) != len(self.latents.get(layer, ())):
                raise ValueError(f"clamp_latents.values[{layer}] must align with latents[{layer}]")
        return self

    @field_validator("values")
    @classmethod
    def _finite_values(cls, v: dict[int, tuple[float, ...]]) -> dict[int, tuple[float, ...]]:
        for layer, vals in v.items():
            _finite(vals, f"layer {layer} value")
        return v

    def value_of(self, layer: int, k: int) -> float:
        vals = self.values.get(layer, ())
        return vals[k] if vals else self.value


class ScaleLatents(_LatentEdit):
    """Scale SAE latents by a factor, keeping the error term: z_i <- factor * z_i, i.e.
    h' = h + sum_i (factor - 1) z_i W_dec[i]. factor 0 is an ablation; a negative factor flips
    the latents' contribution (x-3 is the steering of "Understanding Refusal in Language Models
    with Sparse Autoencoders")."""

    type: Literal["scale_latents"] = "scale_latents"
    latents: dict[int, tuple[int, ...]] = Field(default_factory=dict)  # layer -> latent ids
    factor: _FiniteFloat
    latent_set_id: str | None = None
    scope: TokenScope = ALL_TOKENS


class AblateDirection(_DirectionEdit):
    """Arditi et al.: h' = h - (h.r)r at every layer input and attention/MLP output."""

    type: Literal["ablate_direction"] = "ablate_direction"
    direction: _FiniteVector = ()
    direction_id: str | None = None
    layers: tuple[int, ...] = ()  # empty = all layers
    scope: TokenScope = ALL_TOKENS


class AddDirection(_DirectionEdit):
    """Activation addition at the output of one layer: h' = h + coefficient * r."""

    type: Literal["add_direction"] = "add_direction"
    direction: _FiniteVector = ()
    direction_id: str | None = None
    layer: int
    coefficient: _FiniteFloat = 1.0
    scope: TokenScope = ALL_TOKENS


Intervention = Annotated[
    AblateLatents | ClampLatents | ScaleLatents | AblateDirection | AddDirection, Field(discriminator="type")
]


class SamplingParams(_Frozen):
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 (and anything below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # stop only on stop_token_ids or max_new_tokens (fixed-length load tests)

    @field_validator("max_new_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("max_new_tokens must be > 0")
        return v

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        _finite([v])
        if v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE


class Request(_Frozen):
    """One prompt with its own interventions (and sampling, when generating)."""

    prompt: Prompt
    interventions: tuple[Intervention, ...] = ()
    sampling: SamplingParams = SamplingParams()


def canonical_spec_json(interventions: tuple[Intervention, ...] | list[Intervention]) -> str:
    """A canonical JSON of an intervention list (stable key order), for hashing and transport."""
    payload = [iv.model_dump(mode="json") for iv in interventions]
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def spec_json_hash(spec_json: str) -> str:
    """The hash of a canonical spec (`canonical_spec_json`): sha256, hex."""
    return hashlib.sha256(spec_json.encode()).hexdigest()


def spec_hash(interventions: tuple[Intervention, ...] | list[Intervention]) -> str | None:
    """sha256 of the canonical spec, or None when there is no intervention (no cache salt)."""
    if not interventions:
        return None
    return spec_json_hash(canonical_spec_json(interventions))
