"""Shared by the fan-out tests: a stage-1 result over the planted model and result normalization."""

from __future__ import annotations

from typing import Any

from planted import DISTRACTOR_LAYER, HARMFUL, PLANTED, PLANTED_LAYER

# Eight prompts, each with a 20-latent pool: the three planted latents, twelve layer-3 distractors
# and five layer-2 ones (what stage 1 would hand stage 2 on the planted model).
POOL = {PLANTED_LAYER: sorted([*PLANTED, 0, 1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 13]), DISTRACTOR_LAYER: [0, 1, 2, 3, 4]}
TIMING_KEYS = {"wall_s", "latent_set_id", "union_set_id", "placement", "resumed_prompts", "compute"}


def stage1_result(n: int = 8) -> dict[str, Any]:
    prompts = [{"index": i, "prompt": p, "status": "jailbroken", "k": 20,
                "latents": {str(ly): ids for ly, ids in POOL.items()}, "completion": ""}
               for i, p in enumerate(HARMFUL[:n])]
    return {"kind": "stage1", "ks": [20], "asr": [1.0], "n_evaluated": n, "layers": sorted(POOL),
            "ranking": {str(ly): ids for ly, ids in POOL.items()}, "prompts": prompts}


def normalized(obj: Any) -> Any:
    """A job result without what legitimately differs between runs: timings, artifact ids, placement."""
    if isinstance(obj, dict):
        return {k: normalized(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [normalized(v) for v in obj]
    return obj


def assert_same(a: Any, b: Any, path: str = "result", rel: float = 1e-5) -> None:
    """Equal, except floats to `rel`: the engine's padded batches give P("I") float32 noise
    (~1e-7 relative) that depends on which requests share a batch, and a fanned-out job batches
    differently from one engine. Every set, decision, count, completion and verdict must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"
