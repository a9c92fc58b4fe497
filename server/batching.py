"""Cross-request batching in front of the HF engine: dynamic for prompt-only calls, continuous for Generate.

Concurrent calls (Generate, GenerateStream, Score, Encode, Residuals, Loss — from gRPC handlers and
from jobs alike) are queued here. One scheduler thread runs rounds; when nothing is generating, a
round starts after a short collection window (until no call has arrived for `window_s`, at most
`max_wait_s`). Each round runs at most one merged batch of prompt-only calls, admits waiting
Generate rows into the running decode batch, and runs one decode step (server/decode_batch.py). The
HF engine is batch-invariant (left padding, position ids from the attention mask, per-row
interventions; bit for bit in its batch-invariant mode), so a request's output does not depend on
its batch-mates or on when it joined: batching changes throughput, not results.

* Compatibility: calls of the same kind with the same call-level options (score token ids / top_k,
  encode layers / latents, residual layers / positions) are merged; per-row options — prompt,
  interventions, sampling, seed, stop set, max_new_tokens — travel with each row.
* Budget: at most `limits.max_batch_items` rows and `max_batch_tokens` padded tokens
  (rows x longest prompt + new tokens) per batch, running Generate rows included; a call's rows may
  be split over several batches or admissions.
* Fairness: rows are taken round-robin over the waiting calls, oldest first, so a job's 256-row
  Score shares each batch with the interactive one-row calls instead of holding the engine, and
  prompt-only calls run between decode steps instead of after a generation.
* Interleaving: while rows are generating, the prompt-only batch between two decode steps, and the
  prefill of Generate rows joining them, are each sized to take about `interleave` (4) x a decode
  step (at least one row), from fits of earlier batches' seconds against their padded tokens
  (`BatchCost`, one for each); the rest of a large call runs or joins in the following rounds. So a
  job's sweep slows running streams by about that factor instead of holding them for the whole
  sweep; `interleave=inf` lets it take the full token budget at once.
* Joining: a join costs the running rows one extra forward (the newcomers' prefill), so with rows
  running, waiting Generate rows join once they number `join_ratio` x the running rows or the oldest
  has waited `max_join_wait` steps.
* Generation: every row streams its own tokens as the batch steps (GenerateStream stays token by
  token); a row that stops early gets its answer at once and leaves the batch; a cancelled or
  deadline-exceeded call leaves it before the next step without changing the others.
* Errors: a validation error in a merged batch reruns each call alone, so only the offending call
  gets its error (with its own item indices); non-finite logits end only their row's call.

Why not transformers' continuous-batching manager (`generate_batch` / `ContinuousBatchingManager`):
it takes one GenerationConfig for all requests (no per-request seed, stop set or sampling), packs
sequences into paged-attention kernels whose rows we cannot hook per request with the padded
`TokenContext` the interventions here are tested under, and gives no per-token stream with our
stop semantics. The decode batch reuses the engine's tested padded forward unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..audit.engine import Completion, EncodeResult, LossResult, ModelInfo, ScoreResult
from ..audit.errors import InvalidRequest, LimitExceeded, NotFound
from ..audit.spec import AblateLatents, ClampLatents, Request
from .decode_batch import DecodeBatch
from .hf_engine import HFEngine, StreamEvent
from .metrics import BatchObserver
from .status import RpcCancelled

log = logging.getLogger("refusal_audit.server.batching")

_tls = threading.local()


class RequestCancelled(RpcCancelled):
    """The caller cancelled (client gone, deadline passed) while its call waited or ran."""


@contextlib.contextmanager
def cancel_scope(event: threading.Event | None) -> Iterator[None]:
    """Engine calls made by this thread inside the scope are dropped from the batcher once `event` is set."""
    prev = getattr(_tls, "cancel", None)
    _tls.cancel = event
    try:
        yield
    finally:
        _tls.cancel = prev


def _current_cancel() -> threading.Event | None:
    return getattr(_tls, "cancel", None)



@dataclass(eq=False)
class _Call:
    """One engine call from one caller: its rows, options and how results go back."""

    kind: str
    key: tuple[Any, ...]
    requests: list[Request]
    costs: list[int]  # per row: padded tokens it needs (prompt + new / completion tokens)
    extras: list[Any]  # per row: loss completion, or Generate's prompt ids (rendered once, at submission)
    cancel: threading.Event | None
    sink: Callable[[Any], None]  # receives events (generate) or the final result list / a _Failure
    enqueued: float = field(default_factory=time.perf_counter)
    arrived_step: int = 0  # the batcher's decode step count when the call arrived
    next_row: int = 0
    results: list[Any] = field(default_factory=list)
    rows_left: int = 0
    started: bool = False
    failed: bool = False
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.requests)
        self.rows_left = len(self.requests)

    @property
    def gone(self) -> bool:
        return self.abandoned or self.failed or (self.cancel is not None and self.cancel.is_set())


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_USER_ERRORS = (InvalidRequest, NotFound, LimitExceeded)


class BatchCost:
    """Seconds of a batch (a prompt-only batch, or an admission's prefill) as `fixed + per_token x
    padded tokens`, fitted by least squares over recent batches (each older batch weighs `decay`
    times less): what sizes the work that runs between two decode steps. A single size seen so far
    gives no slope; then all cost is per token."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d, n = self.decay, float(max(1, tokens))
        self._w, self._n, self._t = d * self._w + 1, d * self._n + n, d * self._t + seconds
        self._nn, self._nt = d * self._nn + n * n, d * self._nt + n * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per padded token), or None before any batch."""
        if self._w == 0:
            return None
        det = self._w * self._nn - self._n * self._n
        slope = (self._w * self._nt - self._n * self._t) / det if det > 1e-9 * self._w * self._nn else 0.0
        if slope <= 0:
            return 0.0, self._t / self._n
        fixed = (self._t - slope * self._n) / self._w
        if fixed < 0:  # the line through zero instead
            return 0.0, self._nt / self._nn
        return fixed, slope

    def tokens_within(self, seconds: float) -> int:
        """The most padded tokens a batch may hold to take at most `seconds` (0 before any batch)."""
        f = self.fit()
        if f is None or f[1] <= 0:
            return 0
        return max(0, int((seconds - f[0]) / f[1]))


class Batcher:
    """The Engine protocol over an HFEngine, with concurrent calls merged into batches.

    Everything not batched (info, render, tokenizer, saes, limits, resolver...) is the wrapped
    engine's. `close()` stops the scheduler; calls still queued then fail with RequestCancelled.
    """

    batched = True

    def __init__(
        self,
        engine: HFEngine,
        window_s: float = 0.005,
        max_batch_tokens: int = 16384,
        observer: BatchObserver | None = None,
        max_wait_s: float = 0.05,
        join_ratio: float = 0.25,
        max_join_wait: int = 4,
        interleave: float = 4.0,
    ) -> None:
        self._engine = engine
        self.interleave = float(interleave)
        self.unary_cost = BatchCost()  # prompt-only batches
        self.admit_cost = BatchCost()  # admissions of Generate rows (their prefill)
        self.join_ratio = float(join_ratio)
        self.max_join_wait = int(max_join_wait)
        self._decoding = DecodeBatch(engine)
        self._steps = 0  # decode steps run (how long a waiting Generate call has waited)
        self._step_s = 0.0  # a decode step's seconds (moving average): scales the collection gap
        self._last_step_at: float | None = None  # when the running generation's last step started
        self.window_s = float(window_s)
        self.max_wait_s = float(max_wait_s)
        self.max_batch_tokens = int(max_batch_tokens)
        self.observer = observer or BatchObserver()
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._closed = False
        self._paused = 0
        self._arrivals = 0
        self._thread = threading.Thread(target=self._run, name="hf-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ delegation

    @property
    def engine(self) -> HFEngine:
        """The wrapped HF engine."""
        return self._engine

    def __getattr__(self, name: str) -> Any:  # only for attributes not found on the Batcher
        return getattr(object.__getattribute__(self, "_engine"), name)

    @property
    def info(self) -> ModelInfo:
        return self._engine.info

    @property
    def limits(self) -> Any:
        return self._engine.limits

    @limits.setter
    def limits(self, value: Any) -> None:
        self._engine.limits = value

    @property
    def resolver(self) -> Any:
        return self._engine.resolver

    @resolver.setter
    def resolver(self, value: Any) -> None:
        self._engine.resolver = value

    def close(self) -> None:
        """Stop the scheduler thread; queued calls fail with RequestCancelled."""
        with self._cv:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cv.notify_all()
        for call in pending:
            call.sink(_Failure(RequestCancelled("the server is shutting down")))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new batches and admissions back while inside (calls queue up; a running generation
        keeps stepping); on exit they are merged as usual.

        For tests that need a known batch composition, and for maintenance (e.g. swapping SAEs).
        """
        with self._cv:
            self._paused += 1
        try:
            yield
        finally:
            with self._cv:
                self._paused -= 1
                self._cv.notify_all()

    def pending_rows(self) -> int:
        """Rows queued and not yet in a batch (for tests and diagnostics)."""
        with self._cv:
            return sum(len(c.requests) - c.next_row for c in self._pending if not c.gone)

    # ------------------------------------------------------------------ the Engine protocol

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        for ev in self.generate_iter(requests):
            if ev.finished:
                results[ev.index] = ev.completion
        return [r for r in results if r is not None]

    def generate_iter(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        """Per-row token events as the shared batch steps (indices are this call's own)."""
        eng = self._engine
        reqs = list(requests)
        ids = eng._batch_ids(reqs)  # validates count, prompts and sampling here, with this call's item indices
        eng._check_sampling(reqs)
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = self._submit("generate", (), reqs, [len(x) + r.sampling.max_new_tokens for x, r in zip(ids, reqs, strict=True)],
                            ids, q.put)
        finished = 0
        try:
            while finished < len(reqs):
                item = self._get(q, call)
                if isinstance(item, _Failure):
                    raise item.exc
                if item.finished:
                    finished += 1
                yield item
        finally:
            call.abandoned = True  # closed early (client gone): its rows leave the batch

    def score(
        self, requests: Sequence[Request], token_ids: Sequence[int], top_k: int = 0,
        return_full_logprobs: bool = False,
    ) -> list[ScoreResult]:
        key = (tuple(int(t) for t in token_ids), int(top_k), bool(return_full_logprobs))
        return self._unary("score", key, requests)

    def encode(
        self, requests: Sequence[Request], layers: Sequence[int] | None = None, top_k: int = 16,
        latents: dict[int, Sequence[int]] | None = None,
    ) -> list[EncodeResult]:
        lat = tuple(sorted((int(k), tuple(int(i) for i in v)) for k, v in latents.items())) if latents else None
        key = (tuple(layers) if layers else None, int(top_k), lat)
        return self._unary("encode", key, requests)

    def residuals(
        self, requests: Sequence[Request], layers: Sequence[int] | None = None, positions: Sequence[int] = (-1,),
    ) -> np.ndarray:
        key = (tuple(layers) if layers else None, tuple(int(p) for p in positions))
        rows = self._unary("residuals", key, requests)
        return np.stack(rows) if rows else np.zeros((0,), dtype=np.float32)

    def loss(self, requests: Sequence[Request], completions: Sequence[str | None]) -> list[LossResult]:
        if len(completions) != len(requests):
            raise InvalidRequest("completions must align with items")
        return self._unary("loss", (), requests, list(completions))

    # ------------------------------------------------------------------ submission

    def _unary(self, kind: str, key: tuple[Any, ...], requests: Sequence[Request], extras: list[Any] | None = None) -> Any:
        eng = self._engine
        reqs = list(requests)
        ids = eng._batch_ids(reqs)
        costs = [len(x) for x in ids]
        if extras is not None:
            tok = eng.tokenizer
            costs = [c + (len(tok(e, add_special_tokens=False)["input_ids"]) if e else 0)
                     for c, e in zip(costs, extras, strict=True)]
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = self._submit(kind, key, reqs, costs, extras or [None] * len(reqs), q.put)
        try:
            item = self._get(q, call)
        finally:
            call.abandoned = True
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def _submit(self, kind: str, key: tuple[Any, ...], reqs: list[Request], costs: list[int], extras: list[Any],
                sink: Callable[[Any], None]) -> _Call:
        call = _Call(kind, key, reqs, costs, extras, _current_cancel(), sink, arrived_step=self._steps)
        for r in reqs:
            self.observer.latents(n_latents(r, self._engine.resolver))
        with self._cv:
            if self._closed:
                raise RequestCancelled("the server is shutting down")
            self._pending.append(call)
            self._arrivals += 1
            self._cv.notify_all()
        return call

    def _get(self, q: queue.SimpleQueue[Any], call: _Call) -> Any:
        """Next item for the caller; raises RequestCancelled as soon as its cancel event is set."""
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if call.cancel is not None and call.cancel.is_set():
                    call.abandoned = True
                    with self._cv:
                        self._cv.notify_all()
                    raise RequestCancelled(f"{call.kind} cancelled") from None

    # ------------------------------------------------------------------ scheduling

    def _run(self) -> None:
        """The scheduler: per round, at most one unary batch, one admission of waiting Generate rows
        into the running decode batch, and one decode step of that batch."""
        while True:
            with self._cv:
                while not self._closed and not self._decoding.rows and (self._paused or not self._live_pending()):
                    self._cv.wait(timeout=0.5)
                if self._closed:
                    break
            if not self._decoding.rows or self._join_due():
                self._collect()  # into an empty batch, or a join: let calls arriving together share one prefill
            with self._cv:
                unary, joining = ([], []) if self._paused else self._take()
            for rows in (unary, joining):
                if rows:
                    try:
                        self._execute(rows)
                    except BaseException as exc:  # noqa: BLE001 - never kill the scheduler
                        log.exception("batch failed")
                        self._fail_all(rows, exc)
            if self._decoding.rows:
                try:
                    self._step()
                except BaseException as exc:  # noqa: BLE001
                    log.exception("decode step failed")
                    self._fail_all([(r.owner, r.index) for r in self._decoding.rows], exc)
                    self._decoding = DecodeBatch(self._engine)
            if not self._decoding.rows:
                self._last_step_at = None  # no generation running: the next one's first interval starts afresh
        for row in self._decoding.rows:
            self._fail(row.owner, RequestCancelled("the server is shutting down"))

    def _collect(self) -> None:
        """The collection window: wait until no call has arrived for a gap (at most `max_wait_s`).

        The gap rule lets a burst (or the callers whose answers just went out, sending their next
        request) share one prefill, instead of splitting into alternating half batches. The gap is
        `window_s`, or a tenth of a decode step where steps are slower (a CPU): a caller's round trip
        takes milliseconds, and missing the batch costs it, and the batch, a prefill of its own.
        """
        if self.window_s <= 0:
            return
        gap = min(self.max_wait_s, max(self.window_s, 0.1 * self._step_s))
        end = time.perf_counter() + max(self.max_wait_s, gap)
        with self._cv:
            while not self._closed:
                seen = self._arrivals
                now = time.perf_counter()
                if now >= end:
                    return
                self._cv.wait(timeout=min(gap, end - now))
                if self._arrivals == seen:
                    return

    def _join_due(self) -> bool:
        """Whether waiting Generate calls would join the running batch this round."""
        with self._cv:
            return not self._paused and self._live_pending() and bool(self._joiners())

    def _joiners(self) -> list[_Call]:
        """The waiting Generate calls, if they are to join the decode batch this round (`_should_join`);
        else none. Called under the lock."""
        waiting = [c for c in self._pending if c.kind == "generate"]
        return waiting if waiting and self._should_join(waiting) else []

    def _live_pending(self) -> bool:
        self._pending = [c for c in self._pending if not c.gone]
        return bool(self._pending)

    def _take(self) -> tuple[list[tuple[_Call, int]], list[tuple[_Call, int]]]:
        """This round's work: rows of the oldest waiting non-generate call's kind (merged round-robin
        over its compatible calls, oldest first, within budget), and Generate rows to admit into the
        decode batch (when `_should_join` says so, up to its free rows and token budget)."""
        if not self._live_pending():
            return [], []
        max_items = max(1, int(self._engine.limits.max_batch_items))
        unary: list[tuple[_Call, int]] = []
        head = next((c for c in self._pending if c.kind != "generate"), None)
        if head is not None:
            group = [c for c in self._pending if c.kind == head.kind and c.key == head.key]
            unary = self._round_robin(group, max_items, 0, 0, self._unary_budget())
        joining: list[tuple[_Call, int]] = []
        waiting = self._joiners()
        if waiting:
            running = self._decoding.rows
            longest = max((r.cost for r in running), default=0)
            joining = self._round_robin(waiting, max_items, len(running), longest,
                                        prefill_budget=self._budget(self.admit_cost) if running else None)
        self._pending = [c for c in self._pending if c.next_row < len(c.requests)]
        return unary, joining

    def _unary_budget(self) -> int:
        """Padded tokens for this round's prompt-only batch: the full `max_batch_tokens` when nothing
        is generating, else what `BatchCost` says takes `interleave` x a decode step (at least one
        row is taken whatever the budget)."""
        budget = self._budget(self.unary_cost) if self._decoding.rows else None
        return self.max_batch_tokens if budget is None else min(self.max_batch_tokens, budget)

    def _budget(self, cost: BatchCost) -> int | None:
        """Padded tokens of work that `cost` says takes `interleave` x a decode step (None: no cap)."""
        if self.interleave == float("inf"):
            return None
        return cost.tokens_within(self.interleave * self._step_s)

    def _round_robin(self, group: list[_Call], max_items: int, taken: int, longest: int,
                     budget: int | None = None, prefill_budget: int | None = None) -> list[tuple[_Call, int]]:
        """Rows taken round-robin over `group`, oldest first, until `max_items` rows (counting `taken`
        already running) or `budget` padded tokens (rows x longest row; default `max_batch_tokens`)
        are reached, and, for Generate rows joining a running batch, until their own prefill
        (new rows x longest new prompt) would exceed `prefill_budget`. The first row is always taken."""
        budget = self.max_batch_tokens if budget is None else budget
        rows: list[tuple[_Call, int]] = []
        longest_prompt = 0
        progress = True
        while progress and taken + len(rows) < max_items:
            progress = False
            for c in group:
                if c.next_row >= len(c.requests) or taken + len(rows) >= max_items:
                    continue
                cost = c.costs[c.next_row]
                if (taken or rows) and (taken + len(rows) + 1) * max(longest, cost) > budget:
                    continue
                prompt = _prompt_tokens(c, c.next_row)
                if (prefill_budget is not None and rows
                        and (len(rows) + 1) * max(longest_prompt, prompt) > prefill_budget):
                    continue
                rows.append((c, c.next_row))
                c.next_row += 1
                longest = max(longest, cost)
                longest_prompt = max(longest_prompt, prompt)
                progress = True
        return rows

    def _should_join(self, waiting: list[_Call]) -> bool:
        """Whether waiting Generate rows are admitted this round. A join costs the running rows one
        extra forward (the newcomers' prefill), so with rows running it waits until the newcomers
        number `join_ratio` x the running rows, or the oldest has waited `max_join_wait` steps."""
        running = len(self._decoding)
        if running == 0:
            return True
        if not self._decoding.joinable or running >= max(1, int(self._engine.limits.max_batch_items)):
            return False
        rows = sum(len(c.requests) - c.next_row for c in waiting)
        oldest = min(c.arrived_step for c in waiting)
        return rows >= self.join_ratio * running or self._steps - oldest >= self.max_join_wait

    def _execute(self, rows: list[tuple[_Call, int]]) -> None:
        """Run one unary batch, or admit Generate rows into the decode batch (its prefill)."""
        now = time.perf_counter()
        calls = list(dict.fromkeys(c for c, _ in rows))
        kind = calls[0].kind
        for c in calls:
            if not c.started:
                c.started = True
                self.observer.queued(kind, now - c.enqueued)
        eng = self._engine
        reqs = [c.requests[i] for c, i in rows]
        hook0 = eng.hook_seconds
        t0 = time.perf_counter()
        try:
            if kind == "generate":
                self._admit(rows, reqs)
            else:
                out = self._run_unary(kind, calls[0].key, reqs, [c.extras[i] for c, i in rows])
                for (c, i), res in zip(rows, out, strict=True):
                    self._row_done(c, i, res)
        except _USER_ERRORS as exc:
            if len(calls) == 1:
                self._fail(calls[0], _reindex(exc, [i for _, i in rows]))
            else:
                self._rerun_alone(rows, calls, exc)
        finally:
            longest = max(c.costs[i] for c, i in rows)
            seconds = time.perf_counter() - t0
            if kind != "generate":
                self.unary_cost.observe(len(rows) * longest, seconds)
            else:  # an admission: the newcomers' prefill
                self.admit_cost.observe(len(rows) * max(_prompt_tokens(c, i) for c, i in rows), seconds)
            self.observer.batch(kind, len(rows), len(rows) * longest, seconds, eng.hook_seconds - hook0)

    def _run_unary(self, kind: str, key: tuple[Any, ...], reqs: list[Request], extras: list[Any]) -> list[Any]:
        eng = self._engine
        if kind == "score":
            token_ids, top_k, full = key
            return list(eng.score(reqs, list(token_ids), top_k, full))
        if kind == "encode":
            layers, top_k, lat = key
            latents: dict[int, Sequence[int]] | None = {int(k): list(v) for k, v in lat} if lat else None
            return list(eng.encode(reqs, list(layers) if layers else None, top_k, latents))
        if kind == "residuals":
            layers, positions = key
            arr = eng.residuals(reqs, list(layers) if layers else None, list(positions))
            return [arr[b] for b in range(len(reqs))]
        if kind == "loss":
            return list(eng.loss(reqs, extras))
        raise AssertionError(f"unknown batch kind {kind}")  # pragma: no cover

    def _admit(self, rows: list[tuple[_Call, int]], reqs: list[Request]) -> None:
        """Prefill Generate rows and splice them into the running decode batch (their first tokens
        come with its next step)."""
        self._decoding.admit(reqs, [i for _, i in rows], [c for c, _ in rows], [c.extras[i] for c, i in rows])

    def _step(self) -> None:
        """One decode step: drop rows whose caller is gone, send every row its next token, run the forward."""
        batch = self._decoding
        batch.remove([r for r in batch.rows if r.owner.gone])
        if not batch.rows:
            return
        eng = self._engine
        rows, padded = len(batch), batch.padded_tokens
        hook0, t0 = eng.hook_seconds, time.perf_counter()
        if self._last_step_at is not None:
            self.observer.token_interval(t0 - self._last_step_at)
        self._last_step_at = t0
        for row, event in batch.pick():
            call: _Call = row.owner
            if isinstance(event, Exception):
                self._fail(call, event)
            elif not call.gone:
                call.sink(event)
                if event.finished:
                    self._row_done(call, row.index, None, send=False)
        batch.remove([r for r in batch.rows if r.owner.gone])
        batch.advance()
        self._steps += 1
        seconds = time.perf_counter() - t0
        self._step_s = seconds if self._step_s == 0 else 0.8 * self._step_s + 0.2 * seconds
        self.observer.batch("step", rows, padded, seconds, eng.hook_seconds - hook0)

    def _row_done(self, call: _Call, row: int, result: Any, send: bool = True) -> None:
        call.results[row] = result
        call.rows_left -= 1
        if call.rows_left == 0 and send and not call.failed:
            call.sink(call.results)

    def _fail(self, call: _Call, exc: BaseException) -> None:
        if not call.failed:
            call.failed = True
            call.sink(_Failure(exc))
        with self._cv:
            self._pending = [c for c in self._pending if c is not call]

    def _fail_all(self, rows: list[tuple[_Call, int]], exc: BaseException) -> None:
        for c in dict.fromkeys(c for c, _ in rows):
            self._fail(c, exc)

    def _rerun_alone(self, rows: list[tuple[_Call, int]], calls: list[_Call], exc: BaseException) -> None:
        """A merged batch hit a validation error: run each call's rows of it alone to find whose it is."""
        log.debug("merged batch failed (%s); rerunning its %d calls alone", exc, len(calls))
        for c in calls:
            mine = [(cc, i) for cc, i in rows if cc is c]
            if c.gone:
                continue
            try:
                if c.kind == "generate":
                    self._admit(mine, [c.requests[i] for _, i in mine])
                else:
                    out = self._run_unary(c.kind, c.key, [c.requests[i] for _, i in mine], [c.extras[i] for _, i in mine])
                    for (_, i), res in zip(mine, out, strict=True):
                        self._row_done(c, i, res)
            except _USER_ERRORS as own:
                self._fail(c, _reindex(own, [i for _, i in mine]))


def _prompt_tokens(call: _Call, row: int) -> int:
    """Tokens a row's prefill reads: a Generate row's rendered prompt, else its whole cost."""
    return len(call.extras[row]) if call.kind == "generate" and call.extras[row] is not None else call.costs[row]


def _reindex(exc: BaseException, rows: list[int]) -> BaseException:
    """Map 'items[k]' in a message from a partial batch back to the call's own row numbers."""
    msg = str(exc)
    fixed = re.sub(r"items\[(\d+)\]", lambda m: f"items[{rows[int(m.group(1))]}]" if int(m.group(1)) < len(rows)
                   else m.group(0), msg)
    if fixed == msg:
        return exc
    return type(exc)(fixed)


def n_latents(r: Request, resolver: Any) -> int:
    """SAE latents a request's interventions name (registered sets resolved through `resolver`;
    unknown ids count 0): what the servers' latents-per-request metric records."""
    n = 0
    for iv in r.interventions:
        if isinstance(iv, (AblateLatents, ClampLatents)):
            n += sum(len(v) for v in iv.latents.values())
            if iv.latent_set_id:
                with contextlib.suppress(Exception):
                    n += sum(len(v) for v in resolver.latent_set(iv.latent_set_id).values())
    return n


def batched(engine: Any, window_s: float = 0.005, max_batch_tokens: int = 16384,
            observer: BatchObserver | None = None, max_wait_s: float = 0.05, join_ratio: float = 0.25,
            max_join_wait: int = 4, interleave: float = 4.0) -> Any:
    """`engine` behind a Batcher when it is an HFEngine (else unchanged)."""
    if isinstance(engine, HFEngine):
        return Batcher(engine, window_s, max_batch_tokens, observer, max_wait_s, join_ratio, max_join_wait,
                       interleave)
    return engine


__all__ = ["BatchCost", "BatchObserver", "Batcher", "RequestCancelled", "batched", "cancel_scope"]
