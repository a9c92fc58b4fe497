"""The selection half of the second seed paper's pipeline (Yeo et al.): refusal latents found by
integrated-gradient attribution instead of per-latent forward passes (docs/attribution.md).

1. candidates: the top `candidates_per_layer` latents of every SAE layer by cos(W_dec row, refusal
   direction) (stage 1's ranking, served by `engine.sae_rows`);
2. the jailbreak token of each prompt: the argmax first token with the direction ablated
   (`AblateDirection` at every layer), or the fallback token ("Here") when that argmax is the
   refusal token "I" itself;
3. IG attribution (10 steps, the paper's left rule) of logit(jailbreak token) - logit("I") at the
   last prompt token, baseline = the direction-ablated state, summed over the positions after BOS,
   reading the candidates' scores;
4. per prompt the top `per_prompt_k` candidates by attribution, and a global top `global_k` by the
   mean attribution over prompts.

`method="atp"` replaces step 3's 10-step path by plain attribution patching (one gradient, taken at
the clean state, times baseline - clean: the IG left rule with n = 1, the issue's "n=1 case"); the
rest is the same. It costs 1 scored forward + 3 forward (clean with gradient, baseline run, patched
end point) + 1 backward per prompt, against IG's 1 + 12 forward + 10 backward.

Compute is counted per prompt row: forward passes (the jailbreak-token scoring and the attribution's
forward passes) and backward passes, plus `forward_equivalents` (a backward counted as two forwards),
so it compares with stage 2's forward-pass counts.

`steering_sweep` is the paper's validation: the global top-k latents scaled by a factor alpha
(`ScaleLatents`, z_i <- alpha z_i at every position, generated tokens included; the paper uses -3 on
Gemma-2-2B and -1 on Llama-3.1-8B) over a grid of (alpha, k): the judged refusal rate of greedy
generations and the cross-entropy cost on given (prompt, completion) pairs, next to the unsteered
run. `per_prompt_row` validates each prompt's own top-k set (alpha 0 = ablation, how stage 2
verifies its per-prompt sets), so the two methods' jailbreak rates compare on the same prompts.
`run_refusal_features` chains them with checkpoints (the `refusal_features` job kind):
``refusal_features/selection`` once the sets are found, ``refusal_features/per_prompt/{alpha}`` per
per-prompt factor, ``refusal_features/sweep/{alpha}/{k}`` per
sweep point (``.../base`` for the unsteered run), each fingerprinted by the prompts and config, so a
restarted job redoes nothing it finished.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .attribution import AttributionItem, AttributionRequest, Baseline, LogitDiff
from .compute import forward_equivalents
from .engine import Completion
from .judges import JudgeItem
from .spec import AblateDirection, Intervention, Prompt, Request, SamplingParams, ScaleLatents
from .stage_utils import chunks, fingerprint, resumed, save_fingerprinted


@dataclass
class RefusalFeatures:
    """Candidates, per-prompt jailbreak tokens and top sets, the global set and the compute spent."""

    candidates: dict[int, list[int]]
    jailbreak_token_ids: list[int]
    per_prompt: list[list[tuple[int, int, float]]]  # per prompt: (layer, latent, attribution), best first
    global_set: list[tuple[int, int, float]]  # (layer, latent, mean attribution), best first
    metric_clean: list[float] = field(default_factory=list)
    metric_baseline: list[float] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    wall_s: float = 0.0
    method: str = "ig"
    n_steps: int = 0  # gradient evaluations along the path (atp: 1)

    @property
    def forward_equivalents(self) -> float:
        return forward_equivalents(self.forward_passes, self.backward_passes)

    def global_latents(self, k: int | None = None) -> dict[int, list[int]]:
        """The global top-k as {layer: latent ids}."""
        out: dict[int, list[int]] = {}
        for ly, i, _ in self.global_set[: k if k is not None else len(self.global_set)]:
            out.setdefault(ly, []).append(i)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": {str(k): v for k, v in self.candidates.items()},
            "jailbreak_token_ids": self.jailbreak_token_ids,
            "per_prompt": [[list(t) for t in p] for p in self.per_prompt],
            "global_set": [list(t) for t in self.global_set],
            "metric_clean": self.metric_clean, "metric_baseline": self.metric_baseline,
            "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
            "forward_equivalents": self.forward_equivalents, "wall_s": self.wall_s,
            "method": self.method, "n_steps": self.n_steps,
        }


def jailbreak_tokens(engine: Any, prompts: Sequence[Prompt], ablate: AblateDirection, refusal_token_id: int,
                     fallback_token_id: int, batch_size: int = 8) -> list[int]:
    """Per prompt, the argmax first token with the direction ablated (one scored forward pass each), or
    the fallback token when that argmax is the refusal token itself."""
    jb: list[int] = []
    for part in chunks(list(prompts), batch_size):
        res = engine.score([Request(prompt=p, interventions=(ablate,)) for p in part], [refusal_token_id], top_k=1)
        for r in res:
            top = int(r.top_token_ids[0]) if r.top_token_ids is not None and len(r.top_token_ids) else fallback_token_id
            jb.append(fallback_token_id if top == refusal_token_id else top)
    return jb


def select_refusal_features(
    engine: Any,
    prompts: Sequence[Prompt],
    direction: np.ndarray,
    refusal_token_id: int,
    fallback_token_id: int,
    candidates_per_layer: int = 10,
    per_prompt_k: int = 20,
    global_k: int = 20,
    n_steps: int = 10,
    rule: str = "left",
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    method: Literal["ig", "atp"] = "ig",
) -> RefusalFeatures:
    """Run steps 1-4 of the module docstring on an engine with `score` and `attribute` (`method` "atp":
    one gradient at the clean state; `n_steps` and `rule` are then not read)."""
    t0 = time.perf_counter()
    rows = engine.sae_rows(layers, direction=np.asarray(direction, dtype=np.float32), top_k=candidates_per_layer,
                           decoder=False)
    layers = sorted(rows)
    candidates = {ly: [int(i) for i in rows[ly].latents] for ly in layers}
    ablate = AblateDirection(direction=tuple(float(x) for x in np.asarray(direction).ravel()))
    jb = jailbreak_tokens(engine, prompts, ablate, refusal_token_id, fallback_token_id, batch_size)
    fwd = len(prompts)
    bwd = 0
    scores = np.zeros((len(prompts), sum(len(v) for v in candidates.values())))
    keys = [(ly, i) for ly in layers for i in candidates[ly]]
    col = {k: j for j, k in enumerate(keys)}
    m_clean: list[float] = []
    m_base: list[float] = []
    row = 0
    for part_idx in chunks(list(range(len(prompts))), batch_size):
        items = tuple(AttributionItem(prompt=prompts[i], metric=LogitDiff(positive=jb[i], negative=refusal_token_id))
                      for i in part_idx)
        req = AttributionRequest(
            items=items, method=method, n_steps=n_steps if method == "ig" else 0,
            rule=rule if method == "ig" else "left",  # type: ignore[arg-type]
            baseline=Baseline(kind="interventions", interventions=(ablate,)), layers=tuple(layers), top_k=0,
            latents={ly: tuple(ids) for ly, ids in candidates.items()},
        )
        resp = engine.attribute(req)
        fwd += resp.forward_passes
        bwd += resp.backward_passes
        for res in resp.results:
            for ly, la in res.layers.items():
                for i, v in zip(la.latents.tolist(), la.scores.tolist(), strict=True):
                    scores[row, col[(ly, int(i))]] = v
            m_clean.append(res.metric_clean)
            m_base.append(res.metric_baseline)
            row += 1

    def ranked(vals: np.ndarray, k: int) -> list[tuple[int, int, float]]:
        order = np.lexsort((np.arange(len(vals)), -vals))[:k]
        return [(keys[j][0], keys[j][1], float(vals[j])) for j in order]

    per_prompt = [ranked(scores[p], per_prompt_k) for p in range(len(prompts))]
    global_set = ranked(scores.mean(0), global_k) if len(prompts) else []
    return RefusalFeatures(candidates, jb, per_prompt, global_set, m_clean, m_base, fwd, bwd, time.perf_counter() - t0,
                           method, n_steps if method == "ig" else 1)


def steering_sweep(
    engine: Any,
    prompts: Sequence[Prompt],
    behaviors: Sequence[str],
    features: RefusalFeatures,
    judge: Any,
    alphas: Sequence[float] = (-3.0, -1.0, 0.0),
    ks: Sequence[int] = (5, 10, 20),
    max_new_tokens: int = 64,
    ce_prompts: Sequence[Prompt] = (),
    ce_completions: Sequence[str | None] = (),
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """One row per (alpha, k) plus the unsteered row (alpha None): refusal / jailbreak rates, CE and its delta."""
    if len(behaviors) != len(prompts):
        raise ValueError("one behavior (the request text the judge reads) per prompt")

    def run(ivs: tuple[Intervention, ...]) -> dict[str, Any]:
        return steering_row(engine, prompts, behaviors, ivs, judge, max_new_tokens, ce_prompts, ce_completions,
                            batch_size)

    base = {"alpha": None, "k": 0, **run(())}
    rows = [base]
    for k in ks:
        latents = features.global_latents(k)
        if not latents:
            continue
        for alpha in alphas:
            row = {"alpha": float(alpha), "k": int(k), **run((scale(latents, alpha),))}
            if "ce" in row and "ce" in base:
                row["ce_delta"] = row["ce"] - base["ce"]
            rows.append(row)
    return rows


def scale(latents: dict[int, list[int]], alpha: float) -> ScaleLatents:
    """z_i <- alpha z_i for the latents, at every position (generated tokens included)."""
    return ScaleLatents(latents={ly: tuple(ids) for ly, ids in latents.items()}, factor=float(alpha))


def steering_row(
    engine: Any, prompts: Sequence[Prompt], behaviors: Sequence[str], ivs: tuple[Intervention, ...], judge: Any,
    max_new_tokens: int, ce_prompts: Sequence[Prompt] = (), ce_completions: Sequence[str | None] = (),
    batch_size: int = 8, completions: Sequence[Completion] | None = None,
) -> dict[str, Any]:
    """Greedy generations under `ivs` (or the given `completions`, made by `generate_under`), judged
    (refusal / jailbreak rates), and the mean CE on the CE pairs."""
    t0 = time.perf_counter()
    comps = (list(completions) if completions is not None
             else generate_under(engine, prompts, [ivs], max_new_tokens, batch_size)[0])
    verdicts = judge.judge([JudgeItem(behavior=b, generation=c.text, prompt=p)
                            for b, c, p in zip(behaviors, comps, prompts, strict=True)])
    row: dict[str, Any] = {**judged_rates(verdicts), "generations": len(comps)}
    if ce_prompts:
        losses = []
        for part_idx in chunks(list(range(len(ce_prompts))), batch_size):
            losses.extend(engine.loss([Request(prompt=ce_prompts[i], interventions=ivs) for i in part_idx],
                                      [ce_completions[i] if ce_completions else None for i in part_idx]))
        row["ce"] = float(np.mean([r.loss for r in losses]))
    row["wall_s"] = time.perf_counter() - t0
    return row


def generate_under(engine: Any, prompts: Sequence[Prompt], ivs_list: Sequence[tuple[Intervention, ...]],
                   max_new_tokens: int, batch_size: int) -> list[list[Completion]]:
    """Greedy completions of every prompt under each intervention tuple, all in `batch_size`-row calls.

    The steering sweep's points differ only in their interventions: generated together they fill the
    engine's batches instead of one call per point (per-request outputs do not depend on the batch)."""
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    reqs = [Request(prompt=p, interventions=ivs, sampling=sp) for ivs in ivs_list for p in prompts]
    comps: list[Completion] = []
    for part in chunks(reqs, batch_size):
        comps.extend(engine.generate(part))
    n = len(prompts)
    return [comps[j * n : (j + 1) * n] for j in range(len(ivs_list))]


def judged_rates(verdicts: Sequence[Any]) -> dict[str, Any]:
    """Refusal and jailbreak rates of judge verdicts; ungated counts degenerate text as a jailbreak too
    (the coherence gate's verdicts: ungated jailbroken == jailbroken or degenerate)."""
    n = max(1, len(verdicts))
    degenerate = [bool(getattr(v, "degenerate", False)) for v in verdicts]
    return {
        "refusal_rate": sum(bool(v.refused) for v in verdicts) / n,
        "jailbreak_rate": sum(bool(v.jailbroken) for v in verdicts) / n,
        "jailbreak_rate_ungated": sum(bool(v.jailbroken) or d for v, d in zip(verdicts, degenerate, strict=True)) / n,
        "n_degenerate": sum(degenerate),
        "jailbroken": [bool(v.jailbroken) for v in verdicts],
    }


def per_prompt_row(
    engine: Any, prompts: Sequence[Prompt], behaviors: Sequence[str], sets: Sequence[dict[int, list[int]]],
    alpha: float, judge: Any, max_new_tokens: int, batch_size: int = 8,
) -> dict[str, Any]:
    """Each prompt under its own latent set scaled by alpha (alpha 0: ablated, as stage 2 verifies its
    per-prompt sets): greedy generations judged; a prompt with an empty set runs unsteered."""
    t0 = time.perf_counter()
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    reqs = [Request(prompt=p, interventions=(scale(s, alpha),) if s else (), sampling=sp)
            for p, s in zip(prompts, sets, strict=True)]
    comps = []
    for part in chunks(reqs, batch_size):
        comps.extend(engine.generate(part))
    verdicts = judge.judge([JudgeItem(behavior=b, generation=c.text, prompt=p)
                            for b, c, p in zip(behaviors, comps, prompts, strict=True)])
    return {"alpha": float(alpha), **judged_rates(verdicts), "set_sizes": [sum(len(v) for v in s.values()) for s in sets],
            "generations": len(comps), "wall_s": time.perf_counter() - t0}


# the steering sweep generates its points together, in calls of this many times `batch_size` rows
STEERING_BATCH_FACTOR = 4


class RefusalFeaturesConfig(BaseModel):
    """Refusal-features configuration: selection (attribution) then steering validation (the direction is an argument)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "temaq-abliterated:harmful"
    split: str = "test"
    n: int | None = Field(default=32, ge=1)
    harmless_dataset: str = "temaq-abliterated:harmless"  # CE cost: LM loss of these prompts
    n_harmless: int = Field(default=16, ge=0)
    seed: int = 0
    chat: bool = True
    candidates_per_layer: int = Field(default=10, ge=1)
    per_prompt_k: int = Field(default=20, ge=1)
    global_k: int = Field(default=20, ge=1)
    method: Literal["ig", "atp"] = "ig"  # atp: one gradient at the clean state (n_steps, rule not read)
    n_steps: int = Field(default=10, ge=1)
    rule: str = "left"
    fallback_token: str = "Here"
    alphas: list[float] = Field(default_factory=lambda: [-3.0, -1.0, 0.0])
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    layers: list[int] | None = None  # SAE layers for candidates and attribution (None: every SAE layer)
    # each prompt's own top per_prompt_k set under these factors (0: ablation, stage 2's verification)
    per_prompt_alphas: list[float] = Field(default_factory=lambda: [0.0])
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=8, ge=1)


def run_refusal_features(
    engine: Any, cfg: RefusalFeaturesConfig, ctx: Any, direction: np.ndarray, prompts: Sequence[str], harmless: Sequence[str] = (), refusal_token_id: int | None = None,
    fallback_token_id: int | None = None, name: str = "refusal_features",
) -> dict[str, Any]:
    """Selection then the sweep, checkpointed (module docstring); registers the global set as a latent set.
    `name` prefixes the checkpoint keys, the progress stages (what a compute meter charges) and the latent
    set, so two selections (e.g. IG and AtP) can run in one context side by side."""
    from .stage_utils import as_prompt

    t0 = time.perf_counter()
    eps = [as_prompt(t, cfg.chat) for t in prompts]
    ref = refusal_token_id if refusal_token_id is not None else engine.info.special_token_ids.get("I")
    if ref is None:
        raise ValueError("the engine reports no 'I' token id; pass refusal_token_id")
    fb = fallback_token_id if fallback_token_id is not None else engine.info.special_token_ids.get(cfg.fallback_token, ref)
    direction = np.asarray(direction, dtype=np.float32)
    fp = fingerprint([*prompts, cfg.model_dump_json(exclude={"alphas", "ks", "max_new_tokens", "per_prompt_alphas"}),
                      direction.tobytes().hex()])
    sel_key = f"{name}/selection"
    got = resumed(ctx, sel_key, fp)
    if got is not None:
        sel = got["selection"]
    else:
        ctx.progress(f"{name}: attribution", 0, len(prompts))
        feats = select_refusal_features(engine, eps, direction, int(ref), int(fb),
                                        cfg.candidates_per_layer, cfg.per_prompt_k, cfg.global_k, cfg.n_steps,
                                        cfg.rule, cfg.batch_size, cfg.layers, cfg.method)
        sel = feats.to_json()
        save_fingerprinted(ctx, sel_key, fp, selection=sel)
        ctx.progress(f"{name}: attribution", len(prompts), len(prompts))
    global_set = [(int(a), int(b), float(c)) for a, b, c in sel["global_set"]]
    feats = RefusalFeatures({int(k): v for k, v in sel["candidates"].items()}, sel["jailbreak_token_ids"],
                            [[tuple(t) for t in p] for p in sel["per_prompt"]], global_set)  # type: ignore[misc]
    set_id = ctx.register_latent_set(f"{name}_global", feats.global_latents(),
                                     {"source": name, "method": cfg.method, "k": len(global_set)})
    harmless_p = [as_prompt(t, cfg.chat) for t in harmless]
    per_prompt: list[dict[str, Any]] = []
    sets = [latents_of(p) for p in feats.per_prompt]
    for pa in cfg.per_prompt_alphas:
        key, row_fp = f"{name}/per_prompt/{pa}", fingerprint([fp, str(cfg.max_new_tokens)])
        ctx.progress(f"{name}: per-prompt validation", len(per_prompt), len(cfg.per_prompt_alphas))
        got = resumed(ctx, key, row_fp)
        if got is None:
            ctx.check_cancelled()
            got = {"row": per_prompt_row(engine, eps, list(prompts), sets, pa, ctx.judge, cfg.max_new_tokens,
                                         cfg.batch_size)}
            save_fingerprinted(ctx, key, row_fp, row=got["row"])
        per_prompt.append(got["row"])
    points: list[tuple[float | None, int]] = [(None, 0)] + [(float(a), int(k)) for k in cfg.ks for a in cfg.alphas]
    rows = []
    ctx.progress(f"{name}: steering", 0, len(points))

    def key_of(alpha: float | None, k: int) -> str:
        return f"{name}/sweep/{'base' if alpha is None else f'{alpha}/{k}'}"

    def ivs_of(alpha: float | None, k: int) -> tuple[Intervention, ...]:
        return () if alpha is None else (scale(feats.global_latents(k), alpha),)

    row_fp = fingerprint([fp, str(cfg.max_new_tokens), *harmless])
    todo = [pt for pt in points if resumed(ctx, key_of(*pt), row_fp) is None]
    # every pending point's generations first, in batches of STEERING_BATCH_FACTOR x batch_size rows
    generated = dict(zip(todo, generate_under(engine, eps, [ivs_of(*pt) for pt in todo], cfg.max_new_tokens,
                                              STEERING_BATCH_FACTOR * cfg.batch_size), strict=True))
    for n_done, (alpha, k) in enumerate(points):
        key = key_of(alpha, k)
        got = resumed(ctx, key, row_fp)
        if got is not None:
            rows.append(got["row"])
            continue
        ctx.check_cancelled()
        row = {"alpha": alpha, "k": k, **steering_row(engine, eps, list(prompts), ivs_of(alpha, k), ctx.judge,
                                                      cfg.max_new_tokens, harmless_p, [None] * len(harmless_p),
                                                      cfg.batch_size, generated[(alpha, k)])}
        if alpha is not None and "ce" in row and "ce" in rows[0]:
            row["ce_delta"] = row["ce"] - rows[0]["ce"]
        save_fingerprinted(ctx, key, row_fp, row=row)
        rows.append(row)
        ctx.progress(f"{name}: steering", n_done + 1, len(points))
    return {"kind": "refusal_features", "name": name, "method": cfg.method, "selection": sel, "latent_set_id": set_id, "sweep": rows,
            "per_prompt_validation": per_prompt, "n_prompts": len(prompts), "prompts": list(prompts),
            "wall_s": time.perf_counter() - t0}


def latents_of(ranked: Sequence[Sequence[Any]]) -> dict[int, list[int]]:
    """{layer: latent ids} of a ranked (layer, latent, score) list."""
    out: dict[int, list[int]] = {}
    for t in ranked:
        out.setdefault(int(t[0]), []).append(int(t[1]))
    return out
