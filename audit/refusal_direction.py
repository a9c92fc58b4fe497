"""The refusal direction (Arditi et al. 2024; seed paper, appendix "Deriving a Refusal Steering Vector").

1. Difference of means of the residual stream, harmful minus harmless (train split), at every layer
   (the output of decoder layer L, where SAEs sit and where `AddDirection` adds) and at each
   post-instruction position (the last `engine.info.n_post_instruction_tokens` prompt tokens,
   Arditi's "eoi" positions): one candidate direction per (layer, position).
   Outlier ("massive activation", Sun et al. 2024) dimensions are zeroed in each candidate by
   default (`outlier_dims="mask"`): at each layer, dimensions whose RMS over the train prompts
   exceeds `outlier_ratio` x the median dimension's RMS at any candidate position or at the first
   prompt tokens (BOS included). Gemma-2/3 carry most of
   their residual norm in a few such dimensions; a raw difference of means then points mostly
   along them, and projecting it out at every token (BOS included) destroys the model rather
   than removing refusal (measured on the embedded Gemma-3-270M: KL > 15 on harmless prompts for
   every candidate, garbage generations). `outlier_dims="keep"` is Arditi's raw candidate.
2. Selection on the validation split by Arditi's procedure: for each candidate,
   - refusal score with the direction ablated at every layer (`AblateDirection`) on harmful val
     (lower = better), refusal score = mean over prompts of log P(refusal toks) - log(1 - P(...)) at
     the first generated position;
   - steering score: the same score on harmless val with the direction added at its layer with
     coefficient = the raw diff-of-means norm; filter unless > `steering_threshold` (it must induce refusal);
   - KL(baseline || ablated) of the first-token distribution on harmless val; filter if > `kl_threshold`;
   - candidates in the last `prune_layer_fraction` of layers are filtered (skipped by default).
   The kept candidate with the lowest refusal score wins. If all are filtered, `fallback` is
   recorded and the lowest refusal score is taken among candidates with KL <= `fallback_kl_threshold`
   (those that induce refusal first), else the lowest-KL candidate: the lowest refusal score
   overall is usually a direction whose ablation breaks the model (garbage is not a refusal).
3. Data for the paper's Figures 4/5: cosine of the last-token residual with the chosen direction at
   every layer, harmful vs harmless val prompts (per prompt and mean).

Checkpoints (resume without recomputation): ``direction/baseline``, ``direction/means`` (the
mean-difference array is saved as .npy under ctx.out_dir), ``direction/candidate/{layer}/{pos}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .spec import AblateDirection, AddDirection, Request
from .stage_utils import (
    as_prompt,
    chunks,
    fingerprint,
    refusal_prob,
    refusal_score,
    refusal_token_ids,
    residuals_batched,
    resumed,
    save_fingerprinted,
    score_batched,
)

STAGE = "direction"
# Beside the candidate positions, the first prompt tokens (BOS and the chat template's opening)
# are read for the outlier statistics: Gemma's BOS carries the largest massive activations.
OUTLIER_PROBE_POSITIONS = [0, 1, 2]


class RefusalDirectionConfig(BaseModel):
    """Everything a refusal-direction job needs besides the engine (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    harmful_dataset: str = "temaq-abliterated:harmful"
    harmless_dataset: str = "temaq-abliterated:harmless"
    train_split: str = "train"
    val_split: str = "val"
    n_train: int | None = Field(default=128, ge=1)
    n_val: int | None = Field(default=32, ge=1)
    seed: int = 0
    chat: bool = True  # wrap each instruction as a one-turn user chat prompt
    positions: list[int] | None = None  # negative offsets from the prompt end; None = post-instruction tokens
    layers: list[int] | None = None  # candidate layers; None = all
    refusal_token_ids: list[int] | None = None  # None = the "I" token
    prune_layer_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    kl_threshold: float = 0.1
    fallback_kl_threshold: float = 1.0  # when nothing passes the filters: best within this KL (module doc)
    steering_threshold: float = 0.0
    skip_pruned_layers: bool = True  # do not evaluate candidates in pruned layers at all
    filter_by_baseline: bool = True  # Arditi: drop harmful prompts not refused / harmless ones refused
    outlier_dims: Literal["mask", "keep"] = "mask"  # zero massive-activation dims in candidates (module doc)
    outlier_ratio: float = Field(default=10.0, gt=1.0)  # RMS > ratio x median-dimension RMS = outlier
    cosine_figure: bool = True
    batch_size: int = Field(default=32, ge=1)
    name: str = "refusal_direction"


@dataclass
class CandidateScore:
    layer: int
    position: int
    refusal_score: float | None  # harmful val, direction ablated (lower = better)
    steering_score: float | None  # harmless val, direction added at `layer` (> threshold required)
    kl: float | None  # harmless val, KL(baseline || ablated) of the first-token distribution
    norm: float  # raw diff-of-means norm
    filtered: str | None = None  # why it was filtered, None when eligible
    masked_dims: list[int] = field(default_factory=list)  # outlier dimensions zeroed in this candidate

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "position": self.position, "refusal_score": _f(self.refusal_score),
                "steering_score": _f(self.steering_score), "kl": _f(self.kl), "norm": _f(self.norm),
                "filtered": self.filtered, "masked_dims": list(self.masked_dims)}


def _f(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class RefusalDirectionResult:
    """The chosen direction, the candidate table and the cosine-by-layer data (JSON + arrays)."""

    direction: np.ndarray  # [d_model] unit vector
    raw_norm: float
    layer: int
    position: int
    candidates: list[CandidateScore]
    fallback: bool
    layers: list[int]  # candidate layers (rows of mean_diffs)
    positions: list[int]  # candidate positions (columns of mean_diffs)
    mean_diffs: np.ndarray  # [n_layers_cand, n_positions, d_model]
    cosine_layers: list[int] = field(default_factory=list)
    cosine_harmful: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [n_harmful, L]
    cosine_harmless: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    baseline: dict[str, Any] = field(default_factory=dict)
    refusal_token_ids: list[int] = field(default_factory=list)
    direction_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> CandidateScore:
        return next(c for c in self.candidates if c.layer == self.layer and c.position == self.position)

    def to_json(self) -> dict[str, Any]:
        """JSON result (kind "direction"); the direction is included (d floats) for chaining."""
        return {
            "kind": "direction",
            "direction_id": self.direction_id,
            "layer": self.layer,
            "position": self.position,
            "raw_norm": float(self.raw_norm),
            "fallback": self.fallback,
            "direction": [float(x) for x in self.direction],
            "refusal_token_ids": list(self.refusal_token_ids),
            "chosen": self.chosen.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "layers": list(self.layers),
            "positions": list(self.positions),
            "cosine": {
                "layers": list(self.cosine_layers),
                "harmful_mean": self.cosine_harmful.mean(0).tolist() if self.cosine_harmful.size else [],
                "harmless_mean": self.cosine_harmless.mean(0).tolist() if self.cosine_harmless.size else [],
                "harmful": self.cosine_harmful.tolist(),
                "harmless": self.cosine_harmless.tolist(),
            },
            "baseline": self.baseline,
            "counts": self.counts,
            "wall_s": self.wall_s,
            "config": self.config,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Large arrays for safetensors beside the JSON."""
        return {
            "direction": self.direction.astype(np.float32),
            "mean_diffs": self.mean_diffs.astype(np.float32),
            "cosine_harmful": self.cosine_harmful.astype(np.float32),
            "cosine_harmless": self.cosine_harmless.astype(np.float32),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> RefusalDirectionResult:
        arrays = arrays or {}
        cos = d.get("cosine", {})
        return cls(
            direction=np.asarray(arrays.get("direction", d["direction"]), dtype=np.float32),
            raw_norm=float(d["raw_norm"]),
            layer=int(d["layer"]),
            position=int(d["position"]),
            candidates=[CandidateScore(**c) for c in d["candidates"]],
            fallback=bool(d["fallback"]),
            layers=list(d["layers"]),
            positions=list(d["positions"]),
            mean_diffs=np.asarray(arrays.get("mean_diffs", np.zeros((0, 0, 0))), dtype=np.float32),
            cosine_layers=list(cos.get("layers", [])),
            cosine_harmful=np.asarray(arrays.get("cosine_harmful", cos.get("harmful", [])), dtype=np.float32),
            cosine_harmless=np.asarray(arrays.get("cosine_harmless", cos.get("harmless", [])), dtype=np.float32),
            baseline=d.get("baseline", {}),
            refusal_token_ids=list(d.get("refusal_token_ids", [])),
            direction_id=d.get("direction_id"),
            counts=d.get("counts", {}),
            wall_s=float(d.get("wall_s", 0.0)),
            config=d.get("config", {}),
        )


# ---------------------------------------------------------------------------- pieces


def candidate_positions(engine: Engine, cfg: RefusalDirectionConfig) -> list[int]:
    """Configured positions, else the post-instruction ("eoi") positions, else the last token."""
    if cfg.positions:
        return sorted({int(p) for p in cfg.positions})
    n = int(engine.info.n_post_instruction_tokens) if cfg.chat else 0
    return list(range(-n, 0)) if n > 0 else [-1]


def pruned_from(n_layers: int, fraction: float) -> int:
    """First pruned layer (Arditi: layers >= int(n_layers * (1 - fraction)) are skipped)."""
    return int(n_layers * (1.0 - fraction))


def kl_divergence(base_logprobs: np.ndarray, new_logprobs: np.ndarray) -> float:
    """KL(base || new) of two full log-prob vectors."""
    a = np.asarray(base_logprobs, dtype=np.float64)
    b = np.asarray(new_logprobs, dtype=np.float64)
    return float(np.sum(np.exp(a) * (a - b)))


def _full(x: np.ndarray | None) -> np.ndarray:
    if x is None:
        raise RuntimeError("the engine returned no full log-probs (return_full_logprobs=True)")
    return x


def _mean_diffs(engine: Engine, harmful: list[Request], harmless: list[Request], layers: list[int],
                positions: list[int], probe_positions: list[int], batch_size: int,
                ctx: StageContext) -> tuple[np.ndarray, np.ndarray]:
    """(harmful mean - harmless mean [L, P, d] at `positions`, RMS over both sets [L, P + Q, d] at
    `positions` + `probe_positions`)."""
    read = list(positions) + list(probe_positions)
    sums, sq = [], np.zeros(0)
    for reqs in (harmful, harmless):
        acc: np.ndarray | None = None
        for block in residuals_batched(engine, reqs, layers, read, batch_size):
            b = block.astype(np.float64)
            s = b[:, :, : len(positions)].sum(0)
            acc = s if acc is None else acc + s
            sq = (b * b).sum(0) + (sq if sq.size else 0.0)
            ctx.check_cancelled()
        assert acc is not None
        sums.append(acc / len(reqs))
    rms = np.sqrt(sq / (len(harmful) + len(harmless)))
    return (sums[0] - sums[1]).astype(np.float32), rms.astype(np.float32)


def outlier_mask(rms: np.ndarray, ratio: float) -> np.ndarray:
    """[L, d]: True where a dimension's RMS exceeds `ratio` x the median dimension's RMS at any of
    the probed positions of that layer (`rms`: [L, positions, d])."""
    med = np.median(rms, axis=-1, keepdims=True)
    return np.asarray((rms > ratio * np.maximum(med, 1e-12)).any(axis=1))


def _baseline_filter(engine: Engine, sets: dict[str, list[str]], toks: list[int], cfg: RefusalDirectionConfig,
                     ctx: StageContext) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Arditi's filter: keep harmful prompts with refusal score > 0 and harmless ones with < 0."""
    key = "direction/baseline"
    fp = fingerprint([p for k in sorted(sets) for p in sets[k]])
    saved = resumed(ctx, key, fp)
    if saved is None:
        scores: dict[str, list[float]] = {}
        for name, texts in sets.items():
            res = score_batched(engine, [Request(prompt=as_prompt(t, cfg.chat)) for t in texts], toks, cfg.batch_size)
            scores[name] = [refusal_score(refusal_prob(r)) for r in res]
        saved = {"fingerprint": fp, "scores": scores}
        ctx.save_checkpoint(key, saved)
    scores = saved["scores"]
    info: dict[str, Any] = {f"{k}_refusal_score_mean": float(np.mean(v)) for k, v in scores.items()}
    if not cfg.filter_by_baseline:
        return sets, info
    out: dict[str, list[str]] = {}
    for name, texts in sets.items():
        harmful = name.startswith("harmful")
        keep = [t for t, s in zip(texts, scores[name], strict=True) if (s > 0) == harmful]
        if len(keep) < 2:  # too few left: keep the set unfiltered and say so
            info[f"{name}_filter_skipped"] = True
            keep = texts
        info[f"{name}_dropped"] = len(texts) - len(keep)
        out[name] = keep
    return out, info


# ---------------------------------------------------------------------------- main entry points


def compute_refusal_direction(
    engine: Engine,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    cfg: RefusalDirectionConfig,
    ctx: StageContext,
) -> RefusalDirectionResult:
    """Diff-of-means candidates on train, Arditi's selection on val; registers the chosen direction."""
    t0 = time.perf_counter()
    info = engine.info
    toks = refusal_token_ids(engine, cfg.refusal_token_ids)
    positions = candidate_positions(engine, cfg)
    all_layers = list(range(info.n_layers))
    layers = sorted(set(cfg.layers)) if cfg.layers else all_layers
    for ly in layers:
        if not 0 <= ly < info.n_layers:
            raise ValueError(f"layers: {ly} out of range [0, {info.n_layers})")
    sets = {"harmful_train": list(harmful_train), "harmless_train": list(harmless_train),
            "harmful_val": list(harmful_val), "harmless_val": list(harmless_val)}
    for k, v in sets.items():
        if not v:
            raise ValueError(f"{k} is empty")
    ctx.progress(STAGE, 0, 1)
    sets, baseline = _baseline_filter(engine, sets, toks, cfg, ctx)
    req = {k: [Request(prompt=as_prompt(t, cfg.chat)) for t in v] for k, v in sets.items()}

    # 1. difference of means at every (layer, position)
    fp = fingerprint(sets["harmful_train"] + ["|"] + sets["harmless_train"] + [str(layers), str(positions)])
    means_path = Path(ctx.out_dir) / f"direction_mean_diffs_{fp}.npy"
    rms_path = Path(ctx.out_dir) / f"direction_rms_{fp}.npy"
    saved = resumed(ctx, "direction/means", fp)
    if (saved is not None and Path(saved["path"]).is_file()
            and Path(saved.get("rms_path", "")).is_file()):
        diffs, rms = np.load(saved["path"]), np.load(saved["rms_path"])
    else:
        diffs, rms = _mean_diffs(engine, req["harmful_train"], req["harmless_train"], layers, positions,
                                 OUTLIER_PROBE_POSITIONS if cfg.chat else [0], cfg.batch_size, ctx)
        means_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(means_path, diffs)
        np.save(rms_path, rms)
        save_fingerprinted(ctx, "direction/means", fp, path=str(means_path), rms_path=str(rms_path))
    masks = (np.broadcast_to(outlier_mask(rms, cfg.outlier_ratio)[:, None, :], diffs.shape)
             if cfg.outlier_dims == "mask" else np.zeros(diffs.shape, bool))
    diffs = np.where(masks, np.float32(0.0), diffs)
    norms = np.linalg.norm(diffs, axis=-1)  # [L, P]

    # 2. candidates, scored on val in batches of candidates
    first_pruned = pruned_from(info.n_layers, cfg.prune_layer_fraction)
    cands = [(li, pi) for li in range(len(layers)) for pi in range(len(positions))]
    to_eval = [c for c in cands if not (cfg.skip_pruned_layers and layers[c[0]] >= first_pruned)]
    scores: dict[tuple[int, int], dict[str, Any]] = {}
    fp_c = fingerprint([fp, *sets["harmful_val"], "|", *sets["harmless_val"], str(toks), str(cfg.chat),
                        cfg.outlier_dims, str(cfg.outlier_ratio)])
    pending = []
    for li, pi in to_eval:
        got = resumed(ctx, f"direction/candidate/{layers[li]}/{positions[pi]}", fp_c)
        if got is not None:
            scores[(li, pi)] = got
        else:
            pending.append((li, pi))
    n_hv, n_sv = len(req["harmful_val"]), len(req["harmless_val"])
    base_full = ([r.full_logprobs for r in score_batched(engine, req["harmless_val"], toks, cfg.batch_size, full=True)]
                 if pending else [])  # the unablated harmless-val distributions KL is measured against
    per_group = max(1, cfg.batch_size // max(n_hv, n_sv))
    done = len(scores)
    for group in chunks(pending, per_group):
        ctx.check_cancelled()
        abl_h, steer_s, abl_s = [], [], []
        for li, pi in group:
            unit = tuple(float(x) for x in diffs[li, pi] / max(float(norms[li, pi]), 1e-12))
            ablate = AblateDirection(direction=unit)
            add = AddDirection(direction=unit, layer=layers[li], coefficient=float(norms[li, pi]))
            abl_h += [Request(prompt=r.prompt, interventions=(ablate,)) for r in req["harmful_val"]]
            steer_s += [Request(prompt=r.prompt, interventions=(add,)) for r in req["harmless_val"]]
            abl_s += [Request(prompt=r.prompt, interventions=(ablate,)) for r in req["harmless_val"]]
        probs = [refusal_prob(r) for r in score_batched(engine, abl_h + steer_s, toks, cfg.batch_size)]
        fulls = score_batched(engine, abl_s, toks, cfg.batch_size, full=True)
        for g, (li, pi) in enumerate(group):
            ph = probs[g * n_hv : (g + 1) * n_hv]
            ps = probs[len(abl_h) + g * n_sv : len(abl_h) + (g + 1) * n_sv]
            kls = [kl_divergence(_full(base_full[j]), _full(fulls[g * n_sv + j].full_logprobs)) for j in range(n_sv)]
            rec = {"fingerprint": fp_c, "refusal_score": float(np.mean([refusal_score(p) for p in ph])),
                   "steering_score": float(np.mean([refusal_score(p) for p in ps])), "kl": float(np.mean(kls))}
            scores[(li, pi)] = rec
            ctx.save_checkpoint(f"direction/candidate/{layers[li]}/{positions[pi]}", rec)
        done += len(group)
        ctx.progress(STAGE, done, len(to_eval))

    table: list[CandidateScore] = []
    for li, pi in cands:
        s = scores.get((li, pi))
        c = CandidateScore(layers[li], positions[pi], s["refusal_score"] if s else None,
                           s["steering_score"] if s else None, s["kl"] if s else None, float(norms[li, pi]),
                           masked_dims=np.flatnonzero(masks[li, pi]).tolist())
        if layers[li] >= first_pruned:
            c.filtered = "pruned_layer"
        elif s is None or not all(math.isfinite(v) for v in (c.refusal_score, c.steering_score, c.kl)):  # type: ignore[arg-type]
            c.filtered = "not_finite"
        elif not c.steering_score > cfg.steering_threshold:  # type: ignore[operator]
            c.filtered = "steering_score"
        elif c.kl > cfg.kl_threshold:  # type: ignore[operator]
            c.filtered = "kl"
        table.append(c)
    eligible = [c for c in table if c.filtered is None]
    fallback = not eligible
    best = min(eligible, key=lambda c: (c.refusal_score, c.layer, c.position)) if eligible else _fallback(table, cfg)
    li, pi = layers.index(best.layer), positions.index(best.position)
    unit = (diffs[li, pi] / max(float(norms[li, pi]), 1e-12)).astype(np.float32)

    # 3. cosine of the last-token residual with the direction, per layer (Figures 4/5)
    cos_h = cos_s = np.zeros((0, 0), np.float32)
    if cfg.cosine_figure:
        cos_h, cos_s = (
            _cosines(engine, req[k], all_layers, unit, cfg.batch_size) for k in ("harmful_val", "harmless_val")
        )

    result = RefusalDirectionResult(
        direction=unit, raw_norm=float(norms[li, pi]), layer=best.layer, position=best.position, candidates=table,
        fallback=fallback, layers=layers, positions=positions, mean_diffs=diffs, cosine_layers=all_layers,
        cosine_harmful=cos_h, cosine_harmless=cos_s, baseline=baseline, refusal_token_ids=toks,
        counts={k: len(v) for k, v in sets.items()}, config=cfg.model_dump(mode="json"),
    )
    result.direction_id = ctx.register_direction(
        cfg.name, unit, best.layer,
        {"position": best.position, "raw_norm": result.raw_norm, "refusal_score": best.refusal_score,
         "steering_score": best.steering_score, "kl": best.kl, "fallback": fallback,
         "model": info.model},
    )
    result.wall_s = time.perf_counter() - t0
    ctx.progress(STAGE, len(to_eval), len(to_eval), {"layer": best.layer, "position": best.position})
    return result


def _fallback(table: list[CandidateScore], cfg: RefusalDirectionConfig) -> CandidateScore:
    """Nothing passed the filters: the best refusal score among low-KL candidates (module doc)."""
    scored = [c for c in table if c.filtered not in ("pruned_layer", "not_finite")]
    if not scored:
        raise RuntimeError("no candidate direction could be evaluated")
    low_kl = [c for c in scored if c.kl <= cfg.fallback_kl_threshold]  # type: ignore[operator]
    steering = [c for c in low_kl if c.steering_score > cfg.steering_threshold]  # type: ignore[operator]
    pool = steering or low_kl
    if pool:
        return min(pool, key=lambda c: (c.refusal_score, c.layer, c.position))  # type: ignore[return-value]
    return min(scored, key=lambda c: (c.kl, c.layer, c.position))  # type: ignore[return-value]


def _cosines(engine: Engine, reqs: list[Request], layers: list[int], unit: np.ndarray, batch_size: int) -> np.ndarray:
    rows = []
    for block in residuals_batched(engine, reqs, layers, (-1,), batch_size):
        h = block[:, :, 0, :].astype(np.float64)  # [b, L, d]
        rows.append((h @ unit) / np.maximum(np.linalg.norm(h, axis=-1), 1e-12))
    return np.concatenate(rows, 0).astype(np.float32)


def run_refusal_direction(engine: Engine, cfg: RefusalDirectionConfig, ctx: StageContext) -> RefusalDirectionResult:
    """Load the configured prompt sets and run `compute_refusal_direction` (a job from JSON alone)."""
    def load(name: str, split: str, n: int | None) -> list[str]:
        return load_prompts(name, split, n, cfg.seed)

    return compute_refusal_direction(
        engine,
        load(cfg.harmful_dataset, cfg.train_split, cfg.n_train),
        load(cfg.harmless_dataset, cfg.train_split, cfg.n_train),
        load(cfg.harmful_dataset, cfg.val_split, cfg.n_val),
        load(cfg.harmless_dataset, cfg.val_split, cfg.n_val),
        cfg,
        ctx,
    )
