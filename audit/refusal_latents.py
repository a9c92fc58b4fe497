"""Refusal latents as the analyses (`latent_edges`, `jailbreak_suppression`, `probe_ood`) take them:
{layer: ids}. A job names them by a `refusal_features` job, a registered latent set or an explicit
list (`server/jobs/kinds_refusal_analyses.py`); this module reads a `refusal_features` result's
global set and normalises the mapping. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def global_set_latents(result: dict[str, Any], k: int | None = None) -> dict[int, list[int]]:
    """{layer: ids} of a refusal_features result's global set (its first k, best first)."""
    gs = (result.get("selection") or {}).get("global_set") or []
    out: dict[int, list[int]] = {}
    for ly, i, *_ in gs[: k if k is not None else len(gs)]:
        out.setdefault(int(ly), []).append(int(i))
    return out


def normalise(latents: Mapping[Any, Sequence[int]]) -> dict[int, list[int]]:
    """Integer layers in order, ids deduplicated and sorted; ValueError when there are none."""
    out = {int(ly): sorted({int(i) for i in ids}) for ly, ids in latents.items() if ids}
    if not out:
        raise ValueError("the refusal-latent source holds no latents")
    return dict(sorted(out.items()))


def latents_key(latents: Mapping[int, Sequence[int]]) -> str:
    """A canonical text of a latent mapping (for checkpoint fingerprints)."""
    return ";".join(f"{ly}:{','.join(map(str, ids))}" for ly, ids in sorted(latents.items()))
