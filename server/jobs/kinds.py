"""Job kinds: name -> (pydantic config class, runner). The only place that knows the audit stages.

A runner is ``runner(engine, cfg, ctx) -> (result_dict, artifact_ids)``: `ctx` is the job's
persistent `JobContext` (checkpoints, progress, cancellation, judge, artifact registration,
`ctx.job_result(other_job_id)` to read an earlier job's result). numpy arrays anywhere in the
result dict are stored as safetensors beside the JSON (see `store.pack_result`).

Kinds:

- ``refusal_rate``: generate on a prompt set (named or inline) under optional interventions /
  a registered latent set / a registered direction, judge each completion, report the refusal
  rate and per-prompt verdicts. One checkpoint per prompt.
- ``refusal_direction``: Arditi et al.'s difference-of-means direction (`audit.refusal_direction`).
- ``stage1`` / ``stage2``: the seed paper's searches (`audit.stage1`, `audit.stage2`), taking
  their inputs inline, as an artifact or from an earlier job (`inputs.DirectionSource`,
  `inputs.FromStage1`).
- ``chain``: direction -> stage 1 -> stage 2 in one job (`audit.pipeline.run_chain`).

A kind's config is its `audit` algorithm config plus input mixins (`inputs.job_config`); each
audit-stage kind is wired in one small function (`_run_*`) that resolves the inputs into the
stage's arguments and hands the stage its algorithm config only (`inputs.algorithm_config`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from operator import attrgetter
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...audit.codec import reject_json_constant
from ...audit.errors import InvalidRequest, NotFound, validation_message
from ...audit.spec import AblateDirection, AblateLatents, Intervention, Request, SamplingParams, user_prompt
from . import fanout
from .inputs import (
    CheckEnv,
    DirectionSource,
    FromStage1,
    JobInputs,
    algorithm_config,
    check_artifact,
    check_inputs,
    direction_vector,
    job_config,
    need,
    stage1_result,
)

Runner = Callable[[Any, Any, Any], "tuple[dict[str, Any], list[str]]"]


@dataclass(frozen=True)
class JobKind:
    """One job kind: its config class (or a factory, for lazily imported stages) and runner."""

    name: str
    config: type[BaseModel] | Callable[[], type[BaseModel]]
    runner: Runner
    description: str = ""
    check: Callable[[Any, CheckEnv], None] | None = None

    def config_class(self) -> type[BaseModel]:
        c = self.config
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
        return cast("type[BaseModel]", c())  # type: ignore[call-arg]


def stage_config(module: str, config: str, *inputs: type[JobInputs]) -> Callable[[], type[BaseModel]]:
    """A kind's config factory: the algorithm config `audit.<module>.<config>` plus the `inputs`
    mixins (`inputs.job_config`; the bare algorithm config when there are none). The stage is
    imported when the config is first asked for, so the server starts without importing every stage."""

    @lru_cache(maxsize=1)
    def factory() -> type[BaseModel]:
        algorithm: type[BaseModel] = getattr(import_module(f"...audit.{module}", __package__), config)
        return job_config(algorithm, *inputs) if inputs else algorithm

    return factory


def validate_config(kind: JobKind, config_json: str) -> BaseModel:
    """Parse and validate a kind's config JSON ('' = defaults). Raises InvalidRequest naming the field."""
    try:
        raw = (json.loads(config_json, parse_constant=lambda c: reject_json_constant(c, "config_json"))
               if config_json and config_json.strip() else {})
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"config_json: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("config_json: must be a JSON object")
    cls = kind.config_class()
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, "config")) from None


# ---------------------------------------------------------------------------- shared helpers


def _all_checkpoints(ctx: Any, prefix: str) -> dict[str, Any] | None:
    """Bulk checkpoint read when the context offers it (JobContext), else None."""
    fn = getattr(ctx, "checkpoints", None)
    return fn(prefix) if callable(fn) else None


# ---------------------------------------------------------------------------- refusal_rate


class RefusalRateConfig(BaseModel):
    """Refusal rate of the served model on a prompt set, under optional interventions."""

    model_config = ConfigDict(extra="forbid")

    prompt_set: str = "temaq-abliterated:harmful"  # a name `audit.datasets.load_prompts` knows
    split: Literal["train", "val", "test", "all"] = "test"
    n: int | None = Field(32, ge=1)  # at most n prompts of the split (seeded sample)
    seed: int = 0
    prompts: list[str] = Field(default_factory=list)  # inline prompts; used instead of prompt_set
    chat: bool = True  # wrap each prompt as a one-turn user chat message
    interventions: list[Intervention] = Field(default_factory=list)
    latent_set_id: str | None = None  # shorthand: zero-ablate this registered latent set (all tokens)
    direction_id: str | None = None  # shorthand: ablate this registered direction at every layer
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


def _check_refusal_rate(cfg: RefusalRateConfig, env: CheckEnv) -> None:
    check_artifact(env, "latent_set_id", cfg.latent_set_id, "latent_set")
    check_artifact(env, "direction_id", cfg.direction_id, "direction")
    check_limit(env, "max_new_tokens", cfg.max_new_tokens)
    check_config_interventions(env, "interventions", cfg.interventions)


def check_limit(env: CheckEnv, field_name: str, value: int, limit_name: str = "max_new_tokens") -> None:
    """Submit-time check of a config value against the server's limit `limit_name` (when it has one)."""
    limit = getattr(getattr(env.engine, "limits", None), limit_name, None)
    if limit is not None and value > limit:
        raise InvalidRequest(f"config.{field_name}: {value} exceeds the server limit {limit_name}={limit}")


def check_config_interventions(env: CheckEnv, field_name: str, interventions: list[Any]) -> None:
    """Submit-time validation of a config's interventions against the served model (layers, latent
    ids, direction sizes, finite values, registered artifacts, positions that can exist), so a bad
    one is INVALID_ARGUMENT at StartJob instead of a job that fails later."""
    if not interventions or env.engine is None or not hasattr(env.engine, "saes"):
        return
    from ..interventions import check_interventions

    try:
        check_interventions(env.engine, interventions, f"config.{field_name}", resolver=env.artifacts)
    except NotFound as exc:  # an unknown artifact inside a config is a bad config, as for latent_set_id
        raise InvalidRequest(str(exc)) from None


def checks(needs: dict[str, str], *limited: str) -> Callable[[Any, CheckEnv], None]:
    """A kind's submit-time check: the reference fields it cannot run without (field -> why, `inputs.need`),
    every reference (`inputs.check_inputs`), then the `limited` config fields (dotted paths) against the
    server's max_new_tokens."""

    def check(cfg: Any, env: CheckEnv) -> None:
        for name, why in needs.items():
            need(cfg, name, why)
        check_inputs(cfg, env)
        for name in limited:
            check_limit(env, name, attrgetter(name)(cfg))

    return check


def refusal_rate_interventions(cfg: RefusalRateConfig) -> list[Any]:
    """The config's interventions plus the latent-set / direction shorthands."""
    ivs: list[Any] = list(cfg.interventions)
    if cfg.latent_set_id:
        ivs.append(AblateLatents(latent_set_id=cfg.latent_set_id))
    if cfg.direction_id:
        ivs.append(AblateDirection(direction_id=cfg.direction_id))
    return ivs


def run_refusal_rate(engine: Any, cfg: RefusalRateConfig, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """Generate, judge and checkpoint prompt by prompt (batches of `batch_size`)."""
    from ...audit.judges import JudgeItem

    if cfg.prompts:
        prompts = [p for p in cfg.prompts if p.strip()]
        source = "inline"
    else:
        from ...audit.datasets import load_prompts

        prompts = load_prompts(cfg.prompt_set, cfg.split, cfg.n, cfg.seed)
        source = f"{cfg.prompt_set}[{cfg.split}]"
    if not prompts:
        raise ValueError("no prompts to run (empty prompt set)")
    ivs = refusal_rate_interventions(cfg)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    stage, total = "refusal_rate", len(prompts)

    saved = _all_checkpoints(ctx, "refusal_rate/")
    rows: dict[int, dict[str, Any]] = {}
    for i, text in enumerate(prompts):
        got = saved.get(f"refusal_rate/{i}") if saved is not None else ctx.checkpoint(f"refusal_rate/{i}")
        if got is not None and got.get("prompt") == text:
            rows[i] = got
    restored = len(rows)
    ctx.progress(stage, restored, total)
    pending = [i for i in range(total) if i not in rows]
    judge = ctx.judge

    def request_prompt(i: int) -> Any:
        return user_prompt(prompts[i]) if cfg.chat else prompts[i]

    def handle(idx: list[int], completions: list[Any]) -> None:
        """Judge one batch's completions and checkpoint each prompt (on the job's thread)."""
        if len(completions) != len(idx):
            raise RuntimeError(f"the engine returned {len(completions)} completions for {len(idx)} prompts")
        verdicts = judge.judge([JudgeItem(behavior=prompts[i], generation=c.text, prompt=request_prompt(i))
                                for i, c in zip(idx, completions, strict=True)])
        if len(verdicts) != len(idx):
            raise RuntimeError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(idx)} items")
        batch = []
        for i, c, v in zip(idx, completions, verdicts, strict=True):
            row = {"index": i, "prompt": prompts[i], "completion": c.text, "finish_reason": c.finish_reason,
                   "refused": bool(v.refused), "jailbroken": bool(v.jailbroken), "p_yes": v.p_yes,
                   "degenerate": bool(getattr(v, "degenerate", False)), "nll": getattr(v, "nll", None),
                   "judge": v.judge or judge.name}
            ctx.save_checkpoint(f"refusal_rate/{i}", row)  # committed before it is reported
            rows[i] = row
            batch.append({"index": i, "refused": row["refused"], "jailbroken": row["jailbroken"]})
        ctx.progress(stage, len(rows), total, {"items": batch})

    def batch_requests(idx: list[int]) -> list[Request]:
        return [Request(prompt=request_prompt(i), interventions=tuple(ivs), sampling=sampling) for i in idx]

    batches = [pending[s : s + cfg.batch_size] for s in range(0, len(pending), cfg.batch_size)]
    placement: dict[str, Any] | None = None
    if fanout.can_fan_out(engine):  # engine replicas (Ray): the batches run concurrently on them
        placement = fanout.saved_placement(ctx, stage)
        placement.update(fanout.generate_batches(engine, [(idx, batch_requests(idx)) for idx in batches],
                                                 handle, ctx, stage))
    else:
        for idx in batches:
            ctx.check_cancelled()
            handle(idx, engine.generate(batch_requests(idx)))

    per_prompt = [rows[i] for i in range(total)]
    n_ref = sum(r["refused"] for r in per_prompt)
    n_jb = sum(r["jailbroken"] for r in per_prompt)
    n_dg = sum(bool(r.get("degenerate")) for r in per_prompt)
    result = {
        "kind": "refusal_rate",
        "source": source,
        "n": total,
        "n_refused": n_ref,
        "refusal_rate": n_ref / total,
        "n_jailbroken": n_jb,
        "jailbreak_rate": n_jb / total,
        "n_degenerate": n_dg,  # the coherence gate's vetoes: neither refusal nor compliance
        "n_jailbroken_ungated": n_jb + n_dg,
        "jailbreak_rate_ungated": (n_jb + n_dg) / total,
        "judge": getattr(judge, "name", type(judge).__name__),
        "interventions": [iv.model_dump(mode="json") for iv in ivs],
        "resumed_prompts": restored,
        "config": cfg.model_dump(mode="json"),
        "per_prompt": per_prompt,
    }
    if placement is not None:
        result["placement"] = placement  # which engine replica generated each prompt
    return result, []


# ---------------------------------------------------------------------------- refusal_direction


def _run_direction(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """`audit.refusal_direction.run_refusal_direction`; its arrays go to safetensors."""
    from ...audit.refusal_direction import run_refusal_direction

    res = run_refusal_direction(engine, cfg, ctx)
    out = result_dict(res)
    ids = [res.direction_id] if getattr(res, "direction_id", None) else []
    return out, ids


def result_dict(res: Any) -> dict[str, Any]:
    """A stage result object -> dict: `to_json()` plus `arrays()` (numpy, stored as safetensors)."""
    out = dict(res.to_json()) if hasattr(res, "to_json") else dict(res)
    if hasattr(res, "arrays"):
        out["arrays"] = {k: np.asarray(v) for k, v in res.arrays().items()}
    return out


def _run_stage1(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """Stage 1 (the engine ranks its SAE latents against the direction: `sae_rows`)."""
    from ...audit.stage1 import Stage1Config, run_stage1_from_config

    res = run_stage1_from_config(engine, algorithm_config(cfg, Stage1Config), direction_vector(ctx, cfg), ctx)
    return result_dict(res), []


def _run_stage2(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """Stage 2; on engine replicas (Ray) its (prompt, seed) units run on the replicas (`fanout.run_stage2`)."""
    from ...audit.stage2 import Stage2Config, run_stage2

    run = fanout.run_stage2 if fanout.can_fan_out(engine) else run_stage2
    res = run(engine, stage1_result(ctx, cfg), algorithm_config(cfg, Stage2Config), ctx)
    out = result_dict(res)
    if getattr(res, "placement", None) is not None:
        out["placement"] = res.placement  # which engine replica ran each (prompt, seed)
    return out, []


# ---------------------------------------------------------------------------- chain


def _run_chain(engine: Any, cfg: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """`audit.pipeline.run_chain`: direction -> stage 1 (ranked against it) -> stage 2 in one job.

    The stages' checkpoint keys are distinct (direction/..., stage1/..., stage2/...), so a resumed
    chain replays each finished unit of every stage. The result is ``{direction, stage1, stage2}``
    (what `write_report` takes), the direction's arrays under ``direction.arrays``."""
    from ...audit.pipeline import run_chain

    res = run_chain(engine, None, None, cfg, ctx)
    out = dict(res.to_json())
    out["direction"] = result_dict(res.direction)
    return out, []


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Add (or replace) a job kind in the default registry."""
    KINDS[kind.name] = kind
    return kind


register_kind(JobKind("refusal_rate", RefusalRateConfig, run_refusal_rate,
                      "generate + judge on a prompt set under optional interventions; per-prompt verdicts",
                      check=_check_refusal_rate))
register_kind(JobKind("refusal_direction", stage_config("refusal_direction", "RefusalDirectionConfig"),
                      _run_direction,
                      "Arditi et al. difference-of-means refusal direction (registers a direction artifact)"))
# stage 1: where the direction comes from (exactly one of three); stage 2: the stage-1 result
register_kind(JobKind("stage1", stage_config("stage1", "Stage1Config", DirectionSource), _run_stage1,
                      "top-K SAE latents aligned with the direction, grown per prompt until it jailbreaks",
                      check=check_inputs))
register_kind(JobKind("stage2", stage_config("stage2", "Stage2Config", FromStage1), _run_stage2,
                      "greedy block pruning of stage-1 pools to faithful latent sets (registers latent sets)",
                      check=check_inputs))
register_kind(JobKind("chain", stage_config("pipeline", "ChainConfig"), _run_chain,
                      "refusal_direction -> stage1 -> stage2 in one job"))
