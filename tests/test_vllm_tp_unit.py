"""vLLM tensor parallelism with the hooks, without vLLM: what every rank receives must be the same.

With `--tensor-parallel-size N`, `collective_rpc("ra_install")` runs on every rank and each rank
hooks its own copy of the decoder layers; the residual stream after each layer is all-reduced, so
every rank must apply the same edit. These tests cover the broadcast: the SAE payload rebuilt on two
"ranks" gives identical SAEs, the per-request spec (SamplingParams.extra_args, which vLLM hands to
every rank's model runner) parses and compiles to identical plans, and the engine refuses ranks
whose installed hooks disagree. (TP = 2 itself is run, or not, as said in docs/scaling.md.)
"""

from __future__ import annotations

import pytest
import torch
from refusal_audit.audit.spec import (
    AblateLatents,
    AddDirection,
    ClampLatents,
    TokenScope,
    canonical_spec_json,
    spec_hash,
)
from refusal_audit.server.interventions import compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes
from refusal_audit.server.vllm_engine.engine import check_rank_facts
from refusal_audit.server.vllm_engine.worker import (
    EXTRA_ARGS_KEY,
    VLLMInternalsError,
    _HookRuntime,
    sae_payload,
    saes_from_payload,
)
from tiny import make_sae

D, N_LAYERS = 16, 4


def _two_ranks() -> tuple[dict, list[_HookRuntime]]:
    saes = build_layer_saes({ly: make_sae(D, 32, seed=ly) for ly in (1, 2)}, D, N_LAYERS)
    payload = {"saes": sae_payload(saes), "d_model": D}
    ranks = [_HookRuntime(object(), saes_from_payload(payload["saes"], D, N_LAYERS, torch.device("cpu")), N_LAYERS, D)
             for _ in range(2)]
    return saes, ranks


def test_every_rank_rebuilds_the_same_saes() -> None:
    saes, ranks = _two_ranks()
    for rt in ranks:
        assert sorted(rt.saes) == sorted(saes)
        for ly, s in saes.items():
            mine, ref = rt.saes[ly].sae.state_dict(), s.sae.state_dict()
            assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


def test_every_rank_parses_and_compiles_the_same_plan() -> None:
    _, ranks = _two_ranks()
    ivs = (AblateLatents(latents={1: (1, 4, 9)}, scope=TokenScope(kind="prompt")),
           ClampLatents(latents={2: (3,)}, value=2.5),
           AddDirection(direction=tuple(float(i) for i in range(D)), layer=2, coefficient=0.5))
    spec = canonical_spec_json(ivs)
    extra = {EXTRA_ARGS_KEY: {"spec": spec, "hash": spec_hash(ivs)}}  # what each rank's runner reads
    parsed = [rt._spec(extra[EXTRA_ARGS_KEY]) for rt in ranks]
    assert parsed[0] == parsed[1] == ivs
    plans = [compile_plan([p], [7], rt.saes, N_LAYERS, D, torch.device("cpu")) for p, rt in zip(parsed, ranks, strict=True)]
    a, b = plans
    for ly in (1, 2):
        pa, pb = a.latent_layers[ly], b.latent_layers[ly]
        assert len(pa.groups) == len(pb.groups) >= 1
        for ga, gb in zip(pa.groups, pb.groups, strict=True):
            assert ga.key == gb.key and torch.equal(ga.latents, gb.latents) and torch.equal(ga.ops, gb.ops)
            assert torch.equal(ga.scales, gb.scales) and torch.equal(ga.targets, gb.targets)
            assert torch.equal(ga.membership, gb.membership)
        for field in ("rows", "kind", "n", "positions"):
            assert torch.equal(getattr(pa.scopes, field), getattr(pb.scopes, field))
    # the plans are not vacuous: layer 1 ablates latents 1, 4, 9 over the prompt, layer 2 clamps 3 to 2.5
    assert a.latent_layers[1].groups[0].key == (1, 4, 9)
    assert a.latent_layers[2].groups[0].key == (3,) and float(a.latent_layers[2].groups[0].targets.max()) == 2.5
    assert torch.equal(a.additions[2].directions, b.additions[2].directions)


def test_ranks_whose_hooks_disagree_are_refused() -> None:
    facts = {"n_layers": 4, "d_model": 16, "sae_layers": [1, 2], "runner": "CPUModelRunner"}
    assert check_rank_facts([facts, dict(facts)]) == {**facts, "ranks": 2}
    assert check_rank_facts(facts)["ranks"] == 1  # a single worker answers with a dict
    with pytest.raises(VLLMInternalsError, match="every tensor-parallel rank"):
        check_rank_facts([facts, {**facts, "sae_layers": [1]}])
    with pytest.raises(VLLMInternalsError, match="no worker"):
        check_rank_facts([])
