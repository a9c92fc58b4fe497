"""The refusal-latent analyses of the second seed paper as job kinds (issue 13), registered into
`kinds.KINDS` on import: `latent_edges`, `jailbreak_suppression`, `probe_ood`.

Each takes its refusal latents from a `refusal_features` job (its global set), a registered latent set
or an explicit list (`audit.refusal_latents`), checks its config at StartJob (INVALID_ARGUMENT naming
the field) and is resumable through per-prompt checkpoints (see each audit module).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from ...audit.errors import InvalidRequest
from .inputs import (
    CheckEnv,
    JobInputs,
    OptionalDirection,
    algorithm_config,
    check_inputs,
    direction_vector,
)
from .kinds import JobKind, check_limit, register_kind, stage_config

FEATURES_KINDS = ("refusal_features",)


class RefusalLatentsSource(JobInputs):
    """The refusal latents: a refusal_features job's global set (its first `k_latents`), a registered
    latent set, or an explicit {layer: ids} (exactly one)."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"features_job_id": FEATURES_KINDS}
    ARTIFACT_FIELDS: ClassVar[dict[str, str]] = {"latent_set_id": "latent_set"}
    features_job_id: str | None = None
    latent_set_id: str | None = None
    latents: dict[int, list[int]] | None = None
    k_latents: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> RefusalLatentsSource:
        given = [n for n in ("features_job_id", "latent_set_id", "latents") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of features_job_id, latent_set_id, latents"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.k_latents is not None and not self.features_job_id:
            raise ValueError("k_latents is only read with features_job_id")
        return self


def refusal_latents(ctx: Any, cfg: Any) -> dict[int, list[int]]:
    """Resolve a `RefusalLatentsSource` config to {layer: ids}."""
    from ...audit.refusal_latents import global_set_latents, normalise

    if cfg.latents:
        return normalise(cfg.latents)
    if cfg.latent_set_id:
        if getattr(ctx, "artifacts", None) is None:
            raise RuntimeError("latent_set_id needs the server's artifact store")
        return normalise(ctx.artifacts.latent_set(cfg.latent_set_id))
    return normalise(global_set_latents(ctx.job_result(cfg.features_job_id), cfg.k_latents))


def _check_latents(cfg: Any, env: CheckEnv) -> None:
    """Every reference (check_inputs), and explicit ids against the engine's SAEs."""
    check_inputs(cfg, env)
    info = getattr(env.engine, "info", None)
    if cfg.latents and info is not None:
        for ly, ids in cfg.latents.items():
            if ly not in info.sae_layers:
                raise InvalidRequest(f"config.latents: no SAE at layer {ly} (SAE layers: {list(info.sae_layers)})")
            d_sae = info.sae(ly).d_sae
            bad = [i for i in ids if not 0 <= int(i) < d_sae]
            if bad:
                raise InvalidRequest(f"config.latents[{ly}]: latent id {bad[0]} out of range [0, {d_sae})")


def _check_templates(cfg: Any) -> None:
    from ...audit.jailbreaks import resolve

    try:
        resolve(cfg.templates, cfg.custom_templates)
    except ValueError as exc:
        raise InvalidRequest(f"config.{exc}") from None


def _check_layer(env: CheckEnv, name: str, layer: int | None) -> None:
    info = getattr(env.engine, "info", None)
    if layer is not None and info is not None and not 0 <= layer < info.n_layers:
        raise InvalidRequest(f"config.{name}: layer {layer} out of range [0, {info.n_layers})")


def _prompts(cfg: Any) -> list[str]:
    from ...audit.datasets import load_prompts

    if cfg.prompts:
        return [p for p in cfg.prompts if p.strip()]
    return load_prompts(cfg.dataset, cfg.split, cfg.n, cfg.seed)


# ---------------------------------------------------------------------------- latent_edges


def _check_edges(cfg: Any, env: CheckEnv) -> None:
    _check_latents(cfg, env)
    given = cfg.direction_fields()
    if cfg.baseline == "direction" and len(given) != 1:
        raise InvalidRequest("config.direction_id: baseline 'direction' needs exactly one of direction_id, "
                             "direction_job_id, direction")
    if cfg.baseline == "zero" and given:
        raise InvalidRequest(f"config.{given[0]}: not read with baseline 'zero'")
    info = getattr(env.engine, "info", None)
    if env.engine is not None and not hasattr(env.engine, "latent_edges"):
        raise InvalidRequest("config: this server's engine cannot compute latent edges (no gradients)")
    if cfg.method == "ig":
        check_limit(env, "n_steps", cfg.n_steps, "max_attribution_steps")
    if cfg.latents and info is not None:
        reach = [ly for ly in cfg.latents if any(ly - cfg.max_back <= s < ly for s in info.sae_layers)]
        if not reach:
            raise InvalidRequest(f"config.latents: no SAE layer within max_back={cfg.max_back} layers before "
                                 f"layers {sorted(cfg.latents)}")


def _run_edges(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.latent_edges import LatentEdgesConfig, run_latent_edges

    direction = np.asarray(direction_vector(ctx, cfg), dtype=np.float32) if cfg.baseline == "direction" else None
    algo = algorithm_config(cfg, LatentEdgesConfig)
    return run_latent_edges(engine, algo, ctx, _prompts(algo), refusal_latents(ctx, cfg), direction), []


# ---------------------------------------------------------------------------- jailbreak_suppression


def _check_suppression(cfg: Any, env: CheckEnv) -> None:
    _check_latents(cfg, env)
    _check_templates(cfg)
    check_limit(env, "max_new_tokens", cfg.max_new_tokens)


def _run_suppression(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.jailbreak_suppression import JailbreakSuppressionConfig, run_jailbreak_suppression

    algo = algorithm_config(cfg, JailbreakSuppressionConfig)
    return run_jailbreak_suppression(engine, algo, ctx, ctx.judge, _prompts(algo), refusal_latents(ctx, cfg)), []


# ---------------------------------------------------------------------------- probe_ood


def _check_probe(cfg: Any, env: CheckEnv) -> None:
    _check_latents(cfg, env)
    _check_templates(cfg)
    _check_layer(env, "dense_layer", cfg.dense_layer)


def _run_probe(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.datasets import load_prompts
    from ...audit.probe_ood import ProbeOODConfig, run_probe_ood

    algo = algorithm_config(cfg, ProbeOODConfig)
    texts = {f"{split}_{cls}": load_prompts(ds, split, n, cfg.seed)
             for split, n in (("train", cfg.n_train), ("test", cfg.n_test))
             for cls, ds in (("harmful", cfg.harmful_dataset), ("harmless", cfg.harmless_dataset))}
    return run_probe_ood(engine, algo, ctx, texts, refusal_latents(ctx, cfg)), []


register_kind(JobKind("latent_edges",
                      stage_config("latent_edges", "LatentEdgesConfig", RefusalLatentsSource,
                                   OptionalDirection), _run_edges,
                      "Yeo et al.: upstream -> downstream latent attribution into the refusal latents "
                      "(up to max_back layers back) and the upstream ablation check", _check_edges))
register_kind(JobKind("jailbreak_suppression",
                      stage_config("jailbreak_suppression", "JailbreakSuppressionConfig",
                                   RefusalLatentsSource), _run_suppression,
                      "refusal-latent activation under jailbreak templates, drop split by judged success "
                      "(gated and ungated)", _check_suppression))
register_kind(JobKind("probe_ood", stage_config("probe_ood", "ProbeOODConfig", RefusalLatentsSource),
                      _run_probe,
                      "logistic probe on the refusal latents vs a dense residual probe, tested on "
                      "jailbreak-wrapped prompts", _check_probe))
