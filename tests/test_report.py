"""The HTML + JSON report over a real (planted-model) chain run, and the section registry."""

from __future__ import annotations

import json
import re

import pytest
from planted import (
    HARMFUL,
    HARMLESS,
    PLANTED,
    PLANTED_LAYER,
    directions,
    make_engine,
)
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.pipeline import ChainConfig, PromptSplits, run_chain
from refusal_audit.audit.report import SECTION_RENDERERS, register_section, write_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    engine, _ = make_engine()
    cfgs = ChainConfig.model_validate({
        "direction": {"batch_size": 64},
        "stage1": {"exclude_layers": [], "max_new_tokens": 6, "k_max": 20},
        "stage2": {"block_size": 1, "max_new_tokens": 6, "taus": [0.2, 0.5], "seeds": [0, 1]},
    })
    assert ChainConfig.model_validate_json(cfgs.model_dump_json()) == cfgs
    harmful = PromptSplits(HARMFUL[:12], HARMFUL[12:18], HARMFUL[18:22])
    harmless = PromptSplits(HARMLESS[:12], HARMLESS[12:18])
    ctx = LocalContext(out_dir=tmp_path_factory.mktemp("chain"))
    return run_chain(engine, harmful, harmless, cfgs, ctx), ctx


def test_chain_runs_all_stages(chain):
    res, ctx = chain
    assert float(res.direction.direction @ directions()[0]) > 0.9
    assert res.stage1.asr[-1] == 1.0
    assert all(sorted(p.final_latents) == [(PLANTED_LAYER, i) for i in PLANTED] for p in res.stage2.prompts)
    assert len(ctx.directions) == 1 and len(ctx.latent_sets) == len(res.stage2.prompts) + 1


def test_report_html_and_json(chain, tmp_path):
    res, _ = chain
    results = {**res.to_json(), "stage3": {"kind": "stage3_unknown", "note": "later analyses <render> generically"}}
    html_path, json_path = write_report(results, tmp_path / "out", title="planted")
    page = html_path.read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4 and all(len(b) > 1000 for b in images)  # cosine, selection, ASR vs K, tau
    assert "Cosine of the last-token residual" in page and "attack success rate vs K" in page
    assert 'class="table1"' in page and 'class="candidates"' in page and "<h3>Top latents</h3>" in page
    assert "&lt;render&gt;" in page and "stage3_unknown" in page  # unknown kinds: escaped JSON
    assert page.index('id="direction"') < page.index('id="stage1"') < page.index('id="stage2"')
    data = json.loads(json_path.read_text())
    assert json.loads(json.dumps(data)) == data
    assert data["stage2"]["summary"] == res.stage2.summary()
    assert data["stage1"]["asr"] == res.stage1.asr and data["direction"]["layer"] == res.direction.layer
    # the JSON alone rebuilds the results
    from refusal_audit.audit.stage2 import Stage2Result

    assert Stage2Result.from_json(data["stage2"]).summary() == res.stage2.summary()


def test_sections_are_extensible(tmp_path):
    @register_section("hydra", "Hydra effect", order=40)
    def render_hydra(d):
        return f"<p>revived: {d['revived']}</p>"

    try:
        html_path, _ = write_report({"h": {"kind": "hydra", "revived": 7}, "bad": {"kind": "hydra"}}, tmp_path)
        page = html_path.read_text()
        assert "<h2>Hydra effect (h)</h2><p>revived: 7</p>" in page
        assert "could not render this section" in page  # a broken section does not lose the report
    finally:
        SECTION_RENDERERS.pop("hydra")


def test_demo_stage2_pool_fallback_runs_and_is_reported(chain, tmp_path):
    """The demo's fallback when the literal reading finds no set: stage 2 with reading='pool',
    the literal summary kept, and the report saying which reading it shows."""
    from refusal_audit.audit.stage2 import Stage2Config
    from refusal_audit.server.embedded.demo import literal_trace, rerun_stage2_pool

    res, ctx = chain
    engine, _ = make_engine()
    cfg = Stage2Config(block_size=1, max_new_tokens=6, taus=[0.2, 0.5], seeds=[0, 1])
    literal = {"n_prompts": 4, "jailbreak_successes": 0}
    trace = [{"index": 3, "pool_size": 80, "taus": [
        {"tau": 0.1, "per_seed_sizes": [25, 35, 35], "size": 4, "jailbroken": False},
        {"tau": 0.2, "per_seed_sizes": [20, 30, 25], "size": 0, "jailbroken": None}]}]
    out = rerun_stage2_pool(engine, res.stage1, cfg, ctx, literal, trace)
    real = literal_trace(res.stage2.to_json())  # what the demo records from a real literal run
    assert [p["index"] for p in real] == [p.index for p in res.stage2.prompts] and real
    assert all(len(t["per_seed_sizes"]) == len(res.stage2.to_json()["config"]["seeds"]) for p in real for t in p["taus"])
    assert out["config"]["reading"] == "pool" and out["reading_fallback"]["literal_summary"] == literal
    assert out["summary"]["n_prompts"] == res.stage2.summary()["n_prompts"]
    page = write_report({**res.to_json(), "stage2": out}, tmp_path / "out", title="fallback")[0].read_text()
    assert "reading=pool" in page and "found 0 jailbreaking sets of 4 prompts" in page
    assert ("prompt 3 (pool 80): at tau=0.1 the seeds accepted 25/35/35 latents and shared 4; "
            "it did not jailbreak") in page
