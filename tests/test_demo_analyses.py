"""The demo's run step on the planted tiny model (tests/planted.py): the chain, then every
`demo_analyses.ANALYSES` entry, then the report with one section per analysis and no errors.
(The same on the real demo build is the slow `tests/test_embedded_slow.py`.)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from planted import HARMFUL, HARMLESS, make_engine
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.pipeline import ChainConfig, PromptSplits, run_chain
from refusal_audit.audit.refusal_direction import RefusalDirectionConfig
from refusal_audit.audit.report import write_report
from refusal_audit.audit.stage1 import Stage1Config
from refusal_audit.audit.stage2 import Stage2Config
from refusal_audit.server.embedded import demo_analyses
from refusal_audit.server.embedded.demo import _LocalResolver

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    engine, _ = make_engine()
    out = tmp_path_factory.mktemp("demo-run")
    ctx = LocalContext(out_dir=out)
    engine.resolver = _LocalResolver(ctx)
    cfgs = ChainConfig(direction=RefusalDirectionConfig(batch_size=64, cosine_figure=False, layers=[2, 3]),
                       stage1=Stage1Config(exclude_layers=[], max_new_tokens=6, k_max=40),
                       stage2=Stage2Config(max_new_tokens=6))
    chain = run_chain(engine, PromptSplits(HARMFUL[:16], HARMFUL[16:24], HARMFUL[24:30]),
                      PromptSplits(HARMLESS[:16], HARMLESS[16:24]), cfgs, ctx)
    results = chain.to_json()
    split = SimpleNamespace(harmful_train=HARMFUL, harmless_train=HARMLESS, harmless_heldout=HARMLESS[24:])
    objects: dict = {}
    # with the AtP selection the benchmark adds (benchmarks/compare_methods.py), before the comparison
    analyses = demo_analyses.ANALYSES[:-1] + [demo_analyses.ATP_ANALYSIS] + demo_analyses.ANALYSES[-1:]
    for name, fn in analyses:
        results[name] = fn(engine, results, ctx, split=split, small=True, objects=objects)
    html, js = write_report(results, out)
    return results, html.read_text(), json.loads(js.read_text())


def test_every_analysis_runs_and_has_a_report_section(demo_run) -> None:
    results, html, report = demo_run
    names = [name for name, _ in demo_analyses.ANALYSES]
    assert names == ["stage3", "probe_baseline", "random_baseline", "obrien_baseline", "hydra", "causality",
                     "downstream_ce", "taxonomy", "refusal_features", "method_comparison"]
    for name in ["direction", "stage1", "stage2", *names]:
        assert report[name]["kind"] == name, report[name]
        assert f'<section id="{name}">' in html
    assert report["refusal_features_atp"]["kind"] == "refusal_features" and '<section id="refusal_features_atp">' in html
    assert "could not render this section" not in html


def test_demo_analyses_find_the_planted_structure(demo_run) -> None:
    results, _, _ = demo_run
    assert results["stage2"]["summary"]["jailbreak_successes"] >= 1
    assert results["stage3"]["fm"]["test_accuracy"] >= 0.8  # harmful vs harmless words: separable
    ce = {row["sample"]: row for row in results["downstream_ce"]["table"]}
    assert set(ce) == {"instructions", "general_text"}
    assert ce["instructions"]["baseline"] > 0 and ce["instructions"]["direction"] > 0
    # the shipped CoCoNot prompts: the paper's five unsafe subcategories, offline
    assert sorted(results["taxonomy"]["categories"]) == sorted(
        ["triggers for offensive language", "dangerous or sensitive topics", "misinformation",
         "privacy violations", "copyright violations"])


def test_method_comparison_puts_both_seeds_on_the_same_prompts(demo_run) -> None:
    """Attribution ran on stage 1's prompts; the comparison's counts match each method's own records
    (computed independently: stage 2's per-prompt score rows, the attribution's own pass counters)."""
    results, html, _ = demo_run
    rf, cmp_ = results["refusal_features"], results["method_comparison"]
    texts = [p["prompt"] for p in results["stage1"]["prompts"]]
    assert rf["prompts"] == texts and cmp_["n_prompts"] == len(texts)
    assert [r["prompt"] for r in cmp_["per_prompt"]] == texts
    # no meter in this fixture: the cost falls back to the methods' own counters
    s2 = results["stage2"]["prompts"]
    cost = cmp_["cost"]
    assert cost["stage2_search_fwd_equiv"] == sum(p["forward_passes"] for p in s2)
    assert cost["attribution_search_fwd_equiv"] == rf["selection"]["forward_equivalents"]
    # per prompt: 1 jailbreak-token score + (10 IG steps + baseline + patched) forwards + 10 backwards
    assert cost["attribution_per_prompt"] == 1 + 12 + 2 * 10
    by = {m["method"].split(" (")[0]: m for m in cmp_["methods"]}
    assert by["stage 2"]["jailbreak_rate"] == results["stage2"]["summary"]["jailbreak_successes"] / len(texts)
    ppv0 = next(r for r in rf["per_prompt_validation"] if r["alpha"] == 0.0)
    assert [r["attribution_jailbroken@0"] for r in cmp_["per_prompt"]] == ppv0["jailbroken"]
    # the planted model: both methods find the planted latents, so the per-prompt sets overlap
    assert any((r["jaccard_stage2_attribution"] or 0) > 0 for r in cmp_["per_prompt"])
    ce_names = set(cmp_["ce_samples"])
    assert ce_names == {"instructions", "general_text"}
    assert by["stage 2"]["ce_delta"] and set(by["stage 2"]["ce_delta"]) == ce_names
    assert "Seed 1 vs seed 2" in html and "forward-equiv." in html
    # AtP (n = 1) next to IG: same prompts and candidates, its own counters, 6 forward-equivalents per prompt
    atp = results["refusal_features_atp"]
    assert atp["method"] == "atp" and atp["prompts"] == texts
    assert atp["selection"]["candidates"] == rf["selection"]["candidates"]
    assert cost["atp_search_fwd_equiv"] == atp["selection"]["forward_equivalents"]
    assert cost["atp_per_prompt"] == 1 + 3 + 2 * 1
    assert cost["ratio_attribution_over_atp"] == pytest.approx(33 / 6)
    atp0 = next(r for r in atp["per_prompt_validation"] if r["alpha"] == 0.0)
    assert [r["atp_jailbroken@0"] for r in cmp_["per_prompt"]] == atp0["jailbroken"]
    assert [r["atp_size"] for r in cmp_["per_prompt"]] == [len(p) for p in atp["selection"]["per_prompt"]]
    atp_row = next(m for m in cmp_["methods"] if m["method"].startswith("AtP per-prompt"))
    assert atp_row["jailbreak_rate"] == atp0["jailbreak_rate"] and set(atp_row["ce_delta"]) == ce_names
    assert all(r["jaccard_atp_attribution"] is not None for r in cmp_["per_prompt"])


def test_shipped_coconot_file_is_the_safety_category_with_its_licence() -> None:
    rows = [json.loads(x) for x in demo_analyses.COCONOT_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 395 and {r["category"] for r in rows} == {"Requests with safety concerns"}
    assert (demo_analyses.DATA_DIR / "COCONOT_LICENSE").read_text().startswith("MIT License")


# ---------------------------------------------------------------------------- run_demo: reuse and partial reports


def _small_demo(tmp_path, analyses: list, rerun: bool = False, loads: list | None = None, bf16: bool | None = False):
    """`run_demo` on the planted model with the demo's section machinery (gate, chain, rates,
    the given analyses); `loads` counts engine loads. fp32 matmuls unless `bf16` says otherwise
    (the default, None, would follow this host's CPU)."""
    from refusal_audit.server.embedded.demo import run_demo

    def loader():
        if loads is not None:
            loads.append(1)
        return make_engine()[0]

    cfgs = ChainConfig(direction=RefusalDirectionConfig(batch_size=64, cosine_figure=False, layers=[2, 3],
                                                        n_train=16, n_val=8),
                       stage1=Stage1Config(exclude_layers=[], max_new_tokens=6, k_max=40),
                       stage2=Stage2Config(max_new_tokens=6))
    split = SimpleNamespace(harmful_train=HARMFUL[:16], harmful_heldout=HARMFUL[16:32],
                            harmless_train=HARMLESS[:16], harmless_heldout=HARMLESS[16:32])
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    html, js = run_demo(tmp_path, small=True, n_prompts=4, out_dir=out, rerun=rerun, engine_loader=loader,
                        split=split, analysis_list=analyses, configs=cfgs, bf16=bf16)
    return json.loads(js.read_text())


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory: pytest.TempPathFactory):
    """One computed run (gate, chain, rates, random baseline, `peek`); later tests run against its cache."""
    root = tmp_path_factory.mktemp("demo-cache")
    seen_partial: list[list[str]] = []

    def peek(engine, results, ctx, **_: object) -> dict:
        # the report on disk while this analysis runs: the earlier sections are already there
        run_dirs = sorted(root.glob("run-*"))
        seen_partial.append(sorted(json.loads((run_dirs[-1] / "report.json").read_text())))
        return {"kind": "peek", "n": results["stage2"]["summary"]["n_prompts"]}

    analyses = [("random_baseline", demo_analyses.random_baseline), ("peek", peek)]
    loads: list = []
    first = _small_demo(root, analyses, loads=loads)
    return SimpleNamespace(root=root, first=first, loads=loads, seen_partial=seen_partial, analyses=analyses)


def test_first_demo_run_writes_sections_as_they_finish_and_gates_every_rate(first_demo) -> None:
    first, seen = first_demo.first, first_demo.seen_partial
    assert first_demo.loads == [1] and first["run"]["reused_sections"] == []
    assert {"coherence_gate", "direction", "stage2", "direction_ablation_rates", "random_baseline"} <= set(seen[0])
    assert "peek" not in seen[0]
    gate = first["coherence_gate"]
    assert gate["n_answers"] == 16 and gate["nll_threshold"] > gate["nll_quantile_value"]
    rates = first["direction_ablation_rates"]["harmful_direction_ablated"]
    assert rates["jailbreak_rate_ungated"] >= rates["jailbreak_rate"]
    assert "asr_ungated" in first["stage2"]["summary"] and "asr_mean_ungated" in first["random_baseline"]["summary"]


def test_demo_meters_every_section_and_agrees_with_stage2s_own_counts(first_demo) -> None:
    """The run's MeteredEngine charges the chain's engine calls to direction / stage1 / stage2 by the
    stages' progress reports; stage 2 counts its score rows and generations itself, independently."""
    comp = first_demo.first["compute"]
    assert comp["kind"] == "compute"
    assert {"coherence_gate", "chain", "direction_ablation_rates", "random_baseline"} <= set(comp["sections"])
    stages = comp["sections"]["chain"]["stages"]
    assert {"direction", "stage1", "stage2"} <= set(stages)
    s2 = first_demo.first["stage2"]["prompts"]
    c2 = stages["stage2"]
    assert c2["generations"] == sum(p["generations"] for p in s2)
    assert c2["forward_passes"] - c2["generations"] == sum(p["forward_passes"] for p in s2)
    assert c2["backward_passes"] == 0 and stages["stage1"]["generations"] > 0
    # the coherence gate's NLL checks of stage 2's jailbreaks are listed apart, not in stage 2's passes
    n_jb = sum(1 for p in s2 for t in p["taus"] if t["jailbroken"] or t["degenerate"])
    if n_jb:
        assert stages["stage2: judge"]["forward_passes"] > 0


def test_second_demo_run_reuses_every_section_without_loading_the_model(first_demo) -> None:
    loads: list = []
    second = _small_demo(first_demo.root, first_demo.analyses, loads=loads)
    assert loads == [], "a run with nothing changed must not load the model"
    assert second["run"]["reused_sections"] == ["coherence_gate", "chain", "direction_ablation_rates",
                                                 "random_baseline", "peek"]
    assert len(first_demo.seen_partial) == 1  # nothing recomputed
    # the rendered sections are saved too: a fresh process re-renders no figure it has drawn before
    from refusal_audit.audit import report

    saved = json.loads((first_demo.root / "runs" / "cache" / "rendered.json").read_text())
    assert report.section_key("stage2", second["stage2"]) in saved
    for name in ("coherence_gate", "direction", "stage1", "stage2", "direction_ablation_rates",
                 "random_baseline", "peek", "compute"):  # the cached sections keep their measured compute
        assert second[name] == first_demo.first[name], name


def test_a_changed_analysis_list_reuses_only_the_sections_before_it(first_demo) -> None:
    loads: list = []
    res = _small_demo(first_demo.root, [("obrien_baseline", demo_analyses.obrien_baseline)], loads=loads)
    assert res["run"]["reused_sections"] == ["coherence_gate", "chain", "direction_ablation_rates"]
    assert loads == [1]
    assert all({"asr", "asr_ungated", "jailbroken_ungated"} <= set(r) for r in res["obrien_baseline"]["per_k"])


def test_matmul_precision_is_part_of_the_fingerprint(first_demo) -> None:
    """A bf16-matmul run does not reuse the fp32 run's sections, says so in the report, and finds
    the planted latent all the same (its effect is far above bf16 rounding)."""
    loads: list = []
    res = _small_demo(first_demo.root, first_demo.analyses, loads=loads, bf16=True)
    assert loads == [1] and res["run"]["reused_sections"] == [] and res["run"]["bf16_matmuls"] is True
    assert res["compute"]["matmul_precision"] == "bf16" and first_demo.first["compute"]["matmul_precision"] == "fp32"
    assert first_demo.first["stage2"]["summary"]["jailbreak_successes"] >= 1
    assert res["stage2"]["summary"]["jailbreak_successes"] == first_demo.first["stage2"]["summary"]["jailbreak_successes"]


def test_rerun_recomputes_every_section(first_demo) -> None:
    loads: list = []
    res = _small_demo(first_demo.root, [], rerun=True, loads=loads)
    assert loads == [1] and res["run"]["reused_sections"] == []
    assert res["stage2"]["summary"] == first_demo.first["stage2"]["summary"]  # deterministic
