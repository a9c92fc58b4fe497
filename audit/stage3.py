"""Stage 3 of the seed paper: interaction discovery with a factorization machine (FM).

1. Dataset (`audit.features`): harmful prompts (label 1) and an equal number of harmless ones
   (label 0), split 80/10/10 per class; SAE activations on the last 4 prompt tokens at every SAE
   layer from `min_layer` (2) up to the steering layer (the refusal direction's layer), as sparse
   features (layer, latent, position). Values are rescaled per feature (`transform`, default
   "maxabs": divide by the feature's training max — a standard FM preprocessing that keeps
   sparsity; the paper does not say; "raw" is available).
2. A second-order FM (`audit.fm`, Rendle 2010, the paper's Eq. 2) with embedding size 20 (5 and 50
   selectable), BCE, Adam lr 1e-3, 20 epochs, best epoch on validation, accuracy on test.
3. Ranking: each latent's embedding is the mean of its (layer, latent, position) feature
   embeddings (features seen at least `min_train_count` times in training). For a prompt with
   stage-2 set S, every other latent is scored by the cosine of its embedding with those of S
   (`similarity`: "max" over S — default —, "mean" over S, or "centroid": cosine with S's mean
   embedding); stage-2 latents without an embedding (never active on the last tokens of the FM
   data) are left out of the comparison and counted.
4. Sweep: for K = 100, 200, ..., 2000, ablate S together with the top-K ranked latents (zero
   ablation at all tokens, error term kept, as in stage 2), generate greedily and judge; record the
   jailbreaks per K (the paper's Table 2 counts a prompt jailbroken at any K).

`ablation_sweep` (shared with the probe baseline) batches all (prompt, K) generations of a group of
prompts into engine.generate calls and checkpoints each prompt once its sweep is done
(``{key}/prompt/{index}``). Features are checkpointed per encode batch, the FM weights once
trained (``stage3/fm``), so a resumed job redoes neither.

Stage-2 input: `Stage2Sets` — a list of (prompt, {layer: [latent ids]}) items — built from E1's
`Stage2Result` (object or JSON, or a chain result holding one) or given directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .features import (
    FeatureDataset,
    Transform,
    encode_checkpointed,
    encode_last_tokens,
    latent_groups,
    stratified_split,
)
from .fm import FactorizationMachine, TrainConfig, TrainResult, train_fm
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
    resumed,
    save_fingerprinted,
)

STAGE = "stage3"
Similarity = Literal["max", "mean", "centroid"]


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

    ks: list[int] = Field(default_factory=lambda: list(range(100, 2001, 100)))
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    prompts_per_group: int = Field(8, ge=1)
    stop_at_first_jailbreak: bool = False  # saves generations; later Ks then count as jailbroken (assumed monotone)
    keep_completions: bool = True

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 0 for k in v):
            raise ValueError("ks must be non-empty and >= 0")
        return sorted(set(int(k) for k in v))


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
            open_ = list(group)
            for k in cfg.ks:
                step: list[tuple[Stage2Item, int, list[Latent]]] = []
                for it in open_:
                    n, s = sets_for(it, k)
                    if (it.index, n) not in verdicts and not any(t[0].index == it.index and t[1] == n for t in step):
                        step.append((it, n, s))
                run(step)
                open_ = [it for it in open_ if not verdicts[(it.index, sets_for(it, k)[0])][0]]
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


# ---------------------------------------------------------------------------- FM ranking


def latent_embeddings(V: np.ndarray, keys: np.ndarray, usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(latent_keys [m, 2], embeddings [m, k]): each (layer, latent)'s mean feature embedding."""
    latent_keys, group = latent_groups(keys, usable)
    V = np.asarray(V, np.float64)
    E = np.zeros((len(latent_keys), V.shape[1]), np.float64)
    cnt = np.zeros(len(latent_keys), np.float64)
    ok = group >= 0
    np.add.at(E, group[ok], V[ok])
    np.add.at(cnt, group[ok], 1.0)
    return latent_keys, (E / np.maximum(cnt, 1.0)[:, None]).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rank_by_similarity(latent_keys: np.ndarray, E: np.ndarray, stage2: Sequence[Latent], similarity: Similarity = "max",
                       top: int | None = None, allowed: set[Latent] | None = None) -> tuple[list[Latent], list[float], int]:
    """Latents not in `stage2`, best first by cosine of their embedding with the stage-2 latents'.

    Returns (ranking, scores, number of stage-2 latents that have an embedding). An empty
    ranking when none does."""
    pos = {(int(a), int(b)): i for i, (a, b) in enumerate(np.asarray(latent_keys).tolist())}
    s_idx = [pos[x] for x in stage2 if x in pos]
    if not s_idx:
        return [], [], 0
    U = _unit(np.asarray(E, np.float64))
    S = U[s_idx]
    if similarity == "centroid":
        score = U @ _unit(S.mean(0))
    else:
        cos = U @ S.T
        score = cos.max(1) if similarity == "max" else cos.mean(1)
    mask = np.ones(len(U), bool)
    mask[s_idx] = False
    for x in stage2:  # stage-2 latents never ranked
        if x in pos:
            mask[pos[x]] = False
    if allowed is not None:
        mask &= np.array([(int(a), int(b)) in allowed for a, b in np.asarray(latent_keys).tolist()], bool)
    cand = np.flatnonzero(mask)
    order = cand[np.lexsort((cand, -score[cand]))]
    if top is not None:
        order = order[:top]
    return ([(int(latent_keys[i][0]), int(latent_keys[i][1])) for i in order], [float(score[i]) for i in order],
            len(s_idx))


# ---------------------------------------------------------------------------- config + result


class FeatureConfig(BaseModel):
    """How the FM / probe dataset is built (shared by stage 3 and the linear-probe baseline)."""

    model_config = ConfigDict(extra="forbid")

    harmful_dataset: str = "temaq-abliterated:harmful"
    harmless_dataset: str = "temaq-abliterated:harmless"
    split: str = "all"  # which split of each named set to draw from (then 80/10/10 here)
    n_per_class: int | None = Field(None, ge=2)  # None: min(#harmful, #harmless) ("an equal number")
    seed: int = 0
    chat: bool = True
    layers: list[int] | None = None  # explicit SAE layers; None: SAE layers in [min_layer, steering_layer]
    min_layer: int = 2
    steering_layer: int | None = None  # None: the direction job's layer, else every SAE layer >= min_layer
    n_positions: int = Field(4, ge=1, le=255)
    encode_top_k: int = Field(256, ge=1, le=4096)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    transform: Transform = "maxabs"
    batch_size: int = Field(16, ge=1)


class Stage3Config(BaseModel):
    """Stage-3 job configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    stage2_job_id: str | None = None  # job runner: whose stage-2 sets to extend
    direction_job_id: str | None = None  # job runner: the steering layer (features up to it)
    features: FeatureConfig = Field(default_factory=lambda: FeatureConfig.model_validate({}))
    embedding_dim: int = Field(20, ge=1)  # the paper: 5, 20 (used), 50
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(20, ge=1)
    train_batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    init_std: float = Field(0.1, gt=0)
    seed: int = 0
    train_threads: int | None = Field(1, ge=1)  # torch threads while training (None: unchanged; 1 is fastest here)
    similarity: Similarity = "max"
    candidates: Literal["all", "active"] = "all"  # "active": only latents active on the prompt's last tokens
    min_train_count: int = Field(1, ge=0)
    only_jailbroken: bool = True
    max_prompts: int | None = Field(None, ge=1)
    sweep: SweepConfig = Field(default_factory=lambda: SweepConfig.model_validate({}))
    register_sets: bool = True
    save_features: bool = True

    @model_validator(mode="after")
    def _check(self) -> Stage3Config:
        if self.features.split_fractions[0] <= 0:
            raise ValueError("features.split_fractions: the training fraction must be > 0")
        return self


def resolve_layers(engine: Engine, fc: FeatureConfig, steering_layer: int | None) -> tuple[list[int], str]:
    """Feature layers and a note of how they were chosen."""
    sae_layers = sorted(engine.info.sae_layers)
    if fc.layers:
        bad = [ly for ly in fc.layers if ly not in sae_layers]
        if bad:
            raise ValueError(f"features.layers: no SAE at layer(s) {bad} (SAE layers: {sae_layers})")
        return sorted(set(fc.layers)), "explicit"
    top = fc.steering_layer if fc.steering_layer is not None else steering_layer
    layers = [ly for ly in sae_layers if ly >= fc.min_layer and (top is None or ly <= top)]
    if not layers:
        raise ValueError(f"no SAE layer in [{fc.min_layer}, {top}] (SAE layers: {sae_layers})")
    how = f"SAE layers in [{fc.min_layer}, {top}] (steering layer)" if top is not None else \
        f"SAE layers >= {fc.min_layer} (no steering layer given)"
    return layers, how


def load_fm_prompts(fc: FeatureConfig) -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts, equal numbers (seeded sample of the larger set)."""
    harmful = load_prompts(fc.harmful_dataset, fc.split, None, fc.seed)
    harmless = load_prompts(fc.harmless_dataset, fc.split, None, fc.seed)
    n = min(len(harmful), len(harmless))
    if fc.n_per_class is not None:
        n = min(n, fc.n_per_class)
    rng = np.random.default_rng(fc.seed)
    pick = lambda xs: [xs[i] for i in np.sort(rng.permutation(len(xs))[:n])]  # noqa: E731
    return pick(harmful), pick(harmless)


def build_feature_dataset(engine: Engine, fc: FeatureConfig, layers: Sequence[int], ctx: StageContext,
                          harmful: Sequence[str] | None = None, harmless: Sequence[str] | None = None,
                          key: str = "stage3/features", stage: str = "stage3/features") -> FeatureDataset:
    """Encode harmful (1) + harmless (0) prompts into a `FeatureDataset` with a stratified split."""
    if harmful is None or harmless is None:
        harmful, harmless = load_fm_prompts(fc)
    texts = [*harmful, *harmless]
    labels = [1] * len(harmful) + [0] * len(harmless)
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError("the FM dataset needs at least 2 harmful and 2 harmless prompts")
    prompts = [as_prompt(t, fc.chat) for t in texts]
    examples = encode_checkpointed(engine, prompts, texts, layers, fc.n_positions, fc.encode_top_k, fc.batch_size,
                                   ctx, key, stage)
    split = stratified_split(labels, fc.split_fractions, fc.seed)
    ds = FeatureDataset.build(examples, labels, split, layers, fc.n_positions)
    ds.meta["texts"] = texts
    return ds


@dataclass
class Stage3Result:
    prompts: list[SweepPrompt]
    ks: list[int]
    features: dict[str, Any]
    fm: dict[str, Any]
    layers: list[int]
    layers_note: str
    rankings: dict[int, list[Latent]]
    ranking_scores: dict[int, list[float]]
    fm_V: np.ndarray
    fm_w: np.ndarray
    fm_w0: float
    feature_keys: np.ndarray
    feature_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    union_set_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        n = len(self.prompts)
        jb = [p for p in self.prompts if p.first_jailbreak_k is not None]
        added = {x for p in jb for x in self.rankings.get(p.index, [])[: p.first_jailbreak_k or 0]}
        ju = [p for p in self.prompts if p.first_jailbreak_k_ungated is not None]
        return {"n_prompts": n, "jailbroken_any_k": len(jb), "asr_any_k": len(jb) / n if n else 0.0,
                "jailbroken_any_k_ungated": len(ju), "asr_any_k_ungated": len(ju) / n if n else 0.0,
                "unique_stage3_latents": len(added),
                "mean_first_k": float(np.mean([p.first_jailbreak_k for p in jb])) if jb else None,
                "test_accuracy": self.fm.get("test_accuracy")}

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "stage3",
            "summary": self.summary(),
            "per_k": per_k_table(self.prompts, self.ks),
            "ks": self.ks,
            "features": self.features,
            "fm": self.fm,
            "layers": self.layers,
            "layers_note": self.layers_note,
            "timings": self.timings,
            "union_set_id": self.union_set_id,
            "prompts": [{**p.to_json(), "top_latents": [
                {"layer": ly, "latent": i, "score": s}
                for (ly, i), s in zip(self.rankings.get(p.index, [])[:20], self.ranking_scores.get(p.index, [])[:20], strict=True)]}
                for p in self.prompts],
            "config": self.config,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Rankings (per prompt, -1 padded), FM weights and (optionally) the feature rows."""
        out = rankings_to_arrays([p.index for p in self.prompts], self.rankings, self.ranking_scores)
        out.update({"fm_V": self.fm_V.astype(np.float32), "fm_w": self.fm_w.astype(np.float32),
                    "fm_w0": np.array([self.fm_w0], np.float32), "feature_keys": self.feature_keys.astype(np.int64)})
        out.update(self.feature_arrays)
        return out


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


# ---------------------------------------------------------------------------- the stage


def _train_or_restore(ds: FeatureDataset, cfg: Stage3Config, ctx: StageContext, fp: str) -> tuple[TrainResult | None, FactorizationMachine, dict[str, Any]]:
    got = resumed(ctx, "stage3/fm", fp)
    if got is not None and Path(got.get("path", "")).is_file():
        with np.load(got["path"]) as z:
            model = FactorizationMachine(ds.n_features, cfg.embedding_dim)
            model.load_state_dict({"w0": torch.from_numpy(z["w0"]).reshape(()), "w": torch.from_numpy(z["w"]),
                                   "V": torch.from_numpy(z["V"])})
        return None, model.eval(), dict(got["metrics"])
    tc = TrainConfig(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.train_batch_size, weight_decay=cfg.weight_decay,
                     seed=cfg.seed, num_threads=cfg.train_threads)
    res = train_fm(ds.part("train"), ds.part("val"), ds.part("test"), ds.n_features, cfg.embedding_dim, tc,
                   cfg.init_std, on_epoch=lambda e, row: ctx.progress("stage3/train", e, cfg.epochs, row))
    model = cast(FactorizationMachine, res.model)
    path = Path(ctx.out_dir) / "stage3_fm.npz"
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(path, w0=sd["w0"].reshape(1), w=sd["w"], V=sd["V"])
    metrics = res.metrics()
    save_fingerprinted(ctx, "stage3/fm", fp, path=str(path), metrics=metrics)
    return res, model, metrics


def run_stage3(engine: Engine, stage2: Any, cfg: Stage3Config, ctx: StageContext,
               steering_layer: int | None = None, harmful: Sequence[str] | None = None,
               harmless: Sequence[str] | None = None) -> Stage3Result:
    """Train the FM on SAE features, rank latents per stage-2 set, sweep top-K ablations (module doc).

    `stage2`: anything `Stage2Sets.from_result` accepts. `harmful` / `harmless` override the
    configured datasets (notebooks, tests)."""
    t0 = time.perf_counter()
    fc = cfg.features
    items = Stage2Sets.from_result(stage2).selected(cfg.only_jailbroken, cfg.max_prompts)
    layers, how = resolve_layers(engine, fc, steering_layer)

    t = time.perf_counter()
    raw = build_feature_dataset(engine, fc, layers, ctx, harmful, harmless)
    encode_s = time.perf_counter() - t
    ds = raw.transformed(fc.transform)

    t = time.perf_counter()
    fp = fingerprint([*raw.meta["texts"], str(layers),
                      cfg.model_dump_json(include={"features", "embedding_dim", "lr", "epochs", "train_batch_size",
                                                   "weight_decay", "init_std", "seed"})])
    _, model, metrics = _train_or_restore(ds, cfg, ctx, fp)
    train_s = time.perf_counter() - t

    t = time.perf_counter()
    V = model.V.detach().numpy()
    usable = raw.train_counts() >= cfg.min_train_count
    latent_keys, E = latent_embeddings(V, raw.keys, usable)
    kmax = max(cfg.sweep.ks)
    allowed: dict[int, set[Latent]] = {}
    if cfg.candidates == "active" and items:
        exs = encode_last_tokens(engine, [as_prompt(it.prompt, cfg.sweep.chat) for it in items], layers,
                                 fc.n_positions, fc.encode_top_k, fc.batch_size)
        from .features import unpack_keys

        for it, ex in zip(items, exs, strict=True):
            allowed[it.index] = {(int(a), int(b)) for a, b, _ in unpack_keys(ex.keys).tolist()}
    rankings: dict[int, list[Latent]] = {}
    scores: dict[int, list[float]] = {}
    embedded: dict[int, int] = {}
    for it in items:
        r, s, n_emb = rank_by_similarity(latent_keys, E, it.pairs(), cfg.similarity, kmax, allowed.get(it.index))
        rankings[it.index], scores[it.index], embedded[it.index] = r, s, n_emb
    rank_s = time.perf_counter() - t

    t = time.perf_counter()
    swept = ablation_sweep(engine, items, rankings, cfg.sweep, ctx, "stage3", STAGE)
    sweep_s = time.perf_counter() - t
    prompts = []
    union: set[Latent] = set()
    for it in items:
        p = swept[it.index]
        p.extra["stage2_embedded"] = embedded[it.index]
        k = p.first_jailbreak_k
        if k is not None:
            s3 = rankings[it.index][:k]
            union |= set(s3)
            if cfg.register_sets:
                p.latent_set_id = ctx.register_latent_set(
                    f"stage3/prompt/{it.index}", latents_to_dict(sorted(set(it.pairs()) | set(s3))),
                    {"kind": "stage3_prompt", "prompt_index": it.index, "prompt": it.prompt, "k": k,
                     "stage2_size": len(it.pairs()), "stage3_size": len(s3)})
        prompts.append(p)
    res = Stage3Result(
        prompts=prompts, ks=cfg.sweep.ks, features={**raw.summary(), "transform": fc.transform},
        fm={**metrics, "embedding_dim": cfg.embedding_dim, "n_parameters": int(ds.n_features * (cfg.embedding_dim + 1) + 1),
            "latents_embedded": int(len(latent_keys))},
        layers=layers, layers_note=how, rankings=rankings, ranking_scores=scores, fm_V=V,
        fm_w=model.linear_weights(), fm_w0=float(model.w0.detach()), feature_keys=raw.keys,
        feature_arrays=raw.arrays() if cfg.save_features else {},
        config=cfg.model_dump(mode="json"),
    )
    if cfg.register_sets and union:
        res.union_set_id = ctx.register_latent_set("stage3/union", latents_to_dict(sorted(union)),
                                                   {"kind": "stage3_union", **res.summary()})
    res.timings = {"encode_s": encode_s, "train_s": train_s, "rank_s": rank_s, "sweep_s": sweep_s,
                   "total_s": time.perf_counter() - t0}
    return res
