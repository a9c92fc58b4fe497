"""The seed paper's remaining analyses on the demo model, run by `refusal-audit demo` after stage 2.

Each entry of `ANALYSES` is ``(name, fn)`` with ``fn(engine, results, ctx, *, split, small, objects)``
returning the analysis' JSON (``kind`` = the report section). ``results`` holds the earlier
stages' JSON (``direction``, ``stage2``, ...); ``objects`` carries result objects between analyses
(the stage-3 rankings and features, which are arrays the report does not need).

Sizes are the demo's: stage 3 trains on the fine-tune's training prompts (harmful vs harmless,
an equal number, 80/10/10), the sweeps use short greedy generations, and the downstream CE uses
held-out harmless prompts plus CPython documentation as general text. Everything is offline: the
CoCoNot "Requests with safety concerns" prompts ship with the package (MIT, `data/`).

The last two entries are the second seed paper's: `refusal_features` (attribution-found latents,
steering validation) on stage 1's prompts, then `method_comparison` (audit/comparison.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...audit.baselines import (
    ObrienConfig,
    ProbeConfig,
    RandomConfig,
    run_obrien_baseline,
    run_probe_baseline,
    run_random_baseline,
)
from ...audit.causality import CausalityConfig, run_causality
from ...audit.comparison import ce_conditions, compare_methods
from ...audit.downstream import DownstreamConfig, latent_sets_for, run_downstream
from ...audit.hydra import HydraConfig, run_hydra
from ...audit.refusal_features import RefusalFeaturesConfig, run_refusal_features
from ...audit.stage3 import FeatureConfig, Stage3Config, SweepConfig, run_stage3
from ...audit.sweep import rankings_from
from ...audit.taxonomy import TaxonomyConfig, latents_from_results, run_taxonomy
from .finetune import Split as FinetuneSplit
from .train_saes import cpython_docs_text

DATA_DIR = Path(__file__).parent / "data"
COCONOT_FILE = DATA_DIR / "coconot_safety_concerns.jsonl"
MAX_NEW_TOKENS = 24  # as stages 1-2 of the demo: enough for the refusal-substring judge

Analysis = Callable[..., dict[str, Any]]


def _ks(small: bool) -> list[int]:
    return [100, 500, 1000, 2000] if small else list(range(100, 2001, 100))


def _sweep(small: bool) -> SweepConfig:
    return SweepConfig(ks=_ks(small), max_new_tokens=MAX_NEW_TOKENS, batch_size=16, prompts_per_group=8,
                       stop_at_first_jailbreak=True, keep_completions=True)


def _features(results: dict[str, Any], small: bool) -> FeatureConfig:
    return FeatureConfig(n_per_class=32 if small else 96, steering_layer=int(results["direction"]["layer"]),
                         batch_size=16)


def stage3(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
           objects: dict[str, Any]) -> dict[str, Any]:
    """FM on SAE features of the fine-tune's training prompts; top-K FM-similar latents swept."""
    cfg = Stage3Config(features=_features(results, small), sweep=_sweep(small))
    res = run_stage3(engine, results["stage2"], cfg, ctx, steering_layer=int(results["direction"]["layer"]),
                     harmful=split.harmful_train, harmless=split.harmless_train)
    objects["stage3"] = res
    return res.to_json()


def probe_baseline(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                   objects: dict[str, Any]) -> dict[str, Any]:
    """Logistic probe on stage 3's features; top-|w| latents swept; the FM-vs-probe table."""
    cfg = ProbeConfig(features=_features(results, small), sweep=_sweep(small))
    res = run_probe_baseline(engine, results["stage2"], cfg, ctx, stage3=objects.get("stage3"),
                             steering_layer=int(results["direction"]["layer"]),
                             harmful=split.harmful_train, harmless=split.harmless_train)
    return res.to_json()


def random_baseline(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                    objects: dict[str, Any]) -> dict[str, Any]:
    """As many random active latents as each stage-2 set, ablated (a control)."""
    cfg = RandomConfig(n_draws=1 if small else 3, max_new_tokens=MAX_NEW_TOKENS)
    return run_random_baseline(engine, results["stage2"], cfg, ctx).to_json()


def obrien_baseline(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                    objects: dict[str, Any]) -> dict[str, Any]:
    """O'Brien et al.: every latent active on >= k prompt tokens ablated, ASR per k (stage-2 prompts)."""
    cfg = ObrienConfig(ks=[1, 2, 4, 8] if small else [1, 2, 3, 4, 5, 6, 8, 10, 15, 20],
                       max_new_tokens=MAX_NEW_TOKENS, only_jailbroken=False)
    return run_obrien_baseline(engine, results["stage2"], cfg, ctx).to_json()


def hydra(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
          objects: dict[str, Any]) -> dict[str, Any]:
    """Redundant latents of each stage-2 set: necessity, wake-up under ablation, BOS clamping."""
    cfg = HydraConfig(max_new_tokens=MAX_NEW_TOKENS, clamp_max_new_tokens=32 if small else 48,
                      clamp_values=[2.0, 6.0, 10.0] if small else [2.0, 4.0, 6.0, 8.0, 10.0])
    return run_hydra(engine, results["stage2"], cfg, ctx).to_json()


def causality(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
              objects: dict[str, Any]) -> dict[str, Any]:
    """Stage-3-only ablation: jailbreaks, and which stage-2 latents it switches off."""
    if "stage3" not in objects:
        raise RuntimeError("stage 3 did not run")
    cfg = CausalityConfig(max_new_tokens=MAX_NEW_TOKENS)
    return run_causality(engine, results["stage2"], objects["stage3"], cfg, ctx).to_json()


def general_text_sample(n: int, max_chars: int = 800) -> list[str]:
    """CPython documentation passages (the demo's offline general-text sample; PSF licence)."""
    return [t[:max_chars] for t in itertools.islice(cpython_docs_text(2_000_000), 0, 10 * n, 10)]


def downstream_ce(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                  objects: dict[str, Any]) -> dict[str, Any]:
    """CE on held-out harmless instructions and general text: baseline / direction / each latent set."""
    n = 8 if small else 12  # measured: 24 + 24 texts of 1500 chars took 286 s of a 579 s demo run
    cfg = DownstreamConfig(n_instructions=n, n_general=n, max_sets=4 if small else 10, max_text_chars=800,
                           answer_max_new_tokens=32,
                           latent_sets_from="stage3" if "stage3" in objects else "stage2")
    sets = latent_sets_for(cfg, results["stage2"], objects.get("stage3"))
    return run_downstream(engine, cfg, ctx, direction=results["direction"]["direction_id"], latent_sets=sets,
                          instructions=split.harmless_heldout[:n], general_texts=general_text_sample(n)).to_json()


def taxonomy(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
             objects: dict[str, Any]) -> dict[str, Any]:
    """Stage-2 (+ stage-3) latents mapped to CoCoNot's unsafe subcategories (Figure 3)."""
    latents = latents_from_results(results["stage2"], objects.get("stage3"))
    if not latents:
        return {"kind": "taxonomy", "skipped": "no jailbreaking stage-2 set, so no latents to map"}
    # instruction tokens only: with the chat template's tokens included (measured on the demo run),
    # 419 of 423 latents fired on all five subcategories, which says nothing about harm types
    cfg = TaxonomyConfig(coconot_path=str(COCONOT_FILE), n_per_subcategory=12 if small else 40,
                         token_scope="instruction")
    return run_taxonomy(engine, latents, cfg, ctx).to_json()


def refusal_features(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                     objects: dict[str, Any]) -> dict[str, Any]:
    """The second seed's pipeline on stage 1's prompts, on stage 1's candidates: its SAE layers and, per
    layer, the top k_max latents by decoder cosine (every latent a stage-1 pool can hold; the paper's
    10 per layer would leave 20 candidates for a top 20 on the small build's two layers). IG
    attribution from the direction-ablated baseline (its passes do not depend on the candidate count),
    each prompt's top set ablated / scaled by -3, the global set's steering sweep (CE on held-out
    harmless prompts)."""
    did = results["direction"]["direction_id"]
    direction = ctx.directions[did][0]
    s1 = results["stage1"]
    prompts = [p["prompt"] for p in s1["prompts"]]
    cfg = _rf_config(s1, small)
    return run_refusal_features(engine, cfg, ctx, direction, prompts, split.harmless_heldout[: cfg.n_harmless])


def _rf_config(s1: dict[str, Any], small: bool, **kw: Any) -> RefusalFeaturesConfig:
    """refusal_features' config on stage 1's layers and candidates (`kw` overrides fields)."""
    base: dict[str, Any] = dict(layers=list(s1.get("layers") or []) or None,
                                candidates_per_layer=int((s1.get("config") or {}).get("k_max") or 10),
                                alphas=[-3.0, -1.0, 0.0], ks=[5, 10, 20], per_prompt_alphas=[0.0, -3.0],
                                max_new_tokens=MAX_NEW_TOKENS, batch_size=8, n_harmless=8 if small else 12)
    return RefusalFeaturesConfig(**{**base, **kw})


def refusal_features_atp(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                         objects: dict[str, Any]) -> dict[str, Any]:
    """`refusal_features` with plain attribution patching (`method="atp"`: one gradient at the clean state)
    instead of 10-step IG, on the same prompts, candidates and baseline; validated only as the comparison
    needs (each prompt's top set ablated; no global steering sweep). Not in `ANALYSES` (the demo does not
    run it): `benchmarks/compare_methods.py` adds it, and `method_comparison` reports it when present."""
    direction = ctx.directions[results["direction"]["direction_id"]][0]
    s1 = results["stage1"]
    cfg = _rf_config(s1, small, method="atp", alphas=[], ks=[], per_prompt_alphas=[0.0])
    return run_refusal_features(engine, cfg, ctx, direction, [p["prompt"] for p in s1["prompts"]],
                                split.harmless_heldout[: cfg.n_harmless], name="refusal_features_atp")


def method_comparison(engine: Any, results: dict[str, Any], ctx: Any, *, split: FinetuneSplit, small: bool,
                      objects: dict[str, Any]) -> dict[str, Any]:
    """Stages 1-3 vs attribution on the same prompts (`audit.comparison`); CE of every method's sets on
    one sample (held-out harmless instructions with the model's answers + CPython docs, as downstream_ce)."""
    rf = results.get("refusal_features") or {}
    if rf.get("kind") != "refusal_features":
        raise RuntimeError("refusal_features did not run")
    s3 = results.get("stage3") if (results.get("stage3") or {}).get("kind") == "stage3" else None
    rankings = rankings_from(objects["stage3"]) if "stage3" in objects else None
    atp = results.get("refusal_features_atp") if (results.get("refusal_features_atp") or {}).get("kind") == "refusal_features" else None
    conds = ce_conditions(results["stage2"], rf, s3, rankings, max_sets=2 if small else 4, rf_atp=atp)
    n = 8 if small else 12
    cfg = DownstreamConfig(n_instructions=n, n_general=n, max_text_chars=800, answer_max_new_tokens=32)
    ce = run_downstream(engine, cfg, ctx, instructions=split.harmless_heldout[:n],
                        general_texts=general_text_sample(n), extra_conditions=conds).to_json()
    compute = (results.get("compute") or {}).get("sections")
    return compare_methods(results.get("stage1"), results["stage2"], rf, s3, rankings, compute, ce, rf_atp=atp)


ANALYSES: list[tuple[str, Analysis]] = [
    ("stage3", stage3),
    ("probe_baseline", probe_baseline),
    ("random_baseline", random_baseline),
    ("obrien_baseline", obrien_baseline),
    ("hydra", hydra),
    ("causality", causality),
    ("downstream_ce", downstream_ce),
    ("taxonomy", taxonomy),
    ("refusal_features", refusal_features),
    ("method_comparison", method_comparison),
]
# run before method_comparison to add plain AtP (n = 1) to the comparison (benchmarks/compare_methods.py)
ATP_ANALYSIS: tuple[str, Analysis] = ("refusal_features_atp", refusal_features_atp)
