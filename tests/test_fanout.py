"""Jobs fanned out over engine replicas (server/jobs/fanout.py), without Ray: two in-process
"replicas" of the planted engine on threads, one of which loses its first unit (as a replica that
dies mid-job). The fanned-out job must give the single-engine result; Ray must not be imported."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from _fanout_common import assert_same, normalized, stage1_result
from planted import HARMFUL, HARMLESS, make_engine
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.stage2 import Stage2Config, run_stage2
from refusal_audit.server.jobs import fanout
from refusal_audit.server.jobs.kinds import RefusalRateConfig, run_refusal_rate

pytestmark = pytest.mark.usefixtures("one_thread")


class ThreadReplicas:
    """The `ReplicaSet` surface fanout uses, over one in-process engine and a thread pool."""

    def __init__(self, engine: Any, lose: int = 0) -> None:
        self.engine = engine
        self.rc = SimpleNamespace(unit_window=1, max_retries=2)
        self.pool = ThreadPoolExecutor(2)
        self.lose = lose
        self.ran: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def info(self) -> Any:
        return self.engine.info

    def generate(self, requests: Any) -> Any:
        return self.engine.generate(requests)

    def score(self, requests: Any, token_ids: Any, top_k: int = 0, return_full_logprobs: bool = False) -> Any:
        return self.engine.score(requests, token_ids, top_k, return_full_logprobs)

    def live_replicas(self) -> list[str]:
        return ["replica-0", "replica-1"]

    def inflight(self, name: str) -> int:
        return 0

    def submit_unit(self, fn: str, payload: dict[str, Any], replica: str | None = None) -> Future:
        name = replica or "replica-0"
        with self._lock:
            if self.lose:
                self.lose -= 1
                f: Future = Future()
                f.set_exception(fanout.ReplicaLost(f"replica {name} died"))
                return f

        def run() -> tuple[Any, str]:
            if ":" in fn:
                mod, _, attr = fn.partition(":")
                out = getattr(__import__(mod, fromlist=[attr]), attr)(self.engine, **payload)
            else:
                out = getattr(self.engine, fn)(**payload)
            with self._lock:
                self.ran.append((fn, name))
            return out, name

        return self.pool.submit(run)


@pytest.fixture(scope="module")
def engine():
    return make_engine()[0]


def test_stage2_fanned_out_equals_single_engine(engine):
    cfg = Stage2Config(max_new_tokens=6, seeds=[0, 1], taus=[0.1, 0.4, 0.8])
    s1 = stage1_result(4)
    single = run_stage2(engine, s1, cfg, LocalContext()).to_json()
    reps = ThreadReplicas(engine, lose=1)
    ctx = LocalContext()
    res = fanout.run_stage2(reps, s1, cfg, ctx)
    assert_same(normalized(res.to_json()), normalized(single))
    assert any(p.jailbroken for p in res.prompts)  # not a vacuous comparison
    # 4 prompts x 2 seeds ran (the lost unit re-ran), on both replicas; placement says where
    units = [r for r in reps.ran if r[0] == fanout.UNIT_STAGE2]
    assert len(units) == 8 and {n for _, n in units} == {"replica-0", "replica-1"}
    assert set(res.placement) == {f"stage2/prompt/{i}" for i in range(4)}
    assert ctx.checkpoints["placement/stage2/prompt/0"] == res.placement["stage2/prompt/0"]
    # resume: every prompt is checkpointed, so a second run sends no unit
    again = ThreadReplicas(engine)
    res2 = fanout.run_stage2(again, s1, cfg, ctx)
    assert again.ran == []
    assert_same(normalized(res2.to_json()), normalized(single))


def test_refusal_rate_fanned_out_equals_single_engine(engine):
    cfg = RefusalRateConfig(prompts=HARMFUL[:3] + HARMLESS[:2], max_new_tokens=5, batch_size=2)
    single, _ = run_refusal_rate(engine, cfg, LocalContext())
    reps = ThreadReplicas(engine, lose=1)
    res, _ = run_refusal_rate(reps, cfg, LocalContext())
    assert_same(normalized(res), normalized(single))
    assert 0 < single["n_refused"] < 5
    assert sorted(res["placement"]) == [str(i) for i in range(5)]


def test_without_the_ray_extra_nothing_imports_ray():
    """The default server, jobs and CLI never import Ray; `--ray` without it is a clear error."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if the extra were not installed
        "import refusal_audit.server.app as app, refusal_audit.server.jobs, refusal_audit.client.cli\n"
        "from refusal_audit.server.config import ServerConfig, RayConfig\n"
        "assert ServerConfig().ray is None\n"
        "try:\n"
        "    app.build_engine(ServerConfig(model='x', ray=RayConfig(replicas=2)))\n"
        "except RuntimeError as exc:\n"
        "    print('ERR', exc)\n"
        "print('LOADED', sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR --ray needs Ray: pip install 'refusal-audit[ray]'" in out.stdout
    assert "LOADED ['ray']" in out.stdout  # only our None placeholder: no ray submodule was imported
