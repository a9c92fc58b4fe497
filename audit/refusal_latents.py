"""Where the refusal-latent analyses (`latent_edges`, `jailbreak_suppression`, `probe_ood`) take their
refusal latents from: a `refusal_features` job's global set (its first `k_latents`), a registered
latent set (e.g. the one that job registered), or an explicit {layer: ids}. Torch-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SOURCES = ("features_job_id", "latent_set_id", "latents")


class LatentsSource(BaseModel):
    """Exactly one of features_job_id, latent_set_id, latents (a mixin of the analyses' configs)."""

    model_config = ConfigDict(extra="forbid")

    features_job_id: str | None = None  # a refusal_features job: its global set (best first)
    latent_set_id: str | None = None  # a registered latent set
    latents: dict[int, list[int]] | None = None  # explicit {layer: latent ids}
    k_latents: int | None = Field(default=None, ge=1)  # features_job_id only: the first k of its global set

    @model_validator(mode="after")
    def _one_source(self) -> LatentsSource:
        given = [n for n in SOURCES if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of features_job_id, latent_set_id, latents"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.k_latents is not None and not self.features_job_id:
            raise ValueError("k_latents is only read with features_job_id")
        if self.latents is not None and not any(self.latents.values()):
            raise ValueError("latents: empty")
        return self


def global_set_latents(result: dict[str, Any], k: int | None = None) -> dict[int, list[int]]:
    """{layer: ids} of a refusal_features result's global set (its first k)."""
    gs = (result.get("selection") or {}).get("global_set") or []
    out: dict[int, list[int]] = {}
    for ly, i, *_ in gs[: k if k is not None else len(gs)]:
        out.setdefault(int(ly), []).append(int(i))
    return out


def resolve_latents(cfg: LatentsSource, ctx: Any) -> dict[int, list[int]]:
    """The refusal latents a config names, read from the job context (job results / artifacts)."""
    if cfg.latents:
        out = {int(ly): [int(i) for i in ids] for ly, ids in cfg.latents.items() if ids}
    elif cfg.latent_set_id:
        if getattr(ctx, "artifacts", None) is None:
            raise RuntimeError("latent_set_id needs the server's artifact store")
        out = {int(ly): [int(i) for i in ids] for ly, ids in ctx.artifacts.latent_set(cfg.latent_set_id).items()}
    else:
        out = global_set_latents(ctx.job_result(cfg.features_job_id), cfg.k_latents)
    if not any(out.values()):
        raise ValueError("the refusal-latent source holds no latents")
    return {ly: sorted(dict.fromkeys(ids)) for ly, ids in sorted(out.items())}


def n_latents(latents: dict[int, list[int]]) -> int:
    return sum(len(v) for v in latents.values())
