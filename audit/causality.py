"""Stage 2 <-> stage 3 causality (seed paper, "Causal Link between Stage2 and Stage3 features").

For each prompt of a stage-3 result, its stage-3 set is the top K of its FM ranking (K = the
smallest K that jailbroke it in the stage-3 sweep, or a fixed `k`). Then:

1. Are stage-3 latents alone causal? Ablate only the stage-3 set, generate, judge (the paper:
   89% of LLaMA's jailbreaks survive, 3% of Gemma's).
2. Do they drive the stage-2 latents? Encode the stage-2 latents (chosen-latents mode) without
   and with the stage-3 ablation. Of the stage-2 latents active at baseline (max over prompt
   tokens > threshold), the fraction switched off, and for those still on the mean relative drop
   of their activation (summed over the prompt's tokens): 1 - after / before. `engine.encode`
   reads layer L before layer L's own ablations, so only upstream stage-3 latents act on a stage-2
   latent, as in the model. (The paper: 12% off, up to 44%, 81% drop on LLaMA; 3% and none on Gemma.)

Checkpoint per prompt: ``causality/prompt/{index}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .engine import Engine
from .judges import JudgeItem
from .spec import Request, SamplingParams
from .stage_utils import Latent, ablate, as_prompt, chunks, fingerprint, restore_items, save_fingerprinted
from .sweep import Stage2Sets, SweepPrompt, chosen_latents, rankings_from

STAGE = "causality"


class CausalityConfig(BaseModel):
    """Stage 2 <-> 3 causality configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1)  # None: each prompt's first jailbreaking K in stage 3
    only_stage3_jailbroken: bool = True  # with k=None this is implied
    active_threshold: float = Field(0.0, ge=0)
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    max_prompts: int | None = Field(None, ge=1)


@dataclass
class CausalityPrompt:
    index: int
    prompt: str
    k: int
    stage3_size: int
    jailbroken_stage3_only: bool
    n_stage2: int
    n_stage2_active: int
    n_switched_off: int
    mean_drop_still_on: float | None  # mean over still-active stage-2 latents of 1 - after/before
    per_latent: list[dict[str, Any]] = field(default_factory=list)
    completion: str = ""
    degenerate: bool = False  # the coherence gate vetoed the judge's jailbreak

    @property
    def fraction_off(self) -> float | None:
        return self.n_switched_off / self.n_stage2_active if self.n_stage2_active else None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "k": self.k, "stage3_size": self.stage3_size,
                "jailbroken_stage3_only": self.jailbroken_stage3_only, "n_stage2": self.n_stage2,
                "n_stage2_active": self.n_stage2_active, "n_switched_off": self.n_switched_off,
                "fraction_off": self.fraction_off, "mean_drop_still_on": self.mean_drop_still_on,
                "per_latent": self.per_latent, "completion": self.completion, "degenerate": self.degenerate}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CausalityPrompt:
        return cls(d["index"], d["prompt"], d["k"], d["stage3_size"], d["jailbroken_stage3_only"], d["n_stage2"],
                   d["n_stage2_active"], d["n_switched_off"], d["mean_drop_still_on"], d.get("per_latent", []),
                   d.get("completion", ""), bool(d.get("degenerate", False)))


@dataclass
class CausalityResult:
    prompts: list[CausalityPrompt]
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.prompts)
        fr = [p.fraction_off for p in self.prompts if p.fraction_off is not None]
        drops = [d["drop"] for p in self.prompts for d in p.per_latent if d["still_on"]]
        per_prompt_drop = [p.mean_drop_still_on for p in self.prompts if p.mean_drop_still_on is not None]
        jb = sum(p.jailbroken_stage3_only for p in self.prompts)
        ju = sum(p.jailbroken_stage3_only or p.degenerate for p in self.prompts)
        return {"n_prompts": n, "jailbroken_stage3_only": jb, "fraction_jailbroken": jb / n if n else 0.0,
                "jailbroken_stage3_only_ungated": ju, "fraction_jailbroken_ungated": ju / n if n else 0.0,
                "mean_fraction_off": float(np.mean(fr)) if fr else None,
                "max_fraction_off": float(np.max(fr)) if fr else None,
                "mean_drop_still_on": float(np.mean(drops)) if drops else None,
                "mean_of_prompt_drops": float(np.mean(per_prompt_drop)) if per_prompt_drop else None}

    def to_json(self) -> dict[str, Any]:
        return {"kind": "causality", "summary": self.summary(), "prompts": [p.to_json() for p in self.prompts],
                "wall_s": self.wall_s, "config": self.config}


def _sweep_prompts(stage3: Any) -> dict[int, SweepPrompt]:
    d = stage3.to_json() if hasattr(stage3, "to_json") and not isinstance(stage3, dict) else stage3
    return {int(p["index"]): SweepPrompt.from_json(p) for p in d.get("prompts", [])}


def run_causality(engine: Engine, stage2: Any, stage3: Any, cfg: CausalityConfig, ctx: StageContext) -> CausalityResult:
    """Ablate only each prompt's stage-3 set; judge; measure the stage-2 latents' response."""
    t0 = time.perf_counter()
    s2 = {it.index: it for it in Stage2Sets.from_result(stage2).selected(only_jailbroken=False)}
    rankings = rankings_from(stage3)
    sweeps = _sweep_prompts(stage3)
    items: list[tuple[int, int, list[Latent]]] = []  # (index, k, stage-3 set)
    for idx, sp in sweeps.items():
        if idx not in s2 or idx not in rankings:
            continue
        k = cfg.k if cfg.k is not None else sp.first_jailbreak_k
        if k is None or (cfg.only_stage3_jailbroken and sp.first_jailbreak_k is None):
            continue
        s3 = rankings[idx][:k]
        if s3:
            items.append((idx, k, s3))
    items.sort()
    if cfg.max_prompts is not None:
        items = items[: cfg.max_prompts]
    thr = cfg.active_threshold
    cfg_fp = cfg.model_dump_json(include={"active_threshold", "chat", "max_new_tokens"})
    fps = {i: fingerprint([s2[i].prompt, str(s2[i].pairs()), str(s3), cfg_fp]) for i, _, s3 in items}
    done = restore_items(ctx, "causality/prompt", fps, CausalityPrompt.from_json)
    ctx.progress(STAGE, len(done), len(items))
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    pending = [x for x in items if x[0] not in done]
    for group in chunks(pending, cfg.batch_size):
        ctx.check_cancelled()
        group = list(group)
        prompts = [as_prompt(s2[i].prompt, cfg.chat) for i, _, _ in group]
        comps = engine.generate([Request(prompt=p, interventions=ablate(s3), sampling=sampling)
                                 for p, (_, _, s3) in zip(prompts, group, strict=True)])
        vs = ctx.judge.judge([JudgeItem(behavior=s2[i].prompt, generation=c.text, prompt=p)
                              for (i, _, _), c, p in zip(group, comps, prompts, strict=True)])
        chosen = chosen_latents(sorted({x for i, _, _ in group for x in s2[i].pairs()}))
        col = {(ly, lat): j for ly, ids in chosen.items() for j, lat in enumerate(ids)}
        before = engine.encode([Request(prompt=p) for p in prompts], latents=chosen)
        after = engine.encode([Request(prompt=p, interventions=ablate(s3)) for p, (_, _, s3) in zip(prompts, group, strict=True)],
                              latents=chosen)
        for (i, k, s3), c, v, rb, ra in zip(group, comps, vs, before, after, strict=True):
            per = []
            for ly, lat in s2[i].pairs():
                vb = np.asarray(rb.layers[ly].values)[:, col[(ly, lat)]]
                va = np.asarray(ra.layers[ly].values)[:, col[(ly, lat)]]
                if vb.max(initial=0.0) <= thr:
                    continue
                still = bool(va.max(initial=0.0) > thr)
                sb, sa = float(vb.sum()), float(va.sum())
                per.append({"layer": ly, "latent": lat, "before": sb, "after": sa, "max_before": float(vb.max()),
                            "max_after": float(va.max(initial=0.0)), "still_on": still,
                            "drop": 1.0 - sa / sb if sb > 0 else 0.0})
            on = [d for d in per if d["still_on"]]
            cp = CausalityPrompt(i, s2[i].prompt, k, len(s3), bool(v.jailbroken), len(s2[i].pairs()), len(per),
                                 len(per) - len(on), float(np.mean([d["drop"] for d in on])) if on else None,
                                 per, c.text, bool(getattr(v, "degenerate", False)))
            done[i] = cp
            save_fingerprinted(ctx, f"causality/prompt/{i}", fps[i], result=cp.to_json())
        ctx.progress(STAGE, len(done), len(items))
    return CausalityResult([done[i] for i, _, _ in items], cfg.model_dump(mode="json"), time.perf_counter() - t0)
