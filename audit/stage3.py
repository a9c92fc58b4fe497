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

The sweep (`audit.sweep.ablation_sweep`, shared with the probe baseline) checkpoints each prompt
once its sweep is done. Features are checkpointed per encode batch, the FM weights once trained
(``stage3/fm``), so a resumed job redoes neither. Stage-2 input: `audit.sweep.Stage2Sets`.

torch is imported only to train or restore the FM (`audit.fm`), so this module imports on the
thin client install.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .context import StageContext
from .engine import Engine
from .features import (
    FeatureConfig,
    FeatureDataset,
    build_feature_dataset,
    encode_last_tokens,
    latent_groups,
    resolve_layers,
    unpack_keys,
)
from .stage_utils import Latent, as_prompt, fingerprint, latents_to_dict, resumed, save_fingerprinted
from .sweep import (
    Stage2Sets,
    SweepConfig,
    SweepPrompt,
    ablation_sweep,
    per_k_table,
    rankings_to_arrays,
)

if TYPE_CHECKING:  # torch is imported where the FM is trained, so this module imports without it
    from .fm import FactorizationMachine, TrainResult

STAGE = "stage3"
Similarity = Literal["max", "mean", "centroid"]


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


class Stage3Config(BaseModel):
    """Stage-3 configuration (round-trips through JSON; the stage-2 result is an argument)."""

    model_config = ConfigDict(extra="forbid")

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


# ---------------------------------------------------------------------------- the stage


def _train_or_restore(ds: FeatureDataset, cfg: Stage3Config, ctx: StageContext, fp: str) -> tuple[TrainResult | None, FactorizationMachine, dict[str, Any]]:
    import torch

    from .fm import FactorizationMachine, TrainConfig, train_fm

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
    if not isinstance(res.model, FactorizationMachine):
        raise TypeError(f"train_fm returned a {type(res.model).__name__}")
    model = res.model
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
