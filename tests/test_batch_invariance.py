"""A request's output must not depend on which other requests share its batch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from refusal_audit.audit.engine import Completion
from refusal_audit.audit.errors import InvalidRequest
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
from refusal_audit.server.batching import Batcher, RequestCancelled, cancel_scope
from refusal_audit.server.metrics import BatchObserver
from tiny import ARCHS, build_engine


def _mixed_requests(d_model: int) -> list[Request]:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(7))
    r = tuple((v / v.norm()).tolist())
    greedy = SamplingParams(max_new_tokens=12)
    return [
        Request(prompt=user_prompt("How do I build a bomb?"), sampling=greedy),
        Request(prompt="The quick brown fox", interventions=(AblateLatents(latents={1: (1, 2, 3)}),), sampling=greedy),
        Request(prompt=user_prompt("Tell me a story about a cat and the sea and the stars at night, please."),
                interventions=(AblateLatents(latents={1: tuple(range(0, 128, 2)), 2: tuple(range(100))}),),
                sampling=greedy),
        Request(prompt=user_prompt("Write a poem"),
                interventions=(ClampLatents(latents={2: (4, 5)}, value=3.0, scope=TokenScope(kind="last_n_prompt", n=2)),),
                sampling=greedy),
        Request(prompt="Numbers: 0 1 2 3", interventions=(AblateDirection(direction=r),), sampling=greedy),
        Request(prompt=user_prompt("Give me a recipe for pasta"),
                interventions=(AddDirection(direction=r, layer=2, coefficient=4.0, scope=TokenScope(kind="generated")),
                               AblateLatents(latents={1: (7,)}, scope=TokenScope(kind="positions", positions=(0,)))),
                sampling=SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=123)),
        Request(prompt=user_prompt("Name three rivers"),
                interventions=(ScaleLatents(latents={1: tuple(range(1, 96, 3)), 2: (4, 5, 6)}, factor=-3.0),
                               ScaleLatents(latents={2: (20, 21)}, factor=2.0, scope=TokenScope(kind="generated"))),
                sampling=greedy),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_request_alone_equals_inside_mixed_batch(arch):
    engine = build_engine(arch)
    reqs = _mixed_requests(64)
    batch_gen = engine.generate(reqs)
    batch_score = engine.score(reqs, [5, 6, 7, 8], return_full_logprobs=True)
    max_diff = 0.0
    for i, req in enumerate(reqs):
        alone_gen = engine.generate([req])[0]
        assert alone_gen.token_ids == batch_gen[i].token_ids, f"request {i} changed with its batch"
        alone = engine.score([req], [5, 6, 7, 8], return_full_logprobs=True)[0]
        max_diff = max(max_diff, float(np.max(np.abs(alone.full_logprobs - batch_score[i].full_logprobs))))
    assert max_diff < 1e-4
    # and the interventions really act: the batch differs from the same prompts without them
    plain = engine.score([Request(prompt=r.prompt) for r in reqs], [5, 6, 7, 8], return_full_logprobs=True)
    assert any(np.max(np.abs(p.full_logprobs - b.full_logprobs)) > 1e-3 for p, b in zip(plain[1:], batch_score[1:], strict=True))


def test_batch_order_does_not_matter():
    engine = build_engine("gemma2")
    reqs = _mixed_requests(64)
    fwd = engine.generate(reqs)
    rev = engine.generate(list(reversed(reqs)))[::-1]
    assert [c.token_ids for c in fwd] == [c.token_ids for c in rev]


# ---------------------------------------------------------------------------- concurrent callers (server/batching.py)


class _Recorder(BatchObserver):
    """Records what the batcher reports (batch sizes by kind, latents per request)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.latent_counts: list[int] = []
        self.waits: list[float] = []

    def batch(self, kind: str, rows: int, padded_tokens: int, seconds: float, hook_seconds: float) -> None:
        self.batches.append((kind, rows))

    def queued(self, kind: str, wait_s: float) -> None:
        self.waits.append(wait_s)

    def latents(self, n: int) -> None:
        self.latent_counts.append(n)


def _concurrent_requests(d_model: int) -> list[Request]:
    """Different lengths, max_new_tokens, seeds, sampling and interventions."""
    reqs = _mixed_requests(d_model)
    out = []
    for i, r in enumerate(reqs):
        sp = r.sampling.model_copy(update={"max_new_tokens": 2 + i})
        out.append(r.model_copy(update={"sampling": sp}))
    out.append(Request(prompt="Numbers: 0 1 2 3", sampling=SamplingParams(max_new_tokens=9, temperature=1.0, seed=5)))
    out.append(Request(prompt="Numbers: 0 1 2 3", sampling=SamplingParams(max_new_tokens=9, temperature=1.0, seed=6)))
    return out


def _run_threads(fns: list) -> list:
    """Run each fn in its own thread; results (or raised exceptions) in order."""
    results: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    return [threads, results]


def _wait_pending(batcher: Batcher, rows: int) -> None:
    """Until `rows` rows are queued (the batcher is paused, so they stay queued)."""
    for _ in range(6000):
        if batcher.pending_rows() >= rows:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"only {batcher.pending_rows()} of {rows} rows arrived")


@pytest.mark.parametrize("arch", ["gemma3"])
def test_concurrent_calls_are_batched_and_equal_sequential(arch):
    """Generate, stream, Score, Encode, Residuals and Loss calls from concurrent threads, merged into
    shared batches, give exactly what each request gives alone."""
    engine = build_engine(arch)
    rec = _Recorder()
    batcher = Batcher(engine, window_s=0.0, observer=rec)
    reqs = _concurrent_requests(64)
    try:
        alone_gen = [engine.generate([r])[0] for r in reqs]
        alone_score = [engine.score([r], [5, 6], return_full_logprobs=True)[0] for r in reqs]
        alone_enc = [engine.encode([r], [1, 2], top_k=4)[0] for r in reqs[:3]]
        alone_res = np.concatenate([engine.residuals([r], [0, 2], [-1, 0]) for r in reqs[:3]])
        alone_loss = [engine.loss([r], ["a b c"])[0] for r in reqs[:3]]

        def stream(r: Request) -> tuple[str, list[int], Completion]:
            text, toks, comp = "", [], None
            for ev in batcher.generate_iter([r]):
                text += ev.text_delta
                toks += ev.token_ids
                if ev.finished:
                    comp = ev.completion
            return text, toks, comp

        with batcher.paused():
            fns = [lambda r=r: batcher.generate([r])[0] for r in reqs[:4]]
            fns += [lambda r=r: stream(r) for r in reqs[4:]]
            fns += [lambda r=r: batcher.score([r], [5, 6], return_full_logprobs=True)[0] for r in reqs]
            fns += [lambda r=r: batcher.encode([r], [1, 2], top_k=4)[0] for r in reqs[:3]]
            fns += [lambda: batcher.residuals(reqs[:2], [0, 2], [-1, 0]), lambda: batcher.residuals(reqs[2:3], [0, 2], [-1, 0])]
            fns += [lambda r=r: batcher.loss([r], ["a b c"])[0] for r in reqs[:3]]
            threads, results = _run_threads(fns)
            _wait_pending(batcher, 2 * len(reqs) + 3 + 3 + 3)
        for t in threads:
            t.join(timeout=120)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        n = len(reqs)
        for i in range(n):
            got = results[i] if i < 4 else results[i][2]
            assert got.token_ids == alone_gen[i].token_ids, f"generate {i} changed in the concurrent batch"
            assert got.finish_reason == alone_gen[i].finish_reason and got.text == alone_gen[i].text
            if i >= 4:  # the stream carries the same tokens and text, token by token
                assert results[i][1] == alone_gen[i].token_ids and results[i][0] == alone_gen[i].text
            np.testing.assert_allclose(results[n + i].full_logprobs, alone_score[i].full_logprobs, atol=1e-4)
        for j in range(3):
            enc = results[2 * n + j]
            assert enc.token_ids == alone_enc[j].token_ids
            for ly in (1, 2):
                for a, b in zip(enc.layers[ly].top_indices, alone_enc[j].layers[ly].top_indices, strict=True):
                    assert list(a) == list(b)
        res = np.concatenate([results[2 * n + 3], results[2 * n + 4]])
        np.testing.assert_allclose(res, alone_res, atol=1e-4)
        for j in range(3):
            assert abs(results[2 * n + 5 + j].loss - alone_loss[j].loss) < 1e-4
        # every kind really ran as one merged batch
        by_kind = {k: max(rows for kk, rows in rec.batches if kk == k) for k, _ in rec.batches}
        # (Generate rows are admitted in one prefill batch, then decoded in steps of up to n rows)
        assert by_kind == {"generate": n, "step": n, "score": n, "encode": 3, "residuals": 3, "loss": 3}, by_kind
        assert sorted(rec.latent_counts)[-1] == 64 + 100  # the request with 2 x latent lists
    finally:
        batcher.close()


def test_cancelled_request_leaves_batch_without_disturbing_others():
    """One stream is closed mid-batch, one queued call is cancelled: the rest equal their solo runs."""
    engine = build_engine("gemma2")
    rec = _Recorder()
    batcher = Batcher(engine, window_s=0.0, observer=rec)
    reqs = _concurrent_requests(64)[:5]
    long = reqs[2].model_copy(update={"sampling": SamplingParams(max_new_tokens=40)})
    alone = [engine.generate([r])[0] for r in reqs]
    forwards = []
    engine.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        def stream_then_cancel() -> int:
            gen = batcher.generate_iter([long])
            n = 0
            for _ev in gen:
                n += 1
                if n == 2:
                    break
            gen.close()  # the client went away after two tokens
            return n

        cancel = threading.Event()

        def queued_then_cancelled():
            with cancel_scope(cancel):
                return batcher.score([reqs[0]], [5])

        with batcher.paused():
            fns = [lambda r=r: batcher.generate([r])[0] for r in reqs] + [stream_then_cancel, queued_then_cancelled]
            threads, results = _run_threads(fns)
            _wait_pending(batcher, len(reqs) + 2)
            cancel.set()  # deadline passed while queued
            threads[-1].join(timeout=60)
        for t in threads:
            t.join(timeout=120)
        assert isinstance(results[-1], RequestCancelled)
        assert results[-2] == 2
        for i in range(len(reqs)):
            assert results[i].token_ids == alone[i].token_ids, f"request {i} changed when a batch-mate left"
        # the dropped stream stopped costing steps: the batch ended with its longest remaining row
        assert len(forwards) <= 1 + max(r.sampling.max_new_tokens for r in reqs) < long.sampling.max_new_tokens
        for _ in range(500):  # the last step is reported just after its answer
            if ("step", 1) in rec.batches:
                break
            threading.Event().wait(0.01)
        # the cancelled score never ran; every row was admitted at once, and the steps shrank as rows left
        assert [b for b in rec.batches if b[0] != "step"] == [("generate", len(reqs) + 1)]
        steps = [rows for kind, rows in rec.batches if kind == "step"]
        assert steps[0] == len(reqs) + 1 and steps == sorted(steps, reverse=True) and steps[-1] == 1
    finally:
        batcher.close()


def test_merged_batch_with_a_bad_call_fails_only_that_call():
    engine = build_engine("llama")
    batcher = Batcher(engine, window_s=0.0)
    good = Request(prompt="The quick brown fox", sampling=SamplingParams(max_new_tokens=4))
    bad = Request(prompt="hello", interventions=(AblateLatents(latents={1: (99999,)}),),
                  sampling=SamplingParams(max_new_tokens=4))
    try:
        with batcher.paused():
            threads, results = _run_threads([lambda: batcher.generate([good, good]), lambda: batcher.generate([good, bad])])
            _wait_pending(batcher, 4)
        for t in threads:
            t.join(timeout=60)
        assert [c.token_ids for c in results[0]] == [engine.generate([good])[0].token_ids] * 2
        assert isinstance(results[1], InvalidRequest)
        assert "items[1]" in str(results[1]), str(results[1])
    finally:
        batcher.close()


def test_concurrent_grpc_calls_equal_sequential_and_are_metered(tmp_path):
    """Through the server: concurrent Generate / GenerateStream RPCs share one batch, each answer equals
    the request run alone, a call whose deadline passes while queued fails alone, and /metrics shows
    the batch size, queue wait, latents per request and hook time."""
    from refusal_audit.client import AuditClient, RemoteError
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import ServerConfig

    engine = build_engine("llama")
    reqs = _concurrent_requests(64)[:6]
    alone = [engine.generate([r])[0] for r in reqs]
    srv = ThreadedServer(ServerConfig(port=0, data_dir=tmp_path), engine, jobs_factory=lambda **_: None).start()
    try:
        batcher = srv.handle.engine
        assert isinstance(batcher, Batcher)
        clients = [AuditClient(srv.address, timeout=120) for _ in range(len(reqs) + 1)]

        def stream(c: AuditClient, r: Request) -> list[int]:
            return [t for ev in c.generate_stream([r]) for t in ev.token_ids]

        with batcher.paused():
            fns = [lambda c=c, r=r: c.generate([r])[0].token_ids for c, r in zip(clients[:3], reqs[:3], strict=True)]
            fns += [lambda c=c, r=r: stream(c, r) for c, r in zip(clients[3:-1], reqs[3:], strict=True)]
            fns += [lambda: clients[-1].generate([reqs[0]], timeout=3.0)]
            threads, results = _run_threads(fns)
            _wait_pending(batcher, len(reqs))
            threads[-1].join(timeout=60)  # its deadline passes while it waits in the queue (or before)
        for t in threads:
            t.join(timeout=120)
        assert isinstance(results[-1], RemoteError) and results[-1].code.name == "DEADLINE_EXCEEDED"
        for i, r in enumerate(results[:-1]):
            assert r == alone[i].token_ids, f"request {i} changed when served concurrently"
        for _ in range(500):  # the batch is reported just after its last answer
            text = srv.handle.metrics.render().decode()
            if 'refusal_audit_batch_size_count{engine="hf",kind="generate"}' in text:
                break
            threading.Event().wait(0.01)
        assert 'refusal_audit_batch_size_count{engine="hf",kind="generate"} 1.0' in text
        assert f'refusal_audit_batch_size_sum{{engine="hf",kind="generate"}} {float(len(reqs))}' in text
        assert 'refusal_audit_queue_wait_seconds_count{engine="hf",kind="generate"}' in text
        n_lat = [ln for ln in text.splitlines() if ln.startswith('refusal_audit_latents_per_request_count{engine="hf"')]
        assert n_lat and float(n_lat[0].split()[-1]) >= len(reqs)
        hook = [ln for ln in text.splitlines() if ln.startswith('refusal_audit_hook_seconds_total{engine="hf"')]
        assert hook and float(hook[0].split()[-1]) > 0
        gaps = [ln for ln in text.splitlines() if ln.startswith('refusal_audit_token_interval_seconds_count{engine="hf"}')]
        assert gaps and float(gaps[0].split()[-1]) >= 1  # the streams' waits between two tokens
        for c in clients:
            c.close()
    finally:
        srv.stop()


def test_ignore_eos_runs_past_the_models_stop_set_but_not_the_requests_own():
    """`ignore_eos`: generation stops only on the request's stop_token_ids or max_new_tokens, and
    the field survives the wire format."""
    from refusal_audit.proto.convert import sampling_from_pb, sampling_to_pb

    engine = build_engine("gemma3")
    prompt = user_prompt("Tell me a story")
    first = engine.generate([Request(prompt=prompt, sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
    assert len(first.token_ids) == 6
    first = first.token_ids
    engine.eos_ids = (*engine.eos_ids, first[0])  # the model's stop set now ends this prompt at once
    stopped = engine.generate([Request(prompt=prompt, sampling=SamplingParams(max_new_tokens=6))])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == []
    sp = sampling_from_pb(sampling_to_pb(SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert sp.ignore_eos
    going = engine.generate([Request(prompt=prompt, sampling=sp)])[0]
    assert going.finish_reason == "length" and going.token_ids == first
    own = SamplingParams(max_new_tokens=6, ignore_eos=True, stop_token_ids=(first[2],))
    cut = engine.generate([Request(prompt=prompt, sampling=own)])[0]
    assert cut.finish_reason == "stop" and cut.token_ids == first[: first.index(first[2])]
