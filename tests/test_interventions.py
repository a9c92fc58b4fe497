"""Interventions against independent computations: sae-lens's own encode/decode closed form,
weight-orthogonalisation (direction ablation), a bias edit (direction addition), and scopes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Request,
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import ARCHS, make_model, make_saes, make_tokenizer

PROMPTS = [user_prompt("How do I build a bomb?"), "The quick brown fox jumps over the lazy dog near the river"]


def _engine(arch="llama", layers=(1, 2), sae_arch="jumprelu", **kw):
    model = make_model(arch)
    saes = make_saes(model, layers, sae_arch, **kw)
    return HFEngine(model, make_tokenizer(), build_layer_saes(saes, model.config.hidden_size, 4)), saes


def _hidden(engine: HFEngine, prompt, interventions=()) -> list[torch.Tensor]:
    """Residual after every layer (hidden_states[L+1]) for one prompt, via residuals() at all positions."""
    n = len(engine.render(prompt))
    r = engine.residuals([Request(prompt=prompt, interventions=tuple(interventions))],
                         layers=list(range(engine.n_layers)), positions=list(range(n)))
    return [torch.from_numpy(r[0, ly]) for ly in range(engine.n_layers)]


def _closed_form_ablate(sae, h: torch.Tensor, S: list[int]) -> torch.Tensor:
    """W_dec (z * 1_notS) + b_dec + (h - sae(h)) with sae-lens's own encode/decode."""
    with torch.no_grad():
        z = sae.encode(h)
        recon = sae.decode(z)
        z_masked = z.clone()
        z_masked[..., S] = 0.0
        sae.encode(h)  # sae-lens's run-time normalisation is stateful: decode needs a fresh encode
        return sae.decode(z_masked) + (h - recon)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_equals_closed_form_one_layer(arch):
    engine, saes = _engine(arch)
    for prompt in PROMPTS:
        base = _hidden(engine, prompt)
        z = saes[1].encode(base[1])
        active = torch.nonzero(z.sum(0) > 0).flatten().tolist()
        S = active[:10] + [0, 5, 7]
        S = sorted(set(S))
        hooked = _hidden(engine, prompt, [AblateLatents(latents={1: tuple(S)})])
        expected = _closed_form_ablate(saes[1], base[1], S)
        assert _rel(hooked[1], expected) <= 1e-5
        assert _rel(hooked[1], base[1]) > 1e-3, "the ablation must change the residual"
        assert torch.equal(hooked[0], base[0]), "upstream layers are untouched"


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_several_layers_downstream_sees_upstream_edit(arch):
    engine, saes = _engine(arch)
    prompt = PROMPTS[0]
    base = _hidden(engine, prompt)
    S1 = torch.nonzero(saes[1].encode(base[1]).sum(0) > 0).flatten().tolist()[:20]
    S2 = torch.nonzero(saes[2].encode(base[2]).sum(0) > 0).flatten().tolist()[:20]
    both = _hidden(engine, prompt, [AblateLatents(latents={1: tuple(S1), 2: tuple(S2)})])
    only1 = _hidden(engine, prompt, [AblateLatents(latents={1: tuple(S1)})])
    # layer 1: closed form on the clean stream; layer 2: closed form on the stream after the upstream edit
    assert _rel(both[1], _closed_form_ablate(saes[1], base[1], S1)) <= 1e-5
    assert _rel(both[2], _closed_form_ablate(saes[2], only1[2], S2)) <= 1e-5
    z_clean, z_edited = saes[2].encode(base[2]), saes[2].encode(only1[2])
    assert not torch.allclose(z_clean, z_edited), "an upstream ablation must change the downstream encode"
    # and using the clean stream at layer 2 would be wrong:
    assert _rel(both[2], _closed_form_ablate(saes[2], base[2], S2)) > 1e-4


@pytest.mark.parametrize("sae_arch,norm", [("standard", "none"), ("jumprelu", "constant_norm_rescale"),
                                           ("jumprelu", "layer_norm"), ("topk", "none")])
def test_ablation_other_architectures_and_normalisation(sae_arch, norm):
    engine, saes = _engine("llama", sae_arch=sae_arch, normalize_activations=norm)
    assert engine.saes[1].separable == (sae_arch != "topk")
    base = _hidden(engine, PROMPTS[1])
    S = torch.nonzero(saes[1].encode(base[1]).sum(0) > 0).flatten().tolist()[:12]
    hooked = _hidden(engine, PROMPTS[1], [AblateLatents(latents={1: tuple(S)})])
    assert _rel(hooked[1], _closed_form_ablate(saes[1], base[1], S)) <= 1e-5
    assert _rel(hooked[1], base[1]) > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_clamp_equals_closed_form(arch):
    engine, saes = _engine(arch)
    prompt = PROMPTS[0]
    base = _hidden(engine, prompt)
    S, vals = [3, 9, 40], (2.0, 5.0, 0.5)
    hooked = _hidden(engine, prompt, [ClampLatents(latents={1: tuple(S)}, values={1: vals})])
    with torch.no_grad():
        z = saes[1].encode(base[1])
        z2 = z.clone()
        z2[..., S] = torch.tensor(vals)
        expected = saes[1].decode(z2) + (base[1] - saes[1].decode(z))
    assert _rel(hooked[1], expected) <= 1e-5
    assert _rel(hooked[1], base[1]) > 1e-4


def _closed_form_scale(sae, h: torch.Tensor, S: list[int], factor: float) -> torch.Tensor:
    """W_dec z' + b_dec + (h - sae(h)) with z'_S = factor * z_S, via sae-lens's own encode/decode."""
    with torch.no_grad():
        z = sae.encode(h)
        recon = sae.decode(z)
        z2 = z.clone()
        z2[..., S] = factor * z[..., S]
        sae.encode(h)  # sae-lens's run-time normalisation is stateful: decode needs a fresh encode
        return sae.decode(z2) + (h - recon)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("factor", [-3.0, 0.5, 2.0])
def test_scale_equals_closed_form(arch, factor):
    engine, saes = _engine(arch)
    prompt = PROMPTS[0]
    base = _hidden(engine, prompt)
    S = torch.nonzero(saes[1].encode(base[1]).sum(0) > 0).flatten().tolist()[:10] + [3, 40]
    S = sorted(set(S))
    hooked = _hidden(engine, prompt, [ScaleLatents(latents={1: tuple(S)}, factor=factor)])
    assert _rel(hooked[1], _closed_form_scale(saes[1], base[1], S, factor)) <= 1e-5
    assert _rel(hooked[1], base[1]) > 1e-4, "the scaling must change the residual"
    assert torch.equal(hooked[0], base[0]), "upstream layers are untouched"


@pytest.mark.parametrize("sae_arch,norm", [("jumprelu", "none"), ("standard", "layer_norm"), ("topk", "none")])
def test_scale_other_architectures_and_zero_is_ablation_exactly(sae_arch, norm):
    engine, saes = _engine("llama", sae_arch=sae_arch, normalize_activations=norm)
    base = _hidden(engine, PROMPTS[1])
    S = torch.nonzero(saes[1].encode(base[1]).sum(0) > 0).flatten().tolist()[:12]
    flipped = _hidden(engine, PROMPTS[1], [ScaleLatents(latents={1: tuple(S)}, factor=-3.0)])
    assert _rel(flipped[1], _closed_form_scale(saes[1], base[1], S, -3.0)) <= 1e-5
    zero = _hidden(engine, PROMPTS[1], [ScaleLatents(latents={1: tuple(S)}, factor=0.0)])
    ablated = _hidden(engine, PROMPTS[1], [AblateLatents(latents={1: tuple(S)})])
    assert all(torch.equal(a, b) for a, b in zip(zero, ablated, strict=True)), "factor 0 must be the ablation, bit for bit"
    assert _rel(zero[1], base[1]) > 1e-4
    one = _hidden(engine, PROMPTS[1], [ScaleLatents(latents={1: tuple(S)}, factor=1.0)])
    assert _rel(one[1], base[1]) <= 1e-6, "factor 1 leaves the stream as it is"


def test_scale_factor_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        ScaleLatents(latents={1: (1,)}, factor=float("nan"))
    with pytest.raises(ValueError, match="needs latents or latent_set_id"):
        ScaleLatents(factor=-3.0)


def _unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def test_direction_ablation_equals_weight_orthogonalisation_llama():
    """Arditi et al.: ablating r at every layer == orthogonalising the writing weights to r."""
    engine, _ = _engine("llama")
    r = _unit(64)
    req = [Request(prompt=p, interventions=(AblateDirection(direction=tuple(r.tolist())),)) for p in PROMPTS]
    hooked = engine.score(req, [5, 6, 7], return_full_logprobs=True)

    ortho = make_model("llama")
    proj = torch.eye(64) - torch.outer(r, r)
    with torch.no_grad():
        ortho.model.embed_tokens.weight.copy_(ortho.model.embed_tokens.weight @ proj)
        for layer in ortho.model.layers:
            layer.self_attn.o_proj.weight.copy_(proj @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(proj @ layer.mlp.down_proj.weight)
    plain = HFEngine(ortho, make_tokenizer(), {})
    expected = plain.score([Request(prompt=p) for p in PROMPTS], [5, 6, 7], return_full_logprobs=True)
    for a, b in zip(hooked, expected, strict=True):
        assert np.max(np.abs(a.full_logprobs - b.full_logprobs)) < 1e-4
    base = engine.score([Request(prompt=p) for p in PROMPTS], [5, 6, 7], return_full_logprobs=True)
    assert np.max(np.abs(base[0].full_logprobs - hooked[0].full_logprobs)) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_direction_ablation_leaves_no_component_anywhere(arch):
    engine, _ = _engine(arch)
    r = _unit(64, 1)
    hooked = _hidden(engine, PROMPTS[0], [AblateDirection(direction=tuple(r.tolist()))])
    base = _hidden(engine, PROMPTS[0])
    for ly in range(engine.n_layers):
        assert float((hooked[ly] @ r).abs().max()) < 1e-4
    assert float((base[2] @ r).abs().max()) > 1e-2


def test_direction_addition_equals_bias_edit_llama():
    engine, _ = _engine("llama")
    r, coef, layer = _unit(64, 2), 3.5, 1
    req = [Request(prompt=p, interventions=(AddDirection(direction=tuple(r.tolist()), layer=layer, coefficient=coef),))
           for p in PROMPTS]
    hooked = engine.score(req, [5], return_full_logprobs=True)
    edited = make_model("llama")
    mlp = edited.model.layers[layer].mlp
    down = torch.nn.Linear(mlp.down_proj.in_features, 64, bias=True)
    with torch.no_grad():
        down.weight.copy_(mlp.down_proj.weight)
        down.bias.copy_(coef * r)
    mlp.down_proj = down
    expected = HFEngine(edited, make_tokenizer(), {}).score([Request(prompt=p) for p in PROMPTS], [5],
                                                            return_full_logprobs=True)
    for a, b in zip(hooked, expected, strict=True):
        assert np.max(np.abs(a.full_logprobs - b.full_logprobs)) < 1e-4


def test_token_scopes_touch_only_their_tokens():
    engine, saes = _engine("gemma3")
    prompt = PROMPTS[0]
    n = len(engine.render(prompt))
    base = _hidden(engine, prompt)
    S = torch.nonzero(saes[1].encode(base[1]).sum(0) > 0).flatten().tolist()[:30]
    full = _closed_form_ablate(saes[1], base[1], S)
    cases = {
        TokenScope(kind="all"): set(range(n)),
        TokenScope(kind="prompt"): set(range(n)),
        TokenScope(kind="generated"): set(),
        TokenScope(kind="last_n_prompt", n=3): {n - 3, n - 2, n - 1},
        TokenScope(kind="positions", positions=(0, 2, -1)): {0, 2, n - 1},
    }
    for scope, touched in cases.items():
        hooked = _hidden(engine, prompt, [AblateLatents(latents={1: tuple(S)}, scope=scope)])[1]
        for t in range(n):
            want = full[t] if t in touched else base[1][t]
            assert torch.allclose(hooked[t], want, atol=1e-5), (scope, t)


def test_generated_scope_changes_generation_only_after_prompt():
    engine, _ = _engine("llama")
    r = _unit(64, 3)
    gen = AddDirection(direction=tuple(r.tolist()), layer=1, coefficient=50.0, scope=TokenScope(kind="generated"))
    base = engine.generate([Request(prompt=PROMPTS[0])])[0]
    hooked = engine.generate([Request(prompt=PROMPTS[0], interventions=(gen,))])[0]
    # the first generated token is predicted from prompt positions only: unchanged
    assert hooked.token_ids[0] == base.token_ids[0]
    assert hooked.token_ids != base.token_ids


def test_validate_rows_rejects_exactly_what_compile_plan_rejects():
    """The vLLM engine and job configs validate with `validate_rows` (no plan built): every bad row is
    rejected with compile_plan's error type and message (naming the same field), good rows pass both."""
    from refusal_audit.audit.errors import InvalidRequest, NotFound
    from refusal_audit.server.interventions import Resolver, compile_plan, validate_rows
    from tiny import make_sae

    saes = build_layer_saes({1: make_sae(16, 32, seed=0), 2: make_sae(16, 32, seed=1)}, 16, 4)
    good = (AblateLatents(latents={1: (0, 3), 2: (5,)}), ClampLatents(latents={1: (7,)}, value=1.0))
    bad_rows = [
        (AblateLatents(latents={1: (40,)}),),  # latent out of range
        (AblateLatents(latents={3: (1,)}),),  # no SAE at that layer
        (ClampLatents(latents={1: (2,)}, value=1e38),),  # would overflow the stream
        (AblateLatents(latent_set_id="nope"),),  # unknown set
        (AblateLatents(latents={1: (1,)}, scope=TokenScope(kind="positions", positions=(50,))),),  # past the sequence
        (AblateLatents(latents={1: tuple(range(20)), 2: tuple(range(20))}),),  # over the per-request limit
    ]
    args = dict(saes=saes, n_layers=4, d_model=16, resolver=Resolver(), max_latents_per_request=32)
    validate_rows([good, ()], [5, 3], seq_lens=[8, 3], **args)
    compile_plan([good, ()], [5, 3], device=torch.device("cpu"), seq_lens=[8, 3], **args)
    for bad in bad_rows:
        rows, plens, slens = [good, bad], [5, 6], [8, 9]
        with pytest.raises((InvalidRequest, NotFound)) as want:
            compile_plan(rows, plens, device=torch.device("cpu"), seq_lens=slens, **args)
        with pytest.raises(type(want.value)) as got:
            validate_rows(rows, plens, seq_lens=slens, **args)
        assert str(got.value) == str(want.value)
        assert "items[1]" in str(got.value) or "nope" in str(got.value), str(got.value)
