"""What the analyses share, torch-free: stage-2 sets as input (`Stage2Sets`), the top-K ablation
sweep (`ablation_sweep`, used by stage 3 and the probe baseline) and per-prompt latent rankings.

Kept apart from `stage3` so that the analyses which train no model (baselines, hydra, causality,
downstream, taxonomy) import on the thin client install, without torch.

`ablation_sweep` batches all (prompt, K) generations of a group of prompts into engine.generate
calls and checkpoints each prompt once its sweep is done (``{key}/prompt/{index}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .engine import Engine
from .judges import JudgeItem
from .spec import Request, SamplingParams
from .stage_utils import (
    Latent,
    ablate,
    as_prompt,
    chunks,
    dict_to_latents,
    fingerprint,
    latents_to_dict,
    restore_items,
    save_fingerprinted,
    sorted_grid,
)

# ---------------------------------------------------------------------------- stage-2 input


@dataclass
class Stage2Item:
    """One stage-2 prompt: its text and final latent set."""

    index: int
    prompt: str
    latents: dict[int, list[int]]
    jailbroken: bool = True
    latent_set_id: str | None = None

    def pairs(self) -> list[Latent]:
        return dict_to_latents(self.latents)


@dataclass
class Stage2Sets:
    """What the analyses need from stage 2: per prompt (prompt, {layer: [ids]}, verified?)."""

    items: list[Stage2Item]

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, dict[int, Sequence[int]]]]) -> Stage2Sets:
        return cls([Stage2Item(i, p, {int(k): [int(x) for x in v] for k, v in s.items()})
                    for i, (p, s) in enumerate(pairs)])

    @classmethod
    def from_result(cls, obj: Any) -> Stage2Sets:
        """From a Stage2Sets, a `Stage2Result` (or its JSON), a chain result holding one under
        "stage2", or a list of (prompt, {layer: ids}) pairs."""
        if isinstance(obj, Stage2Sets):
            return obj
        if hasattr(obj, "to_json") and not isinstance(obj, dict):
            obj = obj.to_json()
        if isinstance(obj, dict):
            if obj.get("kind") != "stage2" and isinstance(obj.get("stage2"), dict):
                obj = obj["stage2"]
            if "prompts" not in obj:
                raise ValueError("not a stage-2 result: no 'prompts'")
            items = []
            for p in obj["prompts"]:
                lat = p.get("final_latents", p.get("latents", {}))
                items.append(Stage2Item(int(p["index"]), str(p["prompt"]),
                                        {int(k): [int(x) for x in v] for k, v in lat.items() if v},
                                        bool(p.get("jailbroken", True)), p.get("latent_set_id")))
            return cls(items)
        return cls.from_pairs(list(obj))

    def selected(self, only_jailbroken: bool = True, max_prompts: int | None = None) -> list[Stage2Item]:
        """Items with a non-empty set (and a verified jailbreak, by default), at most `max_prompts`."""
        out = [it for it in self.items if it.latents and (it.jailbroken or not only_jailbroken)]
        return out[:max_prompts] if max_prompts is not None else out


def chosen_latents(pairs: Sequence[Latent]) -> dict[int, Sequence[int]]:
    """{layer: sorted ids} of (layer, id) pairs, typed for `engine.encode(latents=...)`."""
    return {ly: ids for ly, ids in latents_to_dict(pairs).items()}


def judge_flags(ctx: StageContext, behaviors: Sequence[str], generations: Sequence[str],
                chat: bool = True) -> list[tuple[bool, bool]]:
    """ctx.judge's (jailbroken, degenerate) for (behaviour, generation) pairs: jailbroken is gated
    (the coherence gate's veto applied), ``jailbroken or degenerate`` is the ungated verdict."""
    if not behaviors:
        return []
    vs = ctx.judge.judge([JudgeItem(behavior=b, generation=g, prompt=as_prompt(b, chat))
                          for b, g in zip(behaviors, generations, strict=True)])
    if len(vs) != len(behaviors):
        raise RuntimeError(f"the judge returned {len(vs)} verdicts for {len(behaviors)} items")
    return [(bool(v.jailbroken), bool(getattr(v, "degenerate", False))) for v in vs]


def judge_texts(ctx: StageContext, behaviors: Sequence[str], generations: Sequence[str],
                chat: bool = True) -> list[bool]:
    """ctx.judge's (gated) jailbreak verdicts for (behaviour, generation) pairs."""
    return [jb for jb, _ in judge_flags(ctx, behaviors, generations, chat)]


# ---------------------------------------------------------------------------- the top-K sweep


@dataclass
class KOutcome:
    k: int
    n_added: int  # latents actually added (< k when the ranking is shorter)
    jailbroken: bool
    completion: str = ""
    degenerate: bool = False  # the coherence gate vetoed the judge's jailbreak

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "n_added": self.n_added, "jailbroken": self.jailbroken, "completion": self.completion,
                "degenerate": self.degenerate}


@dataclass
class SweepPrompt:
    index: int
    prompt: str
    stage2_size: int
    n_ranked: int
    outcomes: list[KOutcome]
    latent_set_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_jailbreak_k(self) -> int | None:
        return next((o.k for o in self.outcomes if o.jailbroken), None)

    @property
    def first_jailbreak_k_ungated(self) -> int | None:
        """The first K an ungated judge would have counted (a degenerate completion included)."""
        return next((o.k for o in self.outcomes if o.jailbroken or o.degenerate), None)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "stage2_size": self.stage2_size,
                "n_ranked": self.n_ranked, "first_jailbreak_k": self.first_jailbreak_k,
                "first_jailbreak_k_ungated": self.first_jailbreak_k_ungated,
                "per_k": [o.to_json() for o in self.outcomes], "latent_set_id": self.latent_set_id, **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepPrompt:
        known = {"index", "prompt", "stage2_size", "n_ranked", "first_jailbreak_k", "first_jailbreak_k_ungated",
                 "per_k", "latent_set_id"}
        return cls(int(d["index"]), d["prompt"], int(d["stage2_size"]), int(d["n_ranked"]),
                   [KOutcome(int(o["k"]), int(o["n_added"]), bool(o["jailbroken"]), o.get("completion", ""),
                             bool(o.get("degenerate", False))) for o in d["per_k"]], d.get("latent_set_id"), {k: v for k, v in d.items() if k not in known})


class SweepConfig(BaseModel):
    """Generation settings of a top-K ablation sweep."""

    model_config = ConfigDict(extra="forbid")

    ks: Annotated[list[int], sorted_grid("ks", 0, int)] = Field(
        default_factory=lambda: list(range(100, 2001, 100)))
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    prompts_per_group: int = Field(8, ge=1)
    stop_at_first_jailbreak: bool = False  # saves generations; later Ks then count as jailbroken (assumed monotone)
    keep_completions: bool = True


def ablation_sweep(engine: Engine, items: Sequence[Stage2Item], rankings: dict[int, list[Latent]],
                   cfg: SweepConfig, ctx: StageContext, key: str, stage: str) -> dict[int, SweepPrompt]:
    """For every item and K: ablate its stage-2 set plus the top K of its ranking, generate, judge.

    Generations of a group of prompts go to batched engine.generate calls; identical ablation sets
    (a ranking shorter than K) are generated once. Each prompt is checkpointed as soon as its
    group is done (``{key}/prompt/{index}``, with a fingerprint of its inputs)."""
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    sweep_fp = cfg.model_dump_json(exclude={"batch_size", "prompts_per_group"})
    fps = {it.index: fingerprint([it.prompt, str(it.pairs()), str(rankings.get(it.index, [])[: max(cfg.ks)]),
                                  sweep_fp]) for it in items}
    done = restore_items(ctx, f"{key}/prompt", fps, SweepPrompt.from_json)
    ctx.progress(stage, len(done), len(items))
    pending = [it for it in items if it.index not in done]
    for group in chunks(pending, cfg.prompts_per_group):
        ctx.check_cancelled()
        verdicts: dict[tuple[int, int], tuple[bool, str, bool]] = {}  # (index, n_added) -> verdict

        def sets_for(it: Stage2Item, k: int) -> tuple[int, list[Latent]]:
            extra = rankings.get(it.index, [])[:k]
            return len(extra), sorted(set(it.pairs()) | set(extra))

        def run(todo: list[tuple[Stage2Item, int, list[Latent]]],
                verdicts: dict[tuple[int, int], tuple[bool, str, bool]] = verdicts) -> None:
            for part in chunks(todo, cfg.batch_size):
                reqs = [Request(prompt=as_prompt(it.prompt, cfg.chat), interventions=ablate(s), sampling=sampling)
                        for it, _, s in part]
                comps = engine.generate(reqs)
                jb = judge_flags(ctx, [it.prompt for it, _, _ in part], [c.text for c in comps], cfg.chat)
                for (it, n, _), c, (b, dg) in zip(part, comps, jb, strict=True):
                    verdicts[(it.index, n)] = (b, c.text, dg)

        if cfg.stop_at_first_jailbreak:
            # K by K as written, but the Ks of a window are generated in one call (windows of 1, 2, 4, ...
            # Ks, at most batch_size rows): one short batch per K left the model mostly idle on a CPU. The
            # window's verdicts are then committed K by K exactly as the one-K loop would, so a prompt's
            # outcomes stop at its first jailbreak and the Ks generated past it are dropped unread.
            open_ = list(group)
            ks, pos, width = list(cfg.ks), 0, 1
            while pos < len(ks) and open_:
                window = ks[pos : pos + max(1, min(width, cfg.batch_size // len(open_)))]
                step: dict[tuple[int, int], tuple[Stage2Item, int, list[Latent]]] = {}
                for it in open_:
                    for k in window:
                        n, s = sets_for(it, k)
                        if (it.index, n) not in verdicts:
                            step.setdefault((it.index, n), (it, n, s))
                ahead: dict[tuple[int, int], tuple[bool, str, bool]] = {}
                run(list(step.values()), ahead)
                for k in window:
                    for it in open_:
                        key_n = (it.index, sets_for(it, k)[0])
                        if key_n not in verdicts:
                            verdicts[key_n] = ahead[key_n]
                    open_ = [it for it in open_ if not verdicts[(it.index, sets_for(it, k)[0])][0]]
                pos, width = pos + len(window), width * 2
        else:
            todo: list[tuple[Stage2Item, int, list[Latent]]] = []
            for it in group:
                seen: set[int] = set()
                for k in cfg.ks:
                    n, s = sets_for(it, k)
                    if n not in seen:
                        seen.add(n)
                        todo.append((it, n, s))
            run(todo)
        for it in group:
            outcomes = []
            for k in cfg.ks:
                n, _ = sets_for(it, k)
                if (it.index, n) not in verdicts:
                    break  # stopped after the first jailbreak
                b, text, dg = verdicts[(it.index, n)]
                outcomes.append(KOutcome(k, n, b, text if cfg.keep_completions else "", dg))
            res = SweepPrompt(it.index, it.prompt, len(it.pairs()), len(rankings.get(it.index, [])), outcomes)
            done[it.index] = res
            save_fingerprinted(ctx, f"{key}/prompt/{it.index}", fps[it.index], result=res.to_json())
            ctx.progress(stage, len(done), len(items), {"index": it.index, "first_jailbreak_k": res.first_jailbreak_k})
    return {it.index: done[it.index] for it in items}


def per_k_table(prompts: Sequence[SweepPrompt], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Jailbreaks per K (a prompt stopped early counts as jailbroken at every later K), gated and
    ungated (a degenerate completion counted as the wrapped judge called it)."""
    rows = []
    for k in ks:
        n = nu = 0
        for p in prompts:
            o = next((o for o in p.outcomes if o.k == k), None)
            if o is not None:
                n += int(o.jailbroken)
                nu += int(o.jailbroken or o.degenerate)
            elif p.first_jailbreak_k is not None and p.first_jailbreak_k <= k:
                n += 1
                nu += 1
        m = len(prompts)
        rows.append({"k": int(k), "jailbroken": n, "asr": n / m if m else 0.0,
                     "jailbroken_ungated": nu, "asr_ungated": nu / m if m else 0.0})
    return rows


def rankings_to_arrays(indices: Sequence[int], rankings: dict[int, list[Latent]],
                       scores: dict[int, list[float]] | None = None) -> dict[str, np.ndarray]:
    """{"ranking_index": [n], "ranking": [n, Kmax, 2] (-1 padded), "ranking_scores": [n, Kmax]}."""
    kmax = max([len(rankings.get(i, [])) for i in indices] + [1])
    R = np.full((len(indices), kmax, 2), -1, np.int32)
    S = np.full((len(indices), kmax), np.nan, np.float32)
    for r, i in enumerate(indices):
        lat = rankings.get(i, [])
        if lat:
            R[r, : len(lat)] = np.asarray(lat, np.int32)
            if scores is not None and scores.get(i):
                S[r, : len(lat)] = np.asarray(scores[i], np.float32)
    return {"ranking_index": np.asarray(list(indices), np.int64), "ranking": R, "ranking_scores": S}


def rankings_from(obj: Any) -> dict[int, list[Latent]]:
    """Per-prompt rankings from a Stage3Result / ProbeResult object or a stored result dict
    (arrays under "arrays", or top-level "ranking" / "ranking_index")."""
    if hasattr(obj, "rankings") and not isinstance(obj, dict):
        return {int(k): list(v) for k, v in obj.rankings.items()}
    arrays = obj.get("arrays") or obj
    if "ranking" not in arrays or "ranking_index" not in arrays:
        raise ValueError("the result holds no rankings (arrays 'ranking' and 'ranking_index')")
    R = np.asarray(arrays["ranking"]).reshape(len(np.asarray(arrays["ranking_index"]).reshape(-1)), -1, 2)
    out = {}
    for row, idx in enumerate(np.asarray(arrays["ranking_index"]).reshape(-1).tolist()):
        out[int(idx)] = [(int(a), int(b)) for a, b in R[row].tolist() if a >= 0]
    return out
