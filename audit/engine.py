"""The engine protocol the audit algorithms are written against.

Implemented in-process by the HF engine (`refusal_audit.server.hf_engine`), by the vLLM engine,
and remotely by the gRPC client (`refusal_audit.client`), so the same audit code runs inside a
server job or from a notebook. Arrays are numpy so no torch is needed on the client side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .spec import Prompt, Request


class Limits(BaseModel):
    """The per-request limits a server enforces (and reports in ModelInfo.limits), validated > 0.

    The one definition: the engines check requests against it, `ServerConfig.limits` holds it
    (with the server-side `default_max_new_tokens`), the client reads it from GetInfo."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_prompt_tokens: int = Field(default=4096, gt=0)
    max_new_tokens: int = Field(default=1024, gt=0)
    max_batch_items: int = Field(default=256, gt=0)
    max_latents_per_request: int = Field(default=65536, gt=0)
    max_concurrent_jobs: int = Field(default=1, gt=0)
    max_attribution_steps: int = Field(default=128, gt=0)  # Attribute: integrated-gradient steps


@dataclass(frozen=True)
class SAEInfo:
    layer: int
    source: str
    architecture: str
    d_in: int
    d_sae: int
    separable: bool


@dataclass(frozen=True)
class ModelInfo:
    model: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    saes: tuple[SAEInfo, ...]
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    n_post_instruction_tokens: int
    engine: str = "hf"
    dtype: str = "float32"
    special_token_ids: dict[str, int] = field(default_factory=dict)
    batch_invariant: bool = False  # rows bit-identical to running alone, whatever shares their batch

    @property
    def sae_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.saes)

    def sae(self, layer: int) -> SAEInfo:
        for s in self.saes:
            if s.layer == layer:
                return s
        raise KeyError(f"no SAE at layer {layer}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


@dataclass
class StreamEvent:
    """One step of streamed generation: a text delta of item `index` (the final one has
    finished=True; in-process engines attach the whole `completion` to it, the wire does not)."""

    index: int
    text_delta: str
    token_ids: list[int]
    finished: bool
    finish_reason: str
    completion: Completion | None = None


@dataclass
class ScoreResult:
    logprobs: np.ndarray  # [n_token_ids], aligned with the requested token ids
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    full_logprobs: np.ndarray | None = None  # [vocab]


@dataclass
class LayerActivations:
    layer: int
    # top-k mode: per token, (indices, values); chosen-latents mode: values [n_tokens, n_latents]
    top_indices: list[np.ndarray] | None = None
    top_values: list[np.ndarray] | None = None
    latents: np.ndarray | None = None
    values: np.ndarray | None = None


@dataclass
class EncodeResult:
    token_ids: list[int]
    tokens: list[str]
    layers: dict[int, LayerActivations]


@dataclass
class LossResult:
    loss: float
    n_tokens: int


RankBy = Literal["cosine", "abs_cosine"]


@dataclass
class SAERows:
    """Weights of some latents of one SAE layer (`Engine.sae_rows`)."""

    layer: int
    latents: np.ndarray  # [k] int64: the chosen latents in their order, or the top k best first (ties by id)
    cosines: np.ndarray | None = None  # [k] float32 cos(direction, W_dec[i]), when a direction was given
    decoder: np.ndarray | None = None  # [k, d_model] float32 W_dec rows
    encoder: np.ndarray | None = None  # [k, d_model] float32 W_enc columns (as rows)


@runtime_checkable
class Engine(Protocol):
    """generate / score / encode / residuals / loss, every request under its own interventions;
    tokenize and sae_rows expose the tokenizer and the SAE weights (torch-free, as numpy)."""

    @property
    def info(self) -> ModelInfo: ...

    def generate(self, requests: Sequence[Request]) -> list[Completion]: ...

    def score(
        self,
        requests: Sequence[Request],
        token_ids: Sequence[int],
        top_k: int = 0,
        return_full_logprobs: bool = False,
    ) -> list[ScoreResult]: ...

    def encode(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        top_k: int = 16,
        latents: dict[int, Sequence[int]] | None = None,
    ) -> list[EncodeResult]: ...

    def residuals(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,),
    ) -> np.ndarray: ...

    def loss(
        self, requests: Sequence[Request], completions: Sequence[str | None]
    ) -> list[LossResult]: ...

    def tokenize(self, prompts: Sequence[Prompt], raw: bool = False) -> list[list[int]]:
        """Token ids per prompt as the engine runs it (raw=False: BOS / chat template, the positions a
        TokenScope counts), or raw text without special tokens (raw=True)."""
        ...

    def sae_rows(
        self,
        layers: Sequence[int] | None = None,
        latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None,
        top_k: int = 0,
        rank_by: RankBy = "cosine",
        decoder: bool = True,
        encoder: bool = False,
    ) -> dict[int, SAERows]:
        """Per SAE layer, the chosen `latents`' rows, or (with `direction` and no latents) the `top_k`
        latents (0 = all) ranked by cos(direction, W_dec[i]); cosines whenever a direction is given."""
        ...
