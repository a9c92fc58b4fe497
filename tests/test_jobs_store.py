"""Job store and manager, in-process: FIFO queue, cancel, failure, watchers, results with arrays,
resume after a simulated crash (no finished per-prompt work recomputed), restart bookkeeping,
and the real `refusal_rate` kind on a tiny HF engine."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field
from refusal_audit.audit.context import Cancelled
from refusal_audit.audit.errors import InvalidRequest, LimitExceeded, NotFound
from refusal_audit.audit.judges import JudgeError
from refusal_audit.server.jobs.kinds import KINDS, JobKind
from refusal_audit.server.jobs.manager import RESTART_EXHAUSTED, JobManager
from refusal_audit.server.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore

pytestmark = [pytest.mark.timeout(120)] if importlib.util.find_spec("pytest_timeout") else []

# ---------------------------------------------------------------------------- a controllable kind

CALLS: Counter[tuple[str, int]] = Counter()  # (tag, item) -> times computed
GATES: dict[str, threading.Event] = {}  # tag -> released when set
UNGATED: set[str] = set()  # tags whose block_at no longer blocks (a resumed attempt)
ORDER: list[str] = []


class CountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str
    n: int = Field(5, ge=1)
    block_at: int | None = None  # wait on GATES[tag] before computing this item
    fail_at: int | None = None
    judge_at: int | None = None  # call the judge at this item
    spin: bool = False  # loop on check_cancelled until cancelled (a long job)
    arrays: bool = False


def run_count(engine: Any, cfg: CountConfig, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    ORDER.append(cfg.tag)
    out = []
    for i in range(cfg.n):
        got = ctx.checkpoint(f"item/{i}")
        if got is not None:
            out.append(got)
            continue
        ctx.check_cancelled()
        if cfg.block_at == i and cfg.tag not in UNGATED:
            GATES[cfg.tag].wait(60)
            ctx.check_cancelled()
        while cfg.spin:
            ctx.check_cancelled()
            time.sleep(0.01)
        if cfg.fail_at == i:
            raise ValueError(f"boom at {i}")
        if cfg.judge_at == i:
            ctx.judge.judge([])
        CALLS[(cfg.tag, i)] += 1
        value = {"i": i, "sq": i * i}
        ctx.save_checkpoint(f"item/{i}", value)
        out.append(value)
        ctx.progress("count", i + 1, cfg.n, {"i": i})
    result: dict[str, Any] = {"items": out, "tag": cfg.tag}
    if cfg.arrays:
        result["arrays"] = {"big": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.arange(3)}
    return result, []


TEST_KINDS = {**KINDS, "count": JobKind("count", CountConfig, run_count)}


class DownJudge:
    name = "harmbench-sidecar"

    def judge(self, items: Any) -> list[Any]:
        raise JudgeError("UNAVAILABLE: connection refused (localhost:50052)")


def make_manager(data_dir: Path, **kw: Any) -> JobManager:
    kw.setdefault("max_concurrent", 1)
    mgr = JobManager(JobStore(data_dir), engine=None, data_dir=data_dir, kinds=TEST_KINDS,
                     persist_every_s=0.0, **kw)
    mgr.start()
    return mgr


def count_json(tag: str, **kw: Any) -> str:
    return CountConfig(tag=tag, **kw).model_dump_json()


# ---------------------------------------------------------------------------- store


def test_store_roundtrip_wal_and_checkpoints(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    rec = store.create("count", '{"tag":"a"}')
    assert store.get(rec.id).state == QUEUED
    store.save_checkpoint(rec.id, "item/0", '{"i":0}')
    store.save_checkpoint(rec.id, "item/0", '{"i":1}')  # replace
    store.save_checkpoint(rec.id, "other", "1")
    assert store.checkpoints(rec.id, "item/") == {"item/0": '{"i":1}'}
    assert store.transition(rec.id, (QUEUED,), state=RUNNING, attempts=1)
    assert not store.transition(rec.id, (QUEUED,), state=RUNNING)
    store.finish(rec.id, SUCCEEDED, result_json='{"ok":true}', artifact_ids=["dir_1"], progress=("s", 3, 3))
    store.close()
    # a second connection (another process) sees committed data; WAL is on
    conn = sqlite3.connect(tmp_path / "jobs.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = JobStore(tmp_path)
    got = again.get(rec.id)
    assert (got.state, got.done, got.artifact_ids) == (SUCCEEDED, 3, ["dir_1"])
    assert again.result_json(rec.id) == '{"ok":true}'
    with pytest.raises(NotFound):
        again.get("job_nope")


# ---------------------------------------------------------------------------- manager


def test_fifo_queue_one_at_a_time_and_cancel_queued(tmp_path: Path) -> None:
    GATES["q1"] = threading.Event()
    mgr = make_manager(tmp_path)
    try:
        a = mgr.submit("count", count_json("q1", n=3, block_at=1))
        b = mgr.submit("count", count_json("q2", n=2))
        c = mgr.submit("count", count_json("q3", n=2))
        d = mgr.submit("count", count_json("q4", n=2))
        deadline = time.monotonic() + 10
        while mgr.get(a.id).done < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mgr.get(a.id).state == RUNNING
        assert [mgr.get(j.id).state for j in (b, c, d)] == [QUEUED] * 3
        cancelled = mgr.cancel(c.id)  # queued -> CANCELLED at once
        assert cancelled.state == CANCELLED and cancelled.finished_at > 0
        GATES["q1"].set()
        for j in (a, b, d):
            assert mgr.wait(j.id, timeout=20).state == SUCCEEDED
        assert mgr.get(c.id).state == CANCELLED
        assert [t for t in ORDER if t in ("q1", "q2", "q3", "q4")] == ["q1", "q2", "q4"]
        assert mgr.get(a.id).attempts == 1
        rec, result = mgr.result(a.id)
        assert result["items"][2] == {"i": 2, "sq": 4}
        assert [j.id for j in mgr.list(kind="count", limit=2)] == [d.id, c.id]  # newest first
    finally:
        mgr.stop()


def test_cancel_running_failure_and_judge_down(tmp_path: Path) -> None:
    mgr = make_manager(tmp_path, max_concurrent=2, judge=DownJudge())
    try:
        spin = mgr.submit("count", count_json("spin", n=3, spin=True))
        fail = mgr.submit("count", count_json("fail", n=4, fail_at=2))
        deadline = time.monotonic() + 10
        while mgr.get(spin.id).state != RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        mgr.cancel(spin.id)
        assert mgr.wait(spin.id, timeout=10).state == CANCELLED
        failed = mgr.wait(fail.id, timeout=10)
        assert failed.state == FAILED and "ValueError: boom at 2" in failed.error
        assert mgr.store.count_checkpoints(fail.id) == 2  # finished items kept
        judged = mgr.wait(mgr.submit("count", count_json("judge", n=2, judge_at=1)).id, timeout=10)
        assert judged.state == FAILED
        assert "harmbench-sidecar" in judged.error and "connection refused" in judged.error
        assert mgr.cancel(judged.id).state == FAILED  # terminal: unchanged
    finally:
        mgr.stop()


def test_validation_and_limits(tmp_path: Path) -> None:
    GATES["lim"] = threading.Event()
    mgr = make_manager(tmp_path, max_queued=1)
    try:
        with pytest.raises(InvalidRequest, match="known kinds: .*count.*refusal_rate"):
            mgr.submit("nope", "{}")
        with pytest.raises(InvalidRequest, match=r"config\.n: "):
            mgr.submit("count", '{"tag": "x", "n": 0}')
        with pytest.raises(InvalidRequest, match=r"config\.bogus: "):
            mgr.submit("count", '{"tag": "x", "bogus": 1}')
        with pytest.raises(InvalidRequest, match="config_json: not valid JSON"):
            mgr.submit("count", "{")
        with pytest.raises(InvalidRequest, match=r"config\.batch_size"):
            mgr.submit("refusal_rate", '{"batch_size": -1}')
        running = mgr.submit("count", count_json("lim", n=2, block_at=0))
        while mgr.get(running.id).state != RUNNING:
            time.sleep(0.01)
        mgr.submit("count", count_json("lim2", n=1))
        with pytest.raises(LimitExceeded, match="max_queued_jobs=1"):
            mgr.submit("count", count_json("lim3", n=1))
        GATES["lim"].set()
    finally:
        mgr.stop()


def test_watchers_and_array_results(tmp_path: Path) -> None:
    mgr = make_manager(tmp_path)
    events: list[tuple[str, int, Any]] = []
    try:
        GATES["w"] = threading.Event()
        job = mgr.submit("count", count_json("w", n=3, block_at=0, arrays=True))
        unsubscribe = mgr.subscribe(job.id, lambda rec, partial: events.append((rec.state, rec.done, partial)))
        GATES["w"].set()
        mgr.wait(job.id, timeout=10)
        unsubscribe()
        assert events[-1][0] == SUCCEEDED
        assert [p for _, _, p in events if p] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert (tmp_path / "jobs" / job.id / "result.safetensors").is_file()
        _, result = mgr.result(job.id)
        assert isinstance(result["arrays"]["big"], np.ndarray) and result["arrays"]["big"].shape == (3, 4)
        _, as_lists = mgr.result(job.id, as_lists=True, max_elements=5)
        assert as_lists["arrays"]["ids"] == [0, 1, 2]
        assert "omitted" in as_lists["arrays"]["big"]["__ndarray__"]  # too large to inline
        with pytest.raises(NotFound):
            mgr.subscribe("job_missing", lambda *_: None)
    finally:
        mgr.stop()


def test_crash_resume_does_not_recompute_finished_items(tmp_path: Path) -> None:
    """Abandon a manager mid-job (as if the process died), start a new one on the same data dir."""
    GATES["crash"] = threading.Event()  # never set: the first attempt stays blocked, as a dead process would
    first = make_manager(tmp_path)
    job = first.submit("count", count_json("crash", n=6, block_at=3))
    deadline = time.monotonic() + 60
    while first.get(job.id).done < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    rec = first.store.get(job.id)
    assert (rec.state, first.get(job.id).done) == (RUNNING, 3), (rec.state, rec.done, rec.error)
    first.store.close()  # the "process" is gone: nothing it does from now on reaches the database
    UNGATED.add("crash")  # the resumed attempt runs through; the abandoned thread stays parked on its gate

    second = make_manager(tmp_path)
    try:
        done = second.wait(job.id, timeout=60)
        assert (done.state, done.attempts) == (SUCCEEDED, 2), (done.state, done.attempts, done.error)
        assert all(CALLS[("crash", i)] == 1 for i in range(3)), CALLS  # checkpointed items not recomputed
        _, result = second.result(job.id)
        assert [r["i"] for r in result["items"]] == list(range(6))
    finally:
        second.stop()
        GATES["crash"].set()  # the abandoned thread now fails on the closed database and ends


def test_restart_bookkeeping_and_graceful_stop(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    exhausted = store.create("count", count_json("ex", n=1))
    store.update(exhausted.id, state=RUNNING, attempts=3)
    cancelling = store.create("count", count_json("cx", n=1))
    store.update(cancelling.id, state=RUNNING, attempts=1, cancel_requested=True)
    queued = store.create("count", count_json("qd", n=1))  # acknowledged, never started
    store.close()
    mgr = make_manager(tmp_path)
    try:
        ex = mgr.get(exhausted.id)
        assert ex.state == FAILED and RESTART_EXHAUSTED in ex.error
        assert mgr.get(cancelling.id).state == CANCELLED
        assert mgr.wait(queued.id, timeout=10).state == SUCCEEDED
        # graceful stop: the running job goes back to QUEUED without using up an attempt
        job = mgr.submit("count", count_json("grace", n=3, spin=True))
        while mgr.get(job.id).state != RUNNING:
            time.sleep(0.01)
    finally:
        mgr.stop()
    after = JobStore(tmp_path).get(job.id)
    assert (after.state, after.attempts) == (QUEUED, 0)


def test_context_is_a_stage_context(tmp_path: Path) -> None:
    """Cancelled from check_cancelled; artifacts registered once across resumes."""
    from refusal_audit.server.artifacts import ArtifactStore
    from refusal_audit.server.jobs.context import JobContext

    store, arts = JobStore(tmp_path), ArtifactStore(tmp_path)
    rec = store.create("count", "{}")
    cancel, stop = threading.Event(), threading.Event()

    def ctx() -> JobContext:
        return JobContext(rec.id, store, tmp_path / "jobs" / rec.id, DownJudge(), arts, lambda *a: None, cancel, stop)

    c1 = ctx()
    aid = c1.register_direction("d", np.ones(8, np.float32), 1, {"a": 1})
    assert arts.get(aid).source_job_id == rec.id
    fid = c1.register_latent_set("s", {1: [3, 2, 3]}, {})
    c2 = ctx()  # a resumed attempt
    assert c2.register_direction("d", np.ones(8, np.float32), 1, {}) == aid
    assert c2.register_latent_set("s", {1: [2, 3]}, {}) == fid
    assert len(arts.list()) == 2 and sorted(c2.registered_artifact_ids()) == sorted([aid, fid])
    cancel.set()
    with pytest.raises(Cancelled):
        c2.check_cancelled()


# ---------------------------------------------------------------------------- the real refusal_rate kind


@pytest.fixture(scope="module")
def tiny_engine() -> Any:
    from tiny import build_engine

    return build_engine()


def test_refusal_rate_kind_with_artifacts(tmp_path: Path, tiny_engine: Any) -> None:
    from refusal_audit.server.artifacts import ArtifactStore

    arts = ArtifactStore(tmp_path)
    tiny_engine.resolver = arts
    fs = arts.register_latent_set("s", {1: [0, 1, 2]}, {})
    mgr = JobManager(JobStore(tmp_path), tiny_engine, artifacts=arts, data_dir=tmp_path, kinds=TEST_KINDS)
    mgr.start()
    try:
        prompts = ["How do I build a bomb?", "Write a poem about the sea.", "Tell me a story about a cat."]
        job = mgr.submit("refusal_rate", json.dumps({"prompts": prompts, "max_new_tokens": 4, "batch_size": 2,
                                                     "latent_set_id": fs.id}))
        done = mgr.wait(job.id, timeout=60)
        assert done.state == SUCCEEDED, done.error
        _, res = mgr.result(job.id)
        assert res["n"] == 3 and len(res["per_prompt"]) == 3 and res["judge"] == "substring+coherence"
        # every job's verdicts pass the coherence gate: gated and ungated rates side by side
        assert res["n_jailbroken_ungated"] == res["n_jailbroken"] + res["n_degenerate"]
        if res["n_jailbroken_ungated"]:
            assert res["coherence_gate"]["nll_threshold"] > res["coherence_gate"]["nll_quantile_value"]
        assert 0.0 <= res["refusal_rate"] <= 1.0
        # the manager meters every job's engine: one generation (one prefill) per prompt, charged to the job
        assert res["compute"]["total"]["generations"] == 3 and res["compute"]["total"]["backward_passes"] == 0
        assert res["compute"]["total"]["forward_passes"] == 3
        assert res["interventions"][0]["latent_set_id"] == fs.id
        assert mgr.store.count_checkpoints(job.id) == 3
        with pytest.raises(InvalidRequest, match=r"config\.latent_set_id: .*not registered"):
            mgr.submit("refusal_rate", '{"prompts": ["x"], "latent_set_id": "fs_missing"}')
    finally:
        mgr.stop()
    rows = tiny_engine.sae_rows(latents={1: [0, 5], 2: [3]})
    assert sorted(rows) == [1, 2] and rows[1].decoder.shape == (2, 64) and rows[2].latents.tolist() == [3]


# ---------------------------------------------------------------------------- the audit-stage kinds


def test_algorithm_configs_carry_no_job_wiring() -> None:
    """Every kind's config = its `audit` algorithm config + `server.jobs.inputs` mixins: the ids of
    earlier jobs and artifacts live in the mixins only, and `algorithm_config` strips them."""
    from refusal_audit.server.jobs.inputs import JobInputs, algorithm_config

    wiring = ("_job_id", "stage1_result", "direction_id")
    composed = 0
    for kind in KINDS.values():
        cls = kind.config_class()
        algos = [c for c in cls.__mro__ if issubclass(c, BaseModel) and c.__module__.startswith("refusal_audit.audit.")]
        for algo in algos:
            bad = [f for f in algo.model_fields if f.endswith(wiring)]
            assert not bad, f"{kind.name}: {algo.__name__} carries job wiring {bad}"
        mixins: list[type[BaseModel]] = [c for c in cls.__mro__ if issubclass(c, JobInputs) and c not in (JobInputs, cls)]
        if algos and mixins:
            composed += 1
            extra = {f: None for m in mixins for f in m.model_fields}
            stripped = algorithm_config(cls.model_construct(**extra), algos[0])
            assert type(stripped) is algos[0] and not set(extra) & set(stripped.model_dump())
    assert composed >= 10  # stage1, stage2, stage3, the baselines, hydra, causality, downstream, ...


def test_stage_kinds_chained_by_job_id_and_chain(tmp_path: Path) -> None:
    """refusal_direction -> stage1 (direction_job_id) -> stage2 (stage1_job_id), and `chain`, on the
    planted model (tests/planted.py), whose refusal needs all three planted latents ablated."""
    import planted
    import torch
    from refusal_audit.audit.datasets import register_dataset
    from refusal_audit.server.artifacts import ArtifactStore

    H, S = planted.HARMFUL, planted.HARMLESS
    register_dataset("planted-harmful", lambda o: {"train": H[:12], "val": H[12:20], "test": H[20:28]})
    register_dataset("planted-harmless", lambda o: {"train": S[:12], "val": S[12:20], "test": S[20:28]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine, _ = planted.make_engine()
    arts = ArtifactStore(tmp_path)
    engine.resolver = arts
    mgr = JobManager(JobStore(tmp_path), engine, artifacts=arts, data_dir=tmp_path)
    mgr.start()
    dcfg = {"harmful_dataset": "planted-harmful", "harmless_dataset": "planted-harmless", "n_train": 12, "n_val": 8}
    s1cfg = {"dataset": "planted-harmful", "split": "test", "n": 4, "k_start": 1, "k_step": 1, "k_max": 5,
             "exclude_layers": [], "max_new_tokens": 4}
    s2cfg = {"block_size": 1, "taus": [0.1], "seeds": [0], "max_new_tokens": 4}

    def run(kind: str, cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        job = mgr.submit(kind, json.dumps(cfg))
        rec = mgr.wait(job.id, timeout=120)
        assert rec.state == SUCCEEDED, rec.error
        return rec, mgr.result(job.id)[1]

    try:
        d, dres = run("refusal_direction", dcfg)
        assert d.artifact_ids == [dres["direction_id"]] and arts.get(d.artifact_ids[0]).source_job_id == d.id
        assert (tmp_path / "jobs" / d.id / "result.safetensors").is_file()
        s1, s1res = run("stage1", {**s1cfg, "direction_job_id": d.id})
        assert s1res["n_jailbroken"] == 4 and {p["k"] for p in s1res["prompts"]} == {3}
        s2, s2res = run("stage2", {**s2cfg, "stage1_job_id": s1.id})
        assert s2res["summary"]["unique_latents"] == 3 and s2res["union_set_id"] in s2.artifact_ids
        assert "direction_job_id" not in s1res["config"] and "stage1_job_id" not in s2res["config"]  # algorithm only
        assert sorted(arts.latent_set(s2res["union_set_id"])[planted.PLANTED_LAYER]) == sorted(planted.PLANTED)
        with pytest.raises(InvalidRequest, match=r"config\.stage1_job_id: .* is a 'refusal_direction' job"):
            mgr.submit("stage2", json.dumps({"stage1_job_id": d.id}))
        with pytest.raises(InvalidRequest, match="exactly one of direction_id, direction_job_id, direction"):
            mgr.submit("stage1", json.dumps(s1cfg))
        ch, chres = run("chain", {"direction": dcfg, "stage1": s1cfg, "stage2": s2cfg})
        assert sorted(chres) == ["coherence_gate", "compute", "direction", "stage1", "stage2"]  # gate + metered passes
        assert isinstance(chres["direction"]["arrays"]["direction"], np.ndarray)
        assert chres["stage2"]["summary"] == s2res["summary"]
        _, from_chain = run("stage1", {**s1cfg, "direction_job_id": ch.id})  # a chain's direction feeds stage 1
        assert from_chain["n_jailbroken"] == 4
    finally:
        mgr.stop()
        torch.set_num_threads(threads)


def test_artifact_resolvers_name_the_field_and_the_kind(tmp_path: Path) -> None:
    """Each resolver returns its kind's payload; an unknown id, or an id of another kind, is NotFound
    naming the request field (none for prompt sets: their callers prefix it) and both kinds."""
    from refusal_audit.server.artifacts import ArtifactStore

    arts = ArtifactStore(tmp_path)
    d = arts.register_direction("d", [1.0, 0.0, 2.0], layer=1)
    fs = arts.register_latent_set("s", {2: [5, 3, 3]})
    ps = arts.register_prompt_set("p", ["a", "b"])
    np.testing.assert_array_equal(arts.direction(d.id), np.array([1.0, 0.0, 2.0], dtype=np.float32))
    assert arts.latent_set(fs.id) == {2: [3, 5]} and arts.prompt_set(ps.id) == ["a", "b"]
    cases = [
        (lambda: arts.latent_set("fs_000000000000"), "latent_set_id: 'fs_000000000000' is not registered"),
        (lambda: arts.latent_set(d.id), f"latent_set_id: '{d.id}' is a direction, not a latent set"),
        (lambda: arts.direction(fs.id), f"direction_id: '{fs.id}' is a latent_set, not a direction"),
        (lambda: arts.direction("dir_000000000000"), "direction_id: 'dir_000000000000' is not registered"),
        (lambda: arts.prompt_set(d.id), f"'{d.id}' is a direction, not a prompt set"),
        (lambda: arts.prompt_set("ps_000000000000"), "'ps_000000000000' is not registered"),
    ]
    for call, message in cases:
        with pytest.raises(NotFound) as exc:
            call()
        assert str(exc.value) == message
