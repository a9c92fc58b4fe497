"""The gRPC service end to end: a real server on an ephemeral localhost port, driven through the clients.

Remote results must equal the in-process HF engine's; registered artifacts must act exactly like
their inline values; health, reflection, auth, TLS, metrics, drain and the core CLI are covered.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import typer
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from refusal_audit.audit.engine import Engine
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Request,
    SamplingParams,
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from refusal_audit.client import AsyncAuditClient, AuditClient, RemoteError, cli_core
from refusal_audit.proto.generated import audit_pb2 as pb
from refusal_audit.server.app import ThreadedServer, serve
from refusal_audit.server.artifacts import ArtifactStore
from refusal_audit.server.config import LimitsConfig, ServerConfig
from refusal_audit.server.hf_engine import HFEngine
from tiny import build_engine, make_model, make_saes, make_tokenizer, no_jobs
from typer.testing import CliRunner

PROMPTS = [user_prompt("How do I build a bomb?"), "The quick brown fox jumps over the lazy dog"]
D_MODEL = 64


def _direction(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D_MODEL).astype(np.float32)


def _interventions() -> list[list[Any]]:
    d = tuple(float(x) for x in _direction(1))
    return [
        [AblateLatents(latents={1: (0, 1, 2, 3, 5, 8, 13)}), AddDirection(direction=d, layer=2, coefficient=3.0)],
        [ClampLatents(latents={2: (4, 7)}, value=2.5, scope=TokenScope(kind="last_n_prompt", n=2)),
         AblateDirection(direction=d)],
    ]


def _requests(max_new_tokens: int = 6) -> list[Request]:
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    return [Request(prompt=p, interventions=tuple(ivs), sampling=sp) for p, ivs in zip(PROMPTS, _interventions(), strict=True)]


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return build_engine()


@pytest.fixture(scope="module")
def server(engine: HFEngine, start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return start_server(engine, metrics_port=0, metrics_host="127.0.0.1", limits=LimitsConfig(max_new_tokens=64))


# ---------------------------------------------------------------------------- the API


def test_get_info(client: AuditClient, engine: HFEngine) -> None:
    info = client.get_info()
    assert info == engine.info
    assert (info.model, info.n_layers, info.d_model) == ("tiny-llama", 4, D_MODEL)
    assert [(s.layer, s.d_sae, s.architecture) for s in info.saes] == [(1, 128, "jumprelu"), (2, 128, "jumprelu")]
    assert info.special_token_ids["I"] == engine.tokenizer.convert_tokens_to_ids("I")
    assert client.limits.max_new_tokens == 64 and client.limits.max_batch_items == 256
    assert isinstance(client, Engine)  # the client satisfies the engine protocol


def test_generate_equals_in_process_engine(client: AuditClient, engine: HFEngine) -> None:
    reqs = _requests()
    remote = client.generate(reqs)
    local = engine.generate(reqs)
    assert remote == local
    assert all(c.finish_reason in ("stop", "length") and c.prompt_tokens > 0 for c in remote)
    # the prompt/kwargs form builds the same requests
    again = client.generate(PROMPTS[1], _interventions()[0], max_new_tokens=6)
    assert again == engine.generate([Request(prompt=PROMPTS[1], interventions=tuple(_interventions()[0]),
                                             sampling=SamplingParams(max_new_tokens=6))])


def test_stream_concatenates_to_generate(client: AuditClient) -> None:
    reqs = _requests(max_new_tokens=24)
    full = client.generate(reqs)
    texts, finished = ["", ""], [0, 0]
    ids: list[list[int]] = [[], []]
    for ev in client.generate_stream(reqs):
        texts[ev.index] += ev.text_delta
        ids[ev.index] += ev.token_ids
        finished[ev.index] += ev.finished
        if ev.finished:
            assert ev.finish_reason == full[ev.index].finish_reason
    assert texts == [c.text for c in full]
    assert ids == [c.token_ids for c in full]
    assert finished == [1, 1]


def test_score_equals_engine(client: AuditClient, engine: HFEngine) -> None:
    reqs = _requests()
    i_id = client.info.special_token_ids["I"]
    remote = client.score(reqs, [i_id, 7], top_k=5, return_full_logprobs=True)
    local = engine.score(reqs, [i_id, 7], top_k=5, return_full_logprobs=True)
    for r, loc in zip(remote, local, strict=True):
        np.testing.assert_allclose(r.logprobs, loc.logprobs, rtol=0, atol=1e-6)
        assert r.top_token_ids is not None and r.full_logprobs is not None and r.top_logprobs is not None
        np.testing.assert_array_equal(r.top_token_ids, loc.top_token_ids)
        np.testing.assert_allclose(r.full_logprobs, loc.full_logprobs, atol=1e-6)
        assert r.full_logprobs.shape == (engine.vocab_size,)
    p = client.p_token(PROMPTS, i_id)
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))


def test_encode_equals_engine(client: AuditClient, engine: HFEngine) -> None:
    reqs = _requests()
    remote = client.encode(reqs, top_k=4)
    local = engine.encode(reqs, top_k=4)
    for r, loc in zip(remote, local, strict=True):
        assert r.token_ids == loc.token_ids and r.tokens == loc.tokens
        assert sorted(r.layers) == [1, 2]
        for ly in (1, 2):
            for a, b in zip(r.layers[ly].top_indices or [], loc.layers[ly].top_indices or [], strict=True):
                np.testing.assert_array_equal(a, b)
            for a, b in zip(r.layers[ly].top_values or [], loc.layers[ly].top_values or [], strict=True):
                np.testing.assert_allclose(a, b, atol=1e-6)
    chosen = client.encode(reqs, latents={2: [3, 9, 11]})
    local_chosen = engine.encode(reqs, latents={2: [3, 9, 11]})
    for r, loc in zip(chosen, local_chosen, strict=True):
        assert r.layers[2].values is not None and loc.layers[2].values is not None
        assert r.layers[2].values.shape == (len(r.token_ids), 3)
        np.testing.assert_allclose(r.layers[2].values, loc.layers[2].values, atol=1e-6)
        np.testing.assert_array_equal(r.layers[2].latents, [3, 9, 11])
    assert client.tokenize("The quick", raw=True) == [engine.tokenizer("The quick", add_special_tokens=False)["input_ids"]]


def test_residuals_and_loss_equal_engine(client: AuditClient, engine: HFEngine) -> None:
    reqs = _requests()
    remote = client.residuals(reqs, layers=[-1, 0, 3], positions=[0, -1, -2])
    local = engine.residuals(reqs, layers=[-1, 0, 3], positions=[0, -1, -2])
    assert remote.shape == (2, 3, 3, D_MODEL) and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, atol=1e-6)
    comps = [" Sure, here is how", None]
    rl = client.loss(reqs, comps)
    ll = engine.loss(reqs, comps)
    assert [r.n_tokens for r in rl] == [r.n_tokens for r in ll]
    np.testing.assert_allclose([r.loss for r in rl], [r.loss for r in ll], atol=1e-5)


def test_registered_artifacts_act_like_inline_values(client: AuditClient, server: ThreadedServer) -> None:
    vec = _direction(7)
    d = client.register_direction("refusal-dir", vec, layer=2, metadata={"source": "test"})
    assert d.id.startswith("dir_") and len(d.id) == 16 and d.kind == "direction"
    fs = client.register_latent_set("hydra", {1: [5, 3, 3, 9], 2: [1]}, metadata={"k": 3})
    assert fs.id.startswith("fs_") and fs.latents == {1: [3, 5, 9], 2: [1]}

    got = client.artifact(d.id)
    np.testing.assert_array_equal(got.direction, vec)
    assert got.metadata == {"source": "test"} and got.direction_layer == 2
    listed = {a.id: a for a in client.artifacts()}
    assert {d.id, fs.id} <= set(listed) and listed[d.id].direction is None  # listings carry no payload
    assert [a.id for a in client.artifacts("latent_set")].count(fs.id) == 1

    inline = tuple(float(x) for x in vec)
    by_id = [AblateDirection(direction_id=d.id), AddDirection(direction_id=d.id, layer=1, coefficient=2.0)]
    by_value = [AblateDirection(direction=inline), AddDirection(direction=inline, layer=1, coefficient=2.0)]
    i_id = client.info.special_token_ids["I"]
    a = client.score(PROMPTS, [i_id], interventions=by_id)
    b = client.score(PROMPTS, [i_id], interventions=by_value)
    assert [r.logprobs.tolist() for r in a] == [r.logprobs.tolist() for r in b]

    sa = client.generate(PROMPTS, [AblateLatents(latent_set_id=fs.id)], max_new_tokens=8)
    sb = client.generate(PROMPTS, [AblateLatents(latents={1: (3, 5, 9), 2: (1,)})], max_new_tokens=8)
    assert sa == sb
    ca = client.score(PROMPTS, [i_id], interventions=[ClampLatents(latent_set_id=fs.id, value=3.0)])
    cb = client.score(PROMPTS, [i_id], interventions=[ClampLatents(latents={1: (3, 5, 9), 2: (1,)}, value=3.0)])
    assert [r.logprobs.tolist() for r in ca] == [r.logprobs.tolist() for r in cb]
    xa = client.score(PROMPTS, [i_id], interventions=[ScaleLatents(latent_set_id=fs.id, factor=-3.0)])
    xb = client.score(PROMPTS, [i_id], interventions=[ScaleLatents(latents={1: (3, 5, 9), 2: (1,)}, factor=-3.0)])
    assert [r.logprobs.tolist() for r in xa] == [r.logprobs.tolist() for r in xb]

    # persisted: a fresh store over the same data dir resolves both ids
    assert server.handle is not None
    store = ArtifactStore(server.handle.config.data_dir)
    try:
        np.testing.assert_array_equal(store.direction(d.id), vec)
        assert store.latent_set(fs.id) == {1: [3, 5, 9], 2: [1]}
        assert (server.handle.config.data_dir / "artifacts" / f"{d.id}.safetensors").exists()
    finally:
        store.close()


def test_health_reflection_and_metrics(client: AuditClient, server: ThreadedServer) -> None:
    assert client.health() == "SERVING"
    assert client.health("refusal_audit.v1.AuditService") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"refusal_audit.v1.AuditService", "grpc.health.v1.Health"} <= names

    client.get_info()
    assert server.handle is not None and server.handle.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.handle.metrics_port}/metrics", timeout=10).read().decode()
    assert 'refusal_audit_requests_total{code="OK",method="GetInfo"}' in body
    assert "refusal_audit_request_seconds_bucket" in body
    assert "refusal_audit_generated_tokens_total" in body and "refusal_audit_inflight" in body


def test_jobs_unimplemented_without_a_jobs_service(client: AuditClient) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        client.stub.StartJob(pb.StartJobRequest(kind="stage1"), timeout=10)  # the raw stub raises grpc errors
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED and "jobs" in (exc.value.details() or "")


def test_async_client(server: ThreadedServer, client: AuditClient) -> None:
    reqs = _requests()

    async def main() -> None:
        async with AsyncAuditClient(server.address, timeout=60) as ac:
            info = await ac.get_info()
            assert info == client.info and ac.limits == client.limits
            assert await ac.health() == "SERVING"
            assert await ac.generate(reqs) == client.generate(reqs)
            texts = ["", ""]
            async for ev in ac.generate_stream(reqs):
                texts[ev.index] += ev.text_delta
            assert texts == [c.text for c in client.generate(reqs)]
            i_id = info.special_token_ids["I"]
            s = await ac.score(reqs, [i_id])
            np.testing.assert_allclose([r.logprobs for r in s], [r.logprobs for r in client.score(reqs, [i_id])])
            e = await ac.encode(reqs, top_k=3)
            assert [r.token_ids for r in e] == [r.token_ids for r in client.encode(reqs, top_k=3)]
            r = await ac.residuals(reqs, layers=[1])
            assert r.shape == (2, 1, 1, D_MODEL)
            lo = await ac.loss(reqs, ["abc", None])
            assert [x.n_tokens for x in lo] == [x.n_tokens for x in client.loss(reqs, ["abc", None])]
            art = await ac.register_latent_set("async-set", {2: [1, 2]})
            assert (await ac.artifact(art.id)).latents == {2: [1, 2]}
            assert art.id in {a.id for a in await ac.artifacts()}
            assert await ac.tokenize(PROMPTS) == client.tokenize(PROMPTS)
            np.testing.assert_allclose(await ac.p_token(reqs, i_id), client.p_token(reqs, i_id))
            ranked = await ac.sae_rows(direction=_direction(), top_k=3, decoder=False)
            local = client.sae_rows(direction=_direction(), top_k=3, decoder=False)
            assert {ly: list(x.latents) for ly, x in ranked.items()} == {ly: list(x.latents) for ly, x in local.items()}
            d = await ac.register_direction("async-dir", _direction(2), layer=1)
            got = await ac.artifact(d.id)
            assert got.direction is not None and got.direction_layer == 1
            np.testing.assert_allclose(got.direction, _direction(2))
            with pytest.raises(RemoteError) as exc:
                await ac.generate(PROMPTS, [AblateLatents(latent_set_id="fs_000000000000")])
            assert exc.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_thin_client_needs_no_torch(server: ThreadedServer) -> None:
    """The SDK (and the core CLI module) import and work with torch unavailable."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from refusal_audit.client import AuditClient, AblateLatents\n"
        "import refusal_audit.client.cli_core\n"
        f"c = AuditClient({server.address!r}, timeout=60)\n"
        "print(c.info.model, len(c.generate('hi', [AblateLatents(latents={1: (1,)})], max_new_tokens=2)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tiny-llama", "1"]


# ---------------------------------------------------------------------------- auth, TLS, jobs delegation


class FakeJobs:
    """Records delegated job RPCs."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.calls: list[str] = []

    async def StartJob(self, request: pb.StartJobRequest, context: Any) -> pb.Job:
        self.calls.append("StartJob")
        return pb.Job(id="job_1", kind=request.kind, state=pb.Job.QUEUED)

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any):
        for state in (pb.Job.RUNNING, pb.Job.SUCCEEDED):
            yield pb.JobEvent(job=pb.Job(id=request.id, state=state))


def test_auth_token_and_jobs_delegation(tmp_path: Path) -> None:
    jobs: dict[str, FakeJobs] = {}

    def factory(**kw: Any) -> FakeJobs:
        jobs["svc"] = FakeJobs(**kw)
        return jobs["svc"]

    cfg = ServerConfig(model="tiny-llama", port=0, data_dir=tmp_path, auth_token="s3cret", judge="substring")
    with ThreadedServer(cfg, build_engine(), jobs_factory=factory) as srv:
        for token in (None, "wrong"):
            with AuditClient(srv.address, token=token, timeout=30) as c:
                assert c.health() == "SERVING"  # health is exempt
                with pytest.raises(RemoteError) as exc:
                    c.get_info()
                assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(RemoteError) as exc:
                    list(c.generate_stream(PROMPTS[1], max_new_tokens=2))
                assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        with AuditClient(srv.address, token="s3cret", timeout=30) as c:
            assert c.get_info().model == "tiny-llama"
            assert len(c.generate(PROMPTS, max_new_tokens=3)) == 2
            job = c.stub.StartJob(pb.StartJobRequest(kind="stage1", config_json="{}"), metadata=c.metadata)
            assert job.id == "job_1" and job.kind == "stage1"
            events = list(c.stub.WatchJob(pb.WatchJobRequest(id="job_1"), metadata=c.metadata))
            assert [e.job.state for e in events] == [pb.Job.RUNNING, pb.Job.SUCCEEDED]
            with pytest.raises(grpc.RpcError) as rpc:
                c.stub.GetJob(pb.GetJobRequest(id="job_1"), metadata=c.metadata)
            assert rpc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    svc = jobs["svc"]
    assert svc.calls == ["StartJob"]
    assert set(svc.kw) >= {"engine", "artifacts", "judge", "data_dir", "max_concurrent"}
    assert svc.kw["judge"].name == "substring"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    cfg = ServerConfig(model="tiny-llama", port=0, data_dir=tmp_path / "d", tls_cert=cert, tls_key=key)
    with ThreadedServer(cfg, build_engine(), jobs_factory=no_jobs) as srv:
        with AuditClient(f"localhost:{srv.port}", tls_ca=cert, timeout=30) as c:
            assert c.get_info().model == "tiny-llama"
        with AuditClient(f"localhost:{srv.port}", timeout=5) as plain, pytest.raises(RemoteError) as exc:
            plain.get_info()
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- drain


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    """SIGTERM: the in-flight Generate still completes; then serve() returns and the port is closed."""
    cfg = ServerConfig(model="tiny-llama", port=0, data_dir=tmp_path, grace_s=30.0)
    results: dict[str, Any] = {}

    def ready(handle: Any) -> None:
        def drive() -> None:
            with AuditClient(handle.address, timeout=60) as c:
                started = threading.Event()

                def long_call() -> None:
                    started.set()
                    try:
                        results["completions"] = c.generate([PROMPTS[1]] * 4, max_new_tokens=400)
                    except Exception as exc:  # noqa: BLE001
                        results["error"] = exc

                t = threading.Thread(target=long_call)
                t.start()
                started.wait()
                deadline = time.time() + 20
                while handle.servicer.admission.count == 0 and time.time() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGTERM)
                t.join(60)
                results["address"] = handle.address

        threading.Thread(target=drive, daemon=True).start()

    asyncio.run(asyncio.wait_for(serve(cfg, engine=build_engine(), jobs_factory=no_jobs, ready=ready), 90))
    assert "error" not in results, results.get("error")
    assert len(results["completions"]) == 4
    assert all(c.finish_reason in ("stop", "length") for c in results["completions"])
    with AuditClient(results["address"], timeout=3) as c, pytest.raises(RemoteError) as exc:
        c.get_info()
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE


def _blas_has_floor() -> bool:
    import torch
    from refusal_audit.server.batch_invariant import NoRowFloor, row_floor

    try:
        row_floor(64, torch.float32, torch.device("cpu"))
        row_floor(128, torch.float32, torch.device("cpu"))
    except NoRowFloor:
        return False
    return True


def test_cli_serve_loads_model_and_saes_from_disk_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`refusal-audit serve --model DIR --sae L=DIR` in a subprocess: build_engine, serve, SIGTERM -> exit 0."""
    model_dir = tmp_path / "model"
    model = make_model("llama", seed=0)
    model.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    for layer, sae in make_saes(model, (1, 2)).items():
        sae.save_model(str(model_dir / f"sae{layer}"))  # type: ignore[attr-defined]
    cmd = [sys.executable, "-c", "from refusal_audit.client.cli import app; app()", "serve",
           "--model", str(model_dir), "--sae", f"1={model_dir / 'sae1'}", "--sae", f"2={model_dir / 'sae2'}",
           "--port", "0", "--data-dir", str(tmp_path / "data"), "--max-new-tokens", "32", "--grace", "5",
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        address = ""
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("serving "):
                address = line.rsplit(" on ", 1)[1].strip()
                break
        assert address, "the server did not start"
        with AuditClient(address, timeout=60) as c:
            info = c.get_info()
            assert [(s.layer, s.source) for s in info.saes] == [(1, str(model_dir / "sae1")), (2, str(model_dir / "sae2"))]
            assert c.limits.max_new_tokens == 32
            assert info.batch_invariant == _blas_has_floor()  # serve's default: on where it can be kept
            assert c.generate(PROMPTS, max_new_tokens=4) == build_engine(batch_invariant=info.batch_invariant).generate(
                [Request(prompt=p, sampling=SamplingParams(max_new_tokens=4)) for p in PROMPTS])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- core CLI


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    cli_core.register(app)
    return app


def _run(app: typer.Typer, server: ThreadedServer, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--server", server.address])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_cli_info_generate_score_activations(cli: typer.Typer, server: ThreadedServer, client: AuditClient) -> None:
    info = json.loads(_run(cli, server, "info", "--json"))
    assert info["model"] == "tiny-llama" and [s["layer"] for s in info["saes"]] == [1, 2]
    assert info["batch_invariant"] is False  # this fixture's engine is built in code: the mode is off
    assert "tiny-llama" in _run(cli, server, "info")

    out = json.loads(_run(cli, server, "generate", "How do I build a bomb?", "--json", "--max-new-tokens", "5",
                          "--ablate", "1:0,1,2", "--clamp", "2:4=2.5", "--scale", "1:5,6@-3",
                          "--scale", "2:9@-3", "--scope", "prompt"))
    expect = client.generate(
        [user_prompt("How do I build a bomb?")],
        [AblateLatents(latents={1: (0, 1, 2)}, scope=TokenScope(kind="prompt")),
         ClampLatents(latents={2: (4,)}, values={2: (2.5,)}, scope=TokenScope(kind="prompt")),
         ScaleLatents(latents={1: (5, 6), 2: (9,)}, factor=-3.0, scope=TokenScope(kind="prompt"))],
        max_new_tokens=5,
    )
    assert [o["text"] for o in out] == [c.text for c in expect]
    assert "How do I build" in _run(cli, server, "generate", "How do I build a bomb?", "--max-new-tokens", "3")
    streamed = _run(cli, server, "generate", "The quick brown", "--raw", "--stream", "--max-new-tokens", "5")
    assert streamed.rstrip("\n").endswith(client.generate("The quick brown", max_new_tokens=5)[0].text.rstrip("\n"))

    scores = json.loads(_run(cli, server, "score", "Tell me a story", "--target-token", "I", "--token-id", "7", "--json"))
    i_id = client.info.special_token_ids["I"]
    ref = client.score([user_prompt("Tell me a story")], [i_id, 7])[0]
    assert [s["token_id"] for s in scores[0]["tokens"]] == [i_id, 7]
    np.testing.assert_allclose([s["logprob"] for s in scores[0]["tokens"]], ref.logprobs, atol=1e-6)
    assert "Tell me a story" in _run(cli, server, "score", "Tell me a story")

    acts = json.loads(_run(cli, server, "activations", "The quick brown fox", "--raw", "--layer", "1",
                           "--top-k", "3", "--json"))
    enc = client.encode("The quick brown fox", layers=[1], top_k=3)[0]
    assert acts[0]["tokens"] == enc.tokens
    assert [t["latents"] for t in acts[0]["layers"]["1"]] == [ix.tolist() for ix in enc.layers[1].top_indices or []]
    assert "layer 1" in _run(cli, server, "activations", "The quick brown fox", "--raw", "--top-k", "2")


def test_cli_reports_errors_cleanly(cli: typer.Typer, server: ThreadedServer) -> None:
    result = CliRunner().invoke(cli, ["generate", "hi", "--ablate", "3:1", "--server", server.address])
    assert result.exit_code != 0
    assert "INVALID_ARGUMENT" in result.output and "no SAE at layer 3" in result.output
    result = CliRunner().invoke(cli, ["generate", "hi", "--ablate", "nonsense", "--server", server.address])
    assert result.exit_code != 0 and "--ablate" in result.output
    result = CliRunner().invoke(cli, ["generate", "hi", "--scale", "1:4@nan", "--server", server.address])
    assert result.exit_code != 0 and "--scale" in result.output and "finite" in result.output
    result = CliRunner().invoke(cli, ["generate", "hi", "--scale", "1:4", "--server", server.address])
    assert result.exit_code != 0 and "--scale" in result.output
