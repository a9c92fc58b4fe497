"""Job inputs: which earlier job's result or which registered artifact a job reads.

The algorithm configs in `audit/` describe an algorithm only (they round-trip to disk and run in
a notebook). A job kind's config is that algorithm config plus a few *input* fields, declared
here as small mixins (`FromStage2`, `DirectionSource`, ...) and composed by `job_config`. The
wire format of StartJob stays one flat JSON object: algorithm fields and input fields side by
side (docs/jobs.md, "Job inputs").

Each mixin declares, per field, which job kinds (``JOB_FIELDS``) or artifact kind
(``ARTIFACT_FIELDS``) it may name, so `check_inputs` validates every reference at StartJob in
one place; the resolvers (`stage2_result`, `direction_vector`, ...) turn the ids into the
arguments the `audit` functions take. `algorithm_config` strips the input fields again, so the
algorithm (and the `config` echoed in its result) sees its own fields only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, create_model, model_validator

from ...audit.errors import InvalidRequest, NotFound

STAGE1_KINDS = ("stage1", "chain")
STAGE2_KINDS = ("stage2", "chain")
STAGE3_KINDS = ("stage3",)
DIRECTION_KINDS = ("refusal_direction", "chain")

A = TypeVar("A", bound=BaseModel)


@dataclass
class CheckEnv:
    """What a kind's submit-time `check` may look at (nothing runs on the engine here)."""

    engine: Any
    artifacts: Any
    job_kind: Callable[[str], str]  # job id -> its kind (raises NotFound)


# ---------------------------------------------------------------------------- input mixins


class JobInputs(BaseModel):
    """Base of the input mixins: the reference fields and what each may name."""

    model_config = ConfigDict(extra="forbid")
    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}
    ARTIFACT_FIELDS: ClassVar[dict[str, str]] = {}


class FromStage1(JobInputs):
    """Stage 1's result: an earlier stage1/chain job, or the result JSON inline (exactly one)."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"stage1_job_id": STAGE1_KINDS}
    stage1_job_id: str | None = None
    stage1_result: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_stage1(self) -> FromStage1:
        if (self.stage1_job_id is None) == (self.stage1_result is None):
            raise ValueError("give exactly one of stage1_job_id, stage1_result")
        return self


class FromStage2(JobInputs):
    """An earlier stage2/chain job whose latent sets (and prompts) the algorithm works on."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"stage2_job_id": STAGE2_KINDS}
    stage2_job_id: str | None = None


class FromStage3(JobInputs):
    """An earlier stage3 job (FM rankings, features, per-K jailbreaks)."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"stage3_job_id": STAGE3_KINDS}
    stage3_job_id: str | None = None


class FromDirectionJob(JobInputs):
    """An earlier refusal_direction/chain job (its steering layer, or its direction)."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"direction_job_id": DIRECTION_KINDS}
    direction_job_id: str | None = None


class OptionalDirection(JobInputs):
    """A refusal direction when the algorithm may use one: a registered artifact, an earlier job's,
    or inline (at most one is read; the kind's check says when one is required). An inline
    direction's size is checked against the served model by `check_inputs`."""

    JOB_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"direction_job_id": DIRECTION_KINDS}
    ARTIFACT_FIELDS: ClassVar[dict[str, str]] = {"direction_id": "direction"}
    direction_id: str | None = None
    direction_job_id: str | None = None
    direction: list[float] | None = None

    def direction_fields(self) -> list[str]:
        """The direction fields that are set."""
        return [n for n in ("direction_id", "direction_job_id", "direction") if getattr(self, n)]


class DirectionSource(OptionalDirection):
    """The refusal direction: a registered artifact, an earlier job's, or inline (exactly one)."""

    @model_validator(mode="after")
    def _one_direction(self) -> DirectionSource:
        given = self.direction_fields()
        if len(given) != 1:
            raise ValueError("give exactly one of direction_id, direction_job_id, direction"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


@cache
def job_config(algorithm: type[BaseModel], *inputs: type[JobInputs]) -> type[BaseModel]:
    """The config class of a job kind: `algorithm`'s fields plus the `inputs` mixins' fields."""
    name = algorithm.__name__.removesuffix("Config") + "JobConfig"
    return create_model(name, __base__=(algorithm, *inputs), __module__=__name__)


def algorithm_config(cfg: BaseModel, algorithm: type[A]) -> A:
    """`cfg` (a `job_config` instance) without its input fields: what the algorithm takes."""
    return algorithm.model_validate(cfg.model_dump(include=set(algorithm.model_fields)))


# ---------------------------------------------------------------------------- submit-time checks


def check_artifact(env: CheckEnv, field_name: str, artifact_id: str | None, kind: str) -> None:
    """Submit-time check that `artifact_id` (when given) is a registered artifact of `kind`."""
    if not artifact_id or env.artifacts is None:
        return
    try:
        rec = env.artifacts.get(artifact_id)
    except NotFound:
        raise InvalidRequest(f"config.{field_name}: artifact {artifact_id!r} is not registered") from None
    if getattr(rec, "kind", kind) != kind:
        raise InvalidRequest(f"config.{field_name}: artifact {artifact_id!r} is a {rec.kind}, not a {kind}")


def check_job(env: CheckEnv, field_name: str, job_id: str | None, kinds: tuple[str, ...]) -> None:
    """Submit-time check that `job_id` (when given) names a job of one of `kinds`."""
    if not job_id:
        return
    try:
        got = env.job_kind(job_id)
    except NotFound:
        raise InvalidRequest(f"config.{field_name}: job {job_id!r} not found") from None
    if got not in kinds:
        raise InvalidRequest(f"config.{field_name}: job {job_id!r} is a {got!r} job, expected {' or '.join(kinds)}")


def check_inputs(cfg: BaseModel, env: CheckEnv) -> None:
    """Check every job / artifact reference the config's input mixins declare, and the size of an
    inline direction against the served model."""
    for klass in type(cfg).__mro__:
        if not (isinstance(klass, type) and issubclass(klass, JobInputs)):
            continue
        for name, kinds in vars(klass).get("JOB_FIELDS", {}).items():
            check_job(env, name, getattr(cfg, name, None), kinds)
        for name, kind in vars(klass).get("ARTIFACT_FIELDS", {}).items():
            check_artifact(env, name, getattr(cfg, name, None), kind)
    d_model = getattr(getattr(env.engine, "info", None), "d_model", None)
    if isinstance(cfg, OptionalDirection) and cfg.direction is not None and d_model is not None \
            and len(cfg.direction) != d_model:
        raise InvalidRequest(f"config.direction: {len(cfg.direction)} values, expected d_model={d_model}")


def need(cfg: Any, field: str, why: str) -> str:
    """The value of a reference field the kind cannot run without; INVALID_ARGUMENT naming it."""
    val = getattr(cfg, field, None)
    if not val:
        raise InvalidRequest(f"config.{field}: required ({why})")
    return str(val)


# ---------------------------------------------------------------------------- resolvers


def part(result: dict[str, Any], name: str) -> dict[str, Any]:
    """One part ("direction", "stage1") of a chain job's result, or a single-stage job's result."""
    if "kind" not in result and isinstance(result.get(name), dict):
        return dict(result[name])
    return result


def stage1_result(ctx: Any, cfg: Any) -> dict[str, Any]:
    """Stage 1's result: inline, or the named job's."""
    if cfg.stage1_result is not None:
        return dict(cfg.stage1_result)
    return part(ctx.job_result(cfg.stage1_job_id), "stage1")


def stage2_result(ctx: Any, cfg: Any) -> dict[str, Any]:
    """The stage-2 result of `cfg.stage2_job_id` (a stage2 job, or a chain's stage 2)."""
    return part(ctx.job_result(cfg.stage2_job_id), "stage2")


def stage3_result(ctx: Any, cfg: Any) -> dict[str, Any] | None:
    """The result of `cfg.stage3_job_id`, or None when not given."""
    return ctx.job_result(cfg.stage3_job_id) if cfg.stage3_job_id else None


def steering_layer(ctx: Any, cfg: Any) -> int | None:
    """The layer of `cfg.direction_job_id`'s direction, or None when not given."""
    if not cfg.direction_job_id:
        return None
    return int(part(ctx.job_result(cfg.direction_job_id), "direction")["layer"])


def _job_direction(ctx: Any, job_id: str) -> dict[str, Any]:
    return part(ctx.job_result(job_id), "direction")


def _direction_array(d: dict[str, Any]) -> np.ndarray:
    arrays = d.get("arrays") or {}
    return np.asarray(arrays.get("direction", d["direction"]), dtype=np.float32)


def direction_vector(ctx: Any, cfg: Any) -> np.ndarray:
    """The refusal direction of a `DirectionSource` (or `OptionalDirection`) config: inline, a registered artifact, or a job's."""
    if cfg.direction:
        return np.asarray(cfg.direction, dtype=np.float32)
    if cfg.direction_id:
        if ctx.artifacts is None:
            raise RuntimeError("direction_id needs the server's artifact store")
        rec = ctx.artifacts.get(cfg.direction_id)
        if getattr(rec, "direction", None) is None:
            raise ValueError(f"direction_id: {cfg.direction_id!r} is not a direction")
        return np.asarray(rec.direction, dtype=np.float32)
    return _direction_array(_job_direction(ctx, cfg.direction_job_id))


def direction_ref(ctx: Any, cfg: Any) -> str | np.ndarray | None:
    """`cfg.direction_job_id`'s direction as its registered artifact id if it has one, else the vector."""
    if not cfg.direction_job_id:
        return None
    d = _job_direction(ctx, cfg.direction_job_id)
    return d.get("direction_id") or _direction_array(d)
