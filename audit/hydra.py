"""The hydra / redundant-latent analysis of the seed paper ("Redundant Features", Tables 5/6).

For each prompt's stage-2 set S:

1. Encode the unablated prompt (chosen-latents mode): S splits into latents active somewhere on
   the prompt (max activation over its tokens > `active_threshold`) and inactive ones.
2. Ablate only the inactive latents, then only the active ones; generate and judge each. The paper:
   dropping the inert latents from the ablation (= ablating the active ones only) makes most
   jailbreaks fail, so silent latents are necessary. A prompt is *impacted* when its full set
   jailbreaks (stage 2's verification) but the active-only ablation does not.
3. Under the active-only ablation, encode the inactive latents again. `engine.encode` reads z at
   layer L after every upstream intervention but before layer L's own latent ops, so a latent
   that "wakes up" because upstream latents were removed shows here. Record which wake, on which
   tokens (BOS / special / post-instruction / other), and their activations.
4. Clamp the woken latents that fire on BOS (or all woken ones) at the BOS position only
   (`ClampLatents`, scope positions=(0,)) to values 2..10 on benign prompts and keep the
   generations (the paper's Tables 5/6: harm-flavoured text, then "no no", then refusal).

Checkpoints: ``hydra/prompt/{index}`` per prompt, ``hydra/clamp`` for the clamp table.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .engine import EncodeResult, Engine
from .spec import ClampLatents, Request, SamplingParams, TokenScope
from .stage_utils import (
    Latent,
    ablate,
    as_prompt,
    chunks,
    fingerprint,
    latents_to_dict,
    restore_items,
    resumed,
    save_fingerprinted,
)
from .sweep import Stage2Item, Stage2Sets, chosen_latents, judge_texts

STAGE = "hydra"
BENIGN_PROMPTS = [
    "Tell me a story.",
    "How to make pasta?",
    "What are the benefits of meditation?",
    "Explain the theory of relativity in simple terms.",
    "Tell me 20 prime numbers separated by space",
]


class HydraConfig(BaseModel):
    """Hydra-analysis configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    only_jailbroken: bool = True
    max_prompts: int | None = Field(None, ge=1)
    active_threshold: float = Field(0.0, ge=0)
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    clamp: bool = True
    clamp_prompts: list[str] = Field(default_factory=lambda: list(BENIGN_PROMPTS))
    clamp_values: list[float] = Field(default_factory=lambda: [2.0, 4.0, 6.0, 8.0, 10.0])
    clamp_set: Literal["bos", "all_woken"] = "bos"
    clamp_from: Literal["impacted", "all"] = "impacted"  # which prompts' woken latents are clamped
    max_clamp_latents: int | None = Field(None, ge=1)  # most frequently woken first
    clamp_max_new_tokens: int = Field(32, ge=1)


def _values(res: EncodeResult, chosen: dict[int, Sequence[int]], wanted: Sequence[Latent]) -> dict[Latent, np.ndarray]:
    """Per wanted latent, its activation at every prompt token ([n_tokens]) from a chosen-latents encode."""
    col = {(ly, i): j for ly, ids in chosen.items() for j, i in enumerate(ids)}
    out = {}
    for ly, i in wanted:
        acts = res.layers[ly]
        assert acts.values is not None
        out[(ly, i)] = np.asarray(acts.values)[:, col[(ly, i)]]
    return out


def token_class(engine: Engine, res: EncodeResult, pos: int) -> str:
    """"bos" (position 0, the BOS id), "special" (a special token), "post_instruction" (the chat
    template's last tokens), or "other" (the instruction itself)."""
    info = engine.info
    tid = res.token_ids[pos]
    if pos == 0 and tid == info.bos_token_id:
        return "bos"
    special = {v for k, v in info.special_token_ids.items() if k != "I"}
    if tid in special:
        return "special"
    if info.n_post_instruction_tokens and pos >= len(res.token_ids) - info.n_post_instruction_tokens:
        return "post_instruction"
    return "other"


@dataclass
class HydraPrompt:
    index: int
    prompt: str
    active: list[Latent]
    inactive: list[Latent]
    jailbroken_full: bool
    jailbroken_active_only: bool | None
    jailbroken_inactive_only: bool | None
    woken: list[dict[str, Any]]  # {"layer", "latent", "max", "tokens": [{"pos", "token", "class", "value"}]}
    completions: dict[str, str] = field(default_factory=dict)

    @property
    def impacted(self) -> bool:
        return bool(self.inactive) and self.jailbroken_full and self.jailbroken_active_only is False

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt,
                "active": [list(x) for x in self.active], "inactive": [list(x) for x in self.inactive],
                "jailbroken_full": self.jailbroken_full, "jailbroken_active_only": self.jailbroken_active_only,
                "jailbroken_inactive_only": self.jailbroken_inactive_only, "impacted": self.impacted,
                "woken": self.woken, "completions": self.completions}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HydraPrompt:
        return cls(d["index"], d["prompt"], [tuple(x) for x in d["active"]], [tuple(x) for x in d["inactive"]],  # type: ignore[misc]
                   d["jailbroken_full"], d["jailbroken_active_only"], d["jailbroken_inactive_only"], d["woken"],
                   d.get("completions", {}))


@dataclass
class HydraResult:
    prompts: list[HydraPrompt]
    clamp: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def woken_latents(self, only_impacted: bool = False) -> list[dict[str, Any]]:
        """Woken latents over prompts: how many prompts, on BOS in how many, max activation."""
        agg: dict[Latent, dict[str, Any]] = {}
        for p in self.prompts:
            if only_impacted and not p.impacted:
                continue
            for w in p.woken:
                key = (int(w["layer"]), int(w["latent"]))
                a = agg.setdefault(key, {"layer": key[0], "latent": key[1], "n_prompts": 0, "n_bos": 0, "max": 0.0})
                a["n_prompts"] += 1
                a["n_bos"] += int(any(t["class"] == "bos" for t in w["tokens"]))
                a["max"] = max(a["max"], float(w["max"]))
        return sorted(agg.values(), key=lambda a: (-a["n_prompts"], a["layer"], a["latent"]))

    def summary(self) -> dict[str, Any]:
        with_inactive = [p for p in self.prompts if p.inactive]
        impacted = [p for p in self.prompts if p.impacted]
        inactive_total = sum(len(p.inactive) for p in impacted)
        woken = [w for p in impacted for w in p.woken]
        classes: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        for w in woken:
            for t in w["tokens"]:
                classes[t["class"]] += 1
                tokens[t["token"]] += 1
        n_act = sum(classes.values())
        on_sys = [w for w in woken if any(t["class"] != "other" for t in w["tokens"])]
        on_bos = [w for w in woken if any(t["class"] == "bos" for t in w["tokens"])]
        return {
            "n_prompts": len(self.prompts),
            "n_with_inactive": len(with_inactive),
            "stage2_latents": sum(len(p.active) + len(p.inactive) for p in self.prompts),
            "inactive_latents": sum(len(p.inactive) for p in self.prompts),
            "unique_inactive_latents": len({x for p in self.prompts for x in p.inactive}),
            "jailbroken_full": sum(p.jailbroken_full for p in self.prompts),
            "jailbroken_active_only": sum(bool(p.jailbroken_active_only) for p in with_inactive),
            "jailbroken_inactive_only": sum(bool(p.jailbroken_inactive_only) for p in with_inactive),
            "n_impacted": len(impacted),
            "impacted_inactive_latents": inactive_total,
            "woken_latents": len(woken),
            "woken_fraction": len(woken) / inactive_total if inactive_total else 0.0,
            "woken_on_system_tokens": len(on_sys) / len(woken) if woken else 0.0,
            "woken_on_bos": len(on_bos) / len(woken) if woken else 0.0,
            "bos_share_of_system": len(on_bos) / len(on_sys) if on_sys else 0.0,
            "activation_share_by_class": {k: v / n_act for k, v in sorted(classes.items())} if n_act else {},
            "top_tokens": [{"token": t, "count": c, "share": c / n_act} for t, c in tokens.most_common(15)],
        }

    def to_json(self) -> dict[str, Any]:
        return {"kind": "hydra", "summary": self.summary(), "woken_latents": self.woken_latents(),
                "clamp": self.clamp, "prompts": [p.to_json() for p in self.prompts], "wall_s": self.wall_s,
                "config": self.config}


def _analyse_group(engine: Engine, group: list[Stage2Item], cfg: HydraConfig, ctx: StageContext) -> list[HydraPrompt]:
    thr = cfg.active_threshold
    prompts = [as_prompt(it.prompt, cfg.chat) for it in group]
    union = chosen_latents(sorted({x for it in group for x in it.pairs()}))
    base = engine.encode([Request(prompt=p) for p in prompts], latents=union)
    splits = []
    for it, res in zip(group, base, strict=True):
        vals = _values(res, union, it.pairs())
        active = sorted(x for x, v in vals.items() if v.max(initial=0.0) > thr)
        splits.append((active, sorted(set(it.pairs()) - set(active))))
    # generations: inactive-only and active-only ablations
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    todo = [(j, name, s) for j, (act, ina) in enumerate(splits) for name, s in (("inactive_only", ina), ("active_only", act)) if s]
    verdict: dict[tuple[int, str], tuple[bool, str]] = {}
    for part in chunks(todo, cfg.batch_size):
        comps = engine.generate([Request(prompt=prompts[j], interventions=ablate(s), sampling=sampling) for j, _, s in part])
        jb = judge_texts(ctx, [group[j].prompt for j, _, _ in part], [c.text for c in comps])
        for (j, name, _), c, b in zip(part, comps, jb, strict=True):
            verdict[(j, name)] = (b, c.text)
    # wake-up: inactive latents under the active-only ablation
    woken: dict[int, list[dict[str, Any]]] = {j: [] for j in range(len(group))}
    rows = [j for j, (act, ina) in enumerate(splits) if act and ina]
    if rows:
        chosen = chosen_latents(sorted({x for j in rows for x in splits[j][1]}))
        for part in chunks(rows, cfg.batch_size):
            res_list = engine.encode([Request(prompt=prompts[j], interventions=ablate(splits[j][0])) for j in part],
                                     latents=chosen)
            for j, res in zip(part, res_list, strict=True):
                for (ly, i), v in _values(res, chosen, splits[j][1]).items():
                    on = np.flatnonzero(v > thr)
                    if len(on):
                        woken[j].append({"layer": ly, "latent": i, "max": float(v.max()), "tokens": [
                            {"pos": int(t), "token": res.tokens[t], "class": token_class(engine, res, int(t)),
                             "value": float(v[t])} for t in on]})
    out = []
    for j, it in enumerate(group):
        act, ina = splits[j]
        jb_a = verdict.get((j, "active_only"))
        jb_i = verdict.get((j, "inactive_only"))
        out.append(HydraPrompt(it.index, it.prompt, act, ina, bool(it.jailbroken),
                               None if jb_a is None else jb_a[0], None if jb_i is None else jb_i[0], woken[j],
                               {k: v[1] for k, v in (("active_only", jb_a), ("inactive_only", jb_i)) if v}))
    return out


def clamp_table(engine: Engine, latents: Sequence[Latent], prompts: Sequence[str], values: Sequence[float],
                chat: bool = True, max_new_tokens: int = 32, batch_size: int = 16) -> list[dict[str, Any]]:
    """Generations with `latents` clamped to each value at the BOS position only (plus a baseline row)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    lat = {ly: tuple(ids) for ly, ids in latents_to_dict(latents).items()}
    todo: list[tuple[str, float | None]] = [(p, v) for p in prompts for v in [None, *values]]
    reqs = [Request(prompt=as_prompt(p, chat), sampling=sampling, interventions=() if v is None else (
        ClampLatents(latents=lat, value=float(v), scope=TokenScope(kind="positions", positions=(0,))),)) for p, v in todo]
    comps = [c for part in chunks(reqs, batch_size) for c in engine.generate(part)]
    return [{"prompt": p, "value": v, "completion": c.text} for (p, v), c in zip(todo, comps, strict=True)]


def run_hydra(engine: Engine, stage2: Any, cfg: HydraConfig, ctx: StageContext) -> HydraResult:
    """Steps 1-4 of the module doc for every selected stage-2 prompt."""
    t0 = time.perf_counter()
    items = Stage2Sets.from_result(stage2).selected(cfg.only_jailbroken, cfg.max_prompts)
    cfg_fp = cfg.model_dump_json(include={"active_threshold", "chat", "max_new_tokens"})
    fps = {it.index: fingerprint([it.prompt, str(it.pairs()), str(it.jailbroken), cfg_fp]) for it in items}
    done = restore_items(ctx, "hydra/prompt", fps, HydraPrompt.from_json)
    ctx.progress(STAGE, len(done), len(items))
    pending = [it for it in items if it.index not in done]
    for group in chunks(pending, cfg.batch_size):
        ctx.check_cancelled()
        for hp in _analyse_group(engine, list(group), cfg, ctx):
            done[hp.index] = hp
            save_fingerprinted(ctx, f"hydra/prompt/{hp.index}", fps[hp.index], result=hp.to_json())
        ctx.progress(STAGE, len(done), len(items))
    result = HydraResult([done[it.index] for it in items], {}, cfg.model_dump(mode="json"))
    if cfg.clamp:
        agg = result.woken_latents(only_impacted=cfg.clamp_from == "impacted")
        if cfg.clamp_set == "bos":
            agg = [a for a in agg if a["n_bos"] > 0]
        if cfg.max_clamp_latents is not None:
            agg = agg[: cfg.max_clamp_latents]
        lat = sorted((a["layer"], a["latent"]) for a in agg)
        clamp: dict[str, Any] = {"latents": {str(k): v for k, v in latents_to_dict(lat).items()},
                                 "values": cfg.clamp_values, "position": 0, "rows": []}
        if not lat:
            clamp["note"] = f"no woken latent to clamp (clamp_set={cfg.clamp_set}, clamp_from={cfg.clamp_from})"
        else:
            fp = fingerprint([str(lat), str(cfg.clamp_prompts), str(cfg.clamp_values), str(cfg.clamp_max_new_tokens),
                              str(cfg.chat)])
            got = resumed(ctx, "hydra/clamp", fp)
            if got is not None:
                clamp["rows"] = got["rows"]
            else:
                ctx.check_cancelled()
                clamp["rows"] = clamp_table(engine, lat, cfg.clamp_prompts, cfg.clamp_values, cfg.chat,
                                            cfg.clamp_max_new_tokens, cfg.batch_size)
                save_fingerprinted(ctx, "hydra/clamp", fp, rows=clamp["rows"])
        result.clamp = clamp
    result.wall_s = time.perf_counter() - t0
    return result
