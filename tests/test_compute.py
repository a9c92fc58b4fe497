"""`audit.compute`: the engine meter charges every counted call to the stage the run last reported, and
`audit.comparison`'s pure parts (Jaccard, rates, the search-cost ratio) on hand-made results."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from refusal_audit.audit.comparison import compare_methods, jaccard
from refusal_audit.audit.compute import Compute, ComputeMeter, MeteredEngine, stages_json
from refusal_audit.audit.context import LocalContext


class FakeEngine:
    """Returns one result per request; attribute reports 5 forward and 4 backward passes per item."""

    info = "info"

    def score(self, requests, token_ids, top_k=0):
        return [0.0] * len(requests)

    def generate(self, requests):
        return [SimpleNamespace(token_ids=[1] * (i + 1), text="") for i in range(len(requests))]

    def residuals(self, requests, layers=None, positions=(-1,)):
        return np.zeros((len(requests), 1, 1, 2))

    def attribute(self, request):
        n = len(request)
        return SimpleNamespace(forward_passes=5 * n, backward_passes=4 * n)


class NoGrad:
    def score(self, requests, token_ids, top_k=0):
        return []


def test_meter_charges_each_call_to_the_current_stage() -> None:
    t = [0.0]
    meter = ComputeMeter(clock=lambda: t[0])
    eng = MeteredEngine(FakeEngine(), meter)
    meter.set_stage("a")
    eng.score(["p", "q", "r"], [1])
    eng.generate(["p", "q"])  # 2 prefills, 1 + 2 generated tokens
    t[0] = 2.0
    meter.set_stage("b")
    eng.attribute(["p", "q"])
    eng.residuals(["p"])
    t[0] = 5.0
    got = meter.take()
    assert got["a"].forward_passes == 5 and got["a"].generations == 2 and got["a"].generated_tokens == 3
    assert got["a"].backward_passes == 0 and got["a"].engine_calls == 2 and got["a"].wall_s == 2.0
    assert got["b"].forward_passes == 11 and got["b"].backward_passes == 8
    assert got["b"].forward_equivalents == 11 + 16 and got["b"].wall_s == 3.0
    assert meter.take() == {}  # counting restarts from zero (no time passed, nothing charged)
    js = stages_json(got)
    assert js["total"]["forward_equivalents"] == 5 + 27 and set(js["stages"]) == {"a", "b"}
    assert Compute.from_json(js["stages"]["b"]) == got["b"]


def test_metered_engine_is_transparent() -> None:
    inner = FakeEngine()
    eng = MeteredEngine(inner, ComputeMeter())
    assert eng.info == "info" and eng.wrapped is inner
    eng.resolver = "r"  # attribute writes reach the wrapped engine (the demo sets its resolver)
    assert inner.resolver == "r"  # type: ignore[attr-defined]
    plain = MeteredEngine(NoGrad(), ComputeMeter())
    assert not hasattr(plain, "attribute")  # the job checks still see an engine that cannot attribute
    with pytest.raises(AttributeError):
        _ = plain.encode


def test_local_context_progress_switches_the_stage() -> None:
    meter = ComputeMeter()
    ctx = LocalContext(on_progress=lambda s, d, t, p: meter.set_stage(s))
    eng = MeteredEngine(FakeEngine(), meter)
    ctx.progress("stage2", 0, 1)
    eng.score(["p"], [1])
    ctx.progress("stage3", 0, 1)
    eng.score(["p", "q"], [1])
    got = meter.snapshot()
    assert got["stage2"].forward_passes == 1 and got["stage3"].forward_passes == 2


def _lat(*pairs: tuple[int, int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for ly, i in pairs:
        out.setdefault(str(ly), []).append(i)
    return out


def test_compare_methods_on_hand_made_results() -> None:
    """Two prompts: stage 2 ran on both and jailbroke the first; attribution's per-prompt sets are known,
    so the Jaccard overlaps, rates and the search-cost ratio are checked by hand."""
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and jaccard(set(), set()) is None
    texts = ["a", "b"]
    stage1 = {"prompts": [{"index": 0, "prompt": "a", "status": "jailbroken", "latents": _lat((3, 1), (3, 2), (3, 5))},
                          {"index": 1, "prompt": "b", "status": "jailbroken", "latents": _lat((3, 1), (4, 7))}]}
    stage2 = {"config": {"seeds": [0, 1, 2], "block_size": 5},
              "prompts": [{"index": 0, "prompt": "a", "final_latents": _lat((3, 1), (3, 2)), "jailbroken": True,
                           "forward_passes": 300, "pool_size": 3, "taus": []},
                          {"index": 1, "prompt": "b", "final_latents": {}, "jailbroken": False,
                           "forward_passes": 100, "pool_size": 2, "taus": [{"degenerate": True}]}]}
    rf = {"prompts": texts, "selection": {
        "per_prompt": [[[3, 2, 1.0], [4, 9, 0.5]], [[3, 1, 1.0]]], "global_set": [[3, 2, 1.0]],
        "candidates": {"3": [1, 2], "4": [9]}, "forward_equivalents": 40.0, "forward_passes": 20,
        "backward_passes": 10, "per_prompt_k": 2},
        "per_prompt_validation": [{"alpha": 0.0, "jailbreak_rate": 0.5, "jailbreak_rate_ungated": 0.5,
                                   "jailbroken": [True, False]}],
        "sweep": [{"alpha": None, "k": 0}, {"alpha": -3.0, "k": 1, "jailbreak_rate": 1.0}]}
    ce = {"samples": {"instructions": {"baseline": {"mean": 2.0},
                                       "extra": {"stage2/0": {"mean": 2.5}, "attribution/0": {"mean": 2.25},
                                                 "attribution/global/-3": {"mean": 3.0}}}}}
    out = compare_methods(stage1, stage2, rf, ce=ce)
    a, b = out["per_prompt"]
    assert a["jaccard_stage2_attribution"] == pytest.approx(1 / 3)  # {3:1,3:2} vs {3:2,4:9}
    assert b["jaccard_stage2_attribution"] is None and b["stage2_jailbroken_ungated"] and not b["stage2_jailbroken"]
    assert a["attribution_jailbroken@0"] is True and b["attribution_jailbroken@0"] is False
    by = {m["method"].split(" (")[0]: m for m in out["methods"]}
    assert by["stage 2"]["jailbreak_rate"] == 0.5 and by["stage 2"]["jailbreak_rate_ungated"] == 1.0
    assert by["stage 2"]["ce_delta"] == {"instructions": 0.5}
    assert by["attribution per-prompt top-2, x0"]["ce_delta"] == {"instructions": 0.25}
    assert by["attribution global top-1, x-3"]["ce_delta"] == {"instructions": 1.0}
    cost = out["cost"]
    assert cost["stage2_per_prompt"] == 200 and cost["attribution_per_prompt"] == 20
    assert cost["ratio_stage2_over_attribution"] == 10 and cost["meets_10x"]
    assert cost["break_even_pool_10x"] == pytest.approx(5 * (200 - 2) / 3)
    layer3 = next(r for r in out["per_layer"] if r["layer"] == 3)
    assert layer3["stage2_union"] == 2 and layer3["attribution_union"] == 2 and layer3["stage2_in_candidates"] == 2
    assert layer3["jaccard_stage2_attribution"] == 1.0
    # with a meter's record, the cost comes from it (generation prefills excluded from the search)
    compute = {"chain": {"stages": {"stage2": Compute(forward_passes=90, generations=10).to_json()}},
               "refusal_features": {"stages": {"refusal_features: attribution":
                                               Compute(forward_passes=4, backward_passes=3).to_json()}}}
    cost = compare_methods(stage1, stage2, rf, compute=compute)["cost"]
    assert cost["stage2_per_prompt"] == 40 and cost["attribution_per_prompt"] == 5 and not cost["meets_10x"]


def test_ce_conditions_prefer_prompts_every_method_has_a_set_for() -> None:
    from refusal_audit.audit.comparison import ce_conditions

    stage2 = {"prompts": [{"index": 0, "prompt": "a", "final_latents": _lat((3, 1)), "jailbroken": True},
                          {"index": 1, "prompt": "b", "final_latents": _lat((3, 2)), "jailbroken": True}]}
    stage3 = {"prompts": [{"index": 0, "first_jailbreak_k": None}, {"index": 1, "first_jailbreak_k": 1}]}
    rf = {"prompts": ["a", "b"], "selection": {"per_prompt": [[[3, 1, 1.0]], [[3, 4, 1.0]]], "global_set": [[3, 4, 1.0]]}}
    names = [n for n, _ in ce_conditions(stage2, rf, stage3, {0: [(3, 7)], 1: [(3, 9)]}, max_sets=1)]
    assert names == ["stage2/1", "stage3/1", "attribution/1", "stage2/union", "attribution/global/0",
                     "attribution/global/-3"]
    conds = dict(ce_conditions(stage2, rf, stage3, {0: [(3, 7)], 1: [(3, 9)]}, max_sets=1))
    assert conds["stage3/1"][0].latents == {3: (2, 9)}  # stage 2's set plus the FM top-1


def test_compare_methods_adds_atp_next_to_ig() -> None:
    """A second (AtP) selection on the same prompts: its rows, overlaps with IG's and stage 2's sets, CE on
    the same prompts and its own search cost and ratio, all checked by hand."""
    from refusal_audit.audit.comparison import ce_conditions

    stage2 = {"config": {"seeds": [0, 1, 2], "block_size": 5},
              "prompts": [{"index": 0, "prompt": "a", "final_latents": _lat((3, 1), (3, 2)), "jailbroken": True,
                           "forward_passes": 300, "pool_size": 3, "taus": []},
                          {"index": 1, "prompt": "b", "final_latents": {}, "jailbroken": False,
                           "forward_passes": 100, "pool_size": 2, "taus": []}]}
    rf = {"prompts": ["a", "b"], "selection": {"per_prompt": [[[3, 2, 1.0], [4, 9, 0.5]], [[3, 1, 1.0]]],
                                               "global_set": [[3, 2, 1.0]], "candidates": {"3": [1, 2], "4": [9]},
                                               "forward_equivalents": 40.0, "per_prompt_k": 2},
          "per_prompt_validation": [{"alpha": 0.0, "jailbreak_rate": 0.5, "jailbroken": [True, False]}]}
    atp = {"prompts": ["a", "b"], "method": "atp",
           "selection": {"per_prompt": [[[3, 1, 2.0], [3, 2, 1.0]], [[4, 9, 1.0]]], "global_set": [[3, 1, 1.5]],
                         "forward_equivalents": 8.0, "forward_passes": 6, "backward_passes": 1, "per_prompt_k": 2},
           "per_prompt_validation": [{"alpha": 0.0, "jailbreak_rate": 0.0, "jailbreak_rate_ungated": 0.5,
                                      "jailbroken": [False, False]}]}
    names = [n for n, _ in ce_conditions(stage2, rf, rf_atp=atp, global_alphas=())]
    assert names == ["stage2/0", "attribution/0", "atp/0", "stage2/union"]
    ce = {"samples": {"instructions": {"baseline": {"mean": 2.0},
                                       "extra": {"attribution/0": {"mean": 2.25}, "atp/0": {"mean": 2.75}}}}}
    out = compare_methods(None, stage2, rf, ce=ce, rf_atp=atp)
    a, b = out["per_prompt"]
    assert a["jaccard_stage2_atp"] == 1.0 and a["jaccard_atp_attribution"] == pytest.approx(1 / 3)
    assert b["jaccard_stage2_atp"] is None and b["jaccard_atp_attribution"] == 0.0
    assert a["atp_jailbroken@0"] is False and a["atp_size"] == 2
    row = next(m for m in out["methods"] if m["method"].startswith("AtP per-prompt top-2, x0"))
    assert row["jailbreak_rate"] == 0.0 and row["jailbreak_rate_ungated"] == 0.5
    assert row["ce_delta"] == {"instructions": 0.75} and row["unique_latents"] == 3
    layer3 = next(r for r in out["per_layer"] if r["layer"] == 3)
    assert layer3["atp_union"] == 2 and layer3["jaccard_stage2_atp"] == 1.0 and layer3["jaccard_atp_attribution"] == 1.0
    cost = out["cost"]  # stage 2: 400 / 2 prompts; IG 40 / 2; AtP 8 / 2
    assert cost["atp_per_prompt"] == 4 and cost["ratio_stage2_over_atp"] == 50 and cost["meets_10x_atp"]
    assert cost["ratio_attribution_over_atp"] == 5 and cost["ratio_stage2_over_attribution"] == 10
    assert cost["mean_jaccard_atp_attribution"] == pytest.approx(1 / 6)
    from refusal_audit.audit.report_comparison import render_comparison

    html = render_comparison(out)
    assert "10x fewer for AtP" in html and "Jaccard AtP/IG" in html and "AtP jb 0" in html
    assert "AtP" not in render_comparison(compare_methods(None, stage2, rf, ce=ce)).replace("(seed 2)", "")
    # without an AtP result nothing AtP appears
    plain = compare_methods(None, stage2, rf, ce=ce)
    assert "atp_per_prompt" not in plain["cost"] and "atp_size" not in plain["per_prompt"][0]
    assert not any(m["method"].startswith("AtP") for m in plain["methods"])
