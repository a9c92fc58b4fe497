"""Stage 1 of the seed paper: top-K SAE latents aligned with the refusal direction, per prompt.

For every SAE latent z with decoder row d_z, cos(v, d_z) with the refusal direction v; the
candidate set L_K is the top K latents of each (non-excluded) SAE layer. Per harmful prompt, K
grows from `k_start` in steps of `k_step` up to `k_max` until ablating L_K (AblateLatents at every
non-excluded SAE layer, error term kept) jailbreaks the prompt — judged on a greedy generation by
ctx.judge. Layers 1 and 2 are excluded by default (the paper: their latents are grammatical and
ablating them makes the output degenerate).

The ranking is global (it depends on the direction and the decoders, not on the prompt); what is
per prompt is the K at which the prompt breaks, hence its candidate pool for stage 2.

The ranking comes from `engine.sae_rows(direction=v, top_k=k_max)`: the engine ranks its decoder
rows where the weights live (in-process, or server-side through the SAERows RPC), so a notebook
runs stage 1 against a remote server without fetching any W_dec.

Batching: at each K, the still-unbroken prompts are generated in one call (chunked to batch_size).
Checkpoints: ``stage1/prompt/{i}`` once a prompt is resolved (jailbroken, not jailbroken by k_max,
or not refused at baseline); ``stage1/state`` = {fingerprint, next_k, baseline completions} so a
restart continues at the next K.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .judges import JudgeItem
from .spec import Request, SamplingParams
from .stage_utils import (
    ablate,
    as_prompt,
    fingerprint,
    generate_batched,
    restore_items,
    resumed,
    save_fingerprinted,
)

STAGE = "stage1"


class Stage1Config(BaseModel):
    """Stage-1 configuration (round-trips through JSON; the direction is an argument)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "temaq-abliterated:harmful"
    split: str = "test"
    n: int | None = Field(default=64, ge=1)
    seed: int = 0
    chat: bool = True
    k_start: int = Field(default=10, ge=1)
    k_step: int = Field(default=10, ge=1)
    k_max: int = Field(default=200, ge=1)
    exclude_layers: list[int] = Field(default_factory=lambda: [1, 2])
    rank_by: Literal["cosine", "abs_cosine"] = "cosine"
    max_new_tokens: int = Field(default=64, ge=1)
    check_baseline: bool = True  # generate without intervention first; skip prompts not refused
    batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Stage1Config:
        if self.k_max < self.k_start:
            raise ValueError("k_max must be >= k_start")
        return self

    def ks(self) -> list[int]:
        return list(range(self.k_start, self.k_max + 1, self.k_step))


def top_k_latents(ranking: dict[int, list[int]], k: int) -> dict[int, list[int]]:
    """L_K: the top k of every layer's ranking."""
    return {ly: ids[:k] for ly, ids in ranking.items()}


@dataclass
class Stage1Prompt:
    index: int
    prompt: str
    status: str  # "jailbroken" | "not_jailbroken" | "not_refused_at_baseline"
    k: int | None  # the K that jailbroke it (None otherwise)
    latents: dict[int, list[int]]  # L_K at that K (the stage-2 candidate pool); {} unless jailbroken
    completion: str = ""  # the generation at K (or at the last K tried)
    baseline_completion: str | None = None
    generations: int = 0  # generate calls made for this prompt (incl. baseline)
    degenerate_ks: list[int] = field(default_factory=list)  # Ks the coherence gate vetoed (0 = baseline)

    @property
    def jailbroken_ungated(self) -> bool:
        """Jailbroken at some tried K without the coherence gate (an ungated search stops there)."""
        return self.status == "jailbroken" or any(k > 0 for k in self.degenerate_ks)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "status": self.status, "k": self.k,
                "latents": {str(ly): ids for ly, ids in self.latents.items()}, "completion": self.completion,
                "baseline_completion": self.baseline_completion, "generations": self.generations,
                "degenerate_ks": self.degenerate_ks, "jailbroken_ungated": self.jailbroken_ungated}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stage1Prompt:
        return cls(int(d["index"]), d["prompt"], d["status"], d["k"],
                   {int(ly): [int(i) for i in ids] for ly, ids in d["latents"].items()}, d.get("completion", ""),
                   d.get("baseline_completion"), int(d.get("generations", 0)),
                   [int(k) for k in d.get("degenerate_ks", [])])


@dataclass
class Stage1Result:
    prompts: list[Stage1Prompt]
    ks: list[int]
    asr: list[float]  # fraction of evaluated prompts jailbroken at K <= ks[j]
    n_evaluated: int  # prompts refused at baseline (all, when check_baseline is off)
    layers: list[int]  # SAE layers ablated
    ranking: dict[int, list[int]]  # per layer, the top k_max latent ids by cosine
    ranking_cosines: dict[int, list[float]]
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "stage1",
            "ks": self.ks,
            "asr": self.asr,
            "n_prompts": len(self.prompts),
            "n_evaluated": self.n_evaluated,
            "n_jailbroken": sum(p.status == "jailbroken" for p in self.prompts),
            "n_jailbroken_ungated": sum(p.jailbroken_ungated for p in self.prompts
                                        if p.status != "not_refused_at_baseline"),
            "asr_ungated": [sum(1 for p in self.prompts if p.status != "not_refused_at_baseline" and (
                (p.k is not None and p.k <= k) or any(0 < d <= k for d in p.degenerate_ks))) / self.n_evaluated
                if self.n_evaluated else 0.0 for k in self.ks],
            "layers": self.layers,
            "ranking": {str(ly): ids for ly, ids in self.ranking.items()},
            "ranking_cosines": {str(ly): c for ly, c in self.ranking_cosines.items()},
            "prompts": [p.to_json() for p in self.prompts],
            "wall_s": self.wall_s,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stage1Result:
        return cls(
            prompts=[Stage1Prompt.from_json(p) for p in d["prompts"]], ks=list(d["ks"]), asr=list(d["asr"]),
            n_evaluated=int(d["n_evaluated"]), layers=[int(x) for x in d["layers"]],
            ranking={int(k): list(v) for k, v in d["ranking"].items()},
            ranking_cosines={int(k): list(v) for k, v in d.get("ranking_cosines", {}).items()},
            wall_s=float(d.get("wall_s", 0.0)), config=d.get("config", {}),
        )

    def pools(self) -> dict[int, dict[int, list[int]]]:
        """Prompt index -> candidate pool, for the jailbroken prompts (stage 2's input)."""
        return {p.index: p.latents for p in self.prompts if p.status == "jailbroken"}


def run_stage1(
    engine: Engine,
    prompts: Sequence[str],
    direction: np.ndarray | Sequence[float],
    cfg: Stage1Config,
    ctx: StageContext,
) -> Stage1Result:
    """Grow K until ablating the top-K latents per layer jailbreaks each prompt (see module doc).

    `direction` is the refusal direction (d_model floats); the engine ranks its SAE latents by
    the cosine of their decoder rows with it."""
    t0 = time.perf_counter()
    prompts = list(prompts)
    sae_layers = sorted(engine.info.sae_layers)
    layers = [ly for ly in sae_layers if ly not in set(cfg.exclude_layers)]
    if not layers:
        raise ValueError(f"no SAE layer left: SAE layers {sae_layers}, excluded {cfg.exclude_layers}")
    rows = engine.sae_rows(layers, direction=np.asarray(direction, dtype=np.float32), top_k=cfg.k_max,
                           rank_by=cfg.rank_by, decoder=False)
    ranking = {ly: [int(i) for i in rows[ly].latents] for ly in layers}
    ranking_cosines = {ly: [float(c) for c in np.asarray(rows[ly].cosines)] for ly in layers}
    ks = cfg.ks()
    ctx.progress(STAGE, 0, len(ks))  # stage 1 starts: watchers and the compute meter see it before any generation
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    fp = fingerprint([*prompts, str(ranking), cfg.model_dump_json(include={
        "chat", "k_start", "k_step", "k_max", "exclude_layers", "rank_by", "max_new_tokens", "check_baseline"})])

    def req(i: int, latents: dict[int, list[int]]) -> Request:
        return Request(prompt=as_prompt(prompts[i], cfg.chat), interventions=ablate(latents), sampling=sampling)

    degenerate_ks: dict[int, list[int]] = {}  # Ks whose completion the coherence gate called degenerate

    def judge_flags(items: list[tuple[int, str]]) -> list[tuple[bool, bool]]:
        """(jailbroken, degenerate) per (prompt index, generation)."""
        verdicts = ctx.judge.judge([JudgeItem(behavior=prompts[i], generation=g, prompt=as_prompt(prompts[i], cfg.chat))
                                    for i, g in items])
        return [(bool(v.jailbroken), bool(getattr(v, "degenerate", False))) for v in verdicts]

    def judge(items: list[tuple[int, str]], k: int = 0) -> list[bool]:
        flags = judge_flags(items)
        for (i, _), (_, dg) in zip(items, flags, strict=True):
            if dg:
                degenerate_ks.setdefault(i, []).append(k)
        return [jb for jb, _ in flags]

    results = restore_items(ctx, "stage1/prompt", dict.fromkeys(range(len(prompts)), fp), Stage1Prompt.from_json)

    def finish(r: Stage1Prompt) -> None:
        r.degenerate_ks = degenerate_ks.get(r.index, [])
        results[r.index] = r
        save_fingerprinted(ctx, f"stage1/prompt/{r.index}", fp, result=r.to_json())

    state = resumed(ctx, "stage1/state", fp)
    if state is None:
        state = {"fingerprint": fp, "next_k": None, "baseline": {}}
    baseline: dict[str, str] = dict(state["baseline"])
    calls: dict[int, int] = {i: 0 for i in range(len(prompts))}
    open_ = [i for i in range(len(prompts)) if i not in results]

    if cfg.check_baseline and state["next_k"] is None and open_:
        comps = generate_batched(engine, [req(i, {}) for i in open_], cfg.batch_size)
        broken = judge([(i, c.text) for i, c in zip(open_, comps, strict=True)])
        for i, c, b in zip(open_, comps, broken, strict=True):
            calls[i] += 1
            baseline[str(i)] = c.text
            if b:
                finish(Stage1Prompt(i, prompts[i], "not_refused_at_baseline", None, {}, c.text, c.text, calls[i]))
        open_ = [i for i in open_ if i not in results]
    state = {"fingerprint": fp, "next_k": state["next_k"] or ks[0], "baseline": baseline}
    ctx.save_checkpoint("stage1/state", state)

    total = len(ks)
    last_text: dict[int, str] = {}
    # K by K as written, but the Ks of a window (1, 2, 4, ... Ks, at most batch_size rows) are generated
    # and judged in one call: one short batch per K left the model mostly idle on a CPU. The window's
    # outcomes are then applied K by K exactly as the one-K loop would (a prompt is finished at its first
    # jailbreak; what was generated for it at later Ks of the window is dropped unread).
    todo = [j for j, k in enumerate(ks) if k >= state["next_k"]]
    width = 1
    while todo:
        ctx.check_cancelled()
        window = todo[: max(1, min(width, cfg.batch_size // max(1, len(open_))))] if open_ else todo
        todo, width = todo[len(window) :], width * 2
        ahead: dict[tuple[int, int], tuple[str, bool, bool]] = {}  # (prompt, K) -> (text, jailbroken, degenerate)
        if open_:
            tried = [(i, ks[j]) for j in window for i in open_]
            comps = generate_batched(engine, [req(i, top_k_latents(ranking, k)) for i, k in tried], cfg.batch_size)
            flags = judge_flags([(i, c.text) for (i, _), c in zip(tried, comps, strict=True)])
            ahead = {ik: (c.text, jb, dg) for ik, c, (jb, dg) in zip(tried, comps, flags, strict=True)}
        for j in window:
            k = ks[j]
            if open_:
                latents = top_k_latents(ranking, k)
                for i in open_:
                    text, b, dg = ahead[(i, k)]
                    if dg:
                        degenerate_ks.setdefault(i, []).append(k)
                    calls[i] += 1
                    last_text[i] = text
                    if b:
                        finish(Stage1Prompt(i, prompts[i], "jailbroken", k, {ly: list(v) for ly, v in latents.items()},
                                            text, baseline.get(str(i)), calls[i]))
                open_ = [i for i in open_ if i not in results]
            nxt = ks[j + 1] if j + 1 < len(ks) else cfg.k_max + 1
            state = {"fingerprint": fp, "next_k": nxt, "baseline": baseline}
            ctx.save_checkpoint("stage1/state", state)
            ctx.progress(STAGE, j + 1, total, {"k": k, "jailbroken": sum(r.status == "jailbroken" for r in results.values())})
    for i in open_:
        finish(Stage1Prompt(i, prompts[i], "not_jailbroken", None, {}, last_text.get(i, ""), baseline.get(str(i)),
                            calls[i]))

    ordered = [results[i] for i in range(len(prompts))]
    evaluated = [p for p in ordered if p.status != "not_refused_at_baseline"]
    n_eval = len(evaluated)
    asr = [sum(1 for p in evaluated if p.k is not None and p.k <= k) / n_eval if n_eval else 0.0 for k in ks]
    return Stage1Result(
        prompts=ordered, ks=ks, asr=asr, n_evaluated=n_eval, layers=layers, ranking=ranking,
        ranking_cosines=ranking_cosines,
        wall_s=time.perf_counter() - t0, config=cfg.model_dump(mode="json"),
    )


def run_stage1_from_config(engine: Engine, cfg: Stage1Config, direction: np.ndarray | Sequence[float],
                           ctx: StageContext) -> Stage1Result:
    """Load the configured prompts and run stage 1 against `direction`."""
    return run_stage1(engine, load_prompts(cfg.dataset, cfg.split, cfg.n, cfg.seed), direction, cfg, ctx)
