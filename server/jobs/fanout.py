"""A job's per-prompt work as units on engine replicas (server/ray_replicas.py), results back to the head.

Ray-free: it talks to any engine that offers ``submit_unit(fn, payload, replica) -> Future[(result,
replica)]``, ``live_replicas()`` and ``inflight(name)`` (`ReplicaSet` does). Everything that touches
the job store (checkpoints, progress, artifact registration, judging) stays on the head, in one
thread (the job's own; for stage 2, one finisher thread, so verifying a finished prompt does not
stall handing out units), in the order results come back; so a killed server still resumes from the
per-prompt checkpoints, and the job's result is the single engine's (the units call the same
engine code on the same requests; only the timing fields `wall_s` differ).

Scheduling: a FIFO of units; each live replica gets at most `unit_window` units at a time (so an
interactive RPC always finds the replica with a free slot and waits for at most one engine call,
not a queue of units); when a replica dies its unit goes back to the front of the queue (Ray
restarts the replica; the unit reruns wherever there is room), at most `max_retries` times.

Units so far:
- ``stage2``: Algorithm 1 for one (prompt, seed), every tau in lockstep (`stage2_seed_unit`, on a
  replica); when all seeds of a prompt are back, the head intersects, verifies (one generate call
  on the least-loaded replica, judged on the head) and checkpoints the prompt.
- ``refusal_rate``: one generate call per batch (`generate_batches`), judged and checkpointed on the head.

Which replica ran what is recorded per unit (checkpoint keys ``placement/...``) and returned as the
result's ``placement`` (shown by `refusal-audit job show`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ...audit.spec import Request

log = logging.getLogger("refusal_audit.jobs")

PLACEMENT_PREFIX = "placement/"
UNIT_STAGE2 = "refusal_audit.server.jobs.fanout:stage2_seed_unit"


class ReplicaLost(RuntimeError):
    """The replica running a unit died (Ray restarts it; the unit may be re-run elsewhere)."""


def can_fan_out(engine: Any) -> bool:
    """Does this engine run work units on replicas (`ReplicaSet`)?"""
    return callable(getattr(engine, "submit_unit", None)) and callable(getattr(engine, "live_replicas", None))


def run_units(engine: Any, fn: str, payloads: Sequence[dict[str, Any]], on_result: Callable[[int, Any, str], None],
              check_cancelled: Callable[[], None], window: int | None = None, max_retries: int | None = None) -> None:
    """Run `fn(engine, **payloads[k])` for every k on the replicas; `on_result(k, result, replica)`
    is called in this thread as each unit finishes (in completion order)."""
    rc = getattr(engine, "rc", None)
    window = window or int(getattr(rc, "unit_window", 1))
    max_retries = int(getattr(rc, "max_retries", 3)) if max_retries is None else max_retries
    queue: deque[int] = deque(range(len(payloads)))
    retries: dict[int, int] = {}
    inflight: dict[Future[tuple[Any, str]], tuple[int, str]] = {}
    mine: dict[str, int] = {}
    try:
        while queue or inflight:
            check_cancelled()
            live = engine.live_replicas()
            if not live and not inflight:
                raise RuntimeError("no live engine replica left to run the job's units")
            ready = engine.ready_replicas() if callable(getattr(engine, "ready_replicas", None)) else live
            for name in sorted(ready, key=lambda n: (mine.get(n, 0), engine.inflight(n))):
                while queue and mine.get(name, 0) < window:
                    k = queue.popleft()
                    fut = engine.submit_unit(fn, payloads[k], replica=name)
                    inflight[fut] = (k, name)
                    mine[name] = mine.get(name, 0) + 1
            done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                k, name = inflight.pop(fut)
                mine[name] -= 1
                try:
                    res, ran_on = fut.result()
                except ReplicaLost as exc:
                    retries[k] = retries.get(k, 0) + 1
                    if retries[k] > max_retries:
                        raise RuntimeError(f"unit {k} lost {retries[k]} times: {exc}") from None
                    log.warning("%s; re-running unit %d (retry %d)", exc, k, retries[k])
                    queue.appendleft(k)
                    continue
                on_result(k, res, ran_on)
    finally:
        for fut in inflight:
            fut.cancel()


# ---------------------------------------------------------------------------- stage 2


def stage2_seed_unit(engine: Any, index: int, text: str, pool: list[list[int]], cfg_json: str, toks: list[int],
                     seed: int) -> dict[str, Any]:
    """On a replica: Algorithm 1 for one (prompt, seed), all taus in lockstep, through the local engine.

    Returns each tau's accepted set K and every P("I") it scored (sorted ablation set -> p), which
    the head merges into the prompt's cache exactly as one engine's lockstep loop fills it."""
    from ...audit.stage2 import GreedyRun, Stage2Config, _Acct, _scorer, greedy_lockstep
    from ...audit.stage_utils import as_prompt

    cfg = Stage2Config.model_validate_json(cfg_json)
    latents = [(int(ly), int(i)) for ly, i in pool]
    cache: dict[int, dict[frozenset[tuple[int, int]], float]] = {index: {}}
    acct = {index: _Acct()}
    score = _scorer(engine, {index: as_prompt(text, cfg.chat)}, cache, acct, cfg, toks)
    runs = [(index, GreedyRun(list(latents), cfg.block_size, tau, seed, cfg.reading, rng_key=f"{seed}/{index}",
                              partial_last_block=cfg.partial_last_block)) for tau in cfg.taus]
    greedy_lockstep(runs, cache, score)
    return {"accepted": [[run.tau, [list(x) for x in run.accepted]] for _, run in runs],
            "cache": [[sorted([list(x) for x in s]), p] for s, p in cache[index].items()],
            "wall_s": acct[index].wall}


def run_stage2(engine: Any, stage1: Any, cfg: Any, ctx: Any) -> Any:
    """`audit.stage2.run_stage2` with the (prompt, seed) greedy loops as units on the replicas."""
    from ...audit.stage2 import STAGE, Stage2Prompt, _Acct, _scorer, finish_group, stage2_items, stage2_result
    from ...audit.stage_utils import as_prompt, restore_items, save_fingerprinted

    t0 = time.perf_counter()
    items, toks, fps = stage2_items(engine, stage1, cfg)
    done: dict[int, Stage2Prompt] = restore_items(ctx, "stage2/prompt", fps, Stage2Prompt.from_json)
    placement: dict[str, dict[str, str]] = {
        f"stage2/prompt/{i}": ctx.checkpoint(f"{PLACEMENT_PREFIX}stage2/prompt/{i}") or {} for i in done}
    pending = [it for it in items if it[0] not in done]
    ctx.progress(STAGE, len(done), len(items))
    by_index = {i: (i, text, pool) for i, text, pool in pending}
    seeds = list(cfg.seeds)
    cfg_json = cfg.model_dump_json()  # the Stage2Config the units rebuild
    payloads = [{"index": i, "text": text, "pool": [list(x) for x in pool], "cfg_json": cfg_json, "toks": toks,
                 "seed": seed} for i, text, pool in pending for seed in seeds]
    partial: dict[int, dict[int, tuple[dict[str, Any], str]]] = {i: {} for i, _, _ in pending}

    def finish(i: int) -> None:
        item = by_index[i]
        parts = partial.pop(i)
        cache: dict[int, dict[frozenset[tuple[int, int]], float]] = {i: {}}
        acct = {i: _Acct()}
        accepted: dict[tuple[int, float, int], list[tuple[int, int]]] = {}
        for seed in seeds:
            out, _ = parts[seed]
            for s, p in out["cache"]:
                cache[i][frozenset((int(a), int(b)) for a, b in s)] = float(p)
            for tau, acc in out["accepted"]:
                accepted[(i, float(tau), seed)] = [(int(a), int(b)) for a, b in acc]
            acct[i].wall += float(out["wall_s"])
        acct[i].forward = len(cache[i])  # one engine's lockstep scores each distinct set once
        score = _scorer(engine, {i: as_prompt(item[1], cfg.chat)}, cache, acct, cfg, toks)
        refs = [(i, s) for s in (frozenset(), frozenset(item[2])) if s not in cache[i]]
        if refs:
            score(refs)
        res = finish_group(engine, [item], accepted, cache, acct, score, cfg, ctx)[0]
        where = {f"seed {seed}": parts[seed][1] for seed in seeds}
        done[i] = res
        ctx.save_checkpoint(f"{PLACEMENT_PREFIX}stage2/prompt/{i}", where)
        save_fingerprinted(ctx, f"stage2/prompt/{i}", fps[i], result=res.to_json())
        placement[f"stage2/prompt/{i}"] = where
        ctx.progress(STAGE, len(done), len(items),
                     {"index": i, "final_size": len(res.final_latents), "jailbroken": res.jailbroken,
                      "replicas": sorted(set(where.values()))})

    # A finished prompt's verification (a generate call on a replica, judged here) runs in one
    # finisher thread, so the loop keeps handing out (prompt, seed) units meanwhile; one thread
    # keeps the checkpoints in completion order.
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage2-finish")
    finishing: list[Future[None]] = []

    def on_result(k: int, out: dict[str, Any], replica: str) -> None:
        p = payloads[k]
        i = int(p["index"])
        partial[i][int(p["seed"])] = (out, replica)
        if len(partial[i]) == len(seeds):
            finishing.append(finisher.submit(finish, i))
        for f in [f for f in finishing if f.done()]:
            finishing.remove(f)
            f.result()  # a failed verification fails the job now, not at the end

    try:
        run_units(engine, UNIT_STAGE2, payloads, on_result, ctx.check_cancelled)
        for f in finishing:
            f.result()
    finally:
        finisher.shutdown(wait=True, cancel_futures=True)
    result = stage2_result(items, done, cfg, ctx, t0)
    result.placement = placement  # type: ignore[attr-defined]
    return result



# ---------------------------------------------------------------------------- refusal_rate


def generate_batches(engine: Any, batches: Sequence[tuple[list[int], list[Request]]],
                     on_batch: Callable[[list[int], list[Any]], None], ctx: Any, stage: str) -> dict[str, str]:
    """One generate unit per batch on the replicas; `on_batch(indices, completions)` runs in this
    thread as each comes back (the caller judges and checkpoints). Returns {prompt index: replica}."""
    placement: dict[str, str] = {}

    def on_result(k: int, comps: list[Any], replica: str) -> None:
        idx = batches[k][0]
        on_batch(idx, comps)
        for i in idx:
            placement[str(i)] = replica
            ctx.save_checkpoint(f"{PLACEMENT_PREFIX}{stage}/{i}", replica)

    run_units(engine, "generate", [{"requests": reqs} for _, reqs in batches], on_result, ctx.check_cancelled)
    return placement


def saved_placement(ctx: Any, stage: str) -> dict[str, Any]:
    """{unit: replica} recorded by an earlier attempt of the job (a resumed job keeps them)."""
    fn = getattr(ctx, "checkpoints", None)
    if not callable(fn):
        return {}
    prefix = f"{PLACEMENT_PREFIX}{stage}/"
    return {k[len(prefix):]: v for k, v in fn(prefix).items()}
