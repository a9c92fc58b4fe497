"""The attribution vocabulary: which metric, method, baseline and token scope an attribution uses,
and what it returns. Torch-free (pydantic + numpy), shared by the client, the server and the jobs.

The math is in docs/attribution.md: integrated gradients in SAE space between the clean state and a
baseline ("patched") state, with the SAE error term interpolated alongside the latents;
attr_i = (z_i,baseline - z_i,clean) x mean over the path of d metric / d z_i. `atp` is the one-step
case (the gradient at the clean state: attribution patching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from .compute import forward_equivalents
from .spec import Intervention, Prompt, _Frozen

DEFAULT_IG_STEPS = 10  # the paper's


class LogitDiff(_Frozen):
    """logit(positive) - logit(negative) at the last prompt token (the paper: jailbreak token vs "I")."""

    type: Literal["logit_diff"] = "logit_diff"
    positive: int
    negative: int


class LogProb(_Frozen):
    """log P(token) at the last prompt token."""

    type: Literal["logprob"] = "logprob"
    token: int


Metric = Annotated[LogitDiff | LogProb, Field(discriminator="type")]


class AttributionScope(_Frozen):
    """Token positions attributed (and patched): 0-based over the unpadded prompt.

    after_bos: every position after a leading BOS (the paper's default); all: every position;
    last_n: the last n; positions: explicit ones (negative counts from the end).
    """

    kind: Literal["after_bos", "all", "last_n", "positions"] = "after_bos"
    n: int = 0
    positions: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _unread(self) -> AttributionScope:
        """A field the kind does not read is a mistake, not something to ignore silently."""
        if self.kind != "last_n" and self.n:
            raise ValueError(f"n is only read for kind 'last_n' (kind is {self.kind!r})")
        if self.kind != "positions" and self.positions:
            raise ValueError(f"positions are only read for kind 'positions' (kind is {self.kind!r})")
        return self


class Baseline(_Frozen):
    """The patched state the path ends at.

    zero: every latent 0, error term kept (the clean one); mean: latents and error term at their
    means over the tokens after BOS of a registered prompt set; interventions: the state the
    residual stream has, at each attributed SAE layer, when these interventions run (e.g. the
    refusal direction ablated, the paper's baseline).
    """

    kind: Literal["zero", "mean", "interventions"] = "zero"
    reference_set_id: str = ""
    interventions: tuple[Intervention, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Baseline:
        if self.kind == "mean" and not self.reference_set_id:
            raise ValueError("reference_set_id is required for a mean baseline")
        if self.kind == "interventions" and not self.interventions:
            raise ValueError("interventions: empty (an interventions baseline needs at least one)")
        if self.kind != "mean" and self.reference_set_id:
            raise ValueError(f"reference_set_id is only read for a mean baseline (kind is {self.kind!r})")
        if self.kind != "interventions" and self.interventions:
            raise ValueError(f"interventions are only read for an interventions baseline (kind is {self.kind!r})")
        return self


class AttributionItem(_Frozen):
    """One prompt; `metric` overrides the request's metric for this item (e.g. its own jailbreak token)."""

    prompt: Prompt
    metric: Metric | None = None


class AttributionRequest(_Frozen):
    """A batch of prompts attributed with one method and baseline."""

    items: tuple[AttributionItem, ...]
    metric: Metric | None = None
    method: Literal["atp", "ig"] = "ig"
    n_steps: int = 0  # ig: path steps (0 = DEFAULT_IG_STEPS); atp is one step (0 or 1)
    rule: Literal["left", "midpoint"] = "left"  # ig: a = k/n (the paper's) or (k + 1/2)/n (O(1/n^2) error)
    baseline: Baseline = Baseline()
    layers: tuple[int, ...] = ()  # SAE layers attributed (and patched jointly); empty = every SAE layer
    scope: AttributionScope = AttributionScope()
    top_k: int = 20  # per layer, by attribution summed over the scope (largest first)
    latents: dict[int, tuple[int, ...]] = Field(default_factory=dict)  # chosen latents, always returned
    per_position: bool = False

    def alphas(self) -> list[float]:
        """The path points where the gradient is taken (atp: the clean state only)."""
        n = self.steps
        if self.method == "ig" and self.rule == "midpoint":
            return [(k + 0.5) / n for k in range(n)]
        return [k / n for k in range(n)]

    @property
    def steps(self) -> int:
        """Gradient evaluations along the path."""
        if self.method == "atp":
            return 1
        return self.n_steps or DEFAULT_IG_STEPS


@dataclass
class LayerAttribution:
    """Attributions at one SAE layer for one item.

    latents: the returned latent ids (top-k by score, then chosen ones not among them);
    scores: their attributions summed over the scope; per_position: [n_positions, n_latents] when
    asked; error: the error term's attribution (summed, and per position); total: the sum over
    every latent of the layer (so total + error is the layer's whole attribution).
    """

    layer: int
    latents: np.ndarray
    scores: np.ndarray
    error: float
    total: float
    per_position: np.ndarray | None = None
    error_per_position: np.ndarray | None = None


@dataclass
class AttributionResult:
    """One item: the metric at the clean state, the baseline run, the path's patched endpoint
    (every attributed layer at its baseline state over the scope, the rest of the model clean),
    the attributed positions and the per-layer attributions."""

    metric_clean: float
    metric_baseline: float
    metric_patched: float
    positions: list[int]
    token_ids: list[int]
    layers: dict[int, LayerAttribution] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of every attribution (latents and error terms, all layers)."""
        return float(sum(la.total + la.error for la in self.layers.values()))


@dataclass
class AttributionResponse:
    """Results per item, and the compute spent: forward and backward passes counted per prompt row."""

    results: list[AttributionResult]
    forward_passes: int = 0
    backward_passes: int = 0
    wall_s: float = 0.0

    @property
    def forward_equivalents(self) -> float:
        """Forward passes plus two per backward pass (the usual cost of a backward)."""
        return forward_equivalents(self.forward_passes, self.backward_passes)


def attribution_request(
    prompts: Sequence[Prompt],
    metric: LogitDiff | LogProb | Sequence[LogitDiff | LogProb],
    **kw: object,
) -> AttributionRequest:
    """A request for prompts with one metric, or one metric per prompt."""
    if isinstance(metric, (LogitDiff, LogProb)):
        return AttributionRequest(items=tuple(AttributionItem(prompt=p) for p in prompts), metric=metric, **kw)  # type: ignore[arg-type]
    metrics = list(metric)
    if len(metrics) != len(prompts):
        raise ValueError("one metric per prompt")
    items = tuple(AttributionItem(prompt=p, metric=m) for p, m in zip(prompts, metrics, strict=True))
    return AttributionRequest(items=items, **kw)  # type: ignore[arg-type]
