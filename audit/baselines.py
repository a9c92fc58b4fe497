"""Baselines and controls for the stage-2/3 latent sets (seed paper, "Analysis").

- Linear probe (`run_probe_baseline`, kind ``probe_baseline``): logistic regression on the same
  sparse SAE features as the FM (reused from a stage-3 result when given, else built the same
  way), latents ranked by |weight| (max over their positions), then the same top-K sweep as stage 3
  (ablate the stage-2 set + top K, generate, judge). With a stage-3 result, the FM-vs-probe
  jailbreak table per K on the same prompts (the paper: FM finds far more jailbreaks).
- Random latents (`run_random_baseline`, ``random_baseline``): per prompt, as many randomly chosen
  latents *active on that prompt* as its stage-2 set holds (per layer, by default), ablated,
  generated, judged (the paper: 0 / 5 jailbreaks).
- O'Brien et al. (`run_obrien_baseline`, ``obrien_baseline``): per prompt, the latents active on
  at least k of its tokens, ablated; ASR per k (the paper's appendix figure; max ASR 0.1 / 0.07).

Every loop over prompts checkpoints per prompt; randomness is seeded per (seed, prompt index).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .features import FeatureConfig, FeatureDataset, build_feature_dataset, latent_groups, resolve_layers
from .spec import Request, SamplingParams
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
    sorted_grid,
)
from .sweep import (
    Stage2Item,
    Stage2Sets,
    SweepConfig,
    SweepPrompt,
    ablation_sweep,
    judge_flags,
    per_k_table,
    rankings_to_arrays,
)

# ---------------------------------------------------------------------------- shared


def active_token_counts(engine: Engine, prompts: Sequence[Any], layers: Sequence[int], top_k: int = 512,
                        batch_size: int = 16) -> list[tuple[dict[Latent, int], int]]:
    """Per prompt: ({(layer, latent): number of prompt tokens where it is > 0}, saturated tokens)."""
    out = []
    for part in chunks(list(prompts), batch_size):
        for r in engine.encode([Request(prompt=p) for p in part], layers=list(layers), top_k=top_k):
            counts: dict[Latent, int] = {}
            sat = 0
            for ly in layers:
                acts = r.layers[ly]
                assert acts.top_indices is not None and acts.top_values is not None
                for idx, val in zip(acts.top_indices, acts.top_values, strict=True):
                    sat += int(len(idx) >= top_k)
                    for i in np.asarray(idx)[np.asarray(val) > 0].tolist():
                        counts[(ly, int(i))] = counts.get((ly, int(i)), 0) + 1
            out.append((counts, sat))
    return out


def _stored_stage3(stage3: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(JSON, arrays) of a Stage3Result object or stored result dict."""
    if stage3 is None:
        return None, {}
    if hasattr(stage3, "to_json") and not isinstance(stage3, dict):
        return stage3.to_json(), stage3.arrays()
    d = dict(stage3)
    return d, dict(d.get("arrays") or {})


# ---------------------------------------------------------------------------- linear probe


class ProbeConfig(BaseModel):
    """Linear-probe baseline configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    features: FeatureConfig = Field(default_factory=lambda: FeatureConfig.model_validate({}))
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(20, ge=1)
    train_batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    train_threads: int | None = Field(1, ge=1)  # torch threads while training (None: unchanged; 1 is fastest here)
    aggregate: Literal["max", "sum"] = "max"  # |w| over a latent's positions
    min_train_count: int = Field(1, ge=0)
    only_jailbroken: bool = True
    max_prompts: int | None = Field(None, ge=1)
    sweep: SweepConfig = Field(default_factory=lambda: SweepConfig.model_validate({"ks": [100, 500, 1000, 2000]}))


def probe_ranking(w: np.ndarray, keys: np.ndarray, usable: np.ndarray | None,
                  aggregate: str = "max") -> tuple[list[Latent], list[float]]:
    """Latents by the |weight| of their features (max or sum over positions), best first."""
    latent_keys, group = latent_groups(keys, usable)
    score = np.zeros(len(latent_keys), np.float64)
    ok = group >= 0
    a = np.abs(np.asarray(w, np.float64))[ok]
    if aggregate == "sum":
        np.add.at(score, group[ok], a)
    else:
        np.maximum.at(score, group[ok], a)
    order = np.lexsort((np.arange(len(score)), -score))
    return ([(int(latent_keys[i][0]), int(latent_keys[i][1])) for i in order], [float(score[i]) for i in order])


@dataclass
class ProbeResult:
    prompts: list[SweepPrompt]
    ks: list[int]
    probe: dict[str, Any]
    features: dict[str, Any]
    rankings: dict[int, list[Latent]]
    global_ranking: list[Latent]
    global_scores: list[float]
    weights: np.ndarray
    feature_keys: np.ndarray
    comparison: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        n = len(self.prompts)
        jb = sum(p.first_jailbreak_k is not None for p in self.prompts)
        ju = sum(p.first_jailbreak_k_ungated is not None for p in self.prompts)
        return {"n_prompts": n, "jailbroken_any_k": jb, "asr_any_k": jb / n if n else 0.0,
                "jailbroken_any_k_ungated": ju, "asr_any_k_ungated": ju / n if n else 0.0,
                "test_accuracy": self.probe.get("test_accuracy")}

    def to_json(self) -> dict[str, Any]:
        return {"kind": "probe_baseline", "summary": self.summary(), "per_k": per_k_table(self.prompts, self.ks),
                "ks": self.ks, "probe": self.probe, "features": self.features, "comparison": self.comparison,
                "top_latents": [{"layer": ly, "latent": i, "abs_weight": s}
                                for (ly, i), s in zip(self.global_ranking[:50], self.global_scores[:50], strict=True)],
                "prompts": [p.to_json() for p in self.prompts], "timings": self.timings, "config": self.config}

    def arrays(self) -> dict[str, np.ndarray]:
        out = rankings_to_arrays([p.index for p in self.prompts], self.rankings)
        out.update({"probe_w": self.weights.astype(np.float32), "feature_keys": self.feature_keys.astype(np.int64)})
        return out


def fm_vs_probe(stage3_json: dict[str, Any], probe_prompts: Sequence[SweepPrompt], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Jailbreaks per K of the FM (stage 3) and the probe on the prompts both swept."""
    fm = {int(p["index"]): SweepPrompt.from_json(p) for p in stage3_json.get("prompts", [])}
    common = [p for p in probe_prompts if p.index in fm]
    fm_common = [fm[p.index] for p in common]
    fm_ks = {int(k) for k in stage3_json.get("ks", [])}
    rows = []
    all_ks = sorted(set(ks) | fm_ks)
    fm_tab = {r["k"]: r["jailbroken"] for r in per_k_table(fm_common, sorted(fm_ks))}
    pr_tab = {r["k"]: r["jailbroken"] for r in per_k_table(common, ks)}
    for k in all_ks:
        rows.append({"k": k, "n_prompts": len(common), "fm_jailbroken": fm_tab.get(k), "probe_jailbroken": pr_tab.get(k)})
    rows.append({"k": "any", "n_prompts": len(common),
                 "fm_jailbroken": sum(p.first_jailbreak_k is not None for p in fm_common),
                 "probe_jailbroken": sum(p.first_jailbreak_k is not None for p in common)})
    return rows


def run_probe_baseline(engine: Engine, stage2: Any, cfg: ProbeConfig, ctx: StageContext, stage3: Any = None,
                       steering_layer: int | None = None, harmful: Sequence[str] | None = None,
                       harmless: Sequence[str] | None = None) -> ProbeResult:
    """Train the logistic probe, rank latents by |w|, sweep top-K ablations with the stage-2 sets."""
    t0 = time.perf_counter()
    items = Stage2Sets.from_result(stage2).selected(cfg.only_jailbroken, cfg.max_prompts)
    s3_json, s3_arrays = _stored_stage3(stage3)
    if s3_json is not None and "features_indices" in s3_arrays:
        raw = FeatureDataset.from_arrays(s3_arrays, s3_json["layers"], int(s3_json["features"]["n_positions"]))
        source = "stage3 job features"
    else:
        layers, _ = resolve_layers(engine, cfg.features, steering_layer)
        raw = build_feature_dataset(engine, cfg.features, layers, ctx, harmful, harmless, key="probe/features",
                                    stage="probe/features")
        source = "built here"
    transform = (s3_json or {}).get("features", {}).get("transform", cfg.features.transform) if s3_json else \
        cfg.features.transform
    ds = raw.transformed(transform)
    from .fm import TrainConfig, train_logistic  # torch: only the probe trains a model

    t = time.perf_counter()
    tc = TrainConfig(lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.train_batch_size, weight_decay=cfg.weight_decay,
                     seed=cfg.seed, num_threads=cfg.train_threads)
    res = train_logistic(ds.part("train"), ds.part("val"), ds.part("test"), ds.n_features, tc,
                         on_epoch=lambda e, row: ctx.progress("probe/train", e, cfg.epochs, row))
    train_s = time.perf_counter() - t
    w = res.model.linear_weights()  # type: ignore[operator]
    ranking, scores = probe_ranking(w, raw.keys, raw.train_counts() >= cfg.min_train_count, cfg.aggregate)
    kmax = max(cfg.sweep.ks)
    rankings = {}
    for it in items:
        s2 = set(it.pairs())
        rankings[it.index] = [x for x in ranking if x not in s2][:kmax]
    t = time.perf_counter()
    swept = ablation_sweep(engine, items, rankings, cfg.sweep, ctx, "probe", "probe_baseline")
    prompts = [swept[it.index] for it in items]
    out = ProbeResult(prompts=prompts, ks=cfg.sweep.ks, probe={**res.metrics(), "source": source},
                      features={**raw.summary(), "transform": transform}, rankings=rankings,
                      global_ranking=ranking, global_scores=scores, weights=w, feature_keys=raw.keys,
                      config=cfg.model_dump(mode="json"))
    if s3_json is not None:
        out.comparison = fm_vs_probe(s3_json, prompts, cfg.sweep.ks)
    out.timings = {"train_s": train_s, "sweep_s": time.perf_counter() - t, "total_s": time.perf_counter() - t0}
    return out


# ---------------------------------------------------------------------------- random latents


class RandomConfig(BaseModel):
    """Random-latents control configuration."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    n_draws: int = Field(1, ge=1)
    stratify_by_layer: bool = True  # draw as many per layer as the stage-2 set has there
    encode_top_k: int = Field(512, ge=1, le=4096)
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    only_jailbroken: bool = True
    max_prompts: int | None = Field(None, ge=1)


def draw_random(active: Sequence[Latent], stage2: Sequence[Latent], rng: np.random.Generator,
                stratify: bool = True) -> tuple[list[Latent], int]:
    """|stage2| random active latents not in stage2 (per layer when `stratify`); (set, shortfall)."""
    s2 = set(stage2)
    pool = sorted(set(active) - s2)
    want = len(s2)
    chosen: list[Latent] = []
    if stratify:
        need: dict[int, int] = {}
        for ly, _ in s2:
            need[ly] = need.get(ly, 0) + 1
        for ly in sorted(need):
            cand = [x for x in pool if x[0] == ly]
            take = min(need[ly], len(cand))
            chosen += [cand[i] for i in sorted(rng.choice(len(cand), take, replace=False).tolist())] if take else []
    rest = [x for x in pool if x not in set(chosen)]
    more = min(want - len(chosen), len(rest))
    if more > 0:
        chosen += [rest[i] for i in sorted(rng.choice(len(rest), more, replace=False).tolist())]
    return sorted(chosen), want - len(chosen)


@dataclass
class RandomPrompt:
    index: int
    prompt: str
    stage2_size: int
    n_active: int
    draws: list[dict[str, Any]]  # {"latents": {layer: ids}, "shortfall", "jailbroken", "completion"}

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "stage2_size": self.stage2_size,
                "n_active": self.n_active, "draws": self.draws,
                "jailbroken_any": any(d["jailbroken"] for d in self.draws)}


@dataclass
class RandomResult:
    prompts: list[RandomPrompt]
    n_draws: int
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.prompts)
        per_draw = [sum(p.draws[d]["jailbroken"] for p in self.prompts if len(p.draws) > d) for d in range(self.n_draws)]
        per_draw_u = [sum(p.draws[d]["jailbroken"] or bool(p.draws[d].get("degenerate")) for p in self.prompts
                          if len(p.draws) > d) for d in range(self.n_draws)]
        return {"n_prompts": n, "jailbroken_per_draw": per_draw, "jailbroken_per_draw_ungated": per_draw_u,
                "asr_mean_ungated": float(np.mean(per_draw_u)) / n if n and per_draw_u else 0.0,
                "mean_jailbroken": float(np.mean(per_draw)) if per_draw else 0.0,
                "jailbroken_any_draw": sum(any(d["jailbroken"] for d in p.draws) for p in self.prompts),
                "asr_mean": float(np.mean(per_draw)) / n if n else 0.0,
                "mean_set_size": float(np.mean([p.stage2_size for p in self.prompts])) if n else 0.0,
                "total_shortfall": sum(d["shortfall"] for p in self.prompts for d in p.draws)}

    def to_json(self) -> dict[str, Any]:
        return {"kind": "random_baseline", "summary": self.summary(), "prompts": [p.to_json() for p in self.prompts],
                "wall_s": self.wall_s, "config": self.config}


def run_random_baseline(engine: Engine, stage2: Any, cfg: RandomConfig, ctx: StageContext) -> RandomResult:
    """Ablate as many random active latents as each stage-2 set holds; count jailbreaks."""
    t0 = time.perf_counter()
    items = Stage2Sets.from_result(stage2).selected(cfg.only_jailbroken, cfg.max_prompts)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    cfg_fp = cfg.model_dump_json(exclude={"batch_size", "max_prompts"})
    fps = {it.index: fingerprint([it.prompt, str(it.pairs()), cfg_fp]) for it in items}
    done = restore_items(ctx, "random/prompt", fps, lambda r: RandomPrompt(
        r["index"], r["prompt"], r["stage2_size"], r["n_active"], r["draws"]))
    pending = [it for it in items if it.index not in done]
    ctx.progress("random_baseline", len(done), len(items))
    for group in chunks(pending, cfg.batch_size):
        ctx.check_cancelled()
        group = list(group)
        layers = sorted({ly for it in group for ly in it.latents}) if cfg.stratify_by_layer else \
            sorted(engine.info.sae_layers)
        acts = [c for c, _ in active_token_counts(engine, [as_prompt(it.prompt, cfg.chat) for it in group], layers,
                                                  cfg.encode_top_k, cfg.batch_size)]
        todo: list[tuple[Stage2Item, int, list[Latent], int]] = []
        for it, counts in zip(group, acts, strict=True):
            rng = np.random.default_rng([cfg.seed, it.index])
            for d in range(cfg.n_draws):
                chosen, short = draw_random(list(counts), it.pairs(), rng, cfg.stratify_by_layer)
                todo.append((it, d, chosen, short))
        reqs = [Request(prompt=as_prompt(it.prompt, cfg.chat), interventions=ablate(s), sampling=sampling)
                for it, _, s, _ in todo]
        comps = [c for part in chunks(reqs, cfg.batch_size) for c in engine.generate(part)]
        jb = judge_flags(ctx, [it.prompt for it, _, _, _ in todo], [c.text for c in comps], cfg.chat)
        for it, counts in zip(group, acts, strict=True):
            draws = [{"latents": {str(k): v for k, v in latents_to_dict(s).items()}, "shortfall": short,
                      "jailbroken": b, "completion": c.text, "degenerate": dg}
                     for (jt, _, s, short), c, (b, dg) in zip(todo, comps, jb, strict=True) if jt.index == it.index]
            rp = RandomPrompt(it.index, it.prompt, len(it.pairs()), len(counts), draws)
            done[it.index] = rp
            save_fingerprinted(ctx, f"random/prompt/{it.index}", fps[it.index], result=rp.to_json())
        ctx.progress("random_baseline", len(done), len(items))
    return RandomResult([done[it.index] for it in items], cfg.n_draws, cfg.model_dump(mode="json"),
                        time.perf_counter() - t0)


# ---------------------------------------------------------------------------- O'Brien et al.


class ObrienConfig(BaseModel):
    """O'Brien et al. baseline: ablate latents active on >= k prompt tokens; ASR per k."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "temaq-abliterated:harmful"
    split: str = "test"
    n: int | None = Field(32, ge=1)
    seed: int = 0
    ks: Annotated[list[int], sorted_grid("ks", 1, int)] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 15, 20])
    layers: list[int] | None = None  # None: every SAE layer not excluded
    exclude_layers: list[int] = Field(default_factory=lambda: [1, 2])
    encode_top_k: int = Field(512, ge=1, le=4096)
    chat: bool = True
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    only_jailbroken: bool = True
    max_prompts: int | None = Field(None, ge=1)
    check_baseline: bool = False  # generate unablated first; prompts not refused are left out of the ASR


@dataclass
class ObrienResult:
    prompts: list[dict[str, Any]]  # {"index", "prompt", "per_k": [{"k", "size", "jailbroken", "completion"}]}
    ks: list[int]
    layers: list[int]
    saturated_tokens: int
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def evaluated(self) -> list[dict[str, Any]]:
        """Prompts counted in the ASR: all, or those refused at baseline when it was checked."""
        return [p for p in self.prompts if not p.get("baseline_jailbroken")]

    def per_k(self) -> list[dict[str, Any]]:
        prompts = self.evaluated()
        n = len(prompts)
        rows = []
        for j, k in enumerate(self.ks):
            outs = [p["per_k"][j] for p in prompts]
            jb = sum(bool(o["jailbroken"]) for o in outs)
            ju = sum(bool(o["jailbroken"]) or bool(o.get("degenerate")) for o in outs)
            rows.append({"k": k, "jailbroken": jb, "asr": jb / n if n else 0.0,
                         "jailbroken_ungated": ju, "asr_ungated": ju / n if n else 0.0,
                         "mean_set_size": float(np.mean([o["size"] for o in outs])) if outs else 0.0})
        return rows

    def to_json(self) -> dict[str, Any]:
        rows = self.per_k()
        return {"kind": "obrien_baseline", "per_k": rows, "max_asr": max([r["asr"] for r in rows] + [0.0]),
                "max_asr_ungated": max([r["asr_ungated"] for r in rows] + [0.0]),
                "n_prompts": len(self.prompts), "n_evaluated": len(self.evaluated()), "ks": self.ks, "layers": self.layers,
                "saturated_tokens": self.saturated_tokens, "prompts": self.prompts, "wall_s": self.wall_s,
                "config": self.config}


def run_obrien_baseline(engine: Engine, prompts: Sequence[str] | Any, cfg: ObrienConfig,
                        ctx: StageContext) -> ObrienResult:
    """`prompts`: texts, or a stage-2 result (its selected prompts are used)."""
    t0 = time.perf_counter()
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        texts = [(i, p) for i, p in enumerate(prompts)]
    else:
        texts = [(it.index, it.prompt) for it in Stage2Sets.from_result(prompts).selected(cfg.only_jailbroken)]
    if cfg.max_prompts is not None:
        texts = texts[: cfg.max_prompts]
    sae_layers = sorted(engine.info.sae_layers)
    layers = sorted(set(cfg.layers)) if cfg.layers else [ly for ly in sae_layers if ly not in set(cfg.exclude_layers)]
    bad = [ly for ly in layers if ly not in sae_layers]
    if bad or not layers:
        raise ValueError(f"layers: no SAE at {bad or 'any selected layer'} (SAE layers {sae_layers})")
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    cfg_fp = cfg.model_dump_json(include={"ks", "layers", "exclude_layers", "encode_top_k", "chat", "max_new_tokens",
                                          "check_baseline"})
    done: dict[int, dict[str, Any]] = {}
    sat_total = 0
    for i, text in texts:
        got = resumed(ctx, f"obrien/prompt/{i}", fingerprint([text, cfg_fp]))
        if got is not None:
            done[i] = got["result"]
            sat_total += int(got.get("saturated", 0))
    pending = [(i, t) for i, t in texts if i not in done]
    ctx.progress("obrien_baseline", len(done), len(texts))
    for group in chunks(pending, cfg.batch_size):
        ctx.check_cancelled()
        group = list(group)
        counts = active_token_counts(engine, [as_prompt(t, cfg.chat) for _, t in group], layers, cfg.encode_top_k,
                                     cfg.batch_size)
        todo: list[tuple[int, str, int, list[Latent]]] = []
        sets: dict[tuple[int, int], list[Latent]] = {}
        for (i, text), (cnt, _) in zip(group, counts, strict=True):
            seen: dict[tuple[Latent, ...], int] = {}
            for k in cfg.ks:
                s = sorted(x for x, n in cnt.items() if n >= k)
                sets[(i, k)] = s
                if s and tuple(s) not in seen:
                    seen[tuple(s)] = k
                    todo.append((i, text, k, s))
            if cfg.check_baseline:
                todo.append((i, text, 0, []))
        verdict: dict[tuple[int, tuple[Latent, ...]], tuple[bool, str, bool]] = {}
        for part in chunks(todo, cfg.batch_size):
            comps = engine.generate([Request(prompt=as_prompt(t, cfg.chat), interventions=ablate(s), sampling=sampling)
                                     for _, t, _, s in part])
            jb = judge_flags(ctx, [t for _, t, _, _ in part], [c.text for c in comps], cfg.chat)
            for (i, _, _, s), c, (b, dg) in zip(part, comps, jb, strict=True):
                verdict[(i, tuple(s))] = (b, c.text, dg)
        for (i, text), (_, sat) in zip(group, counts, strict=True):
            per_k = []
            for k in cfg.ks:
                s = sets[(i, k)]
                b, comp, dg = verdict.get((i, tuple(s)), (False, "", False)) if s else (False, "", False)
                per_k.append({"k": k, "size": len(s), "jailbroken": b, "completion": comp, "degenerate": dg})
            done[i] = {"index": i, "prompt": text, "per_k": per_k}
            if cfg.check_baseline:
                done[i]["baseline_jailbroken"], done[i]["baseline_completion"], _ = verdict[(i, ())]
            sat_total += sat
            save_fingerprinted(ctx, f"obrien/prompt/{i}", fingerprint([text, cfg_fp]), result=done[i], saturated=sat)
        ctx.progress("obrien_baseline", len(done), len(texts))
    return ObrienResult([done[i] for i, _ in texts], cfg.ks, layers, sat_total, cfg.model_dump(mode="json"),
                        time.perf_counter() - t0)


def obrien_prompts(cfg: ObrienConfig) -> list[str]:
    """The configured dataset's prompts (when no stage-2 job is given)."""
    return load_prompts(cfg.dataset, cfg.split, cfg.n, cfg.seed)
