"""The refusal-latent analyses of the second seed paper (issue 13): `latent_edges`,
`jailbreak_suppression`, `probe_ood`, against independent computations on the planted model.

- edges: on a planted model with an upstream latent (layer 2) that writes the refusal direction the
  planted refusal latents (layer 3) read, that latent is the top upstream one for every downstream
  latent, and ablating it drops their activation (a random upstream control barely does); with AtP the
  edges of one upstream layer plus its error term equal an autograd directional derivative computed
  on the raw model;
- jailbreak suppression: the drops equal a recomputation from `encode` and the verdicts; the
  coherence gate's vetoes count as jailbreaks only in the ungated split;
- probe: accuracies equal those of a probe fitted by Newton's method in numpy on the same features;
- each resumes after a simulated kill with the identical result, without redoing finished prompts;
- StartJob-time validation names the field; the report sections render.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import planted
import pytest
import torch
from refusal_audit.audit.attribution import Baseline, LogitDiff
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.errors import InvalidRequest
from refusal_audit.audit.judges import SubstringJudge
from refusal_audit.audit.spec import AblateDirection, Request, user_prompt
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes

UP, DOWN, UP_LATENT = planted.DISTRACTOR_LAYER, planted.PLANTED_LAYER, 4
DOWNSTREAM = {DOWN: list(planted.PLANTED)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def edge_engine() -> HFEngine:
    """The planted model with one planted upstream latent at layer 2: encoder and decoder r, so the
    r component the layer-3 refusal latents read is (within the SAE) this latent's reconstruction."""
    r = torch.tensor(planted.directions()[0], dtype=torch.float32)
    saes = planted.make_saes()
    up = saes[UP]
    with torch.no_grad():
        up.W_enc[:, UP_LATENT] = r
        up.b_enc[UP_LATENT] = 0.0
        up.threshold[UP_LATENT] = 0.5
        up.W_dec[UP_LATENT] = r
    return HFEngine(planted.make_model(), planted.make_tokenizer(),
                    build_layer_saes(saes, planted.D_MODEL, planted.N_LAYERS), model_name="planted-edges")


def _ids(engine: HFEngine) -> tuple[int, int]:
    tok = engine.tokenizer
    return tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("Sure")


# ---------------------------------------------------------------------------- latent_edges


def _edges_cfg(**kw):
    from refusal_audit.audit.latent_edges import LatentEdgesConfig

    base = dict(n_steps=2, ablate_k=1, top_k=3, batch_size=2)
    return LatentEdgesConfig(**{**base, **kw})


def test_latent_edges_finds_planted_edge_and_ablation_drops(edge_engine: HFEngine) -> None:
    from refusal_audit.audit.latent_edges import run_latent_edges

    cfg = _edges_cfg()
    out = run_latent_edges(edge_engine, cfg, LocalContext(), planted.HARMFUL[:3], DOWNSTREAM,
                           planted.directions()[0])
    assert out["top_upstream"][0][:2] == [UP, UP_LATENT]
    assert out["top_upstream"][0][2] > 10 * abs(out["top_upstream"][1][2])
    for d in planted.PLANTED:
        assert out["top_upstream_per_downstream"][f"{DOWN}/{d}"][0][:2] == [UP, UP_LATENT]
    top, control = out["ablation"]["top"], out["ablation"]["control"]
    assert top["upstream"] == [[UP, UP_LATENT]] and control["upstream"] != top["upstream"]
    assert top["relative_drop"] > 0.5 > abs(control["relative_drop"])
    # the drop is what encode says: the refusal latents' activation after BOS, with and without the ablation
    from refusal_audit.audit.spec import ScaleLatents

    ps = [user_prompt(t) for t in planted.HARMFUL[:3]]
    ivs = (ScaleLatents(latents={UP: (UP_LATENT,)}, factor=0.0),)

    def act(ivs_):
        return sum(float(np.asarray(r.layers[DOWN].values)[1:].sum())
                   for r in edge_engine.encode([Request(prompt=p, interventions=ivs_) for p in ps], latents=DOWNSTREAM))

    assert top["relative_drop"] == pytest.approx(1 - act(ivs) / act(()), rel=1e-6)
    row = out["per_prompt"][0]
    assert row["forward_passes"] == 1 + (1 + 1 + 1 + 2) and row["backward_passes"] == 2 + 2 * 3


def test_atp_edges_equal_autograd_directional_derivative(edge_engine: HFEngine) -> None:
    """n = 1, one upstream layer: sum of its latents' edges + its error edge = d/dt of
    sum_t g_d[t] z_d[t] along h_up + t (h_up,base - h_up,clean), computed on the raw model."""
    from refusal_audit.audit.latent_edges import edge_request

    eng = edge_engine
    i_tok, sure = _ids(eng)
    r = planted.directions()[0]
    prompt = user_prompt(planted.HARMFUL[1])
    base = Baseline(kind="interventions", interventions=(AblateDirection(direction=tuple(r.tolist())),))
    req = edge_request([prompt], [LogitDiff(positive=sure, negative=i_tok)], DOWNSTREAM, base, "atp", 1)
    res = eng.latent_edges(req, max_back=1).results[0]
    lay = res.layers[DOWN]
    up = lay.upstream[UP]
    got = up.edges.sum(1) + up.error  # [|D|]

    model = eng.model
    ids = eng.tokenize([prompt])[0]
    n = len(ids)
    scope = torch.zeros(1, n, 1)
    scope[0, 1:] = 1.0  # after BOS
    sae_d = eng.saes[DOWN].sae
    h_clean = torch.tensor(eng.residuals([Request(prompt=prompt)], layers=[UP], positions=list(range(n)))[0, 0])
    h_base = torch.tensor(eng.residuals([Request(prompt=prompt, interventions=base.interventions)], layers=[UP],
                                        positions=list(range(n)))[0, 0])
    x = torch.tensor([ids])
    dlat = torch.tensor(DOWNSTREAM[DOWN])

    # g_d[t] = d metric / d z_d[t] at the clean state = W_dec[d] . d metric / d h_down[t]
    store: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h.retain_grad()
        store["h"] = h

    hd = model.model.layers[DOWN].register_forward_hook(keep)
    try:
        logits = model(input_ids=x).logits[0, -1]
    finally:
        hd.remove()
    (logits[sure] - logits[i_tok]).backward()
    grad_h = store["h"].grad
    assert grad_h is not None
    g = grad_h[0] @ sae_d.W_dec[dlat].T.detach()  # [n, |D|]

    t = torch.zeros((), requires_grad=True)

    def shift(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = h + t * scope * (h_base - h_clean)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def read(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        store["z"] = sae_d.encode(h)[0][:, dlat]

    hs = [model.model.layers[UP].register_forward_hook(shift), model.model.layers[DOWN].register_forward_hook(read)]
    try:
        model(input_ids=x)
    finally:
        for h in hs:
            h.remove()
    want = [float(torch.autograd.grad((g[:, j] * scope[0, :, 0] * store["z"][:, j]).sum(), t, retain_graph=True)[0])
            for j in range(len(dlat))]
    assert abs(got).min() > 0.1  # a real effect, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the error term (direction ablation changes what the SAE does not reconstruct) is well above the
    # tolerance, so a wrong or missing error edge fails the comparison
    assert abs(up.error).min() > 10 * (1e-4 * abs(got).max() + 1e-5)
    # the downstream latents' own AtP attribution is what `attribute` returns for them
    from refusal_audit.audit.attribution import AttributionRequest

    att = eng.attribute(AttributionRequest(items=req.items, method="atp", baseline=base, layers=(UP, DOWN),
                                           top_k=0, latents={DOWN: tuple(DOWNSTREAM[DOWN])})).results[0]
    np.testing.assert_allclose(lay.attribution, att.layers[DOWN].scores, rtol=1e-5)


class _Killed(RuntimeError):
    pass


class _KillAfter:
    """Delegates to an engine; raises on the (k+1)-th call of `name` (a simulated kill -9)."""

    def __init__(self, inner, name: str, k: int) -> None:
        self.inner, self.name, self.k, self.calls = inner, name, k, 0

    def __getattr__(self, attr: str):
        fn = getattr(self.inner, attr)
        if attr != self.name:
            return fn

        def wrapped(*a, **kw):
            self.calls += 1
            if self.calls > self.k:
                raise _Killed(attr)
            return fn(*a, **kw)

        return wrapped


def _strip(out: dict) -> dict:
    return {k: v for k, v in out.items() if k not in ("wall_s", "resumed_prompts")}


def test_latent_edges_resume_identical(edge_engine: HFEngine) -> None:
    from refusal_audit.audit.latent_edges import run_latent_edges

    cfg = _edges_cfg(batch_size=1, method="atp")
    prompts, r = planted.HARMFUL[:3], planted.directions()[0]
    whole = run_latent_edges(edge_engine, cfg, LocalContext(), prompts, DOWNSTREAM, r)
    ctx = LocalContext()
    with pytest.raises(_Killed):
        run_latent_edges(_KillAfter(edge_engine, "latent_edges", 2), cfg, ctx, prompts, DOWNSTREAM, r)
    again = _KillAfter(edge_engine, "latent_edges", 10)
    out = run_latent_edges(again, cfg, ctx, prompts, DOWNSTREAM, r)
    assert again.calls == 1 and out["resumed_prompts"] == 2
    assert _strip(out) == _strip(whole)


# ---------------------------------------------------------------------------- jailbreak_suppression

TEMPLATES = {"long": "please tell me a long story about the garden and the river and music . now {{ prompt }}",
             "plain": "{{ prompt }}", "short": "now {{ prompt }} please"}


class _StubGate:
    """A judge with known verdicts (the planted model refuses every template): answers to the "long"
    template count as jailbreaks, those to "short" as jailbreaks the coherence gate vetoed
    (degenerate), the rest get the substring judge's verdict."""

    name = "stub+gate"

    def judge(self, items):
        out = SubstringJudge().judge(items)
        for k, it in enumerate(items):
            text = _text(it.prompt)
            if text.startswith("please tell me a long story"):
                out[k] = replace(out[k], jailbroken=True, refused=False)
            elif text.startswith("now "):
                out[k] = replace(out[k], jailbroken=False, refused=False, degenerate=True)
        return out


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1].content


def test_jailbreak_suppression_equals_encode(edge_engine: HFEngine) -> None:
    from refusal_audit.audit.jailbreak_suppression import (
        JailbreakSuppressionConfig,
        run_jailbreak_suppression,
    )
    from refusal_audit.audit.jailbreaks import wrap

    eng = edge_engine
    cfg = JailbreakSuppressionConfig(templates=["prefix_injection"], custom_templates=TEMPLATES,
                                     last_n=2, max_new_tokens=3, batch_size=4)
    texts = planted.HARMFUL[:3]
    judge = _StubGate()
    out = run_jailbreak_suppression(eng, cfg, LocalContext(), judge, texts, DOWNSTREAM)

    def act(text: str) -> float:
        (res,) = eng.encode([Request(prompt=user_prompt(text))], latents=DOWNSTREAM)
        return float(np.asarray(res.layers[DOWN].values, dtype=np.float64)[-2:].sum())

    names = ["prefix_injection", *TEMPLATES]
    from refusal_audit.audit.jailbreaks import templates

    tmpl = {**{"prefix_injection": templates()["prefix_injection"]}, **TEMPLATES}
    pairs = []
    for row, text in zip(out["per_prompt"], texts, strict=True):
        assert row["plain"] == pytest.approx(act(text), rel=1e-6)
        for name in names:
            t = row["templates"][name]
            assert t["activation"] == pytest.approx(act(wrap(tmpl[name], text)), rel=1e-6)
            pairs.append((act(text), act(wrap(tmpl[name], text)), t["jailbroken"], t["degenerate"], name))
    assert any(p[3] for p in pairs) and any(p[2] for p in pairs) and any(not p[2] and not p[3] for p in pairs)

    def drop(sel):
        return 1 - sum(w for p, w, *_ in sel) / sum(p for p, *_ in sel)

    s = out["summary"]
    # drops near 0 here (the planted refusal survives every template): compare absolutely
    assert s["all"]["relative_drop"] == pytest.approx(drop(pairs), abs=1e-6)
    assert s["gated"]["jailbroken"]["relative_drop"] == pytest.approx(drop([p for p in pairs if p[2]]), abs=1e-6)
    assert s["gated"]["not_jailbroken"]["n"] == sum(not p[2] for p in pairs)
    assert s["ungated"]["jailbroken"]["relative_drop"] == pytest.approx(drop([p for p in pairs if p[2] or p[3]]),
                                                                         abs=1e-6)
    assert s["n_degenerate"] == sum(p[3] for p in pairs)
    assert s["per_template"]["plain"]["relative_drop"] == pytest.approx(0.0, abs=1e-9)  # same prompt, same activation
    # resume after a kill in the middle: identical result, the finished prompts not redone
    ctx = LocalContext()
    cfg1 = cfg.model_copy(update={"batch_size": 1})  # 5 templates: 5 generate calls per prompt
    with pytest.raises(_Killed):
        run_jailbreak_suppression(_KillAfter(eng, "generate", 6), cfg1, ctx, judge, texts, DOWNSTREAM)
    again = _KillAfter(eng, "generate", 100)
    out2 = run_jailbreak_suppression(again, cfg1, ctx, judge, texts, DOWNSTREAM)
    whole = run_jailbreak_suppression(eng, cfg1, LocalContext(), judge, texts, DOWNSTREAM)  # same batching
    assert out2["resumed_prompts"] == 1 and _strip(out2) == _strip(whole)


# ---------------------------------------------------------------------------- probe_ood


def _newton_probe(X: np.ndarray, y: np.ndarray, l2: float):
    """The same objective minimised by Newton's method in numpy (the independent fit)."""
    mean, std = X.mean(0), X.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    Z = np.hstack([(X - mean) / std, np.ones((len(X), 1))])
    w = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-(Z @ w)))
        grad = Z.T @ (p - y) / len(y) + reg * w
        H = (Z * (p * (1 - p))[:, None]).T @ Z / len(y) + np.diag(reg)
        w -= np.linalg.solve(H, grad)
        if np.abs(grad).max() < 1e-12:
            break
    return lambda Xn: ((np.hstack([(Xn - mean) / std, np.ones((len(Xn), 1))]) @ w) > 0).astype(int)


def test_probe_ood_matches_numpy_probe_and_resumes(edge_engine: HFEngine) -> None:
    from refusal_audit.audit.probe_ood import GROUPS, ProbeOODConfig, features, run_probe_ood

    eng = edge_engine
    texts = {"train_harmful": planted.HARMFUL[:8], "train_harmless": planted.HARMLESS[:8],
             "test_harmful": planted.HARMFUL[8:12], "test_harmless": planted.HARMLESS[8:12]}
    cfg = ProbeOODConfig(templates=[], custom_templates=TEMPLATES, l2=0.1, batch_size=8,
                         dense_layer=1)
    out = run_probe_ood(eng, cfg, LocalContext(), texts, DOWNSTREAM)
    wrapped = {f"ood_{c}": [TEMPLATES[list(TEMPLATES)[i % 3]].replace("{{ prompt }}", t)
                            for i, t in enumerate(texts[f"test_{c}"])] for c in ("harmful", "harmless")}
    groups = {**texts, **wrapped}
    feats = {g: features(eng, [user_prompt(t) for t in groups[g]], DOWNSTREAM, 1, 8) for g in GROUPS}
    for kind in ("latents", "dense"):
        X = {g: np.asarray([f[kind] for f in feats[g]]) for g in GROUPS}
        pred = _newton_probe(np.vstack([X["train_harmful"], X["train_harmless"]]),
                             np.r_[np.ones(8), np.zeros(8)], 0.1)
        for g in GROUPS:
            want = float((pred(X[g]) == (0 if g.endswith("harmless") else 1)).mean())
            assert out["probes"][kind]["accuracy"][g] == want, (kind, g)
    assert out["probes"]["latents"]["n_features"] == 3 and out["probes"]["dense"]["n_features"] == planted.D_MODEL
    assert out["probes"]["latents"]["accuracy"]["test_harmful"] == 1.0  # the planted latents separate the classes
    # the encode path: the latent features are the encode values at the last token
    (r0,) = eng.encode([Request(prompt=user_prompt(texts["train_harmful"][0]))], latents=DOWNSTREAM)
    np.testing.assert_allclose(feats["train_harmful"][0]["latents"], np.asarray(r0.layers[DOWN].values)[-1])
    ctx = LocalContext()
    with pytest.raises(_Killed):
        run_probe_ood(_KillAfter(eng, "residuals", 2), cfg, ctx, texts, DOWNSTREAM)
    again = _KillAfter(eng, "residuals", 100)
    out2 = run_probe_ood(again, cfg, ctx, texts, DOWNSTREAM)
    assert out2["resumed_prompts"] == 16 and _strip(out2) == _strip(out)


# ---------------------------------------------------------------------------- jobs: validation, report


@pytest.mark.parametrize("kind,config,field", [
    ("latent_edges", {}, "features_job_id"),
    ("latent_edges", {"latents": {"3": [5]}, "latent_set_id": "fs_x"}, "latent_set_id"),
    ("latent_edges", {"latents": {"3": [5]}}, "direction_id"),
    ("latent_edges", {"latents": {"9": [5]}, "baseline": "zero"}, "config.latents"),
    ("latent_edges", {"latents": {"3": [99]}, "baseline": "zero"}, "config.latents[3]"),
    ("latent_edges", {"latents": {"2": [1]}, "baseline": "zero", "max_back": 1}, "config.latents"),
    ("latent_edges", {"latents": {"3": [5]}, "baseline": "zero", "direction": [0.0]}, "config.direction"),
    ("latent_edges", {"latents": {"3": [5]}, "baseline": "zero", "max_back": 0}, "max_back"),
    ("jailbreak_suppression", {"latents": {"3": [5]}, "templates": ["nope"]}, "templates"),
    ("jailbreak_suppression", {"latents": {"3": [5]}, "custom_templates": {"x": "no slot"}}, "custom_templates"),
    ("jailbreak_suppression", {"latents": {"3": [5]}, "custom_templates": {"aim": "{{ prompt }}"}}, "custom_templates"),
    ("jailbreak_suppression", {"features_job_id": "nojob"}, "features_job_id"),
    ("probe_ood", {"latents": {"3": [5]}, "dense_layer": 7}, "dense_layer"),
    ("probe_ood", {"latents": {"3": [5]}, "templates": ["nope"]}, "templates"),
    ("probe_ood", {"latents": {"3": [5]}, "custom_templates": {"x": "no slot"}}, "custom_templates"),
    ("probe_ood", {"latents": {"3": [5]}, "k_latents": 3}, "k_latents"),
])
def test_start_job_validation_names_field(edge_engine: HFEngine, kind: str, config: dict, field: str) -> None:
    import json

    from refusal_audit.audit.errors import NotFound
    from refusal_audit.server.jobs import KINDS
    from refusal_audit.server.jobs.kinds import CheckEnv, validate_config

    class Artifacts:
        def get(self, aid):
            raise NotFound(aid)

    def job_kind(job_id: str) -> str:
        raise NotFound(job_id)

    k = KINDS[kind]
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        cfg = validate_config(k, json.dumps(config))
        assert k.check is not None
        k.check(cfg, CheckEnv(edge_engine, Artifacts(), job_kind))


def test_report_sections_render() -> None:
    from refusal_audit.audit.report import render_html

    res = {
        "latent_edges": {"kind": "latent_edges", "downstream": {"3": [5]}, "baseline": "direction", "method": "ig",
                         "n_steps": 2, "max_back": 3, "n_prompts": 2, "forward_passes": 10, "backward_passes": 8,
                         "top_upstream": [[2, 4, 5.4]], "top_upstream_per_downstream": {"3/5": [[2, 4, 1.8]]},
                         "ablation": {"top": {"upstream": [[2, 4]], "factor": 0.0, "before": [1.0], "after": [0.1],
                                              "relative_drop": 0.9}}},
        "jailbreak_suppression": {"kind": "jailbreak_suppression", "templates": ["aim"], "last_n": 1, "judge": "j",
                                  "summary": {"n_pairs": 2, "all": {"n": 2, "relative_drop": 0.5},
                                              "gated": {"jailbroken": {"n": 1, "relative_drop": 0.7}},
                                              "per_template": {"aim": {"n": 2, "jailbreak_rate": 0.5}}}},
        "probe_ood": {"kind": "probe_ood", "dense_layer": 3, "templates": ["aim"], "n": {},
                      "probes": {"latents": {"n_features": 3, "accuracy": {"ood_harmful": 0.87}, "ood_accuracy": 0.8},
                                 "dense": {"n_features": 64, "accuracy": {"ood_harmful": 0.51}}}},
    }
    page = render_html(res)
    for title in ("Upstream latents driving", "Jailbreaks suppress", "Refusal-latent probe"):
        assert title in page
    assert "0.45" in page and "0.73" in page and "0.87" in page and "<pre>" not in page


# ---------------------------------------------------------------------------- the thin client path


def test_jailbreak_suppression_and_ablation_check_through_thin_client(edge_engine: HFEngine, tmp_path) -> None:
    """The torch-free parts run through AuditClient in an interpreter that cannot import torch, and give
    the in-process numbers."""
    import json

    from refusal_audit.audit.jailbreak_suppression import (
        JailbreakSuppressionConfig,
        run_jailbreak_suppression,
    )
    from refusal_audit.audit.latent_edges import ablation_check
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import LimitsConfig, ServerConfig
    from test_remote_audit import _thin

    texts = planted.HARMFUL[:2]
    cfg = dict(templates=["prefix_injection"], custom_templates={"short": TEMPLATES["short"]}, max_new_tokens=3)
    local = run_jailbreak_suppression(edge_engine, JailbreakSuppressionConfig(**cfg), LocalContext(), SubstringJudge(),
                                      texts, DOWNSTREAM)
    ps = [user_prompt(t) for t in texts]
    local_abl = ablation_check(edge_engine, ps, DOWNSTREAM, [(UP, UP_LATENT)], 0.0, 4)
    srv = ThreadedServer(ServerConfig(model="planted", host="127.0.0.1", port=0, data_dir=tmp_path,
                                      limits=LimitsConfig(max_latents_per_request=40)),
                         edge_engine, jobs_factory=lambda **_kw: None).start()
    try:
        out = _thin(f"""
            import json
            from refusal_audit.audit.context import LocalContext
            from refusal_audit.audit.jailbreak_suppression import JailbreakSuppressionConfig, run_jailbreak_suppression
            from refusal_audit.audit.judges import SubstringJudge
            from refusal_audit.audit.latent_edges import ablation_check
            from refusal_audit.audit.spec import user_prompt
            from refusal_audit.client import AuditClient
            latents = {{{DOWN}: {list(planted.PLANTED)!r}}}
            texts = {texts!r}
            with AuditClient({srv.address!r}, timeout=120) as c:
                js = run_jailbreak_suppression(c, JailbreakSuppressionConfig(**{cfg!r}), LocalContext(), SubstringJudge(),
                                               texts, latents)
                abl = ablation_check(c, [user_prompt(t) for t in texts], latents, [({UP}, {UP_LATENT})], 0.0, 4)
            print(json.dumps({{"summary": js["summary"], "ablation": abl}}))
        """)
    finally:
        srv.stop()
    got = json.loads(out)
    for key in ("plain", "wrapped", "relative_drop"):
        assert got["summary"]["all"][key] == pytest.approx(local["summary"]["all"][key], rel=1e-5, abs=1e-6)
    assert got["summary"]["gated"]["jailbroken"]["n"] == local["summary"]["gated"]["jailbroken"]["n"]
    assert got["ablation"]["relative_drop"] == pytest.approx(local_abl["relative_drop"], rel=1e-6)
    assert local_abl["relative_drop"] > 0.5


def test_job_runners_resolve_a_refusal_features_job(edge_engine: HFEngine) -> None:
    """The kinds' runners: latents from a refusal_features job's global set (first k_latents), the
    direction inline; configs as StartJob parses them."""
    import json

    from refusal_audit.server.jobs import KINDS
    from refusal_audit.server.jobs.kinds import validate_config

    features = {"kind": "refusal_features",
                "selection": {"global_set": [[DOWN, i, 1.0] for i in planted.PLANTED] + [[UP, 7, 0.1]]}}

    class Ctx(LocalContext):
        def job_result(self, job_id: str) -> dict:
            assert job_id == "job_rf"
            return features

    def run(kind: str, config: dict) -> dict:
        k = KINDS[kind]
        out, artifacts = k.runner(edge_engine, validate_config(k, json.dumps(config)), Ctx())
        assert artifacts == [] and out["kind"] == kind
        return out

    src = {"features_job_id": "job_rf", "k_latents": 3}
    edges = run("latent_edges", {**src, "prompts": planted.HARMFUL[:2], "direction": planted.directions()[0].tolist(),
                                 "method": "atp", "ablate_k": 1})
    assert edges["downstream"] == {str(DOWN): sorted(planted.PLANTED)}
    assert edges["top_upstream"][0][:2] == [UP, UP_LATENT] and edges["ablation"]["top"]["relative_drop"] > 0.5
    js = run("jailbreak_suppression", {**src, "prompts": planted.HARMFUL[:1], "templates": ["prefix_injection"],
                                       "max_new_tokens": 2})
    assert js["latents"] == {str(DOWN): sorted(planted.PLANTED)} and js["summary"]["n_pairs"] == 1
    probe = run("probe_ood", {"latents": {str(DOWN): list(planted.PLANTED)}, "n_train": 3, "n_test": 2,
                              "templates": ["prefix_injection"], "dense_layer": 1})
    assert probe["n"]["train_harmful"] == 3 and probe["n"]["ood_harmful"] == 2


def test_jobs_through_audit_client(edge_engine: HFEngine, tmp_path) -> None:
    """StartJob through AuditClient on a served planted model: a bad config is INVALID_ARGUMENT naming the
    field (the server keeps serving), latent_edges (explicit latents) and jailbreak_suppression (a registered
    latent set) run to SUCCEEDED, and the report renders their sections."""
    from refusal_audit.audit.report import render_html
    from refusal_audit.client import AuditClient, RemoteError
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import LimitsConfig, ServerConfig

    srv = ThreadedServer(ServerConfig(model="planted", host="127.0.0.1", port=0, data_dir=tmp_path,
                                      limits=LimitsConfig(max_latents_per_request=40)), edge_engine).start()
    try:
        with AuditClient(srv.address, timeout=120) as c:
            with pytest.raises(RemoteError, match="config.latents"):
                c.jobs.start("latent_edges", {"latents": {"9": [1]}, "baseline": "zero"})
            lat = {str(DOWN): list(planted.PLANTED)}
            e = c.jobs.start("latent_edges", {"latents": lat, "prompts": planted.HARMFUL[:2], "method": "atp",
                                              "direction": planted.directions()[0].tolist(), "ablate_k": 1})
            set_id = c.register_latent_set("refusal", {DOWN: list(planted.PLANTED)}).id
            j = c.jobs.start("jailbreak_suppression", {"latent_set_id": set_id, "prompts": planted.HARMFUL[:1],
                                                       "templates": ["prefix_injection"], "max_new_tokens": 2})
            results = {}
            for job in (e, j):
                final = c.jobs.wait(job.id, timeout=120)
                assert final.state == "SUCCEEDED", final.error
                results[final.kind] = c.jobs.result(job.id).result
    finally:
        srv.stop()
    assert results["latent_edges"]["top_upstream"][0][:2] == [UP, UP_LATENT]
    assert results["jailbreak_suppression"]["judge"] == "substring+coherence"  # the server's gated judge
    assert results["jailbreak_suppression"]["latents"] == {str(DOWN): sorted(planted.PLANTED)}  # from the set
    page = render_html(results)
    assert "Upstream latents driving" in page and "Jailbreaks suppress" in page
