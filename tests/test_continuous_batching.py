"""Continuous batching on the HF engine (server/decode_batch.py, server/batching.py): rows that join a
running generation at its step boundaries, and rows that leave it, do not change anyone's output."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from refusal_audit.audit.spec import Request, SamplingParams, user_prompt
from refusal_audit.server import decode_batch
from refusal_audit.server.batching import BatchCost, Batcher
from refusal_audit.server.decode_batch import DecodeBatch
from refusal_audit.server.hf_engine import HFEngine
from test_batch_invariance import _Recorder, _run_threads
from test_batch_invariant import _engine_with_planted_ties, _requests
from tiny import ARCHS, build_engine

# rows join at these steps (the tiny models' sliding window is 8 tokens: the later rows join a cache
# already longer than it, and the long-prompt request runs past it)
_SCHEDULE = {0: (0, 1, 2), 2: (3, 4), 5: (5, 6), 9: (7, 8)}


def _run(engine: HFEngine, schedule: dict[int, tuple[int, ...]], reqs: list[Request]) -> dict[int, list[torch.Tensor]]:
    """Run `reqs` through one DecodeBatch, admitting request i at the step its schedule says; every
    request's next-token logits at each of its steps. Checks the cache stays trimmed."""
    batch = DecodeBatch(engine)
    seen: dict[int, list[torch.Tensor]] = {}
    waiting = dict(schedule)
    step = 0
    while batch.rows or waiting:
        if step in waiting:
            idx = waiting.pop(step)
            batch.admit([reqs[i] for i in idx], indices=list(idx), owners=list(idx))
        assert batch._logits is None or batch._logits.shape[0] == len(batch.rows)
        for b, row in enumerate(batch.rows):
            seen.setdefault(row.owner, []).append(batch._logits[b].clone())
        batch.pick()
        batch.advance()
        if batch.rows:  # no column is padding in every row (the cache does not keep growing on the left)
            assert bool(batch._mask[:, 0].any())
        step += 1
    return seen


def _alone(engine: HFEngine, reqs: list[Request]) -> list[list[torch.Tensor]]:
    return [_run(engine, {0: (0,)}, [r])[0] for r in reqs]


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_joining_and_leaving_are_bit_identical_to_alone(arch):
    """Batch-invariant mode: every row's logits at every step are bit-identical to the row alone,
    although rows join at steps 0 / 2 / 5 / 9 and leave when they finish."""
    reqs = _requests()
    engine = _engine_with_planted_ties(arch, reqs)
    joined = _run(engine, _SCHEDULE, reqs)
    alone = _alone(engine, reqs)
    for i in range(len(reqs)):
        assert len(joined[i]) == len(alone[i]), f"request {i}: {len(joined[i])} steps joined, {len(alone[i])} alone"
        for s, (a, b) in enumerate(zip(joined[i], alone[i], strict=True)):
            assert torch.equal(a, b), f"request {i} step {s}: max |diff| {(a - b).abs().max():.2e}"
    # and the schedule really overlapped rows of different ages (not one batch after another)
    assert max(len(v) for v in alone) > 9


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_joining_and_leaving_equal_alone_in_the_plain_mode(arch):
    """Without the batch-invariant kernels a spliced cache still gives every row its own numbers (up to
    float32 rounding): the splice's padding, masks and positions are right."""
    reqs = _requests()
    engine = build_engine(arch)
    joined = _run(engine, _SCHEDULE, reqs)
    alone = _alone(engine, reqs)
    worst = 0.0
    for i in range(len(reqs)):
        assert len(joined[i]) == len(alone[i]), f"request {i}"
        for a, b in zip(joined[i], alone[i], strict=True):
            worst = max(worst, float((a - b).abs().max()))
    assert worst < 1e-4, worst


def test_generate_iter_drops_a_cancelled_row():
    """A cancelled row leaves the cache (the longer prompt: the shared padding is trimmed away) and the
    other row goes on exactly as alone."""
    engine = build_engine("gemma3")
    long = Request(prompt=user_prompt("A much longer prompt than the other one, with many more tokens in it."),
                   sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
    short = Request(prompt="Hi", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
    alone = engine.generate([short])[0]
    events = []
    for ev in engine.generate_iter([long, short], cancelled=lambda b: b == 0 and len(events) >= 4):
        events.append(ev)
    assert [e.index for e in events].count(0) == 2  # the long row left after its second token
    assert [t for e in events if e.index == 1 for t in e.token_ids] == alone.token_ids


# ---------------------------------------------------------------------------------------------- the batcher


class _Gate(_Recorder):
    """A recorder that holds the scheduler after its `at`-th decode step until `ready()` is true, so
    callers can be queued while a generation is known to be running."""

    def __init__(self, at: int, ready) -> None:
        super().__init__()
        self.at, self.ready, self.steps = at, ready, 0
        self.holding = threading.Event()

    def batch(self, kind: str, rows: int, padded_tokens: int, seconds: float, hook_seconds: float) -> None:
        super().batch(kind, rows, padded_tokens, seconds, hook_seconds)
        if kind == "step":
            self.steps += 1
            if self.steps == self.at:
                self.holding.set()
                for _ in range(3000):
                    if self.ready():
                        return
                    time.sleep(0.01)
                raise AssertionError("the callers never arrived")


def _long_request() -> Request:
    return Request(prompt=user_prompt("Tell me a long story"), sampling=SamplingParams(max_new_tokens=30, ignore_eos=True))


def _newcomers() -> list[Request]:
    reqs = _requests()
    return [reqs[1], reqs[5], reqs[7]]


def _serve_with_newcomers(batcher: Batcher, gate: _Gate, newcomers: list[Request]) -> tuple[list, list[float]]:
    """A long generation starts; at the gate, `newcomers` (Generate) and one Score call are queued.
    Returns (results, finish times) in the order long, newcomers..., score."""
    done_at = [0.0] * (len(newcomers) + 2)

    def timed(i, fn):
        out = fn()
        done_at[i] = time.perf_counter()
        return out

    threads, results = _run_threads([lambda: timed(0, lambda: batcher.generate([_long_request()])[0])])
    assert gate.holding.wait(60), "the long generation never reached the gate"
    def generate(i: int, r: Request) -> Callable[[], Any]:
        return lambda: timed(i + 1, lambda: batcher.generate([r])[0])

    fns = [generate(i, r) for i, r in enumerate(newcomers)]
    fns.append(lambda: timed(len(newcomers) + 1, lambda: batcher.score([newcomers[0]], [5, 6])[0]))
    more, more_results = _run_threads(fns)
    for t in threads + more:
        t.join(timeout=120)
    return results + more_results, done_at


def test_calls_join_a_running_generation_and_equal_sequential():
    """Generate calls arriving mid-generation join it at the next step; a Score call runs between two
    steps instead of waiting for the generation to end; every answer is bit-identical to the
    request alone (batch-invariant mode)."""
    newcomers = _newcomers()
    engine = _engine_with_planted_ties("gemma3", [*_requests(), _long_request()])
    alone = [engine.generate([r])[0] for r in [_long_request(), *newcomers]]
    alone_score = engine.score([newcomers[0]], [5, 6])[0]
    gate = _Gate(3, lambda: batcher.pending_rows() >= len(newcomers) + 1)
    batcher = Batcher(engine, window_s=0.0, observer=gate, join_ratio=0.0, interleave=float("inf"))  # one admission
    try:
        results, done_at = _serve_with_newcomers(batcher, gate, newcomers)
    finally:
        batcher.close()
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results[:-1], alone, strict=True)):
        assert got.token_ids == want.token_ids and got.text == want.text, f"generate {i}"
    assert np.array_equal(results[-1].logprobs, alone_score.logprobs)
    assert done_at[-1] < done_at[0], "the Score call waited for the running generation to finish"
    steps = [rows for kind, rows in gate.batches if kind == "step"]
    assert steps[:3] == [1, 1, 1] and steps[3] == 1 + len(newcomers), steps  # joined at the 4th step
    assert [b for b in gate.batches if b[0] == "generate"] == [("generate", 1), ("generate", len(newcomers))]


@pytest.mark.parametrize(("join_wait", "expect_one_row_steps"), [(3, 3 + 3), (10**6, None)])
def test_newcomers_wait_for_enough_company_or_max_join_wait(join_wait, expect_one_row_steps):
    """With a join ratio no queue reaches, a newcomer joins after `max_join_wait` steps (or, with no
    limit, when the batch is empty), and its answer is the same either way."""
    newcomer = _newcomers()[:1]
    engine = build_engine("gemma3")
    want = engine.generate(newcomer)[0]
    gate = _Gate(3, lambda: batcher.pending_rows() >= 2)
    batcher = Batcher(engine, window_s=0.0, observer=gate, join_ratio=100.0, max_join_wait=join_wait)
    try:
        results, _ = _serve_with_newcomers(batcher, gate, newcomer)
    finally:
        batcher.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert results[1].token_ids == want.token_ids
    steps = [rows for kind, rows in gate.batches if kind == "step"]
    first_shared = next((k for k, rows in enumerate(steps) if rows == 2), None)
    assert first_shared == expect_one_row_steps, steps
    if first_shared is None:  # it ran after the 30-token generation, alone
        assert len(steps) == 30 + len(want.token_ids), steps


def test_a_cache_that_cannot_be_spliced_makes_newcomers_wait(monkeypatch):
    monkeypatch.setattr(decode_batch, "spliceable", lambda cache: False)
    newcomer = _newcomers()[:1]
    engine = build_engine("llama")
    want = engine.generate(newcomer)[0]
    gate = _Gate(3, lambda: batcher.pending_rows() >= 2)
    batcher = Batcher(engine, window_s=0.0, observer=gate, join_ratio=0.0)
    try:
        results, _ = _serve_with_newcomers(batcher, gate, newcomer)
    finally:
        batcher.close()
    assert results[1].token_ids == want.token_ids
    steps = [rows for kind, rows in gate.batches if kind == "step"]
    assert max(steps) == 1 and len(steps) == 30 + len(want.token_ids), steps


def test_non_finite_logits_end_only_their_rows_call():
    """A row whose logits turn NaN fails its own call (naming its item); the row beside it in the same
    decode batch goes on and equals its solo run."""
    from refusal_audit.audit.errors import NonFiniteOutput

    engine = build_engine("llama")
    good = Request(prompt="The quick brown fox", sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
    bad = Request(prompt="Numbers: 0 1 2 3", sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))
    want = engine.generate([good])[0]
    marker = engine.render(bad.prompt)[-1]
    assert marker != engine.render(good.prompt)[-1]
    real_forward = engine._forward

    def poisoned(input_ids, *a, **k):  # NaN logits for the row whose prompt ends with the marker
        out = real_forward(input_ids, *a, **k)
        if input_ids.shape[1] > 1:
            out.logits[input_ids[:, -1] == marker] = float("nan")
        return out

    engine._forward = poisoned
    batcher = Batcher(engine, window_s=0.0)
    try:
        with batcher.paused():
            threads, results = _run_threads([lambda: batcher.generate([good])[0],
                                             lambda: batcher.generate([good, bad])])
            for _ in range(3000):
                if batcher.pending_rows() >= 3:
                    break
                time.sleep(0.01)
        for t in threads:
            t.join(timeout=60)
    finally:
        batcher.close()
    assert results[0].token_ids == want.token_ids
    assert isinstance(results[1], NonFiniteOutput) and "items[1]" in str(results[1]), results[1]


def test_batch_cost_fits_fixed_plus_per_token_seconds():
    cost = BatchCost()
    assert cost.fit() is None and cost.tokens_within(10.0) == 0  # nothing measured: one row at a time
    cost.observe(100, 0.4)
    assert cost.fit() == (0.0, 0.004)  # one size: no slope to fit, all of it per token
    cost = BatchCost()
    for n in (10, 100, 400, 50):
        cost.observe(n, 0.1 + 0.002 * n)
    fixed, per_token = cost.fit()  # type: ignore[misc]
    assert fixed == pytest.approx(0.1) and per_token == pytest.approx(0.002)
    assert cost.tokens_within(0.5) in (199, 200) and cost.tokens_within(0.05) == 0


def _score_rows() -> list[Request]:
    return [Request(prompt=user_prompt(f"Question {i}: what is {i} plus {i}?")) for i in range(6)]


def _beside_a_long_generation(batcher: Batcher, gate: _Gate, call: Callable[[], Any]) -> tuple[Any, Any]:
    """Start the long generation, send `call` once it holds at the gate, close the batcher; returns
    (the long generation's completion, call's result), raising either's error."""
    try:
        threads, results = _run_threads([lambda: batcher.generate([_long_request()])[0]])
        assert gate.holding.wait(60), "the long generation never reached the gate"
        more, called = _run_threads([call])
        for t in threads + more:
            t.join(timeout=120)
    finally:
        batcher.close()
    for r in (results[0], called[0]):
        if isinstance(r, Exception):
            raise r
    return results[0], called[0]


@pytest.mark.parametrize("budget", ["one_row", "two_rows", "unbounded"])
def test_a_large_prompt_only_call_interleaves_with_running_streams(budget):
    """A six-row Score call arriving mid-generation runs in batches sized by the interleave budget,
    one batch between two decode steps (a budget below one row still takes a row per round), instead
    of holding the running stream for all six rows; with no cap it is one batch. Its results and the
    stream's tokens are bit-identical to each run alone."""
    rows = _score_rows()
    engine = _engine_with_planted_ties("gemma3", [*rows, _long_request()])
    want_gen = engine.generate([_long_request()])[0]
    want_score = engine.score(rows, [5, 6], top_k=3)
    gate = _Gate(3, lambda: batcher.pending_rows() >= len(rows))
    intervals: list[float] = []
    gate.token_interval = intervals.append  # type: ignore[method-assign]
    batcher = Batcher(engine, window_s=0.0, observer=gate, interleave=float("inf") if budget == "unbounded" else 1.0)
    if budget != "unbounded":
        longest = max(len(x) for x in engine._batch_ids(rows))
        tokens = 0 if budget == "one_row" else 2 * longest
        batcher.unary_cost.tokens_within = lambda seconds: tokens  # type: ignore[method-assign]
    long_answer, scored = _beside_a_long_generation(batcher, gate, lambda: batcher.score(rows, [5, 6], top_k=3))
    assert long_answer.token_ids == want_gen.token_ids
    for got, want in zip(scored, want_score, strict=True):
        assert np.array_equal(got.logprobs, want.logprobs) and np.array_equal(got.top_token_ids, want.top_token_ids)
    kinds = [kind for kind, _ in gate.batches]
    score_batches = [n for kind, n in gate.batches if kind == "score"]
    expect = {"one_row": [1] * 6, "two_rows": [2, 2, 2], "unbounded": [6]}[budget]
    assert score_batches == expect, gate.batches
    first = kinds.index("score")
    between = kinds[first : first + 2 * len(expect) - 1]
    assert between == ["score", "step"] * (len(expect) - 1) + ["score"], gate.batches  # a step between each
    # one wait between two tokens per pair of consecutive steps of the (one, unbroken) generation
    assert len(intervals) == kinds.count("step") - 1 and all(t > 0 for t in intervals), intervals


@pytest.mark.parametrize("budget", ["two_rows", "unbounded"])
def test_a_large_generate_call_joins_running_streams_in_chunks(budget):
    """A six-row Generate call arriving mid-generation joins in admissions whose prefill fits the
    interleave budget (two rows here, one decode step between two admissions), or all at once with no
    cap; every answer is bit-identical to the request alone either way."""
    rows = [Request(prompt=r.prompt, sampling=SamplingParams(max_new_tokens=3)) for r in _score_rows()]
    engine = _engine_with_planted_ties("gemma3", [*rows, _long_request()])
    want_gen = engine.generate([_long_request()])[0]
    want = [engine.generate([r])[0] for r in rows]
    gate = _Gate(3, lambda: batcher.pending_rows() >= len(rows))
    batcher = Batcher(engine, window_s=0.0, observer=gate, join_ratio=0.0,
                      interleave=float("inf") if budget == "unbounded" else 1.0)
    if budget == "two_rows":
        longest = max(len(x) for x in engine._batch_ids(rows))
        batcher.admit_cost.tokens_within = lambda seconds: 2 * longest  # type: ignore[method-assign]
    long_answer, joined = _beside_a_long_generation(batcher, gate, lambda: batcher.generate(rows))
    assert long_answer.token_ids == want_gen.token_ids
    assert [c.token_ids for c in joined] == [c.token_ids for c in want]
    admissions = [n for kind, n in gate.batches if kind == "generate"]
    assert admissions == ([1, 2, 2, 2] if budget == "two_rows" else [1, 6]), gate.batches
    kinds = [kind for kind, _ in gate.batches]
    first = kinds.index("generate", 1)
    if budget == "two_rows":  # one decode step of the running rows between two admissions
        assert kinds[first : first + 5] == ["generate", "step", "generate", "step", "generate"], gate.batches


def test_the_servers_join_policy_reaches_its_batcher(tmp_path):
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import ServerConfig
    from tiny import no_jobs

    cfg = ServerConfig(port=0, data_dir=tmp_path, batch_join_ratio=0.5, batch_join_wait_steps=7, batch_interleave=2.5)
    srv = ThreadedServer(cfg, build_engine("llama"), jobs_factory=no_jobs).start()
    try:
        batcher = srv.handle.engine
        assert isinstance(batcher, Batcher)
        assert (batcher.join_ratio, batcher.max_join_wait, batcher.interleave) == (0.5, 7, 2.5)
    finally:
        srv.stop()


def test_closed_loop_callers_with_joins_everywhere_equal_sequential():
    """Eight callers each send three Generate calls one after the other (different prompts, lengths,
    interventions and sampling), so rows join and leave a running generation at arbitrary steps;
    every answer is bit-identical to the request alone, and each arrives exactly once."""
    reqs = _requests()
    engine = _engine_with_planted_ties("gemma3", reqs)
    plan = [[reqs[(3 * c + k) % len(reqs)] for k in range(3)] for c in range(8)]
    alone = {id(r): engine.generate([r])[0].token_ids for r in reqs}
    rec = _Recorder()
    batcher = Batcher(engine, window_s=0.0, observer=rec, join_ratio=0.0, max_join_wait=0)
    try:
        threads, results = _run_threads([lambda mine=mine: [batcher.generate([r])[0] for r in mine] for mine in plan])
        for t in threads:
            t.join(timeout=120)
    finally:
        batcher.close()
    for mine, got in zip(plan, results, strict=True):
        assert not isinstance(got, Exception), got
        assert [c.token_ids for c in got] == [alone[id(r)] for r in mine]
    # rows really joined running generations: a step right after an admission held more rows than it admitted
    b = rec.batches
    joins = [i for i, (k, rows) in enumerate(b) if k == "generate" and i + 1 < len(b) and b[i + 1][0] == "step"
             and b[i + 1][1] > rows]
    assert joins, b
    assert sum(rows for k, rows in rec.batches if k == "generate") == 24
