"""The top-K sweep's stop-at-first-jailbreak loop generates several Ks per engine call
(`audit/sweep.py`); its results must equal the one-K-per-call loop's.

The engine is a scripted stand-in: a prompt is jailbroken once at least `need[prompt]` latents are
ablated, so the first jailbreaking K of every prompt is known in advance (the independent answer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.engine import Completion
from refusal_audit.audit.spec import AblateLatents, Request
from refusal_audit.audit.sweep import Stage2Item, SweepConfig, ablation_sweep

PROMPTS = ["alpha request", "beta request", "gamma request", "delta request", "epsilon request"]


class Rows:
    """What `engine.sae_rows` returns per layer."""

    def __init__(self, n: int) -> None:
        self.latents = np.arange(n)
        self.cosines = np.linspace(1.0, 0.0, n)


class ThresholdEngine:
    """generate: "Sure, here it is." once >= need[prompt] latents are ablated, else a refusal."""

    def __init__(self, need: dict[str, int], n_latents: int = 200) -> None:
        self.need, self.n_latents, self.calls = need, n_latents, 0

    class info:  # noqa: N801 - the attribute engines expose
        sae_layers = (3,)

    def sae_rows(self, layers: Sequence[int], **_: Any) -> dict[int, Rows]:
        return {ly: Rows(self.n_latents) for ly in layers}

    def generate(self, reqs: Sequence[Request]) -> list[Completion]:
        self.calls += 1
        out = []
        for r in reqs:
            n = sum(len(ids) for iv in r.interventions if isinstance(iv, AblateLatents) for ids in iv.latents.values())
            need = next(v for p, v in self.need.items() if p in str(r.prompt))
            out.append(Completion("Sure, here it is." if n >= need else "I cannot help with that.", [1], "stop", 3))
        return out


def test_sweep_windows_stop_at_each_prompts_first_jailbreak() -> None:
    ks = list(range(100, 1001, 100))
    # stage-2 sets of 2 latents; first jailbreaking K: 100, 400, 900, never
    need = dict(zip(PROMPTS[:4], [50, 390, 850, 5000], strict=True))
    items = [Stage2Item(i, p, {3: [1000 + 2 * i, 1001 + 2 * i]}) for i, p in enumerate(PROMPTS[:4])]
    rankings = {i: [(3, j) for j in range(2000)] for i in range(4)}
    full_eng, eng = ThresholdEngine(need), ThresholdEngine(need)
    full = ablation_sweep(full_eng, items, rankings, SweepConfig(ks=ks, max_new_tokens=4), LocalContext(), "s", "s")
    short = ablation_sweep(eng, items, rankings, SweepConfig(ks=ks, max_new_tokens=4, stop_at_first_jailbreak=True),
                           LocalContext(), "s", "s")
    assert [short[i].first_jailbreak_k for i in range(4)] == [100, 400, 900, None]
    for i in range(4):
        first = full[i].first_jailbreak_k
        want = [o.to_json() for o in full[i].outcomes if first is None or o.k <= first]
        assert [o.to_json() for o in short[i].outcomes] == want
    assert eng.calls < len(ks)
