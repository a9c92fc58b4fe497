"""Stage 1's K loop and the top-K sweep's stop-at-first-jailbreak loop generate several Ks per engine
call (`audit/stage1.py`, `audit/sweep.py`); their results must equal the one-K-per-call loop's.

The engine is a scripted stand-in: a prompt is jailbroken once at least `need[prompt]` latents are
ablated, so the first jailbreaking K of every prompt is known in advance (the independent answer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.engine import Completion
from refusal_audit.audit.spec import AblateLatents, Request
from refusal_audit.audit.stage1 import Stage1Config, run_stage1
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


def test_stage1_windows_find_each_prompts_first_k_in_fewer_calls() -> None:
    # first jailbreaking K (steps of 10 up to 100): 10, 30, 70, never, never
    need = dict(zip(PROMPTS, [5, 25, 61, 500, 500], strict=True))
    eng = ThresholdEngine(need)
    cfg = Stage1Config(k_start=10, k_step=10, k_max=100, exclude_layers=[], max_new_tokens=4, batch_size=16)
    res = run_stage1(eng, PROMPTS, np.ones(4, np.float32), cfg, LocalContext())
    got = [(p.status, p.k, p.generations) for p in res.prompts]
    # generations = baseline + one per K tried, exactly as the one-K loop counts them
    assert got == [("jailbroken", 10, 2), ("jailbroken", 30, 4), ("jailbroken", 70, 8),
                   ("not_jailbroken", None, 11), ("not_jailbroken", None, 11)]
    assert res.asr == [0.2, 0.2, 0.4, 0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6]
    assert res.prompts[0].latents == {3: list(range(10))}
    assert eng.calls < 1 + len(cfg.ks())  # baseline + fewer calls than Ks


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
