"""Engine replicas on a local Ray cluster (the `[ray]` extra; CI runs this in its own step).

Two replicas of the planted tiny model (saved to disk and loaded by each actor with the server's
own loader, one torch thread each) behind one gRPC server, against the same model served by one
in-process engine:
- a stage-2 job over 8 prompts gives the single engine's result, its (prompt, seed) units spread
  over both replicas (`placement`, `job show`);
- killing one replica's process mid-job (SIGKILL): Ray restarts it, its unit re-runs, same result;
- interactive Generate/Score during the jobs, with a registered latent set (an artifact that must
  reach every replica), are exactly the single engine's;
- per-replica series under the one /metrics.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the [ray] extra (pip install -e '.[ray]')")

from _fanout_common import assert_same, normalized, stage1_result  # noqa: E402
from planted import DISTRACTOR_LAYER, HARMFUL, HARMLESS, PLANTED, PLANTED_LAYER  # noqa: E402
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt  # noqa: E402
from refusal_audit.client import AuditClient  # noqa: E402
from refusal_audit.server.app import ThreadedServer, build_engine  # noqa: E402
from refusal_audit.server.config import RayConfig, ServerConfig  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

STAGE2 = {"max_new_tokens": 6, "stage1_result": stage1_result(8)}


def _save_planted(root: Path) -> tuple[str, list[str]]:
    import planted

    model, tok, saes = planted.make_model(), planted.make_tokenizer(), planted.make_saes()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for layer, sae in saes.items():
        sae.save_model(str(root / f"sae{layer}"))
    return str(root / "model"), [f"{layer}={root / f'sae{layer}'}" for layer in sorted(saes)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ray")
    model, saes = _save_planted(root)
    for attempt in (1, 2):  # Ray gives its raylet 30 s to register: not always enough on a loaded 2-core box
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024**2)
            break
        except Exception as exc:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({exc}); retrying once")
    single_cfg = ServerConfig(model=model, saes=saes, port=0, data_dir=root / "single", grace_s=1.0)
    ray_cfg = ServerConfig(
        model=model, saes=saes, port=0, data_dir=root / "ray", grace_s=1.0,
        ray=RayConfig(replicas=2, num_cpus=1, torch_threads=1, max_restarts=2, max_retries=3),
    )
    single = ThreadedServer(single_cfg, engine=build_engine(single_cfg)).start()
    replicated = ThreadedServer(ray_cfg).start()  # builds the replicas itself
    try:
        yield single, replicated
    finally:
        replicated.stop()
        single.stop()
        ray.shutdown()
        torch.set_num_threads(threads)


def _interactive_matches(c_ray: AuditClient, c_one: AuditClient, set_ray: str, set_one: str) -> None:
    """Generate and Score on the replicas equal the single engine's, per request and exactly."""
    greedy = SamplingParams(max_new_tokens=6)
    prompts = [user_prompt(HARMFUL[9]), user_prompt(HARMLESS[3])]

    def reqs(set_id: str) -> list[Request]:
        return [Request(prompt=prompts[0], sampling=greedy),
                Request(prompt=prompts[0], interventions=(AblateLatents(latent_set_id=set_id),), sampling=greedy),
                Request(prompt=prompts[1], interventions=(AblateLatents(latents={DISTRACTOR_LAYER: (1, 2)}),),
                        sampling=greedy)]

    a, b = c_ray.generate(reqs(set_ray)), c_one.generate(reqs(set_one))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and [x.text for x in a] == [x.text for x in b]
    tok = c_one.get_info().special_token_ids["I"]
    sa, sb = c_ray.score(reqs(set_ray), [tok], top_k=3), c_one.score(reqs(set_one), [tok], top_k=3)
    for x, y in zip(sa, sb, strict=True):
        assert np.array_equal(x.logprobs, y.logprobs) and np.array_equal(x.top_token_ids, y.top_token_ids)
    assert sa[0].logprobs[0] != sa[1].logprobs[0]  # the registered set does change P("I")


def test_stage2_job_on_two_replicas_equals_one_engine_even_when_a_replica_dies(servers):
    single, replicated = servers
    rs = replicated.handle.engine
    assert rs.replica_names == ["replica-0", "replica-1"]
    with AuditClient(single.address) as c_one, AuditClient(replicated.address) as c_ray:
        planted_set = {PLANTED_LAYER: list(PLANTED)}
        set_one = c_one.register_latent_set("planted", planted_set).id
        set_ray = c_ray.register_latent_set("planted", planted_set).id

        base = c_one.jobs.wait(c_one.jobs.start("stage2", STAGE2).id, timeout=400)
        assert base.state == "SUCCEEDED", base.error
        expected = c_one.jobs.result(base.id).result
        assert sum(p["jailbroken"] for p in expected["prompts"]) >= 1

        # 1. clean run, interactive calls while it runs
        job = c_ray.jobs.start("stage2", STAGE2)
        _interactive_matches(c_ray, c_one, set_ray, set_one)
        done = c_ray.jobs.wait(job.id, timeout=400)
        assert done.state == "SUCCEEDED", done.error
        got = c_ray.jobs.result(job.id).result
        assert_same(normalized(got), normalized(expected))
        ran_on = {r for where in got["placement"].values() for r in where.values()}
        assert ran_on == {"replica-0", "replica-1"} and len(got["placement"]) == 8

        # 2. SIGKILL one replica's process while it runs a unit: Ray restarts it, the unit re-runs
        victim = "replica-1"
        pid = rs.replica_pid(victim)
        lost_before = {s.name: s.failures for s in rs.stats()}[victim]
        job = c_ray.jobs.start("stage2", STAGE2)
        deadline = time.monotonic() + 120
        while c_ray.jobs.get(job.id).done < 2 or rs.inflight(victim) == 0:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        _interactive_matches(c_ray, c_one, set_ray, set_one)  # served by the other replica meanwhile
        done = c_ray.jobs.wait(job.id, timeout=400)
        assert done.state == "SUCCEEDED", done.error
        assert_same(normalized(c_ray.jobs.result(job.id).result), normalized(expected))
        # liveness only, not speed: a new replica process imports torch and loads the model, which took
        # over 120 s on a 2-core box busy with another test run
        deadline = time.monotonic() + 600
        while not {s.name: s for s in rs.stats()}[victim].restarts:  # back in a new process
            assert time.monotonic() < deadline, "Ray did not restart the killed replica"
            time.sleep(0.2)
        stats = {s.name: s for s in rs.stats()}
        assert stats[victim].failures > lost_before and stats[victim].alive
        assert rs.replica_pid(victim) != pid
        _interactive_matches(c_ray, c_one, set_ray, set_one)  # the restarted replica got the artifact too

    from prometheus_client import generate_latest

    text = generate_latest(replicated.handle.metrics.registry).decode()
    for name in ("queue_depth", "busy_seconds_total", "calls_total", "lost_calls_total", "up"):
        assert f'refusal_audit_replica_{name}{{replica="replica-0"}}' in text
    assert f'refusal_audit_replica_lost_calls_total{{replica="{victim}"}} 0.0' not in text


def test_artifact_ids_are_found_anywhere_in_a_payload():
    """Ids nested in attribution baselines, dicts and tuples reach the replicas too (no cluster needed)."""
    from refusal_audit.audit.spec import AblateDirection
    from refusal_audit.server.ray_replicas import _interventions_in

    req = Request(prompt="x", interventions=(AblateLatents(latent_set_id="fs_a"),))
    nested = {"request": [req], "baseline": {"interventions": (AblateDirection(direction_id="dir_b"),)},
              "direction": [0.5] * 64}
    ids = sorted(getattr(iv, "latent_set_id", None) or getattr(iv, "direction_id", "") for iv in _interventions_in(nested))
    assert ids == ["dir_b", "fs_a"]
