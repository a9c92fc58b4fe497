"""The Attribute RPC through the real server: the client's result equals the in-process engine's,
a registered prompt set is a mean baseline, the CLI prints it, and bad input gets INVALID_ARGUMENT /
NOT_FOUND naming the field while the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from refusal_audit.audit.attribution import (
    AttributionScope,
    Baseline,
    LogitDiff,
    LogProb,
    attribution_request,
)
from refusal_audit.audit.spec import AblateDirection, user_prompt
from refusal_audit.client import AuditClient, RemoteError
from refusal_audit.client.cli import app
from refusal_audit.proto import convert
from refusal_audit.proto.generated import audit_pb2 as pb
from refusal_audit.server.app import ThreadedServer
from refusal_audit.server.config import LimitsConfig
from refusal_audit.server.hf_engine import HFEngine
from tiny import build_engine
from typer.testing import CliRunner

PROMPTS = [user_prompt("Write a poem about the sea."), user_prompt("How do I build a bomb?")]


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return build_engine()


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return start_server(limits=LimitsConfig(max_prompt_tokens=32, max_batch_items=4, max_latents_per_request=10,
                                            max_attribution_steps=16))


def _metric(client: AuditClient) -> LogitDiff:
    return LogitDiff(positive=client.tokenize("Sure", raw=True)[0][0], negative=client.info.special_token_ids["I"])


def test_remote_equals_in_process(client: AuditClient, engine: HFEngine) -> None:
    direction = tuple(np.random.default_rng(0).normal(size=64).tolist())
    req = attribution_request(PROMPTS, _metric(client), n_steps=4, top_k=5, per_position=True,
                              baseline=Baseline(kind="interventions", interventions=(AblateDirection(direction=direction),)))
    remote = client.attribute(req)
    local = engine.attribute(req)
    assert remote.forward_passes == local.forward_passes == 2 * (4 + 1 + 1)
    assert remote.backward_passes == 2 * 4
    for r, lo in zip(remote.results, local.results, strict=True):
        assert r.metric_clean == pytest.approx(lo.metric_clean, abs=1e-5)
        assert r.metric_baseline == pytest.approx(lo.metric_baseline, abs=1e-5)
        assert r.positions == lo.positions
        assert sorted(r.layers) == [1, 2]
        for ly, la in r.layers.items():
            np.testing.assert_array_equal(la.latents, lo.layers[ly].latents)
            np.testing.assert_allclose(la.scores, lo.layers[ly].scores, rtol=1e-3, atol=1e-5)  # float reduction order
            assert la.error == pytest.approx(lo.layers[ly].error, rel=1e-3, abs=1e-5)
            assert la.per_position is not None and la.per_position.shape == (len(r.positions), 5)
    assert client.limits.max_attribution_steps == 16


def test_prompt_set_mean_baseline(client: AuditClient) -> None:
    ps = client.register_prompt_set("ref", ["Tell me a story about a cat.", user_prompt("Give me a recipe for pasta.")])
    assert ps.id.startswith("ps_") and ps.kind == "prompt_set"
    got = client.artifact(ps.id)
    assert got.prompts is not None and got.prompts[0] == "Tell me a story about a cat."
    resp = client.attribute(PROMPTS[:1], _metric(client), method="atp", layers=(1,), top_k=3,
                            baseline=Baseline(kind="mean", reference_set_id=ps.id))
    la = resp.results[0].layers[1]
    assert len(la.latents) == 3 and la.error != 0.0


def test_cli_attribute_json(server: ThreadedServer) -> None:
    out = CliRunner().invoke(app, ["attribute", "How do I build a bomb?", "--positive", "#7", "--method", "atp",
                                   "--layer", "2", "--top-k", "3", "--json", "--server", server.address])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    (res,) = data["results"]
    assert list(res["layers"]) == ["2"] and len(res["layers"]["2"]["latents"]) == 3
    assert data["backward_passes"] == 1


def _raw(client: AuditClient, **kw: Any) -> Any:
    base = dict(items=[pb.AttributeItem(prompt=pb.Prompt(text="The quick brown fox"))],
                metric=pb.AttributionMetric(logprob=pb.LogProbMetric(token=5)), method="atp")
    base.update(kw)
    return client._call("Attribute", pb.AttributeRequest(**base))


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CASES = [
    ("unknown token", dict(metric=pb.AttributionMetric(logprob=pb.LogProbMetric(token=10**6))), INVALID, "metric.token"),
    ("unknown item token", dict(items=[pb.AttributeItem(prompt=pb.Prompt(text="hi"), metric=pb.AttributionMetric(
        logit_diff=pb.LogitDiffMetric(positive=3, negative=-1)))]), INVALID, "items[0].metric.negative"),
    ("no metric", dict(metric=None), INVALID, "metric"),
    ("empty scope", dict(scope=pb.AttributionScope(kind=pb.AttributionScope.POSITIONS)), INVALID, "scope.positions"),
    ("scope out of range", dict(scope=pb.AttributionScope(kind=pb.AttributionScope.POSITIONS, positions=[40])), INVALID,
     "scope.positions"),
    ("last_n 0", dict(scope=pb.AttributionScope(kind=pb.AttributionScope.LAST_N)), INVALID, "scope.n"),
    ("steps over limit", dict(method="ig", n_steps=17), INVALID, "n_steps"),
    ("negative steps", dict(method="ig", n_steps=-3), INVALID, "n_steps"),
    ("atp steps", dict(method="atp", n_steps=4), INVALID, "n_steps"),
    ("bad method", dict(method="exact"), INVALID, "method"),
    ("bad rule", dict(method="ig", rule="simpson"), INVALID, "rule"),
    ("unknown set", dict(baseline=pb.AttributionBaseline(kind=pb.AttributionBaseline.MEAN, reference_set_id="ps_nope")),
     NOT_FOUND, "baseline.reference_set_id"),
    ("mean without set", dict(baseline=pb.AttributionBaseline(kind=pb.AttributionBaseline.MEAN)), INVALID,
     "baseline.reference_set_id"),
    ("no baseline interventions", dict(baseline=pb.AttributionBaseline(kind=pb.AttributionBaseline.INTERVENTIONS)),
     INVALID, "baseline.interventions"),
    ("bad baseline direction", dict(baseline=pb.AttributionBaseline(
        kind=pb.AttributionBaseline.INTERVENTIONS, interventions=[pb.Intervention(ablate_direction=pb.AblateDirection(
            direction=pb.DirectionRef(values=[1.0, 2.0])))])), INVALID, "baseline.interventions[0]"),
    ("unknown direction id", dict(baseline=pb.AttributionBaseline(
        kind=pb.AttributionBaseline.INTERVENTIONS, interventions=[pb.Intervention(ablate_direction=pb.AblateDirection(
            direction=pb.DirectionRef(direction_id="dir_nope")))])), NOT_FOUND, "direction_id"),
    ("layer without SAE", dict(layers=[3]), INVALID, "layers"),
    ("latent out of range", dict(latents=[pb.LayerLatents(layer=1, latents=[10**6])]), INVALID, "latents[1]"),
    ("too many latents", dict(latents=[pb.LayerLatents(layer=1, latents=list(range(11)))]), INVALID, "latents"),
    ("negative top_k", dict(top_k=-1), INVALID, "top_k"),
    ("empty items", dict(items=[]), INVALID, "items"),
    ("too many items", dict(items=[pb.AttributeItem(prompt=pb.Prompt(text="hi"))] * 5), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "items"),
    ("prompt too long", dict(items=[pb.AttributeItem(prompt=pb.Prompt(text=" ".join(["the quick brown fox"] * 20)))]),
     INVALID, "items[0].prompt"),
]


@pytest.mark.parametrize(("case", "kw", "code", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(client: AuditClient, case: str, kw: dict, code: grpc.StatusCode, field: str) -> None:
    if kw.get("metric", 0) is None:
        kw = {k: v for k, v in kw.items() if k != "metric"}
        with pytest.raises(RemoteError) as ei:
            client._call("Attribute", pb.AttributeRequest(items=[pb.AttributeItem(prompt=pb.Prompt(text="hi"))], method="atp"))
    else:
        with pytest.raises(RemoteError) as ei:
            _raw(client, **kw)
    assert ei.value.code == code, ei.value.details
    assert field in ei.value.details, ei.value.details
    # the server keeps serving
    ok = _raw(client)
    assert len(ok.results) == 1


def test_round_trip_conversion() -> None:
    req = attribution_request(PROMPTS, [LogProb(token=3), LogitDiff(positive=1, negative=2)], method="ig", n_steps=7,
                              rule="midpoint", layers=(1, 2), scope=AttributionScope(kind="last_n", n=3), top_k=4,
                              latents={1: (5, 6)}, per_position=True,
                              baseline=Baseline(kind="interventions", interventions=(AblateDirection(direction=(1.0, 0.0)),)))
    assert convert.attribute_request_from_pb(convert.attribute_request_to_pb(req)) == req
