"""Job kinds for the seed paper's analyses (issue 7), registered into `kinds.KINDS` on import.

Kinds (config class: the `audit` module's pydantic config, which round-trips JSON; earlier results
are read by job id through ``ctx.job_result``):

- ``stage3``           `audit.stage3.Stage3Config`: stage2_job_id (stage2 or chain job), optional
                       direction_job_id (refusal_direction or chain: the steering layer).
- ``probe_baseline``   `audit.baselines.ProbeConfig`: stage2_job_id, optional stage3_job_id (reuse
                       its features; FM-vs-probe table), optional direction_job_id.
- ``random_baseline``  `audit.baselines.RandomConfig`: stage2_job_id.
- ``obrien_baseline``  `audit.baselines.ObrienConfig`: stage2_job_id, or the config's dataset.
- ``hydra``            `audit.hydra.HydraConfig`: stage2_job_id.
- ``causality``        `audit.causality.CausalityConfig`: stage2_job_id + stage3_job_id.
- ``downstream_ce``    `audit.downstream.DownstreamConfig`: optional direction_job_id (its registered
                       direction id, else the vector), stage2_job_id (+ stage3_job_id).
- ``taxonomy``         `audit.taxonomy.TaxonomyConfig`: latents from stage3_job_id + stage2_job_id,
                       stage2_job_id alone, or inline.

Each runner returns ``(result_dict, artifact_ids)``; numpy arrays under ``result["arrays"]``
(rankings, FM weights, feature rows) are stored as safetensors by the job store. Audit modules are
imported lazily (config factories), as in `kinds.py`.

The manager copies `KINDS` when it is created, so this module must be imported before: the
server imports it next to `kinds` (``from . import kinds_analysis``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from ...audit.errors import InvalidRequest
from .kinds import CheckEnv, JobKind, check_job, part, register_kind, result_dict

STAGE2_KINDS = ("stage2", "chain")
STAGE3_KINDS = ("stage3",)
DIRECTION_KINDS = ("refusal_direction", "chain")


# ---------------------------------------------------------------------------- helpers


def _need(cfg: Any, field: str, why: str) -> str:
    val = getattr(cfg, field, None)
    if not val:
        raise InvalidRequest(f"config.{field}: required ({why})")
    return str(val)


def _check_max_new_tokens(env: CheckEnv, *values: int) -> None:
    limit = getattr(getattr(env.engine, "limits", None), "max_new_tokens", None)
    for v in values:
        if limit is not None and v > limit:
            raise InvalidRequest(f"config: max_new_tokens {v} exceeds the server limit {limit}")


def _steering_layer(ctx: Any, job_id: str | None) -> int | None:
    if not job_id:
        return None
    return int(part(ctx.job_result(job_id), "direction")["layer"])


def _stage2(ctx: Any, cfg: Any) -> dict[str, Any]:
    return part(ctx.job_result(cfg.stage2_job_id), "stage2")


# ---------------------------------------------------------------------------- stage 3


def _stage3_config() -> type[BaseModel]:
    from ...audit.stage3 import Stage3Config

    return Stage3Config


def _check_stage3(cfg: Any, env: CheckEnv) -> None:
    _need(cfg, "stage2_job_id", "the stage-2 sets to extend")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    check_job(env, "direction_job_id", cfg.direction_job_id, DIRECTION_KINDS)
    _check_max_new_tokens(env, cfg.sweep.max_new_tokens)


def _run_stage3(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.stage3 import run_stage3

    res = run_stage3(engine, _stage2(ctx, cfg), cfg, ctx, steering_layer=_steering_layer(ctx, cfg.direction_job_id))
    return result_dict(res), []


# ---------------------------------------------------------------------------- baselines


def _probe_config() -> type[BaseModel]:
    from ...audit.baselines import ProbeConfig

    return ProbeConfig


def _check_probe(cfg: Any, env: CheckEnv) -> None:
    _need(cfg, "stage2_job_id", "the stage-2 sets the top-K latents are added to")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    check_job(env, "stage3_job_id", cfg.stage3_job_id, STAGE3_KINDS)
    check_job(env, "direction_job_id", cfg.direction_job_id, DIRECTION_KINDS)
    _check_max_new_tokens(env, cfg.sweep.max_new_tokens)


def _run_probe(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import run_probe_baseline

    stage3 = ctx.job_result(cfg.stage3_job_id) if cfg.stage3_job_id else None
    res = run_probe_baseline(engine, _stage2(ctx, cfg), cfg, ctx, stage3=stage3,
                             steering_layer=_steering_layer(ctx, cfg.direction_job_id))
    return result_dict(res), []


def _random_config() -> type[BaseModel]:
    from ...audit.baselines import RandomConfig

    return RandomConfig


def _check_random(cfg: Any, env: CheckEnv) -> None:
    _need(cfg, "stage2_job_id", "the set sizes to match")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    _check_max_new_tokens(env, cfg.max_new_tokens)


def _run_random(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import run_random_baseline

    return result_dict(run_random_baseline(engine, _stage2(ctx, cfg), cfg, ctx)), []


def _obrien_config() -> type[BaseModel]:
    from ...audit.baselines import ObrienConfig

    return ObrienConfig


def _check_obrien(cfg: Any, env: CheckEnv) -> None:
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    _check_max_new_tokens(env, cfg.max_new_tokens)


def _run_obrien(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.baselines import obrien_prompts, run_obrien_baseline

    prompts: Any = _stage2(ctx, cfg) if cfg.stage2_job_id else obrien_prompts(cfg)
    return result_dict(run_obrien_baseline(engine, prompts, cfg, ctx)), []


# ---------------------------------------------------------------------------- hydra / causality


def _hydra_config() -> type[BaseModel]:
    from ...audit.hydra import HydraConfig

    return HydraConfig


def _check_hydra(cfg: Any, env: CheckEnv) -> None:
    _need(cfg, "stage2_job_id", "the stage-2 sets to analyse")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    _check_max_new_tokens(env, cfg.max_new_tokens, cfg.clamp_max_new_tokens)


def _run_hydra(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.hydra import run_hydra

    return result_dict(run_hydra(engine, _stage2(ctx, cfg), cfg, ctx)), []


def _causality_config() -> type[BaseModel]:
    from ...audit.causality import CausalityConfig

    return CausalityConfig


def _check_causality(cfg: Any, env: CheckEnv) -> None:
    _need(cfg, "stage2_job_id", "the stage-2 sets")
    _need(cfg, "stage3_job_id", "the stage-3 rankings")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    check_job(env, "stage3_job_id", cfg.stage3_job_id, STAGE3_KINDS)
    _check_max_new_tokens(env, cfg.max_new_tokens)


def _run_causality(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.causality import run_causality

    res = run_causality(engine, _stage2(ctx, cfg), ctx.job_result(cfg.stage3_job_id), cfg, ctx)
    return result_dict(res), []


# ---------------------------------------------------------------------------- downstream / taxonomy


def _downstream_config() -> type[BaseModel]:
    from ...audit.downstream import DownstreamConfig

    return DownstreamConfig


def _check_downstream(cfg: Any, env: CheckEnv) -> None:
    check_job(env, "direction_job_id", cfg.direction_job_id, DIRECTION_KINDS)
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    check_job(env, "stage3_job_id", cfg.stage3_job_id, STAGE3_KINDS)
    if cfg.latent_sets_from == "stage3" and not (cfg.stage3_job_id and cfg.stage2_job_id):
        raise InvalidRequest("config.stage3_job_id: latent_sets_from='stage3' needs stage2_job_id and stage3_job_id")
    _check_max_new_tokens(env, cfg.answer_max_new_tokens)


def _run_downstream(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.downstream import latent_sets_for, run_downstream

    direction: Any = None
    if cfg.direction_job_id:
        d = part(ctx.job_result(cfg.direction_job_id), "direction")
        direction = d.get("direction_id") or np.asarray((d.get("arrays") or {}).get("direction", d["direction"]))
    stage2 = _stage2(ctx, cfg) if cfg.stage2_job_id else None
    stage3 = ctx.job_result(cfg.stage3_job_id) if cfg.stage3_job_id else None
    sets = latent_sets_for(cfg, stage2, stage3) if stage2 is not None else []
    return result_dict(run_downstream(engine, cfg, ctx, direction=direction, latent_sets=sets)), []


def _taxonomy_config() -> type[BaseModel]:
    from ...audit.taxonomy import TaxonomyConfig

    return TaxonomyConfig


def _check_taxonomy(cfg: Any, env: CheckEnv) -> None:
    if cfg.latent_source == "explicit" and not cfg.latents:
        raise InvalidRequest("config.latents: required with latent_source='explicit'")
    if cfg.latent_source in ("stage2", "stage3"):
        _need(cfg, "stage2_job_id", f"latent_source={cfg.latent_source!r}")
    if cfg.latent_source == "stage3":
        _need(cfg, "stage3_job_id", "latent_source='stage3'")
    check_job(env, "stage2_job_id", cfg.stage2_job_id, STAGE2_KINDS)
    check_job(env, "stage3_job_id", cfg.stage3_job_id, STAGE3_KINDS)


def _run_taxonomy(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.taxonomy import latents_from_results, run_taxonomy

    if cfg.latent_source == "explicit":
        latents: Any = {int(k): list(v) for k, v in cfg.latents.items()}
    else:
        stage3 = ctx.job_result(cfg.stage3_job_id) if cfg.latent_source == "stage3" else None
        latents = latents_from_results(_stage2(ctx, cfg), stage3)
    return result_dict(run_taxonomy(engine, latents, cfg, ctx)), []


# ---------------------------------------------------------------------------- registration


ANALYSIS_KINDS: tuple[JobKind, ...] = (
    JobKind("stage3", _stage3_config, _run_stage3,
            "factorization machine on SAE features; top-K FM-similar latents ablated with each stage-2 set",
            check=_check_stage3),
    JobKind("probe_baseline", _probe_config, _run_probe,
            "logistic probe on the same features, top-|w| latents ablated with each stage-2 set; FM vs probe",
            check=_check_probe),
    JobKind("random_baseline", _random_config, _run_random,
            "as many random active latents as each stage-2 set, ablated", check=_check_random),
    JobKind("obrien_baseline", _obrien_config, _run_obrien,
            "O'Brien et al.: latents active on >= k prompt tokens, ablated; ASR per k", check=_check_obrien),
    JobKind("hydra", _hydra_config, _run_hydra,
            "inactive (redundant) stage-2 latents: necessity, wake-up under ablation, BOS clamping",
            check=_check_hydra),
    JobKind("causality", _causality_config, _run_causality,
            "stage-3-only ablation: jailbreaks and the stage-2 latents it switches off", check=_check_causality),
    JobKind("downstream_ce", _downstream_config, _run_downstream,
            "CE loss on harmless instructions and general text: baseline / direction / latent-set ablation",
            check=_check_downstream),
    JobKind("taxonomy", _taxonomy_config, _run_taxonomy,
            "map latents to CoCoNot unsafe subcategories by activation (Figure 3)", check=_check_taxonomy),
)

for _kind in ANALYSIS_KINDS:
    register_kind(_kind)
