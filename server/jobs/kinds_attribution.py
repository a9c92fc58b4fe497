"""The `refusal_features` job kind (issue 13): the second seed paper's attribution pipeline, registered
into `kinds.KINDS` on import (`server/jobs/__init__.py` imports it next to `kinds`).

Config: `audit.refusal_features.RefusalFeaturesConfig` plus `inputs.DirectionSource` (exactly one
of direction_id, direction_job_id, direction). The runner ranks candidates against the engine's SAE decoders,
attributes with the engine's `attribute` (the HF engine, also behind vLLM), validates by steering,
and registers the global latent set. Resumable through the checkpoints documented in the module.
"""

from __future__ import annotations

from typing import Any

from ...audit.errors import InvalidRequest
from .inputs import CheckEnv, DirectionSource, algorithm_config, check_inputs, direction_vector
from .kinds import JobKind, check_limit, register_kind, stage_config


def _check(cfg: Any, env: CheckEnv) -> None:
    check_inputs(cfg, env)
    if env.engine is not None and not hasattr(env.engine, "attribute"):
        raise InvalidRequest("config: this server's engine cannot attribute (no gradients)")
    check_limit(env, "n_steps", cfg.n_steps, "max_attribution_steps")


def _run(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.datasets import load_prompts
    from ...audit.refusal_features import RefusalFeaturesConfig, run_refusal_features

    algo = algorithm_config(cfg, RefusalFeaturesConfig)
    prompts = load_prompts(algo.dataset, algo.split, algo.n, algo.seed)
    harmless = load_prompts(algo.harmless_dataset, algo.split, algo.n_harmless, algo.seed) if algo.n_harmless else []
    out = run_refusal_features(engine, algo, ctx, direction_vector(ctx, cfg), prompts, harmless)
    return out, [out["latent_set_id"]]


register_kind(JobKind("refusal_features",
                      stage_config("refusal_features", "RefusalFeaturesConfig", DirectionSource), _run,
                      "Yeo et al.: cos-sim candidates -> IG attribution (direction-ablated baseline) -> top sets -> "
                      "ScaleLatents steering sweep (registers the global latent set)", _check))
