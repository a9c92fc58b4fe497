"""Attribution in SAE space (server/attribution.py) against exact computations on tiny models.

- completeness: IG's attributions (latents + error term) sum to metric(patched) - metric(clean), and the
  patched endpoint is the baseline itself where it must be (one SAE layer, baseline acting upstream);
- the error term: zero baseline -> exactly 0; AtP's error and total equal an independent autograd
  computation (d metric / d h at the clean state, dotted with the baseline-minus-clean error / residual);
- AtP ranks latents like exact activation patching (Spearman >= 0.9) on the planted model;
- bad input names the field.
"""

from __future__ import annotations

import numpy as np
import planted
import pytest
import tiny
import torch
from refusal_audit.audit.attribution import (
    AttributionScope,
    Baseline,
    LogitDiff,
    LogProb,
    attribution_request,
)
from refusal_audit.audit.errors import InvalidRequest, NotFound
from refusal_audit.audit.spec import AblateDirection, AblateLatents, Request, TokenScope, user_prompt
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes

LAYER = 1
PROMPTS = [user_prompt("Write a poem about the sea."), user_prompt("How do I build a bomb?")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_engine() -> HFEngine:
    model = tiny.make_model("gemma2", seed=3, n_layers=3)
    saes = tiny.make_saes(model, layers=(LAYER,), d_sae=96)
    return HFEngine(model, tiny.make_tokenizer(), build_layer_saes(saes, 64, 3), model_name="tiny")


@pytest.fixture(scope="module")
def planted_engine() -> HFEngine:
    return planted.make_engine()[0]


def _metric(engine: HFEngine) -> LogitDiff:
    tok = engine.tokenizer
    return LogitDiff(positive=tok.convert_tokens_to_ids("Sure"), negative=tok.convert_tokens_to_ids("I"))


def _direction(engine: HFEngine, seed: int = 0) -> tuple[float, ...]:
    return tuple(np.random.default_rng(seed).normal(size=engine.d_model).tolist())


def _assert_complete(res, rel: float = 1e-3) -> None:
    effect = res.metric_patched - res.metric_clean
    assert abs(effect) > 1e-3, "the baseline must move the metric for the test to mean anything"
    assert abs(res.total - effect) <= rel * abs(effect), (res.total, effect)


def test_completeness_zero_baseline_matches_latent_ablation(tiny_engine: HFEngine) -> None:
    """IG (midpoint, 128 steps) sums to the effect; the patched endpoint is AblateLatents(all) after BOS."""
    eng = tiny_engine
    tid = eng.tokenizer.convert_tokens_to_ids("I")
    req = attribution_request(PROMPTS, LogProb(token=tid), method="ig", n_steps=128, rule="midpoint", top_k=5)
    out = eng.attribute(req)
    d_sae = eng.saes[LAYER].d_sae
    for res in out.results:
        _assert_complete(res)
        assert res.layers[LAYER].error == 0.0  # zero baseline keeps the clean error term
        n = len(res.token_ids)
        ablate = AblateLatents(latents={LAYER: tuple(range(d_sae))}, scope=TokenScope(kind="positions", positions=tuple(range(1, n))))
        prompt = PROMPTS[out.results.index(res)]
        clean, ablated = eng.score([Request(prompt=prompt), Request(prompt=prompt, interventions=(ablate,))], [tid])
        assert res.metric_clean == pytest.approx(float(clean.logprobs[0]), abs=1e-4)
        assert res.metric_patched == pytest.approx(float(ablated.logprobs[0]), abs=1e-4)
        assert res.metric_baseline == res.metric_patched
    # passes: a separate clean forward (midpoint), 128 gradient steps and the endpoint, per row
    assert out.forward_passes == len(PROMPTS) * (1 + 128 + 1)
    assert out.backward_passes == len(PROMPTS) * 128


def test_completeness_interventions_baseline_with_error_term(tiny_engine: HFEngine) -> None:
    """Direction ablated at layers <= LAYER: the endpoint is the baseline run, and only latents + error sum up."""
    eng = tiny_engine
    bl = Baseline(kind="interventions", interventions=(AblateDirection(direction=_direction(eng), layers=tuple(range(LAYER + 1))),))
    req = attribution_request(PROMPTS, _metric(eng), method="ig", n_steps=128, rule="midpoint", baseline=bl,
                              scope=AttributionScope(kind="all"), top_k=3)
    for res in eng.attribute(req).results:
        assert res.metric_patched == pytest.approx(res.metric_baseline, abs=1e-4)
        _assert_complete(res)
        la = res.layers[LAYER]
        effect = res.metric_baseline - res.metric_clean
        assert abs(la.error) > 1e-2 * abs(effect), "the error term carries part of the effect here"
        assert abs(la.total - effect) > 1e-3 * abs(effect), "latents alone do not add up"


def test_left_riemann_converges(tiny_engine: HFEngine) -> None:
    """The paper's rule (a = k/n) converges to the same total as n grows; n=1 is AtP."""
    eng = tiny_engine
    m = _metric(eng)
    gaps = []
    for n in (1, 8, 64):
        res = eng.attribute(attribution_request(PROMPTS[:1], m, method="ig", n_steps=n, top_k=1)).results[0]
        gaps.append(abs(res.total - (res.metric_patched - res.metric_clean)))
    atp = eng.attribute(attribution_request(PROMPTS[:1], m, method="atp", top_k=1)).results[0]
    ig1 = eng.attribute(attribution_request(PROMPTS[:1], m, method="ig", n_steps=1, top_k=1)).results[0]
    assert atp.total == pytest.approx(ig1.total, rel=1e-6)
    assert gaps[0] > 1e-4, "AtP is not exact here: the metric is nonlinear along the path"
    assert gaps[2] < gaps[1] < gaps[0]
    assert gaps[2] <= 0.1 * gaps[0]


def _grad_at_clean(eng: HFEngine, prompt, metric: LogitDiff, layer: int = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, d metric / d h) after `layer` at the clean state, by plain autograd on the model."""
    ids = eng.render(prompt)
    x = torch.tensor([ids])
    store = {}

    def hook(_m, _a, out):
        h = (out[0] if isinstance(out, tuple) else out).detach().requires_grad_(True)
        store["h"] = h
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = eng.layers[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = eng.model(input_ids=x).logits[0, -1].float()
            val = logits[metric.positive] - logits[metric.negative]
            (g,) = torch.autograd.grad(val, [store["h"]])
    finally:
        handle.remove()
    return store["h"].detach()[0], g[0]


def test_atp_error_term_matches_autograd(tiny_engine: HFEngine) -> None:
    """AtP with a direction-ablation baseline: error = sum_t (e_b - e_c)_t . g_t, total + error = sum_t (h_b - h_c)_t . g_t."""
    eng = tiny_engine
    m = _metric(eng)
    iv = AblateDirection(direction=_direction(eng, 1), layers=tuple(range(LAYER + 1)))
    sae = eng.saes[LAYER]
    for prompt in PROMPTS:
        res = eng.attribute(attribution_request([prompt], m, method="atp", top_k=2,
                                                baseline=Baseline(kind="interventions", interventions=(iv,)))).results[0]
        h_c, g = _grad_at_clean(eng, prompt, m)
        n = h_c.shape[0]
        h_b = torch.from_numpy(eng.residuals([Request(prompt=prompt, interventions=(iv,))], [LAYER], list(range(n)))[0, 0])
        with torch.no_grad():
            e_c = h_c - sae.decode(sae.encode(h_c))
            e_b = h_b - sae.decode(sae.encode(h_b))
        sl = slice(1, n)  # after BOS
        want_err = float((e_b[sl] - e_c[sl]).mul(g[sl]).sum())
        want_all = float((h_b[sl] - h_c[sl]).mul(g[sl]).sum())
        la = res.layers[LAYER]
        assert la.error == pytest.approx(want_err, rel=1e-3, abs=1e-5)
        assert la.total + la.error == pytest.approx(want_all, rel=1e-3, abs=1e-5)
        assert abs(want_err) > 1e-4


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (scipy-free Spearman)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@pytest.mark.parametrize("layer", [planted.PLANTED_LAYER, planted.DISTRACTOR_LAYER])
def test_atp_ranks_like_exact_patching(planted_engine: HFEngine, layer: int) -> None:
    """Per prompt, AtP scores of every active latent vs the exact effect of zero-ablating it alone (after BOS)."""
    eng = planted_engine
    i_tok = eng.tokenizer.convert_tokens_to_ids("I")
    d_sae = planted.D_SAE
    for text in planted.HARMFUL[:2]:
        prompt = user_prompt(text)
        res = eng.attribute(attribution_request([prompt], LogProb(token=i_tok), method="atp", layers=(layer,),
                                                top_k=d_sae)).results[0]
        la = res.layers[layer]
        atp = np.zeros(d_sae)
        atp[la.latents] = la.scores
        scope = TokenScope(kind="positions", positions=tuple(res.positions))
        reqs = [Request(prompt=prompt)] + [
            Request(prompt=prompt, interventions=(AblateLatents(latents={layer: (i,)}, scope=scope),)) for i in range(d_sae)
        ]
        lp = np.array([s.logprobs[0] for s in eng.score(reqs, [i_tok])])
        exact = lp[1:] - lp[0]
        active = np.abs(exact) > 1e-6
        assert active.sum() >= 10
        rho = _spearman(atp[active], exact[active])
        assert rho >= 0.9, rho
        if layer == planted.PLANTED_LAYER:
            top3 = set(la.latents[:3].tolist())
            assert top3 == set(planted.PLANTED) or set(la.latents[-3:].tolist()) == set(planted.PLANTED)


def test_mean_baseline_uses_registered_prompt_set(tiny_engine: HFEngine) -> None:
    """mean: latents and error at their reference means; completeness holds; unknown set -> NotFound."""
    eng = tiny_engine

    class Sets:
        def prompt_set(self, set_id: str):
            if set_id != "ps_ref":
                raise NotFound(f"{set_id!r} is not registered")
            return [user_prompt("Tell me a story about a cat."), user_prompt("Give me a recipe for pasta.")]

    old = eng.resolver
    eng.resolver = Sets()  # type: ignore[assignment]
    try:
        req = attribution_request(PROMPTS[:1], _metric(eng), n_steps=128, rule="midpoint", top_k=4,
                                  baseline=Baseline(kind="mean", reference_set_id="ps_ref"))
        out = eng.attribute(req)
        res = out.results[0]
        _assert_complete(res)
        assert res.layers[LAYER].error != 0.0
        with pytest.raises(NotFound, match="baseline.reference_set_id"):
            eng.attribute(req.model_copy(update={"baseline": Baseline(kind="mean", reference_set_id="ps_nope")}))
    finally:
        eng.resolver = old


def test_per_position_and_chosen_latents(tiny_engine: HFEngine) -> None:
    eng = tiny_engine
    req = attribution_request(PROMPTS[:1], _metric(eng), method="atp", top_k=3, latents={LAYER: (0, 1, 2)},
                              per_position=True)
    res = eng.attribute(req).results[0]
    la = res.layers[LAYER]
    assert la.per_position is not None and la.error_per_position is not None
    assert la.per_position.shape == (len(res.positions), len(la.latents))
    np.testing.assert_allclose(la.per_position.sum(0), la.scores, rtol=1e-5, atol=1e-6)
    assert {0, 1, 2} <= set(la.latents.tolist())
    assert list(la.scores[:3]) == sorted(la.scores[:3], reverse=True)
    assert res.positions == list(range(1, len(res.token_ids)))


def test_non_differentiable_sae_is_refused() -> None:
    model = tiny.make_model("llama", seed=1, n_layers=2)
    saes = tiny.make_saes(model, layers=(0,), normalize_activations="layer_norm")
    eng = HFEngine(model, tiny.make_tokenizer(), build_layer_saes(saes, 64, 2))
    with pytest.raises(InvalidRequest, match="layers: .*normalize_activations='layer_norm'"):
        eng.attribute(attribution_request(PROMPTS[:1], LogProb(token=5), method="atp"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"metric": LogProb(token=10**6)}, "metric.token"),
        ({"metric": LogitDiff(positive=1, negative=-2)}, "metric.negative"),
        ({"method": "ig", "n_steps": 10**4}, "n_steps"),
        ({"method": "ig", "n_steps": -1}, "n_steps"),
        ({"method": "atp", "n_steps": 5}, "n_steps"),
        ({"scope": AttributionScope(kind="positions")}, "scope.positions: empty"),
        ({"scope": AttributionScope(kind="positions", positions=(99,))}, "scope.positions"),
        ({"scope": AttributionScope(kind="last_n", n=0)}, "scope.n"),
        ({"layers": (2,)}, "layers"),
        ({"latents": {LAYER: (10**6,)}}, f"latents[{LAYER}]"),
        ({"top_k": 0}, "top_k"),
        ({"baseline": Baseline(kind="interventions", interventions=(AblateDirection(direction=(1.0, 2.0)),))},
         "baseline.interventions"),
    ],
)
def test_bad_input_names_field(tiny_engine: HFEngine, change: dict, field: str) -> None:
    base = attribution_request(PROMPTS[:1], LogProb(token=5), method="atp")
    req = base.model_copy(update=change)
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny_engine.attribute(req)


def test_refusal_features_selection_on_planted(planted_engine: HFEngine) -> None:
    """Cos-sim candidates include the never-firing decoys; IG attribution ranks the planted latents first."""
    from refusal_audit.audit.refusal_features import select_refusal_features

    eng = planted_engine
    tok = eng.tokenizer
    i_tok, sure = tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("Sure")
    prompts = [user_prompt(t) for t in planted.HARMFUL[:3]]
    out = select_refusal_features(eng, prompts, planted.directions()[0], i_tok, sure, candidates_per_layer=10,
                                  per_prompt_k=5, global_k=5, n_steps=4, batch_size=2)
    assert set(planted.DECOYS) <= set(out.candidates[planted.PLANTED_LAYER])
    assert {(ly, i) for ly, i, _ in out.global_set[:3]} == {(planted.PLANTED_LAYER, i) for i in planted.PLANTED}
    for p in out.per_prompt:
        assert {(ly, i) for ly, i, _ in p[:3]} == {(planted.PLANTED_LAYER, i) for i in planted.PLANTED}
    assert all(t == sure for t in out.jailbreak_token_ids)  # the argmax under direction ablation
    assert all(b > c for b, c in zip(out.metric_baseline, out.metric_clean, strict=True))
    n = len(prompts)
    assert out.forward_passes == n + n * (4 + 1 + 1) and out.backward_passes == n * 4


def test_refusal_features_atp_is_the_one_step_case(planted_engine: HFEngine) -> None:
    """method="atp" is IG's left rule with n = 1 (one gradient at the clean state, a_0 = 0): the same scores,
    sets and metrics; it costs 1 scored + 3 forward (clean with gradient, baseline run, patched end point)
    and 1 backward pass per prompt. Independently: each score is (z_b - z_c) . dM/dz at the clean state,
    summed after BOS, computed here with autograd on hooks of our own."""
    from refusal_audit.audit.refusal_features import select_refusal_features

    eng = planted_engine
    tok = eng.tokenizer
    i_tok, sure = tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("Sure")
    prompts = [user_prompt(t) for t in planted.HARMFUL[:2]]
    r = planted.directions()[0]
    kw = dict(candidates_per_layer=10, per_prompt_k=5, global_k=5, batch_size=2)
    atp = select_refusal_features(eng, prompts, r, i_tok, sure, method="atp", **kw)  # type: ignore[arg-type]
    ig1 = select_refusal_features(eng, prompts, r, i_tok, sure, n_steps=1, **kw)  # type: ignore[arg-type]
    assert atp.method == "atp" and atp.n_steps == 1
    n = len(prompts)
    assert atp.forward_passes == n + 3 * n and atp.backward_passes == n and atp.forward_equivalents == 6 * n
    assert atp.jailbreak_token_ids == ig1.jailbreak_token_ids
    for p_atp, p_ig in zip(atp.per_prompt, ig1.per_prompt, strict=True):
        assert [t[:2] for t in p_atp] == [t[:2] for t in p_ig]
        np.testing.assert_allclose([t[2] for t in p_atp], [t[2] for t in p_ig], rtol=1e-5, atol=1e-7)
    # independently, at one layer: score_i = sum over positions after BOS of (z_b - z_c)_i dM/dz_i at the clean
    # state, dM/dz = (dM/dh) (dh/dz) by autograd through the SAE's decode on the raw model's clean gradient
    layer = planted.PLANTED_LAYER
    sae = eng.saes[layer]
    prompt = prompts[0]
    one = select_refusal_features(eng, [prompt], r, i_tok, sure, method="atp", layers=[layer],
                                  **kw)  # type: ignore[arg-type]
    metric = LogitDiff(positive=one.jailbreak_token_ids[0], negative=i_tok)
    h_c, g = _grad_at_clean(eng, prompt, metric, layer)
    pos = list(range(1, h_c.shape[0]))  # after BOS
    ablate = AblateDirection(direction=tuple(float(x) for x in r))
    h_b = torch.from_numpy(eng.residuals([Request(prompt=prompt, interventions=(ablate,))], [layer], pos)[0, 0])
    with torch.no_grad():
        z_c, z_b = sae.encode(h_c[pos]), sae.encode(h_b)
    zc = z_c.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(sae.decode(zc), [zc], grad_outputs=g[pos])
    want = ((z_b - z_c) * gz).sum(0)
    got = {i: s for ly, i, s in one.per_prompt[0]}
    assert len(got) == 5 and max(abs(float(want[i])) for i in got) > 1e-3
    for i, sc in got.items():
        assert sc == pytest.approx(float(want[i]), rel=1e-3, abs=1e-5)


def test_steering_sweep_on_planted(planted_engine: HFEngine) -> None:
    """Scaling the planted latents by alpha <= 0 (all three) stops the refusal; one latent alone does not."""
    from refusal_audit.audit.judges import SubstringJudge
    from refusal_audit.audit.refusal_features import RefusalFeatures, steering_sweep

    layer = planted.PLANTED_LAYER
    feats = RefusalFeatures(candidates={}, jailbreak_token_ids=[], per_prompt=[],
                            global_set=[(layer, i, 1.0) for i in planted.PLANTED])
    texts = planted.HARMFUL[:3]
    rows = steering_sweep(planted_engine, [user_prompt(t) for t in texts], texts, feats, SubstringJudge(),
                          alphas=(-1.0, 0.0), ks=(1, 3), max_new_tokens=4,
                          ce_prompts=[user_prompt(t) for t in planted.HARMLESS[:2]], ce_completions=["Sure", "Sure"])
    by = {(r["alpha"], r["k"]): r for r in rows}
    assert by[(None, 0)]["refusal_rate"] == 1.0
    assert by[(0.0, 1)]["refusal_rate"] == 1.0  # any planted latent left keeps the refusal
    assert by[(0.0, 3)]["refusal_rate"] == 0.0 and by[(-1.0, 3)]["refusal_rate"] == 0.0
    assert all("ce_delta" in r for r in rows[1:])


def test_run_refusal_features_resumes(planted_engine: HFEngine) -> None:
    """The job body on the planted model: the global set holds the planted latents, steering them stops the
    refusal, and a rerun on the same checkpoints calls neither attribute nor generate again."""
    from refusal_audit.audit.context import LocalContext
    from refusal_audit.audit.refusal_features import RefusalFeaturesConfig, run_refusal_features
    from refusal_audit.server.jobs import KINDS

    assert "refusal_features" in KINDS
    eng = planted_engine
    calls: list[str] = []

    class Counting:
        info = eng.info

        def __getattr__(self, name: str):
            fn = getattr(eng, name)
            if name in ("attribute", "generate", "score", "loss"):
                def wrapped(*a, **k):
                    calls.append(name)
                    return fn(*a, **k)
                return wrapped
            return fn

    r = planted.directions()[0]
    cfg = RefusalFeaturesConfig(global_k=3, per_prompt_k=3, n_steps=2, alphas=[-1.0], ks=[3],
                                max_new_tokens=3, batch_size=4)
    ctx = LocalContext()
    sure = eng.tokenizer.convert_tokens_to_ids("Sure")
    out = run_refusal_features(Counting(), cfg, ctx, r, planted.HARMFUL[:2], planted.HARMLESS[:2], fallback_token_id=sure)
    assert {(ly, i) for ly, i, _ in out["selection"]["global_set"]} == {(planted.PLANTED_LAYER, i) for i in planted.PLANTED}
    base, steered = out["sweep"]
    assert base["refusal_rate"] == 1.0 and steered["refusal_rate"] == 0.0 and "ce_delta" in steered
    assert out["selection"]["forward_equivalents"] == out["selection"]["forward_passes"] + 2 * out["selection"]["backward_passes"]
    assert "attribute" in calls and "generate" in calls
    calls.clear()
    again = run_refusal_features(Counting(), cfg, ctx, r, planted.HARMFUL[:2], planted.HARMLESS[:2], fallback_token_id=sure)
    assert calls == [] and again["sweep"] == out["sweep"]


def test_report_section_renders_refusal_features() -> None:
    from refusal_audit.audit.report import render_html

    res = {"kind": "refusal_features", "latent_set_id": "fs_x", "wall_s": 1.0,
           "selection": {"forward_passes": 13, "backward_passes": 10, "forward_equivalents": 33.0, "wall_s": 0.5,
                         "global_set": [[3, 5, 1.97], [3, 17, 1.5]]},
           "sweep": [{"alpha": None, "k": 0, "refusal_rate": 1.0, "jailbreak_rate": 0.0, "ce": 2.0, "wall_s": 0.1},
                     {"alpha": -1.0, "k": 3, "refusal_rate": 0.0, "jailbreak_rate": 1.0, "ce": 2.5, "ce_delta": 0.5,
                      "wall_s": 0.1}]}
    page = render_html({"refusal_features": res})
    assert "Attribution-found refusal latents" in page and "fs_x" in page and "forward-equivalents" in page
    assert "<pre>" not in page  # the dedicated section, not the generic JSON dump
