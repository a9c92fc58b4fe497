"""Helpers shared by the pipeline stages: prompt wrapping, refusal-token ids, batched engine calls,
Arditi's refusal score, latent-set conversions and ablations, latent ranking, JSON conversion and
prompt fingerprints. Torch-free."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import AfterValidator

from .engine import Completion, Engine, ScoreResult
from .spec import AblateLatents, Prompt, Request, user_prompt

if TYPE_CHECKING:  # pragma: no cover
    from .context import StageContext

T = TypeVar("T")

Latent = tuple[int, int]  # (layer, latent id)
EPS = 1e-8


def as_prompt(text: str, chat: bool) -> Prompt:
    """A one-turn chat prompt (the papers' form) or the raw text."""
    return user_prompt(text) if chat else text


def refusal_token_ids(engine: Engine, configured: Sequence[int] | None) -> list[int]:
    """The configured refusal tokens, or the model's "I" token (Arditi et al., the seed paper)."""
    if configured:
        return [int(t) for t in configured]
    tid = engine.info.special_token_ids.get("I")
    if tid is None:
        raise ValueError(
            "the engine reports no 'I' token id (ModelInfo.special_token_ids['I']); "
            "set refusal_token_ids in the config"
        )
    return [int(tid)]


def refusal_prob(res: ScoreResult) -> float:
    """Sum of the probabilities of the scored (refusal) tokens at the first generated position."""
    return float(np.exp(np.asarray(res.logprobs, dtype=np.float64)).sum())


def refusal_score(p: float) -> float:
    """Arditi et al.'s refusal score: log P(refusal toks) - log(1 - P(refusal toks))."""
    return float(np.log(p + EPS) - np.log(max(1.0 - p, 0.0) + EPS))


def chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    size = max(1, int(size))
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def score_batched(engine: Engine, requests: Sequence[Request], token_ids: Sequence[int], batch_size: int,
                  full: bool = False) -> list[ScoreResult]:
    """engine.score over `requests` in chunks of `batch_size` (results in order)."""
    out: list[ScoreResult] = []
    for part in chunks(requests, batch_size):
        out.extend(engine.score(part, token_ids, return_full_logprobs=full))
    return out


def generate_batched(engine: Engine, requests: Sequence[Request], batch_size: int) -> list[Completion]:
    out: list[Completion] = []
    for part in chunks(requests, batch_size):
        out.extend(engine.generate(part))
    return out


def residuals_batched(engine: Engine, requests: Sequence[Request], layers: Sequence[int], positions: Sequence[int],
                      batch_size: int) -> Iterable[np.ndarray]:
    """Yields [b, L, P, d] residual blocks, chunk by chunk (so callers can reduce without holding all)."""
    for part in chunks(requests, batch_size):
        yield engine.residuals(part, layers=list(layers), positions=list(positions))


def latents_to_dict(latents: Iterable[Latent]) -> dict[int, list[int]]:
    """{layer: sorted ids} from (layer, id) pairs."""
    out: dict[int, list[int]] = {}
    for layer, i in latents:
        out.setdefault(int(layer), []).append(int(i))
    return {ly: sorted(set(ids)) for ly, ids in sorted(out.items())}


def dict_to_latents(d: Mapping[Any, Sequence[int]]) -> list[Latent]:
    """(layer, id) pairs from a {layer: ids} mapping (JSON keys may be strings)."""
    return sorted((int(ly), int(i)) for ly, ids in d.items() for i in ids)


def ablate(latents: Iterable[Latent] | Mapping[Any, Sequence[int]]) -> tuple[AblateLatents, ...]:
    """The one latents -> intervention helper of the stages and analyses: zero-ablate a latent set
    at all tokens, error term kept; one AblateLatents, or () when empty.

    `latents` is (layer, id) pairs or a {layer: ids} mapping (JSON keys may be strings). Ids are
    sorted and deduplicated, so the same set always makes the same intervention (and spec hash)."""
    d = latents_to_dict(dict_to_latents(latents) if isinstance(latents, Mapping) else latents)
    lat = {ly: tuple(ids) for ly, ids in d.items() if ids}
    return (AblateLatents(latents=lat),) if lat else ()


def rank_latents(cosines: np.ndarray, k: int = 0, rank_by: str = "cosine") -> np.ndarray:
    """Indices of the `k` (0 = all) highest cosines (|cosine| for rank_by="abs_cosine"), best first,
    ties by ascending index: the stage-1 order, shared by every engine's `sae_rows`."""
    if rank_by not in ("cosine", "abs_cosine"):
        raise ValueError(f"rank_by: expected 'cosine' or 'abs_cosine', got {rank_by!r}")
    c = np.asarray(cosines, dtype=np.float64)
    key = np.abs(c) if rank_by == "abs_cosine" else c
    order = np.lexsort((np.arange(len(key)), -key))
    return order[:k] if k > 0 else order


def sorted_grid(name: str, minimum: int, cast: Callable[[Any], T]) -> AfterValidator:
    """A config's grid of values (ks, taus): non-empty, each >= `minimum`, returned sorted and
    deduplicated, so runs over the same grid are the same run."""

    def check(v: list[Any]) -> list[T]:
        if not v or any(x < minimum for x in v):
            raise ValueError(f"{name} must be non-empty and >= {minimum}")
        return sorted(set(cast(x) for x in v))  # type: ignore[type-var]

    return AfterValidator(check)


def fingerprint(texts: Sequence[str]) -> str:
    """A short hash of prompt texts: checkpoints made for other prompts are not reused."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the fingerprint-checkpoint-resume loop
# Every stage checkpoints a finished unit of work as {"fingerprint": fp, ...fields} and, on a resume,
# reuses it only when the fingerprint of its inputs is the same (docs/jobs.md).


def resumed(ctx: StageContext, key: str, fp: str) -> dict[str, Any] | None:
    """The checkpoint under `key` when it was made from the same inputs (fingerprint `fp`), else None."""
    got = ctx.checkpoint(key)
    return got if got is not None and got.get("fingerprint") == fp else None


def save_fingerprinted(ctx: StageContext, key: str, fp: str, **fields: Any) -> None:
    """Commit `fields` under `key` with the fingerprint of the inputs they were computed from."""
    ctx.save_checkpoint(key, {"fingerprint": fp, **fields})


def restore_items(ctx: StageContext, prefix: str, fps: Mapping[int, str], load: Callable[[Any], T],
                  field: str = "result") -> dict[int, T]:
    """Per-item resume: ``load(checkpoint[field])`` for every item i whose checkpoint ``{prefix}/{i}``
    has fingerprint ``fps[i]`` (the others are still to do; save them with `save_fingerprinted`)."""
    done: dict[int, T] = {}
    for i, fp in fps.items():
        got = resumed(ctx, f"{prefix}/{i}", fp)
        if got is not None:
            done[i] = load(got[field])
    return done


class Timer:
    """Wall time of a block, for per-prompt accounting."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.elapsed = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
