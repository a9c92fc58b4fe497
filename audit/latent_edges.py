"""Upstream -> downstream latent attribution and its ablation check (the second seed paper's
"upstream analysis"): which SAE latents up to `max_back` layers before the refusal latents drive
them, and whether switching those upstream latents off lowers the refusal latents' activation
(the paper reports a 0.45 relative drop).

The edges are computed server-side (gradients) by `engine.latent_edges` (`server/attribution_edges.py`,
docs/attribution.md "Edges"); the result types here are torch-free. `run_latent_edges` is the
`latent_edges` job body:

1. the metric per prompt: logit(jailbreak token) - logit("I") at the last prompt token, the jailbreak
   token as in `refusal_features` (argmax with the refusal direction ablated, fallback "Here"); with
   the `zero` baseline and no direction, the fallback token;
2. edges per prompt, baseline = the direction-ablated state (the paper's) or zero, checkpointed per
   prompt (``latent_edges/prompt/{i}``);
3. aggregate: per upstream latent, the mean over prompts of its edges summed over the downstream
   latents; the top `ablate_k` (largest positive: patching them towards the baseline raises the metric
   through the refusal latents) are the upstream set;
4. ablation check (``latent_edges/ablation``): `ScaleLatents(upstream set, ablate_factor)` (0 = ablate)
   at every position; the downstream latents' activation summed over the positions after BOS, before
   and after: relative drop = 1 - sum(after) / sum(before) over prompts; the same for `ablate_k` random
   upstream latents (from those the edges touched, seeded) as a control.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .attribution import AttributionItem, AttributionRequest, Baseline, LogitDiff
from .refusal_latents import latents_key
from .spec import AblateDirection, Prompt, Request, ScaleLatents
from .stage_utils import as_prompt, chunks, fingerprint, restore_items, resumed, save_fingerprinted


@dataclass
class UpstreamEdges:
    """Edges from one upstream layer: `latents` [m] (those whose state differs between clean and
    baseline in the scope), `edges` [|D|, m] (edge(u -> d), rows in the downstream order), `error` [|D|]
    (the upstream error term's edge to each downstream latent)."""

    layer: int
    latents: np.ndarray
    edges: np.ndarray
    error: np.ndarray


@dataclass
class EdgeLayer:
    """One downstream layer: its latents D, their own attribution [|D|], and the upstream edges."""

    layer: int
    latents: np.ndarray
    attribution: np.ndarray
    upstream: dict[int, UpstreamEdges] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"latents": self.latents.tolist(), "attribution": self.attribution.tolist(),
                "upstream": {str(u): {"latents": e.latents.tolist(), "edges": e.edges.tolist(),
                                      "error": e.error.tolist()} for u, e in self.upstream.items()}}


@dataclass
class EdgeResult:
    """One prompt: the attributed positions and the edges per downstream layer."""

    positions: list[int]
    token_ids: list[int]
    layers: dict[int, EdgeLayer] = field(default_factory=dict)
    metric_clean: float = 0.0
    metric_baseline: float | None = None  # the baseline run's metric (interventions baselines only)


@dataclass
class EdgeResponse:
    """Results per prompt, and the compute spent (passes counted per prompt row)."""

    results: list[EdgeResult]
    forward_passes: int = 0
    backward_passes: int = 0
    wall_s: float = 0.0


class LatentEdgesConfig(BaseModel):
    """The `latent_edges` algorithm: edges into the refusal latents, then the upstream ablation check.
    (The refusal latents and the direction are arguments of `run_latent_edges`; a job names them.)"""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "temaq-abliterated:harmful"
    split: Literal["train", "val", "test", "all"] = "test"
    n: int | None = Field(default=16, ge=1)
    seed: int = 0
    prompts: list[str] = Field(default_factory=list)  # inline prompts, instead of the dataset
    chat: bool = True
    baseline: Literal["direction", "zero"] = "direction"  # direction: the refusal direction ablated (the paper's)
    max_back: int = Field(default=3, ge=1, le=8)  # upstream SAE layers within this many layers
    method: Literal["atp", "ig"] = "ig"
    n_steps: int = Field(default=10, ge=1)
    fallback_token: str = "Here"
    top_k: int = Field(default=10, ge=1)  # reported upstream latents per downstream latent / overall
    ablate_k: int = Field(default=10, ge=1)  # upstream latents switched off in the ablation check
    ablate_factor: float = 0.0  # ScaleLatents factor of the check (0 = ablation; the paper's clamp: negative)
    control_seed: int = 0
    batch_size: int = Field(default=4, ge=1)


def edge_request(prompts: Sequence[Prompt], metrics: Sequence[LogitDiff], downstream: dict[int, list[int]],
                 baseline: Baseline, method: str, n_steps: int) -> AttributionRequest:
    """The attribution request `engine.latent_edges` reads (latents = the downstream set)."""
    items = tuple(AttributionItem(prompt=p, metric=m) for p, m in zip(prompts, metrics, strict=True))
    return AttributionRequest(items=items, method=method, n_steps=0 if method == "atp" else n_steps,  # type: ignore[arg-type]
                              baseline=baseline, top_k=0,
                              latents={ly: tuple(ids) for ly, ids in downstream.items()})


def aggregate(per_prompt: Sequence[dict[str, Any]]) -> tuple[dict[tuple[int, int], float],
                                                             dict[tuple[int, int, int, int], float]]:
    """Mean over prompts of (a) each upstream latent's edges summed over the downstream latents, keyed
    (layer, id), and (b) each edge, keyed (up layer, up id, down layer, down id). Absent = 0."""
    total: dict[tuple[int, int], float] = {}
    pair: dict[tuple[int, int, int, int], float] = {}
    n = max(1, len(per_prompt))
    for row in per_prompt:
        for ld, lay in row["layers"].items():
            down = lay["latents"]
            for u, e in lay["upstream"].items():
                edges = np.asarray(e["edges"], dtype=np.float64).reshape(len(down), len(e["latents"]))
                for c, uid in enumerate(e["latents"]):
                    key = (int(u), int(uid))
                    total[key] = total.get(key, 0.0) + float(edges[:, c].sum()) / n
                    for r, did in enumerate(down):
                        pk = (int(u), int(uid), int(ld), int(did))
                        pair[pk] = pair.get(pk, 0.0) + float(edges[r, c]) / n
    return total, pair


def ranked(scores: dict[Any, float], k: int) -> list[tuple[Any, float]]:
    """The k largest scores (ties by key), best first."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def downstream_activation(engine: Any, prompts: Sequence[Prompt], downstream: dict[int, list[int]],
                          ivs: tuple[Any, ...], batch_size: int) -> list[float]:
    """Per prompt, the downstream latents' activation summed over them and the positions after BOS."""
    bos = getattr(engine.info, "bos_token_id", None)
    out: list[float] = []
    for part in chunks(list(prompts), batch_size):
        for r in engine.encode([Request(prompt=p, interventions=ivs) for p in part], latents=downstream):
            start = 1 if r.token_ids and r.token_ids[0] == bos else 0
            out.append(float(sum(np.asarray(la.values, dtype=np.float64)[start:].sum() for la in r.layers.values())))
    return out


def ablation_check(engine: Any, prompts: Sequence[Prompt], downstream: dict[int, list[int]],
                   upstream: Sequence[tuple[int, int]], factor: float, batch_size: int) -> dict[str, Any]:
    """Downstream activation before / after scaling the upstream latents by `factor`; the relative drop."""
    before = downstream_activation(engine, prompts, downstream, (), batch_size)
    lat: dict[int, list[int]] = {}
    for ly, i in upstream:
        lat.setdefault(int(ly), []).append(int(i))
    ivs = (ScaleLatents(latents={ly: tuple(sorted(v)) for ly, v in lat.items()}, factor=float(factor)),) if lat else ()
    after = downstream_activation(engine, prompts, downstream, ivs, batch_size) if ivs else list(before)
    sb, sa = float(sum(before)), float(sum(after))
    return {"upstream": [list(t) for t in upstream], "factor": float(factor), "before": before, "after": after,
            "relative_drop": (1.0 - sa / sb) if sb > 0 else None}


def run_latent_edges(engine: Any, cfg: LatentEdgesConfig, ctx: Any, prompts: Sequence[str],
                     downstream: dict[int, list[int]], direction: np.ndarray | None) -> dict[str, Any]:
    """The job body (module docstring), checkpointed per prompt and for the ablation check."""
    from .refusal_features import jailbreak_tokens

    t0 = time.perf_counter()
    if not prompts:
        raise ValueError("no prompts")
    eps = [as_prompt(t, cfg.chat) for t in prompts]
    special = engine.info.special_token_ids
    ref = special.get("I")
    if ref is None:
        raise ValueError("the engine reports no 'I' token id")
    fb = special.get(cfg.fallback_token, ref)
    down_json = latents_key(downstream)
    dir_fp = "" if direction is None else fingerprint([np.asarray(direction, dtype=np.float32).tobytes().hex()])
    cfg_fp = cfg.model_dump_json(include={"chat", "baseline", "max_back", "method", "n_steps", "fallback_token"})
    fps = {i: fingerprint([t, cfg_fp, down_json, dir_fp]) for i, t in enumerate(prompts)}
    rows: dict[int, dict[str, Any]] = restore_items(ctx, "latent_edges/prompt", fps, dict, field="row")
    restored = len(rows)
    ctx.progress("latent_edges: edges", restored, len(prompts))
    if cfg.baseline == "direction":
        if direction is None:
            raise ValueError("baseline 'direction' needs a direction")
        ablate = AblateDirection(direction=tuple(float(x) for x in np.asarray(direction).ravel()))
        baseline = Baseline(kind="interventions", interventions=(ablate,))
    else:
        ablate, baseline = None, Baseline(kind="zero")
    pending = [i for i in range(len(prompts)) if i not in rows]
    for idx in chunks(pending, cfg.batch_size):
        ctx.check_cancelled()
        part = [eps[i] for i in idx]
        jb = (jailbreak_tokens(engine, part, ablate, int(ref), int(fb), cfg.batch_size) if ablate is not None
              else [int(fb)] * len(part))
        metrics = [LogitDiff(positive=t, negative=int(ref)) for t in jb]
        resp = engine.latent_edges(edge_request(part, metrics, downstream, baseline, cfg.method, cfg.n_steps),
                                   max_back=cfg.max_back)
        for i, t, res in zip(idx, jb, resp.results, strict=True):
            row = {"index": i, "prompt": prompts[i], "jailbreak_token_id": int(t),
                   "metric_clean": res.metric_clean, "metric_baseline": res.metric_baseline,
                   "layers": {str(ld): lay.to_json() for ld, lay in res.layers.items()},
                   "forward_passes": resp.forward_passes / len(idx) + (1 if ablate is not None else 0),
                   "backward_passes": resp.backward_passes / len(idx)}
            save_fingerprinted(ctx, f"latent_edges/prompt/{i}", fps[i], row=row)
            rows[i] = row
        ctx.progress("latent_edges: edges", len(rows), len(prompts))
    per_prompt = [rows[i] for i in range(len(prompts))]
    total, pair = aggregate(per_prompt)
    top = [k for k, v in ranked(total, cfg.ablate_k) if v > 0]
    rng = np.random.default_rng(cfg.control_seed)
    pool = sorted(k for k in total if k not in set(top))
    control = [pool[j] for j in sorted(rng.choice(len(pool), size=min(len(top), len(pool)), replace=False))] if pool else []
    abl_fp = fingerprint([*fps.values(), repr(top), repr(control), repr(cfg.ablate_factor)])
    got = resumed(ctx, "latent_edges/ablation", abl_fp)
    if got is not None:
        ablation = got["ablation"]
    else:
        ctx.check_cancelled()
        ablation = {"top": ablation_check(engine, eps, downstream, top, cfg.ablate_factor, cfg.batch_size),
                    "control": ablation_check(engine, eps, downstream, control, cfg.ablate_factor, cfg.batch_size)}
        save_fingerprinted(ctx, "latent_edges/ablation", abl_fp, ablation=ablation)
    per_down: dict[str, list[list[Any]]] = {}
    for (ul, ui, dl, di), v in pair.items():
        per_down.setdefault(f"{dl}/{di}", []).append([ul, ui, v])
    per_down = {k: sorted(v, key=lambda t: (-t[2], t[0], t[1]))[: cfg.top_k] for k, v in sorted(per_down.items())}
    return {
        "kind": "latent_edges",
        "downstream": {str(ly): ids for ly, ids in downstream.items()},
        "baseline": cfg.baseline, "method": cfg.method, "n_steps": cfg.n_steps if cfg.method == "ig" else 1,
        "max_back": cfg.max_back, "n_prompts": len(prompts), "resumed_prompts": restored,
        "top_upstream": [[ly, i, v] for (ly, i), v in ranked(total, cfg.top_k)],
        "top_upstream_per_downstream": per_down,
        "ablation": ablation,
        "forward_passes": float(sum(r["forward_passes"] for r in per_prompt)),
        "backward_passes": float(sum(r["backward_passes"] for r in per_prompt)),
        "per_prompt": per_prompt,
        "wall_s": time.perf_counter() - t0,
    }
