"""Job kinds for the seed paper's analyses (issue 7), registered into `kinds.KINDS` on import.

Kinds (config: the `audit` module's algorithm config plus input mixins from `inputs`, composed by
`inputs.job_config`; earlier results are read by job id through ``ctx.job_result``):

- ``stage3``           `audit.stage3.Stage3Config` + stage2_job_id (stage2 or chain job), optional
                       direction_job_id (refusal_direction or chain: the steering layer).
- ``probe_baseline``   `audit.baselines.ProbeConfig` + stage2_job_id, optional stage3_job_id (reuse
                       its features; FM-vs-probe table), optional direction_job_id.
- ``random_baseline``  `audit.baselines.RandomConfig` + stage2_job_id.
- ``obrien_baseline``  `audit.baselines.ObrienConfig` + optional stage2_job_id (else the dataset).
- ``hydra``            `audit.hydra.HydraConfig` + stage2_job_id.
- ``causality``        `audit.causality.CausalityConfig` + stage2_job_id + stage3_job_id.
- ``downstream_ce``    `audit.downstream.DownstreamConfig` + optional direction_job_id (its registered
                       direction id, else the vector), stage2_job_id (+ stage3_job_id).
- ``taxonomy``         `audit.taxonomy.TaxonomyConfig` + latents from stage3_job_id + stage2_job_id,
                       stage2_job_id alone, or inline.

Each runner resolves the inputs into the stage's arguments, hands it its algorithm config only
(`inputs.algorithm_config`) and returns ``(result_dict, artifact_ids)``; numpy arrays under
``result["arrays"]`` (rankings, FM weights, feature rows) are stored as safetensors by the job
store. Audit modules are imported lazily (`kinds.stage_config`).

The manager copies `KINDS` when it is created, so this module must be imported before: the
server imports it next to `kinds` (``from . import kinds_analysis``).
"""

from __future__ import annotations

from typing import Any

from ...audit.errors import InvalidRequest
from .inputs import (
    CheckEnv,
    FromDirectionJob,
    FromStage2,
    FromStage3,
    algorithm_config,
    check_inputs,
    direction_ref,
    need,
    stage2_result,
    stage3_result,
    steering_layer,
)
from .kinds import JobKind, check_limit, checks, register_kind, result_dict, stage_config

# ---------------------------------------------------------------------------- stage 3


def _run_stage3(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.stage3 import Stage3Config, run_stage3

    res = run_stage3(engine, stage2_result(ctx, cfg), algorithm_config(cfg, Stage3Config), ctx,
                     steering_layer=steering_layer(ctx, cfg))
    return result_dict(res), []


# ---------------------------------------------------------------------------- baselines


def _run_probe(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import ProbeConfig, run_probe_baseline

    res = run_probe_baseline(engine, stage2_result(ctx, cfg), algorithm_config(cfg, ProbeConfig), ctx,
                             stage3=stage3_result(ctx, cfg), steering_layer=steering_layer(ctx, cfg))
    return result_dict(res), []


def _run_random(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import RandomConfig, run_random_baseline

    res = run_random_baseline(engine, stage2_result(ctx, cfg), algorithm_config(cfg, RandomConfig), ctx)
    return result_dict(res), []


def _run_obrien(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import ObrienConfig, obrien_prompts, run_obrien_baseline

    algo = algorithm_config(cfg, ObrienConfig)
    prompts: Any = stage2_result(ctx, cfg) if cfg.stage2_job_id else obrien_prompts(algo)
    return result_dict(run_obrien_baseline(engine, prompts, algo, ctx)), []


# ---------------------------------------------------------------------------- hydra / causality


def _run_hydra(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.hydra import HydraConfig, run_hydra

    return result_dict(run_hydra(engine, stage2_result(ctx, cfg), algorithm_config(cfg, HydraConfig), ctx)), []


def _run_causality(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.causality import CausalityConfig, run_causality

    res = run_causality(engine, stage2_result(ctx, cfg), stage3_result(ctx, cfg),
                        algorithm_config(cfg, CausalityConfig), ctx)
    return result_dict(res), []


# ---------------------------------------------------------------------------- downstream / taxonomy


def _check_downstream(cfg: Any, env: CheckEnv) -> None:
    check_inputs(cfg, env)
    if cfg.latent_sets_from == "stage3" and not (cfg.stage3_job_id and cfg.stage2_job_id):
        raise InvalidRequest("config.stage3_job_id: latent_sets_from='stage3' needs stage2_job_id and stage3_job_id")
    check_limit(env, "answer_max_new_tokens", cfg.answer_max_new_tokens)


def _run_downstream(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.downstream import DownstreamConfig, latent_sets_for, run_downstream

    algo = algorithm_config(cfg, DownstreamConfig)
    stage2 = stage2_result(ctx, cfg) if cfg.stage2_job_id else None
    sets = latent_sets_for(algo, stage2, stage3_result(ctx, cfg)) if stage2 is not None else []
    return result_dict(run_downstream(engine, algo, ctx, direction=direction_ref(ctx, cfg), latent_sets=sets)), []


def _check_taxonomy(cfg: Any, env: CheckEnv) -> None:
    if cfg.latent_source == "explicit" and not cfg.latents:
        raise InvalidRequest("config.latents: required with latent_source='explicit'")
    if cfg.latent_source in ("stage2", "stage3"):
        need(cfg, "stage2_job_id", f"latent_source={cfg.latent_source!r}")
    if cfg.latent_source == "stage3":
        need(cfg, "stage3_job_id", "latent_source='stage3'")
    check_inputs(cfg, env)


def _run_taxonomy(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.taxonomy import TaxonomyConfig, latents_from_results, run_taxonomy

    if cfg.latent_source == "explicit":
        latents: Any = {int(k): list(v) for k, v in cfg.latents.items()}
    else:
        stage3 = stage3_result(ctx, cfg) if cfg.latent_source == "stage3" else None
        latents = latents_from_results(stage2_result(ctx, cfg), stage3)
    return result_dict(run_taxonomy(engine, latents, algorithm_config(cfg, TaxonomyConfig), ctx)), []


# ---------------------------------------------------------------------------- registration


ANALYSIS_KINDS: tuple[JobKind, ...] = (
    JobKind("stage3", stage_config("stage3", "Stage3Config", FromStage2, FromDirectionJob), _run_stage3,
            "factorization machine on SAE features; top-K FM-similar latents ablated with each stage-2 set",
            check=checks({"stage2_job_id": "the stage-2 sets to extend"}, "sweep.max_new_tokens")),
    JobKind("probe_baseline",
            stage_config("baselines", "ProbeConfig", FromStage2, FromStage3, FromDirectionJob), _run_probe,
            "logistic probe on the same features, top-|w| latents ablated with each stage-2 set; FM vs probe",
            check=checks({"stage2_job_id": "the stage-2 sets the top-K latents are added to"},
                         "sweep.max_new_tokens")),
    JobKind("random_baseline", stage_config("baselines", "RandomConfig", FromStage2), _run_random,
            "as many random active latents as each stage-2 set, ablated",
            check=checks({"stage2_job_id": "the set sizes to match"}, "max_new_tokens")),
    JobKind("obrien_baseline", stage_config("baselines", "ObrienConfig", FromStage2), _run_obrien,
            "O'Brien et al.: latents active on >= k prompt tokens, ablated; ASR per k",
            check=checks({}, "max_new_tokens")),
    JobKind("hydra", stage_config("hydra", "HydraConfig", FromStage2), _run_hydra,
            "inactive (redundant) stage-2 latents: necessity, wake-up under ablation, BOS clamping",
            check=checks({"stage2_job_id": "the stage-2 sets to analyse"},
                         "max_new_tokens", "clamp_max_new_tokens")),
    JobKind("causality", stage_config("causality", "CausalityConfig", FromStage2, FromStage3), _run_causality,
            "stage-3-only ablation: jailbreaks and the stage-2 latents it switches off",
            check=checks({"stage2_job_id": "the stage-2 sets", "stage3_job_id": "the stage-3 rankings"},
                         "max_new_tokens")),
    JobKind("downstream_ce",
            stage_config("downstream", "DownstreamConfig", FromDirectionJob, FromStage2, FromStage3),
            _run_downstream,
            "CE loss on harmless instructions and general text: baseline / direction / latent-set ablation",
            check=_check_downstream),
    JobKind("taxonomy", stage_config("taxonomy", "TaxonomyConfig", FromStage2, FromStage3), _run_taxonomy,
            "map latents to CoCoNot unsafe subcategories by activation (Figure 3)", check=_check_taxonomy),
)

for _kind in ANALYSIS_KINDS:
    register_kind(_kind)
