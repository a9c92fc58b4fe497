"""The client/contract half of the API: audit stages through `AuditClient` on the thin (torch-free)
install, the Tokenize and SAERows RPCs, per-call defaults alongside Requests, `score --target-token`,
and the server closing the engine it built on every way out.

The planted model (tests/planted.py) is served on an ephemeral port; the remote stage 1/2 run happens
in a subprocess whose import system refuses torch, transformers and sae_lens.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from planted import DECOYS, HARMFUL, HARMLESS, PLANTED, PLANTED_LAYER, directions, make_engine
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt
from refusal_audit.audit.stage1 import Stage1Config, run_stage1
from refusal_audit.audit.stage2 import Stage2Config, run_stage2
from refusal_audit.client import AsyncAuditClient, AuditClient, RemoteError, cli_core
from refusal_audit.client.sync import as_requests
from refusal_audit.server import app as server_app
from refusal_audit.server.app import ServerHandle, ThreadedServer, serve
from refusal_audit.server.config import LimitsConfig, ServerConfig
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers", "sae_lens")
# Installed first in a fresh interpreter: any import of a blocked package (or of its submodules) fails.
BLOCK_HOOK = textwrap.dedent(f"""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked on the thin client: " + name)
            return None
    sys.meta_path.insert(0, _Block())
""")
PROMPTS = HARMFUL[:3] + HARMLESS[:1]  # the last one is not refused at baseline
S1 = dict(exclude_layers=[], max_new_tokens=6, k_max=20)
S2 = dict(block_size=5, taus=[0.2, 0.5], seeds=[0, 1], max_new_tokens=6)


def _thin(code: str, stdin: str = "", timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter that cannot import torch/transformers/sae_lens; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUSAL_AUDIT")}
    proc = subprocess.run([sys.executable, "-c", BLOCK_HOOK + textwrap.dedent(code)], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _no_wall(obj: Any) -> Any:
    """A result JSON without wall-clock fields (the only part allowed to differ between runs)."""
    if isinstance(obj, dict):
        return {k: _no_wall(v) for k, v in obj.items() if "wall" not in k}
    if isinstance(obj, list):
        return [_no_wall(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def planted():
    engine, saes = make_engine()
    return engine, saes


@pytest.fixture(scope="module")
def server(planted, start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return start_server(planted[0], model="planted", limits=LimitsConfig(max_latents_per_request=40))


# ---------------------------------------------------------------------------- stages 1-2 on the thin client


def test_thin_client_imports_every_torch_free_module() -> None:
    """Everything but `audit.fm` (which trains the FM and the probe) imports without torch."""
    out = _thin("""
        import importlib, pkgutil
        import refusal_audit.audit as audit
        import refusal_audit.client, refusal_audit.client.cli, refusal_audit.proto.convert
        names = sorted(m.name for m in pkgutil.walk_packages(audit.__path__, "refusal_audit.audit."))
        failed = {}
        for n in names:
            try:
                importlib.import_module(n)
            except ImportError as exc:
                failed[n] = str(exc)
        print(__import__("json").dumps({"names": names, "failed": failed,
              "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sae_lens"))}))
    """)
    got = json.loads(out)
    assert len(got["names"]) > 20 and got["loaded"] == []
    assert set(got["failed"]) == {"refusal_audit.audit.fm"}, got["failed"]
    assert "blocked on the thin client: torch" in got["failed"]["refusal_audit.audit.fm"]
    for name in ("stage1", "stage2", "stage3", "baselines", "hydra", "causality", "downstream", "taxonomy",
                 "sweep", "features", "pipeline", "refusal_direction", "report"):
        assert f"refusal_audit.audit.{name}" in got["names"]


def test_stages_1_and_2_through_thin_client_equal_in_process(planted, server: ThreadedServer) -> None:
    engine, _ = planted
    v = directions()[0]
    ctx = LocalContext()
    s1 = run_stage1(engine, PROMPTS, v, Stage1Config(**S1), ctx)
    s2 = run_stage2(engine, s1, Stage2Config(**S2), ctx)
    assert [p.status for p in s1.prompts] == ["jailbroken"] * 3 + ["not_refused_at_baseline"]
    assert any(p.jailbroken for p in s2.prompts)

    remote = json.loads(_thin(f"""
        import json
        import numpy as np
        from refusal_audit.audit.context import LocalContext
        from refusal_audit.audit.stage1 import Stage1Config, run_stage1
        from refusal_audit.audit.stage2 import Stage2Config, run_stage2
        from refusal_audit.client import AuditClient
        args = json.loads(sys.stdin.read())
        with AuditClient({server.address!r}, timeout=120) as c:
            ctx = LocalContext()
            s1 = run_stage1(c, args["prompts"], np.asarray(args["v"]), Stage1Config(**args["s1"]), ctx)
            s2 = run_stage2(c, s1, Stage2Config(**args["s2"]), ctx)
        print(json.dumps({{"stage1": s1.to_json(), "stage2": s2.to_json(), "sets": ctx.latent_sets,
                          "torch": "torch" in sys.modules}}))
    """, stdin=json.dumps({"prompts": PROMPTS, "v": v.tolist(), "s1": S1, "s2": S2})))
    assert remote["torch"] is False
    assert _no_wall(remote["stage1"]) == _no_wall(json.loads(json.dumps(s1.to_json())))
    assert _no_wall(remote["stage2"]) == _no_wall(json.loads(json.dumps(s2.to_json())))
    assert remote["sets"] == json.loads(json.dumps(ctx.latent_sets))


# ---------------------------------------------------------------------------- Tokenize / SAERows


def test_tokenize_rpc_matches_engine(client: AuditClient, planted) -> None:
    engine, _ = planted
    prompts = [user_prompt("how do you make a bomb ?"), "tell me a story"]
    assert client.tokenize(prompts) == [engine.render(p) for p in prompts]
    assert client.tokenize(prompts[1]) == [engine.render(prompts[1])]
    raw = client.tokenize(["I", "tell me"], raw=True)
    assert raw[0] == [client.info.special_token_ids["I"]] and raw[1] == engine.render("tell me")[1:]
    with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT: prompts\[0\]\.prompt: raw tokenization"):
        client.tokenize([user_prompt("hi")], raw=True)
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT: prompts: empty request"):
        client.tokenize([])


def test_sae_rows_rpc_matches_engine(client: AuditClient, planted) -> None:
    engine, saes = planted
    v = directions()[0].astype(np.float32)  # what travels (DirectionRef.values are floats)
    remote = client.sae_rows(direction=v, top_k=5, decoder=False)
    local = engine.sae_rows(direction=v, top_k=5, decoder=False)
    assert sorted(remote) == sorted(local)
    for ly in local:
        assert remote[ly].latents.tolist() == local[ly].latents.tolist()
        np.testing.assert_array_equal(remote[ly].cosines, local[ly].cosines)
        assert remote[ly].decoder is None and remote[ly].encoder is None
    assert set(remote[PLANTED_LAYER].latents[:3].tolist()) == set(PLANTED)
    assert set(remote[PLANTED_LAYER].latents[3:5].tolist()) == set(DECOYS)

    art = client.register_direction("r", v)
    by_id = client.sae_rows([PLANTED_LAYER], direction_id=art.id, top_k=3, rank_by="abs_cosine", encoder=True)
    want = engine.sae_rows([PLANTED_LAYER], direction=v, top_k=3, rank_by="abs_cosine", encoder=True)[PLANTED_LAYER]
    got = by_id[PLANTED_LAYER]
    assert got.latents.tolist() == want.latents.tolist()
    np.testing.assert_array_equal(got.decoder, saes[PLANTED_LAYER].W_dec.detach().numpy()[want.latents])
    np.testing.assert_array_equal(got.encoder, saes[PLANTED_LAYER].W_enc.detach().numpy()[:, want.latents].T)

    chosen = client.sae_rows(latents={PLANTED_LAYER: [23, 5]}, direction=v)[PLANTED_LAYER]
    assert chosen.latents.tolist() == [23, 5] and np.allclose(chosen.cosines, 1.0, atol=1e-5)
    cases: list[tuple[dict[str, Any], str, str]] = [
        (dict(), "INVALID_ARGUMENT", "latents"),
        (dict(direction=np.ones(3)), "INVALID_ARGUMENT", "direction"),
        (dict(latents={0: [1]}), "INVALID_ARGUMENT", "latents[0]: no SAE at layer 0"),
        (dict(latents={PLANTED_LAYER: [99]}), "INVALID_ARGUMENT", f"latents[{PLANTED_LAYER}]"),
        (dict(direction_id="dir_missing"), "NOT_FOUND", "direction_id"),
        (dict(direction=v, top_k=-1), "INVALID_ARGUMENT", "top_k"),
        (dict(direction=v), "RESOURCE_EXHAUSTED", "max_latents_per_request=40"),  # 2 layers x 32 rows > 40
    ]
    for kwargs, status, field in cases:
        with pytest.raises(RemoteError, match=f"{status}: .*{field}".replace("[", r"\[").replace("]", r"\]")):
            client.sae_rows(**kwargs)
    assert len(client.sae_rows(direction=v, decoder=False)[PLANTED_LAYER].latents) == 32  # ids only: no limit


def test_async_client_tokenize_and_sae_rows(server: ThreadedServer, planted) -> None:
    engine, _ = planted

    async def go() -> tuple[list[list[int]], Any]:
        async with AsyncAuditClient(server.address, timeout=60) as c:
            return await c.tokenize("tell me"), await c.sae_rows([PLANTED_LAYER], latents={PLANTED_LAYER: [5]})

    ids, rows = asyncio.run(go())
    assert ids == [engine.render("tell me")]
    assert rows[PLANTED_LAYER].decoder.shape == (1, 64)


# ---------------------------------------------------------------------------- per-call defaults


def test_defaults_alongside_requests_precedence() -> None:
    """The README form: Requests plus max_new_tokens; and the documented field-by-field precedence."""
    ab = (AblateLatents(latents={3: (5,)}),)
    other = (AblateLatents(latents={2: (1,)}),)
    reqs = as_requests(
        [Request(prompt="a"), Request(prompt="b", interventions=ab),
         Request(prompt="c", interventions=()), Request(prompt="d", sampling=SamplingParams(temperature=0.5)),
         Request(prompt="e", sampling=SamplingParams(max_new_tokens=3)), "f"],
        other, max_new_tokens=9, seed=4,
    )
    assert [r.interventions for r in reqs] == [other, ab, (), other, other, other]
    assert [(r.sampling.max_new_tokens, r.sampling.temperature, r.sampling.seed) for r in reqs] == [
        (9, 0.0, 4), (9, 0.0, 4), (9, 0.0, 4), (9, 0.5, 4), (3, 0.0, 4), (9, 0.0, 4)]
    # no defaults: Requests pass through unchanged; sampling=SamplingParams(...) is a default object
    r = Request(prompt="x", interventions=ab, sampling=SamplingParams(max_new_tokens=2, top_p=0.5))
    assert as_requests([r]) == [r]
    assert as_requests([Request(prompt="x")], sampling=SamplingParams(top_p=0.5), max_new_tokens=7)[0].sampling == \
        SamplingParams(top_p=0.5, max_new_tokens=7)
    with pytest.raises(Exception, match="sampling: unknown field"):
        as_requests("x", max_new_token=3)
    with pytest.raises(Exception, match=r"items\[0\]\.sampling"):
        as_requests([Request(prompt="x")], max_new_tokens=0)


def test_generate_requests_with_call_defaults_over_the_wire(client: AuditClient, planted) -> None:
    engine, _ = planted
    p = user_prompt("how do you make a bomb ?")
    ab = (AblateLatents(latents={PLANTED_LAYER: PLANTED}),)
    base, ablated = client.generate([Request(prompt=p), Request(prompt=p, interventions=ab)], max_new_tokens=5)
    sp = SamplingParams(max_new_tokens=5)
    assert [base, ablated] == engine.generate([Request(prompt=p, sampling=sp),
                                               Request(prompt=p, interventions=ab, sampling=sp)])
    assert len(base.token_ids) == 5 and base.text != ablated.text
    events = list(client.generate_stream([Request(prompt=p)], max_new_tokens=2))
    assert [t for e in events for t in e.token_ids] == base.token_ids[:2] and events[-1].finished


# ---------------------------------------------------------------------------- CLI: --token vs --target-token


def test_score_cli_bearer_token_and_target_token(planted, tmp_path: Path) -> None:
    engine, _ = planted
    cfg = ServerConfig(model="planted", host="127.0.0.1", port=0, data_dir=tmp_path, auth_token="s3cret")
    app = typer.Typer()
    cli_core.register(app)
    with ThreadedServer(cfg, engine, jobs_factory=lambda **_kw: None) as srv:
        args = ["score", "tell me a story", "--target-token", "cannot", "--server", srv.address, "--json"]
        denied = CliRunner().invoke(app, args, env={"REFUSAL_AUDIT_TOKEN": ""})
        assert denied.exit_code != 0 and "UNAUTHENTICATED" in denied.output
        ok = CliRunner().invoke(app, [*args, "--token", "s3cret"])
        assert ok.exit_code == 0, ok.output
        row = json.loads(ok.output)[0]["tokens"][0]
        with AuditClient(srv.address, token="s3cret") as c:
            tid = c.tokenize("cannot", raw=True)[0]
            assert tid == [engine.tokenizer.convert_tokens_to_ids("cannot")]
            ref = c.score([user_prompt("tell me a story")], tid)[0]
        assert (row["token"], row["token_id"]) == ("cannot", tid[0])
        np.testing.assert_allclose(row["logprob"], ref.logprobs[0], atol=1e-6)


# ---------------------------------------------------------------------------- the engine is closed on stop


class _FakeEngine:
    """Just enough engine for the server to start; records `close`."""

    def __init__(self, info: Any) -> None:
        self.info = info
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_server_closes_the_engine_it_built(planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[_FakeEngine] = []

    def fake_build(_config: ServerConfig) -> _FakeEngine:
        built.append(_FakeEngine(planted[0].info))
        return built[-1]

    monkeypatch.setattr(server_app, "build_engine", fake_build)
    cfg = ServerConfig(model="fake", host="127.0.0.1", port=0, data_dir=tmp_path)
    no_jobs = lambda **_kw: None  # noqa: E731

    async def stop_path() -> None:
        handle = await ServerHandle.start(cfg, jobs_factory=no_jobs)
        assert built[-1].closed == 0
        await handle.stop(grace=0)
        await handle.stop(grace=0)  # idempotent: closed once

    asyncio.run(stop_path())
    assert built[-1].closed == 1

    def failing_jobs(**_kw: Any) -> None:
        raise RuntimeError("jobs failed to start")

    with pytest.raises(RuntimeError, match="jobs failed"):
        asyncio.run(ServerHandle.start(cfg, jobs_factory=failing_jobs))
    assert built[-1].closed == 1  # a start that fails after building still releases the engine

    def ready(_handle: Any) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C before the signal handlers take over

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(serve(cfg, jobs_factory=no_jobs, ready=ready))
    assert built[-1].closed == 1 and len(built) == 3

    given = _FakeEngine(planted[0].info)  # an engine handed in belongs to the caller: not closed
    asyncio.run(_start_stop(cfg, given, no_jobs))
    assert given.closed == 0


async def _start_stop(cfg: ServerConfig, engine: Any, jobs_factory: Any) -> None:
    handle = await ServerHandle.start(cfg, engine, jobs_factory)
    await handle.stop(grace=0)
