"""Bad input gets its documented gRPC status with a message naming the field, and the server answers
the next good request. Also: RESOURCE_EXHAUSTED when the in-flight bound is reached, cancellation
and deadlines stop generation, and an unexpected engine error is INTERNAL without killing the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from refusal_audit.audit.errors import InvalidRequest, LimitExceeded, NotFound
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Request,
    SamplingParams,
    ScaleLatents,
    user_prompt,
)
from refusal_audit.client import AuditClient, RemoteError
from refusal_audit.client.sync import map_error
from refusal_audit.proto.generated import audit_pb2 as pb
from refusal_audit.server.app import ThreadedServer
from refusal_audit.server.config import LimitsConfig, ServerConfig
from tiny import build_engine, no_jobs

INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
)
D = 64
GOOD = "The quick brown fox"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return start_server(limits=LimitsConfig(max_prompt_tokens=32, max_new_tokens=16, max_batch_items=4,
                                     max_latents_per_request=10, default_max_new_tokens=4))


def _raw_generate(client: AuditClient, *items: pb.GenerateItem) -> Any:
    return client._call("Generate", pb.GenerateRequest(items=list(items)))


def _item(text: str = GOOD, **kw: Any) -> pb.GenerateItem:
    return pb.GenerateItem(prompt=pb.Prompt(text=text), **kw)


def _ablate_dir(values: list[float], **scope: Any) -> pb.Intervention:
    return pb.Intervention(ablate_direction=pb.AblateDirection(direction=pb.DirectionRef(values=values)),
                           scope=pb.TokenScope(**scope) if scope else None)


def _dir(values: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in values)


NAN, INF, POS = float("nan"), float("inf"), pb.TokenScope.POSITIONS


def _raw_stream(client: AuditClient, *items: pb.GenerateItem) -> list[Any]:
    try:
        return list(client.stub.GenerateStream(pb.GenerateRequest(items=list(items)), timeout=30))
    except grpc.RpcError as exc:
        raise map_error(exc) from None


def _raw_score(client: AuditClient, text: str, iv: pb.Intervention | None, *more: tuple[str, pb.Intervention]) -> Any:
    items = [pb.ScoreItem(prompt=pb.Prompt(text=text), interventions=[iv] if iv else [])]
    items += [pb.ScoreItem(prompt=pb.Prompt(text=t), interventions=[v]) for t, v in more]
    return client._call("Score", pb.ScoreRequest(items=items, token_ids=[5]))


LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)

# (case id, call, expected code, substrings the message must contain)
CASES: list[tuple[str, Callable[[AuditClient], Any], grpc.StatusCode, tuple[str, ...]]] = [
    ("no-sae-at-layer", lambda c: c.generate(GOOD, [AblateLatents(latents={3: (1,)})]),
     INVALID, ("items[0].interventions[0].latents", "no SAE at layer 3")),
    ("no-sae-at-layer-clamp", lambda c: c.score(GOOD, [5], interventions=[ClampLatents(latents={0: (1,)}, value=1.0)]),
     INVALID, ("items[0].interventions[0].latents", "no SAE at layer 0")),
    ("encode-layer-without-sae", lambda c: c.encode(GOOD, layers=[3]), INVALID, ("layers", "no SAE at layer 3")),
    ("latent-id-too-large", lambda c: c.generate(GOOD, [AblateLatents(latents={1: (2, 128)})]),
     INVALID, ("items[0].interventions[0].latents[1]", "latent id 128", "[0, 128)")),
    ("latent-id-negative", lambda c: c.generate(GOOD, [ClampLatents(latents={2: (-1,)}, value=1.0)]),
     INVALID, ("items[0].interventions[0].latents[2]", "latent id -1")),
    ("encode-latent-too-large", lambda c: c.encode(GOOD, latents={1: [500]}), INVALID, ("latents[1]", "latent id 500")),
    ("register-latent-too-large", lambda c: c.register_latent_set("x", {1: [128]}), INVALID, ("latents[1]", "latent id 128")),
    ("register-latent-no-sae", lambda c: c.register_latent_set("x", {0: [1]}), INVALID, ("latents", "no SAE at layer 0")),
    ("register-empty-latent-set", lambda c: c.register_latent_set("x", {}), INVALID, ("latents", "empty")),
    ("empty-request", lambda c: c.generate([]), INVALID, ("items", "empty request")),
    ("empty-score-request", lambda c: c.score([], [5]), INVALID, ("items", "empty request")),
    ("empty-loss-request", lambda c: c.loss([], []), INVALID, ("items", "empty request")),
    ("empty-prompt", lambda c: c.generate(""), INVALID, ("items[0].prompt", "empty prompt")),
    ("empty-prompt-second-item", lambda c: c.score([GOOD, ""], [5]), INVALID, ("items[1].prompt", "empty prompt")),
    ("unset-prompt", lambda c: _raw_generate(c, pb.GenerateItem()), INVALID, ("items[0].prompt", "empty prompt")),
    ("empty-messages", lambda c: _raw_generate(c, pb.GenerateItem(prompt=pb.Prompt(messages=pb.Messages()))),
     INVALID, ("items[0].prompt.messages", "empty")),
    ("bad-role", lambda c: _raw_generate(c, pb.GenerateItem(prompt=pb.Prompt(messages=pb.Messages(
        messages=[pb.ChatMessage(role="robot", content="hi")])))), INVALID, ("items[0].prompt.messages[0].role",)),
    ("max-new-tokens-over-limit", lambda c: c.generate(GOOD, max_new_tokens=17),
     INVALID, ("items[0].sampling.max_new_tokens", "17", "16")),
    ("max-new-tokens-over-limit-stream", lambda c: list(c.generate_stream([GOOD, GOOD], max_new_tokens=1000)),
     INVALID, ("items[0].sampling.max_new_tokens",)),
    ("prompt-too-long", lambda c: c.generate(LONG_PROMPT), INVALID, ("items[0].prompt", "max_prompt_tokens=32")),
    ("prompt-too-long-chat", lambda c: c.score([GOOD, user_prompt(LONG_PROMPT)], [5]),
     INVALID, ("items[1].prompt", "max_prompt_tokens=32")),
    ("too-many-items", lambda c: c.generate([GOOD] * 5), EXHAUSTED, ("items", "max_batch_items=4")),
    ("too-many-latents", lambda c: c.generate(GOOD, [AblateLatents(latents={1: tuple(range(11))})]),
     INVALID, ("items[0].interventions", "11 latents", "10")),
    ("encode-too-many-latents", lambda c: c.encode(GOOD, latents={1: list(range(11))}), INVALID, ("latents", "11 latents")),
    ("direction-wrong-dim", lambda c: c.generate(GOOD, [AblateDirection(direction=(1.0, 2.0, 3.0))]),
     INVALID, ("items[0].interventions[0].direction", "dimension (3,)", f"({D},)")),
    ("direction-zero-norm", lambda c: c.generate(GOOD, [AddDirection(direction=(0.0,) * D, layer=1)]),
     INVALID, ("items[0].interventions[0].direction", "zero norm")),
    ("direction-nan", lambda c: c._call("Score", pb.ScoreRequest(token_ids=[5], items=[pb.ScoreItem(
        prompt=pb.Prompt(text=GOOD), interventions=[_ablate_dir([float("nan")] + [1.0] * (D - 1))])])),
     INVALID, ("items[0].interventions[0].ablate_direction.direction", "entry 0 must be finite, got nan")),
    ("add-direction-bad-layer", lambda c: c.generate(GOOD, [AddDirection(direction=(1.0,) * D, layer=9)]),
     INVALID, ("items[0].interventions[0].layer", "layer 9")),
    ("register-direction-wrong-dim", lambda c: c.register_direction("d", [1.0] * (D + 1)), INVALID, ("values", "dimension")),
    ("register-direction-zero", lambda c: c.register_direction("d", [0.0] * D), INVALID, ("values", "zero norm")),
    ("register-direction-nan", lambda c: c.register_direction("d", [float("nan")] * D), INVALID, ("values", "NaN")),
    ("register-direction-empty", lambda c: c.register_direction("d", []), INVALID, ("values", "empty")),
    ("register-bad-metadata", lambda c: c._call("RegisterDirection", pb.RegisterDirectionRequest(
        name="d", values=[1.0] * D, metadata_json="{not json")), INVALID, ("metadata_json",)),
    ("unknown-latent-set-id", lambda c: c.generate(GOOD, [AblateLatents(latent_set_id="fs_doesnotexist")]),
     NOT_FOUND, ("latent_set_id", "fs_doesnotexist")),
    ("unknown-direction-id", lambda c: c.score(GOOD, [5], interventions=[AblateDirection(direction_id="dir_nope")]),
     NOT_FOUND, ("direction_id", "dir_nope")),
    ("unknown-artifact", lambda c: c.artifact("dir_000000000000"), NOT_FOUND, ("id", "dir_000000000000")),
    ("unknown-artifact-kind", lambda c: c.artifacts("feature"), INVALID, ("kind", "feature")),
    ("unknown-score-token", lambda c: c.score(GOOD, [5, 400]), INVALID, ("token_ids", "unknown token id 400")),
    ("negative-score-token", lambda c: c.score(GOOD, [-1]), INVALID, ("token_ids", "unknown token id -1")),
    ("no-score-target", lambda c: c.score(GOOD, []), INVALID, ("token_ids", "empty")),
    ("unknown-stop-token", lambda c: c.generate(GOOD, stop_token_ids=(10_000,)),
     INVALID, ("items[0].sampling.stop_token_ids", "10000")),
    ("bad-top-p", lambda c: _raw_generate(c, _item(sampling=pb.SamplingParams(top_p=2.0))),
     INVALID, ("items[0].sampling.top_p",)),
    ("negative-temperature", lambda c: _raw_generate(c, _item(sampling=pb.SamplingParams(temperature=-1.0))),
     INVALID, ("items[0].sampling.temperature",)),
    ("no-intervention-kind", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention()])),
     INVALID, ("items[0].interventions[0]", "no intervention kind")),
    ("ablate-without-latents", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(ablate_latents=pb.AblateLatents())])),
     INVALID, ("items[0].interventions[0].ablate_latents", "needs latents or latent_set_id")),
    ("bad-scope", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        ablate_latents=pb.AblateLatents(latents=[pb.LayerLatents(layer=1, latents=[1])]),
        scope=pb.TokenScope(kind=pb.TokenScope.LAST_N_PROMPT, n=0))])),
     INVALID, ("items[0].interventions[0].scope", "scope.n")),
    ("clamp-values-misaligned", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        clamp_latents=pb.ClampLatents(latents=[pb.LayerLatents(layer=1, latents=[1, 2], values=[1.0])]))])),
     INVALID, ("items[0].interventions[0].clamp_latents.latents[0].values",)),
    ("scale-without-factor", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        scale_latents=pb.ScaleLatents(latents=[pb.LayerLatents(layer=1, latents=[1])]))])),
     INVALID, ("items[0].interventions[0].scale_latents.factor", "must be set")),
    ("scale-nan-factor", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        scale_latents=pb.ScaleLatents(latents=[pb.LayerLatents(layer=1, latents=[1])], factor=float("inf")))])),
     INVALID, ("items[0].interventions[0].scale_latents", "finite")),
    ("scale-with-values", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        scale_latents=pb.ScaleLatents(latents=[pb.LayerLatents(layer=1, latents=[1], values=[2.0])], factor=2.0))])),
     INVALID, ("items[0].interventions[0].scale_latents.latents.values", "only clamp_latents")),
    ("scale-without-latents", lambda c: _raw_generate(c, _item(interventions=[pb.Intervention(
        scale_latents=pb.ScaleLatents(factor=-3.0))])),
     INVALID, ("items[0].interventions[0].scale_latents", "needs latents or latent_set_id")),
    ("scale-latent-too-large", lambda c: c.generate(GOOD, [ScaleLatents(latents={2: (128,)}, factor=-3.0)]),
     INVALID, ("items[0].interventions[0].latents[2]", "latent id 128")),
    ("scale-unknown-latent-set-id", lambda c: c.generate(GOOD, [ScaleLatents(latent_set_id="fs_nope", factor=0.5)]),
     NOT_FOUND, ("latent_set_id", "fs_nope")),
    ("residual-position-out-of-range", lambda c: c.residuals(GOOD, layers=[1], positions=[100]),
     INVALID, ("positions", "100")),
    ("residual-layer-out-of-range", lambda c: c.residuals(GOOD, layers=[7]), INVALID, ("layers", "layer 7")),
    ("encode-top-k-too-large", lambda c: c.encode(GOOD, top_k=100_000), INVALID, ("top_k",)),
    ("bad-tensor-less-request", lambda c: c._call("GetArtifact", pb.GetArtifactRequest()), INVALID, ("id", "empty")),
    # issue 11: non-finite sampling parameters (Generate and GenerateStream)
    ("temperature-nan", lambda c: _raw_generate(c, _item(sampling=pb.SamplingParams(temperature=NAN))),
     INVALID, ("items[0].sampling.temperature", "finite")),
    ("temperature-inf", lambda c: _raw_generate(c, _item(), _item(sampling=pb.SamplingParams(temperature=INF))),
     INVALID, ("items[1].sampling.temperature", "finite")),
    ("temperature-nan-stream", lambda c: _raw_stream(c, _item(sampling=pb.SamplingParams(temperature=NAN))),
     INVALID, ("items[0].sampling.temperature",)),
    ("top-p-nan", lambda c: _raw_generate(c, _item(sampling=pb.SamplingParams(top_p=NAN))),
     INVALID, ("items[0].sampling.top_p", "nan")),
    # issue 11: token-scope positions the model never reads ("hi" is 3 tokens with BOS)
    ("position-before-prompt", lambda c: _raw_score(c, "hi", _ablate_dir([1.0] * D, kind=POS, positions=[-1000])),
     INVALID, ("items[0].interventions[0].scope.positions[0]", "position -1000", "3-token prompt")),
    ("position-after-prompt", lambda c: _raw_score(c, "hi", _ablate_dir([1.0] * D, kind=POS, positions=[0, 1000])),
     INVALID, ("items[0].interventions[0].scope.positions[1]", "position 1000", "valid: -3 to 2")),
    ("position-second-item", lambda c: _raw_score(c, GOOD, None, ("hi", _ablate_dir([1.0] * D, kind=POS, positions=[3]))),
     INVALID, ("items[1].interventions[0].scope.positions[0]", "position 3")),
    ("position-never-generated", lambda c: _raw_generate(c, pb.GenerateItem(
        prompt=pb.Prompt(text="hi"), sampling=pb.SamplingParams(max_new_tokens=4),
        interventions=[_ablate_dir([1.0] * D, kind=POS, positions=[6])])),
     INVALID, ("items[0].interventions[0].scope.positions[0]", "position 6", "3 generated/completion tokens")),
    ("position-encode", lambda c: c._call("Encode", pb.EncodeRequest(items=[pb.ScoreItem(
        prompt=pb.Prompt(text="hi"), interventions=[_ablate_dir([1.0] * D, kind=POS, positions=[-4])])])),
     INVALID, ("items[0].interventions[0].scope.positions[0]", "position -4")),
    ("positions-with-kind-all", lambda c: _raw_score(c, "hi", _ablate_dir([1.0] * D, positions=[1])),
     INVALID, ("items[0].interventions[0].scope", "positions are only read for kind 'positions'")),
    ("n-with-kind-prompt", lambda c: _raw_score(c, "hi", _ablate_dir([1.0] * D, kind=pb.TokenScope.PROMPT, n=2)),
     INVALID, ("items[0].interventions[0].scope", "scope.n is only read")),
    # issue 11: values whose effect is non-finite
    ("clamp-value-huge", lambda c: c.score("hi", [5], interventions=[ClampLatents(latents={1: (3,)}, value=3e38)]),
     INVALID, ("items[0].interventions[0].value", "clamping latent 3 at layer 1", "overflows float32")),
    ("clamp-own-value-huge", lambda c: c.generate(GOOD, [ClampLatents(latents={2: (1, 5)}, values={2: (1.0, -3e38)})]),
     INVALID, ("items[0].interventions[0].values[2][1]", "clamping latent 5")),
    ("clamp-value-inf", lambda c: _raw_score(c, "hi", pb.Intervention(clamp_latents=pb.ClampLatents(
        latents=[pb.LayerLatents(layer=1, latents=[3])], value=INF))),
     INVALID, ("items[0].interventions[0].clamp_latents.value", "finite")),
    ("add-coefficient-huge", lambda c: c.score("hi", [5], interventions=[AddDirection(direction=(1.0,) * D, layer=1, coefficient=3e38)]),
     INVALID, ("items[0].interventions[0].coefficient", "overflows float32")),
    ("add-coefficient-inf", lambda c: _raw_score(c, "hi", pb.Intervention(add_direction=pb.AddDirection(
        direction=pb.DirectionRef(values=[1.0] * D), layer=1, coefficient=-INF))),
     INVALID, ("items[0].interventions[0].add_direction.coefficient", "finite")),
    ("direction-entry-inf", lambda c: _raw_score(c, "hi", _ablate_dir([1.0] * (D - 1) + [INF])),
     INVALID, ("items[0].interventions[0].ablate_direction.direction", "entry 63 must be finite")),
    ("register-metadata-nan", lambda c: c._call("RegisterDirection", pb.RegisterDirectionRequest(
        name="d", values=[1.0] * D, metadata_json='{"x": NaN}')), INVALID, ("metadata_json", "NaN")),
]


@pytest.mark.parametrize("name,call,code,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_status_then_good_request(
    client: AuditClient, name: str, call: Callable[[AuditClient], Any], code: grpc.StatusCode, needles: tuple[str, ...]
) -> None:
    with pytest.raises(RemoteError) as exc:
        call(client)
    err = exc.value
    assert err.code == code, (name, err)
    for needle in needles:
        assert needle in err.details, (name, needle, err.details)
    # the remote errors are also the local error types
    local = {INVALID: InvalidRequest, NOT_FOUND: NotFound, EXHAUSTED: LimitExceeded}[code]
    assert isinstance(err, local)
    # and the server answers the next good request
    out = client.generate([GOOD, user_prompt("hi")], max_new_tokens=2)
    assert len(out) == 2 and all(len(c.token_ids) <= 2 for c in out)


def test_default_max_new_tokens_applies_when_zero(client: AuditClient) -> None:
    resp = _raw_generate(client, _item(sampling=pb.SamplingParams(max_new_tokens=0)))
    assert len(resp.completions[0].token_ids) <= 4 and (
        resp.completions[0].finish_reason == "stop" or len(resp.completions[0].token_ids) == 4
    )


def test_unexpected_engine_error_is_internal(client: AuditClient, server: ThreadedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.handle is not None
    engine = server.handle.engine

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(engine, "score", boom)
    with pytest.raises(RemoteError) as exc:
        client.score(GOOD, [5])
    assert exc.value.code == grpc.StatusCode.INTERNAL and "kaboom" in exc.value.details
    monkeypatch.undo()
    assert client.score(GOOD, [5])[0].logprobs.shape == (1,)


# ---------------------------------------------------------------------------- admission, cancellation, deadlines


@pytest.fixture(scope="module")
def busy_server(start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    engine = build_engine()
    engine.eos_ids = ()  # a model that never stops by itself: generation ends only by length or cancellation
    return start_server(engine, limits=LimitsConfig(max_new_tokens=5000), max_inflight=1)


def _wait_idle(srv: ThreadedServer, timeout: float = 5.0) -> float:
    """Seconds until no engine request is in flight (fails after `timeout`)."""
    assert srv.handle is not None
    t0 = time.time()
    while srv.handle.servicer.admission.count:
        assert time.time() - t0 < timeout, "generation did not stop"
        time.sleep(0.005)
    return time.time() - t0


def _generated_tokens(srv: ThreadedServer) -> float:
    assert srv.handle is not None
    return float(srv.handle.metrics.generated_tokens._value.get())


def test_inflight_full_is_resource_exhausted_and_cancel_stops_stream(busy_server: ThreadedServer) -> None:
    before = _generated_tokens(busy_server)
    with AuditClient(busy_server.address, timeout=60) as c:
        stream = c.generate_stream([GOOD] * 4, max_new_tokens=5000)
        first = next(stream)  # the slow request is now in flight
        assert first.index in range(4)
        with pytest.raises(RemoteError) as exc:
            c.score(GOOD, [5])
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight=1" in exc.value.details
        assert isinstance(exc.value, LimitExceeded)
        stream.close()  # cancels the RPC
        _wait_idle(busy_server)
        produced = _generated_tokens(busy_server) - before
        assert produced < 4 * 5000 / 2, produced  # the cancelled stream stopped early
        assert c.score(GOOD, [5])[0].logprobs.shape == (1,)  # and the slot is free again


def test_deadline_stops_generation(busy_server: ThreadedServer) -> None:
    before = _generated_tokens(busy_server)
    with AuditClient(busy_server.address) as c:
        with pytest.raises(RemoteError) as exc:
            c.generate([GOOD] * 4, max_new_tokens=5000, timeout=0.3)
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_idle(busy_server)
        assert _generated_tokens(busy_server) - before < 4 * 5000 / 2
        assert len(c.generate(GOOD, max_new_tokens=3)[0].token_ids) <= 3


def test_client_side_validation_is_invalid_request(client: AuditClient) -> None:
    """Bad sampling values are refused before anything is sent, with the same error type."""
    with pytest.raises(InvalidRequest, match="sampling.temperature"):
        client.generate(GOOD, temperature=-1)
    with pytest.raises(InvalidRequest, match="interventions"):
        client.generate(GOOD, [{"type": "ablate_latents"}])
    assert client.generate([Request(prompt=GOOD, sampling=SamplingParams(max_new_tokens=2))])[0].prompt_tokens > 0


def test_artifact_direction_id_of_wrong_kind(client: AuditClient, tmp_path: Path) -> None:
    fs = client.register_latent_set("s", {1: [1]})
    with pytest.raises(RemoteError) as exc:
        client.generate(GOOD, [AblateDirection(direction_id=fs.id)])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and "direction_id" in exc.value.details
    d = client.register_direction("d", np.ones(D, dtype=np.float32))
    with pytest.raises(RemoteError) as exc:
        client.generate(GOOD, [AblateLatents(latent_set_id=d.id)])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and "latent_set_id" in exc.value.details


# ---------------------------------------------------------------------------- issue 11: edges that are valid


def test_tiny_temperature_samples_greedily(client: AuditClient) -> None:
    """T=1e-40 (below GREEDY_TEMPERATURE) is greedy decoding, not an overflow of logits / T."""
    greedy = _raw_generate(client, _item(sampling=pb.SamplingParams(max_new_tokens=6)))
    for t in (1e-40, 1e-6):
        tiny = _raw_generate(client, _item(sampling=pb.SamplingParams(max_new_tokens=6, temperature=t, seed=3, has_seed=True)))
        assert list(tiny.completions[0].token_ids) == list(greedy.completions[0].token_ids), t
    # just above the floor the float64 softmax stays finite: seeded sampling runs and is reproducible
    runs = [_raw_generate(client, _item(sampling=pb.SamplingParams(max_new_tokens=6, temperature=2e-5, seed=3, has_seed=True)))
            for _ in range(2)]
    assert list(runs[0].completions[0].token_ids) == list(runs[1].completions[0].token_ids)


def test_huge_direction_entries_normalise_like_small_ones(client: AuditClient) -> None:
    """Entries of 3e38 overflow a float32 norm; the direction must still be the unit vector (not zero)."""
    rng = np.random.default_rng(0)
    r = rng.standard_normal(D)
    plain = client.score(GOOD, [5], top_k=4, interventions=[AblateDirection(direction=_dir(r))])[0]
    huge = client.score(GOOD, [5], top_k=4, interventions=[AblateDirection(direction=_dir(r / np.abs(r).max() * 3e38))])[0]
    none = client.score(GOOD, [5], top_k=4)[0]
    assert np.allclose(plain.logprobs, huge.logprobs, atol=1e-5)
    assert not np.allclose(plain.logprobs, none.logprobs, atol=1e-4)  # the ablation did something


def test_positions_may_point_at_generated_tokens(client: AuditClient) -> None:
    """In Generate, position P + k is the k-th generated token; the last one the model reads is
    P + max_new_tokens - 2 ("hi" has P=3 with BOS)."""
    item = lambda p: pb.GenerateItem(  # noqa: E731
        prompt=pb.Prompt(text="hi"), sampling=pb.SamplingParams(max_new_tokens=4),
        interventions=[pb.Intervention(add_direction=pb.AddDirection(
            direction=pb.DirectionRef(values=[1.0] * D), layer=1, coefficient=50.0),
            scope=pb.TokenScope(kind=POS, positions=[p]))])
    base = _raw_generate(client, pb.GenerateItem(prompt=pb.Prompt(text="hi"), sampling=pb.SamplingParams(max_new_tokens=4)))
    edited = _raw_generate(client, item(3))  # the first generated token: changes what follows it
    assert len(edited.completions[0].token_ids) >= 1
    assert list(edited.completions[0].token_ids)[:1] == list(base.completions[0].token_ids)[:1]
    _raw_generate(client, item(5))  # the last position the model reads
    with pytest.raises(RemoteError) as exc:
        _raw_generate(client, item(6))
    assert exc.value.code == INVALID and "positions[0]: position 6 of items[0]" in exc.value.details


# ---------------------------------------------------------------------------- issue 11: the last-line guard


def test_non_finite_results_are_errors_not_ok(client: AuditClient, server: ThreadedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in a result: INTERNAL without interventions, INVALID_ARGUMENT naming the item with them."""
    from refusal_audit.audit.engine import ScoreResult

    assert server.handle is not None
    engine = server.handle.engine
    real_score = engine.score

    def nan_score(reqs: Any, *a: Any, **k: Any) -> Any:
        out = real_score(reqs, *a, **k)
        return [ScoreResult(logprobs=np.full_like(r.logprobs, np.nan)) if i == len(out) - 1 else r
                for i, r in enumerate(out)]

    monkeypatch.setattr(engine, "score", nan_score)
    with pytest.raises(RemoteError) as exc:
        client.score([GOOD, "hi"], [5])
    assert exc.value.code == grpc.StatusCode.INTERNAL and "items[1]" in exc.value.details and "non-finite" in exc.value.details
    with pytest.raises(RemoteError) as exc:
        client.score([GOOD, "hi"], [5], interventions=[AblateLatents(latents={1: (1,)})])
    assert exc.value.code == INVALID and "items[1].interventions" in exc.value.details
    monkeypatch.undo()
    assert np.isfinite(client.score(GOOD, [5])[0].logprobs).all()


def test_non_finite_logits_stop_generation(client: AuditClient, server: ThreadedServer) -> None:
    """NaN logits while generating (here forced by a hook on the LM head) end the RPC with an error."""
    assert server.handle is not None
    engine = server.handle.engine
    handle = engine.model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        for call in (lambda: client.generate(GOOD, max_new_tokens=3),
                     lambda: list(client.generate_stream(GOOD, max_new_tokens=3))):
            with pytest.raises(RemoteError) as exc:
                call()
            assert exc.value.code == grpc.StatusCode.INTERNAL and "items[0]" in exc.value.details
        with pytest.raises(RemoteError) as exc:
            client.generate(["hi", GOOD], [AblateLatents(latents={1: (1,)})], max_new_tokens=3)
        assert exc.value.code == INVALID and "items[0].interventions" in exc.value.details
    finally:
        handle.remove()
    assert len(client.generate(GOOD, max_new_tokens=2)[0].token_ids) <= 2


# ---------------------------------------------------------------------------- issue 11: undecodable bytes


def _corrupt(msg: Any, good: bytes, bad: bytes) -> bytes:
    data = msg.SerializeToString()
    assert good in data and len(good) == len(bad)
    return data.replace(good, bad)


def _raw_unary(address: str, method: str, data: bytes) -> grpc.RpcError:
    """Send raw bytes (identity serializers) and return the error the server answers with."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as exc:
            call(data, timeout=30)
    return exc.value


UNDECODABLE = [
    ("/refusal_audit.v1.AuditService/Generate",
     _corrupt(pb.GenerateRequest(items=[_item(GOOD), _item("hello")]), b"hello", b"h\xffllo"),
     "items[1].prompt.text: invalid UTF-8"),
    ("/refusal_audit.v1.AuditService/Score",
     _corrupt(pb.ScoreRequest(items=[pb.ScoreItem(prompt=pb.Prompt(messages=pb.Messages(messages=[
         pb.ChatMessage(role="user", content="hello")])))], token_ids=[5]), b"hello", b"he\xc3\x28o"),
     "items[0].prompt.messages.messages[0].content: invalid UTF-8"),
    ("/refusal_audit.v1.AuditService/StartJob",
     _corrupt(pb.StartJobRequest(kind="stage1", config_json='{"k": "vv"}'), b"vv", b"\xed\xa0"),
     "config_json: invalid UTF-8"),
    ("/refusal_audit.v1.AuditService/GetArtifact", _corrupt(pb.GetArtifactRequest(id="dir_x"), b"dir_x", b"dir_\x80"),
     "id: invalid UTF-8"),
    ("/refusal_audit.v1.AuditService/GetInfo", b"\x08", "cannot decode the bytes as GetInfoRequest"),
    ("/refusal_audit.v1.AuditService/WatchJob", b"\x0a\x05ab", "cannot decode the bytes as WatchJobRequest"),
]


@pytest.mark.parametrize("method,data,needle", UNDECODABLE, ids=[u[0].rsplit("/", 1)[1] for u in UNDECODABLE])
def test_undecodable_request_is_invalid_argument(server: ThreadedServer, client: AuditClient, method: str, data: bytes, needle: str) -> None:
    err = _raw_unary(server.address, method, data) if "Watch" not in method else None
    if err is None:  # server-streaming: the same through unary_stream
        with grpc.insecure_channel(server.address) as ch:
            call = ch.unary_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as exc:
                list(call(data, timeout=30))
        err = exc.value
    assert err.code() == INVALID, (err.code(), err.details())
    assert needle in (err.details() or ""), err.details()
    assert client.generate(GOOD, max_new_tokens=2)[0].prompt_tokens > 0


def _reflection_rejects_undecodable(address: str, service: str) -> None:
    """grpc's reflection service (a bidi stream: request-streaming, unlike our RPCs) answers an
    undecodable request in its stream INVALID_ARGUMENT naming the field, and a good one normally."""
    from grpc_reflection.v1alpha import reflection_pb2

    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    good = reflection_pb2.ServerReflectionRequest(list_services="hello")
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_stream(method, request_serializer=lambda b: b,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        ok = list(call(iter([good.SerializeToString()]), timeout=30))
        assert service in [s.name for s in ok[0].list_services_response.service]
        with pytest.raises(grpc.RpcError) as exc:
            list(call(iter([good.SerializeToString(), _corrupt(good, b"hello", b"hel\xfeo")]), timeout=30))
    err = exc.value
    assert err.code() == INVALID, (err.code(), err.details())
    assert "list_services: invalid UTF-8 in a string field (ServerReflectionRequest)" in (err.details() or ""), err.details()


def test_undecodable_request_to_reflection_is_invalid_argument(server: ThreadedServer, client: AuditClient) -> None:
    _reflection_rejects_undecodable(server.address, "refusal_audit.v1.AuditService")
    assert client.generate(GOOD, max_new_tokens=2)[0].prompt_tokens > 0


def test_undecodable_request_to_the_judges_reflection_is_invalid_argument() -> None:
    """The judge sidecar's reflection (a thread-pool server: the sync interceptor) is wrapped the same way."""
    from refusal_audit.server.judge.classifier import ClassifierOutput
    from refusal_audit.server.judge.service import start_judge_server

    class Fake:
        def classify(self, items: Any) -> list[ClassifierOutput]:
            return [ClassifierOutput(yes=True, p_yes=0.9, p_no=0.1) for _ in items]

        def info(self) -> dict[str, Any]:
            return {"judge": "fake", "model": "fake"}

    js = start_judge_server(Fake(), port=0, reflection=True)
    try:
        _reflection_rejects_undecodable(f"127.0.0.1:{js.port}", "refusal_audit.v1.JudgeService")
    finally:
        js.stop(grace=0)


def test_undecodable_request_to_the_judge_is_invalid_argument() -> None:
    """The judge sidecar (a thread-pool grpc server) maps undecodable requests the same way."""
    from refusal_audit.proto.generated import judge_pb2
    from refusal_audit.server.judge.classifier import ClassifierInput, ClassifierOutput
    from refusal_audit.server.judge.service import start_judge_server

    class Fake:
        def classify(self, items: Any) -> list[ClassifierOutput]:
            return [ClassifierOutput(yes=True, p_yes=0.9, p_no=0.1) for _ in items]

        def info(self) -> dict[str, Any]:
            return {"judge": "fake", "model": "fake"}

    js = start_judge_server(Fake(), port=0, reflection=False)
    try:
        address = f"127.0.0.1:{js.port}"
        req = judge_pb2.ClassifyRequest(items=[judge_pb2.ClassifyItem(behavior="b", generation="g", context="hello")])
        err = _raw_unary(address, "/refusal_audit.v1.JudgeService/Classify", _corrupt(req, b"hello", b"hell\xff"))
        assert err.code() == INVALID and "items[0].context: invalid UTF-8" in (err.details() or ""), err.details()
        with grpc.insecure_channel(address) as ch:
            ok = ch.unary_unary("/refusal_audit.v1.JudgeService/Classify", request_serializer=lambda b: b,
                                response_deserializer=judge_pb2.ClassifyResponse.FromString)(req.SerializeToString(), timeout=30)
        assert ok.results[0].classification.yes
        _ = ClassifierInput  # the fake receives these
    finally:
        js.stop(grace=0)


def test_undecodable_request_without_token_is_unauthenticated(tmp_path: Path) -> None:
    """With auth on, a client without the token learns nothing about its request's bytes."""
    cfg = ServerConfig(model="tiny", port=0, data_dir=tmp_path, auth_token="s3cret")
    with ThreadedServer(cfg, build_engine(), jobs_factory=no_jobs) as srv:
        err = _raw_unary(srv.address, "/refusal_audit.v1.AuditService/GetArtifact",
                         _corrupt(pb.GetArtifactRequest(id="dir_x"), b"dir_x", b"dir_\x80"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_judge_never_answers_nan_probabilities() -> None:
    """A classifier output with NaN probabilities becomes an item error, not a NaN verdict."""
    from refusal_audit.server.judge.classifier import ClassifierOutput
    from refusal_audit.server.judge.service import output_to_proto

    bad = output_to_proto(ClassifierOutput(yes=True, p_yes=float("nan"), p_no=0.1))
    assert bad.WhichOneof("outcome") == "error" and "not finite" in bad.error.message
    assert bad.error.p_yes == 0.0 and bad.error.p_no == 0.0
    good = output_to_proto(ClassifierOutput(yes=False, p_yes=0.2, p_no=0.7))
    assert good.WhichOneof("outcome") == "classification" and not good.classification.yes
