"""Jobs through a real server subprocess (tests/_serve_tiny.py): watch a refusal_rate job to the end
through the client, status codes, cancel (queued and running), the CLI, and a `kill -9` of the
server in the middle of a multi-prompt job: after a restart on the same data directory the job
resumes from its per-prompt checkpoints and completes, with no finished prompt lost or recomputed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.timeout(240)] if importlib.util.find_spec("pytest_timeout") else []

HERE = Path(__file__).resolve().parent
PROMPTS = [f"Tell me a story about a cat number {i}." for i in range(24)]


class ServerProc:
    """`python tests/_serve_tiny.py` on an ephemeral port; `port` once it printed READY."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_serve_tiny.py"), "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=self.log, env=env,
        )
        self.port = self._wait_ready(120.0)

    def _wait_ready(self, timeout: float) -> int:
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith(b"READY "):
                    found.append(int(line.split()[1]))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"server did not start; log:\n{(self.data_dir / 'server.log').read_text()[-3000:]}")
        return found[0]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs_server")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[ServerProc]:
    srv = ServerProc(data_dir)
    yield srv
    srv.stop()


def client_for(srv: ServerProc) -> Any:
    from refusal_audit.client.sync import AuditClient

    c = AuditClient(srv.address, timeout=30)
    c.wait_ready(30)
    return c


def rate_config(prompts: list[str], max_new_tokens: int = 4, batch_size: int = 4) -> dict[str, Any]:
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "batch_size": batch_size}


def test_watch_a_job_to_completion(server: ServerProc) -> None:
    with client_for(server) as client:
        job = client.jobs.start("refusal_rate", rate_config(PROMPTS[:6], batch_size=2))
        assert job.state in ("QUEUED", "RUNNING") and job.id.startswith("job_")
        events = list(client.jobs.watch(job.id, timeout=60))
        assert events[-1].job.state == "SUCCEEDED", events[-1].job.error
        assert [e.job.done for e in events if e.partial] == [2, 4, 6]  # one partial per batch of 2
        assert events[-1].job.done == events[-1].job.total == 6
        res = client.jobs.result(job.id)
        assert res.result["n"] == 6 and len(res.result["per_prompt"]) == 6
        assert res.result["judge"] == "substring+coherence"  # jobs judge through the coherence gate
        assert client.jobs.get(job.id).finished_at >= client.jobs.get(job.id).started_at > 0
        assert job.id in [j.id for j in client.jobs.list(kind="refusal_rate")]


def test_async_client_jobs(server: ServerProc) -> None:
    import asyncio

    from refusal_audit.client.aio import AsyncAuditClient

    async def main() -> None:
        client = AsyncAuditClient(server.address)
        try:
            job = await client.jobs.start("refusal_rate", rate_config(PROMPTS[:2]))
            states = [ev.job.state async for ev in client.jobs.watch(job.id, timeout=60)]
            assert states[-1] == "SUCCEEDED"
            assert (await client.jobs.result(job.id)).result["n"] == 2
            assert job.id in [j.id for j in await client.jobs.list(limit=5)]
        finally:
            await client.close()

    asyncio.run(main())


def test_status_codes(server: ServerProc) -> None:
    from refusal_audit.audit.errors import InvalidRequest, NotFound

    with client_for(server) as client:
        with pytest.raises(InvalidRequest, match="known kinds: .*refusal_rate"):
            client.jobs.start("nope", {})
        with pytest.raises(InvalidRequest, match=r"config\.max_new_tokens"):
            client.jobs.start("refusal_rate", {"prompts": ["x"], "max_new_tokens": 0})
        with pytest.raises(InvalidRequest, match=r"config\.direction_job_id: job 'job_missing' not found"):
            client.jobs.start("stage1", {"direction_job_id": "job_missing"})
        with pytest.raises(NotFound):
            client.jobs.get("job_missing")
        with pytest.raises(NotFound):
            list(client.jobs.watch("job_missing", timeout=10))


def test_cancel_queued_and_running(server: ServerProc) -> None:
    with client_for(server) as client:
        long = client.jobs.start("refusal_rate", rate_config(PROMPTS, max_new_tokens=16, batch_size=1))
        queued = client.jobs.start("refusal_rate", rate_config(PROMPTS[:2]))
        assert client.jobs.cancel(queued.id).state == "CANCELLED"  # max_concurrent=1: it was queued
        for ev in client.jobs.watch(long.id, timeout=60):
            if ev.job.done >= 1:
                break
        client.jobs.cancel(long.id)
        final = client.jobs.wait(long.id, timeout=60)
        assert final.state == "CANCELLED" and final.done < len(PROMPTS)
        assert client.jobs.result(long.id).result is None


def test_cli_show_list_and_report(server: ServerProc, tmp_path: Path) -> None:
    from refusal_audit.client.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    started = runner.invoke(app, ["job", "start", "refusal_rate", "--config", json.dumps(rate_config(PROMPTS[:2])),
                                  "--set", "max_new_tokens=3", "--watch", "--server", server.address])
    assert started.exit_code == 0, started.output
    job_id = started.stdout.strip().splitlines()[0]
    shown = runner.invoke(app, ["job", "show", job_id, "--json", "--server", server.address])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["job"]["state"] == "SUCCEEDED" and data["job"]["config"]["max_new_tokens"] == 3
    assert data["result"]["n"] == 2
    listed = runner.invoke(app, ["job", "list", "--json", "--server", server.address])
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]
    rep = runner.invoke(app, ["report", job_id, "--out", str(tmp_path / "rep"), "--server", server.address])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "rep" / "report.html").is_file()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["refusal_rate"]["n"] == 2
    missing = runner.invoke(app, ["job", "show", "job_missing", "--server", server.address])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


def test_kill9_mid_job_then_restart_resumes(server: ServerProc, data_dir: Path) -> None:
    """Runs last in this module: it kills the module's server."""
    n = len(PROMPTS)
    with client_for(server) as client:
        job = client.jobs.start("refusal_rate", rate_config(PROMPTS, max_new_tokens=12, batch_size=1))
        seen = 0
        for ev in client.jobs.watch(job.id, timeout=60):
            seen = ev.job.done
            if seen >= 4:
                break
    assert 4 <= seen < n, "the job finished before it could be killed"
    server.kill9()
    db = sqlite3.connect(data_dir / "jobs.sqlite")
    state, attempts = db.execute("SELECT state, attempts FROM jobs WHERE id=?", (job.id,)).fetchone()
    committed = db.execute("SELECT COUNT(*) FROM checkpoints WHERE job_id=?", (job.id,)).fetchone()[0]
    db.close()
    assert (state, attempts) == ("RUNNING", 1) and committed >= seen  # reported => committed

    restarted = ServerProc(data_dir)
    try:
        with client_for(restarted) as client:
            final = client.jobs.wait(job.id, timeout=90)
            assert final.state == "SUCCEEDED", final.error
            assert final.attempts == 2
            res = client.jobs.result(job.id).result
        assert res["n"] == n and [r["index"] for r in res["per_prompt"]] == list(range(n))
        assert res["resumed_prompts"] == committed  # every finished prompt restored, none recomputed
        assert [r["prompt"] for r in res["per_prompt"]] == PROMPTS
    finally:
        restarted.stop()
