"""The `refusal_features` job kind (issue 13): the second seed paper's attribution pipeline, registered
into `kinds.KINDS` on import (`server/jobs/__init__.py` imports it next to `kinds`).

Config: `audit.refusal_features.RefusalFeaturesConfig` (exactly one of direction_id,
direction_job_id, direction). The runner ranks candidates against the engine's SAE decoders,
attributes with the engine's `attribute` (the HF engine, also behind vLLM), validates by steering,
and registers the global latent set. Resumable through the checkpoints documented in the module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from ...audit.errors import InvalidRequest
from .kinds import (
    CheckEnv,
    JobKind,
    _check_artifact,
    _direction_vector,
    check_job,
    register_kind,
)


def _config() -> type[BaseModel]:
    from ...audit.refusal_features import RefusalFeaturesConfig

    return RefusalFeaturesConfig


def _check(cfg: Any, env: CheckEnv) -> None:
    given = [n for n in ("direction_id", "direction_job_id", "direction") if getattr(cfg, n)]
    if len(given) != 1:
        raise InvalidRequest("config: give exactly one of direction_id, direction_job_id, direction")
    _check_artifact(env, "direction_id", cfg.direction_id, "direction")
    check_job(env, "direction_job_id", cfg.direction_job_id, ("refusal_direction", "chain"))
    if env.engine is not None and not hasattr(env.engine, "attribute"):
        raise InvalidRequest("config: this server's engine cannot attribute (no gradients)")
    limit = getattr(getattr(env.engine, "limits", None), "max_attribution_steps", None)
    if limit is not None and cfg.n_steps > limit:
        raise InvalidRequest(f"config.n_steps: {cfg.n_steps} exceeds the server limit {limit}")


def _run(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    from ...audit.datasets import load_prompts
    from ...audit.refusal_features import run_refusal_features

    direction = np.asarray(_direction_vector(ctx, cfg), dtype=np.float32)
    prompts = load_prompts(cfg.dataset, cfg.split, cfg.n, cfg.seed)
    harmless = load_prompts(cfg.harmless_dataset, cfg.split, cfg.n_harmless, cfg.seed) if cfg.n_harmless else []
    out = run_refusal_features(engine, cfg, ctx, direction, prompts, harmless)
    return out, [out["latent_set_id"]]


register_kind(JobKind("refusal_features", _config, _run,
                      "Yeo et al.: cos-sim candidates -> IG attribution (direction-ablated baseline) -> top sets -> "
                      "ScaleLatents steering sweep (registers the global latent set)", _check))
