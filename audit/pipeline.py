"""The refusal-dissection chain in one call: direction -> stage 1 -> stage 2 (demo and notebooks).

The server's job system runs the stages as separate jobs; this is the same sequence in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .refusal_direction import RefusalDirectionConfig, RefusalDirectionResult, compute_refusal_direction
from .stage1 import Stage1Config, Stage1Result, run_stage1
from .stage2 import Stage2Config, Stage2Result, run_stage2


class ChainConfig(BaseModel):
    """The three stage configs; stage 1's dataset fields pick the prompts stages 1-2 dissect."""

    model_config = ConfigDict(extra="forbid")

    direction: RefusalDirectionConfig = Field(default_factory=lambda: RefusalDirectionConfig())
    stage1: Stage1Config = Field(default_factory=lambda: Stage1Config())
    stage2: Stage2Config = Field(default_factory=lambda: Stage2Config())


@dataclass
class PromptSplits:
    """Prompts of one kind (harmful or harmless) by split."""

    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)


@dataclass
class ChainResult:
    direction: RefusalDirectionResult
    stage1: Stage1Result
    stage2: Stage2Result

    def to_json(self) -> dict[str, Any]:
        """{kind: result JSON}: the input `write_report` expects."""
        return {"direction": self.direction.to_json(), "stage1": self.stage1.to_json(),
                "stage2": self.stage2.to_json()}


def run_chain(
    engine: Engine,
    harmful: PromptSplits | None,
    harmless: PromptSplits | None,
    cfgs: ChainConfig,
    ctx: StageContext,
) -> ChainResult:
    """Direction on harmful/harmless train+val, then stages 1 and 2 on the harmful test prompts.

    `harmful` / `harmless` of None load the sets named in the configs (direction: train/val splits;
    stage 1: its dataset, split and n). When `harmful` is given, stages 1-2 use `harmful.test`
    (falling back to stage 1's configured dataset when it is empty). Stage 1 ranks latents through
    `engine.sae_rows`, so the chain runs in-process or against a remote server alike.
    """
    dc = cfgs.direction
    if harmful is None:
        harmful = PromptSplits(load_prompts(dc.harmful_dataset, dc.train_split, dc.n_train, dc.seed),
                               load_prompts(dc.harmful_dataset, dc.val_split, dc.n_val, dc.seed))
    if harmless is None:
        harmless = PromptSplits(load_prompts(dc.harmless_dataset, dc.train_split, dc.n_train, dc.seed),
                                load_prompts(dc.harmless_dataset, dc.val_split, dc.n_val, dc.seed))
    direction = compute_refusal_direction(engine, harmful.train, harmless.train, harmful.val, harmless.val, dc, ctx)
    s1c = cfgs.stage1
    prompts = harmful.test or load_prompts(s1c.dataset, s1c.split, s1c.n, s1c.seed)
    stage1 = run_stage1(engine, prompts, direction.direction, s1c, ctx)
    stage2 = run_stage2(engine, stage1, cfgs.stage2, ctx)
    return ChainResult(direction, stage1, stage2)
