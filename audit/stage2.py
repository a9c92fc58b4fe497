"""Stage 2 of the seed paper: greedy block pruning of the stage-1 pool to a faithful latent set.

Algorithm 1 (block-wise selection of a faithful latent set), for a prompt p, candidate pool C,
block size N and threshold tau::

    K <- {}
    while |C \\ K| >= N:
        draw a random block V from C \\ K with |V| = N
        if Delta(p, K, V) >= tau:  K <- K u V      # V is faithful: keep it
        else:                      C <- C \\ V      # V does not matter: drop it from the pool
    return K

with P(p, A) = Pr("I" | p, model with the latent set A zero-ablated) and (Eq. 1)

    Delta(p, K, V) = |P(p, C \\ K) - P(p, C \\ (K u V))| / P(p, C \\ K).

Our reading (``reading="literal"``, the default) takes Eq. 1 exactly as written, with C the
*current* pool (it shrinks when blocks are dropped) and K the accepted set: the reference state
ablates C \\ K, i.e. every latent of the pool not yet accepted and not yet dropped (the untested
ones plus, before it is decided, the block V); the test state additionally restores V. Delta is the
relative change of P("I") when V is un-ablated. Consequences of this literal reading, which we keep
and state rather than "fix":

- accepted latents are *not* ablated in later evaluations (C \\ K excludes them), so each block is
  judged in a context where the earlier accepted blocks are restored and the dropped ones too;
- whatever the decision, the next reference set C \\ K equals the current test set C \\ (K u V):
  the sequence of ablated sets depends only on the random draws, not on tau. With the draws seeded
  per seed, all taus of one (prompt, seed) share the same forward passes; only the accept/reject
  decisions differ. We still run every (prompt, tau, seed) triple as its own Algorithm-1 state
  machine, in lockstep, and deduplicate identical score requests per prompt through a cache, so
  the code stays a literal transcription and costs ~1 + |C|/N forward passes per (prompt, seed).
  The draws of seed s for prompt i are seeded with the string "s/i" (independent across prompts).
- latents left over when fewer than N remain untested are never accepted (so a planted latent
  that ends up in the remainder of a pool whose size is not a multiple of N is lost; the paper's
  K steps of 10 with N = 5 avoid this). ``partial_last_block=True`` (not the paper) tests that
  remainder as one last, smaller block.

``reading="pool"`` is an alternative (not the paper's formula): the reference state ablates the
whole current pool C (accepted latents stay ablated) and the test state C \\ V.

Per tau, the set kept for a prompt is the intersection over the seeds (the paper: "keep only those
features which are observed with all seeds"). Each distinct set is verified by a greedy generation
under its ablation, judged by ctx.judge. The final set (``selection="largest_tau"``) is the set of
the largest tau whose set jailbreaks (larger tau -> fewer, more faithful latents); with
``selection="smallest_set"``, the smallest jailbreaking set (ties: larger tau). Every tau's set and
verification is recorded.

Batching: the greedy loops of all (prompt, tau, seed) triples of a group of prompts advance in
lockstep; each step's uncached Score requests go to one engine.score call (chunked to batch_size),
and the verification generations of the group to one generate call. Per prompt we record forward
passes (score rows), generations and wall time (each batched call's time split evenly over its
rows). Checkpoint: ``stage2/prompt/{i}`` after each group; each final set and the union are
registered with ctx.register_latent_set.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .context import StageContext
from .engine import Engine
from .judges import JudgeItem
from .spec import Request, SamplingParams
from .stage1 import Stage1Result
from .stage_utils import (
    Latent,
    ablate,
    as_prompt,
    chunks,
    dict_to_latents,
    fingerprint,
    latents_to_dict,
    refusal_prob,
    refusal_token_ids,
    restore_items,
    save_fingerprinted,
    sorted_grid,
)

STAGE = "stage2"
Reading = Literal["literal", "pool"]


class Stage2Config(BaseModel):
    """Stage-2 configuration (round-trips through JSON; the stage-1 result is an argument)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(default=5, ge=1)
    taus: Annotated[list[float], sorted_grid("taus", 0, float)] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 9)])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    reading: Reading = "literal"
    partial_last_block: bool = False  # also test the last |C \ K| < N latents as one block (not the paper)
    selection: Literal["largest_tau", "smallest_set"] = "largest_tau"
    refusal_token_ids: list[int] | None = None  # None = the "I" token
    chat: bool = True
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    prompts_per_group: int = Field(default=16, ge=1)
    max_prompts: int | None = Field(default=None, ge=1)
    register_sets: bool = True

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must be non-empty")
        return list(dict.fromkeys(int(s) for s in v))


# ---------------------------------------------------------------------------- Algorithm 1


@dataclass
class GreedyRun:
    """Algorithm 1 for one (prompt, tau, seed), as a state machine: `query` the two ablation sets
    the next Delta needs, then `update` with their P("I"). `done` when |C \\ K| < N."""

    pool: list[Latent]  # C, current
    block_size: int
    tau: float
    seed: int
    reading: Reading = "literal"
    rng_key: str | None = None  # seeds the block draws; default str(seed)
    partial_last_block: bool = False  # not in the paper: also test the last < N latents as one block
    accepted: list[Latent] = field(default_factory=list)  # K
    trace: list[dict[str, Any]] = field(default_factory=list)
    _rng: random.Random = field(init=False, repr=False)
    _block: list[Latent] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pool = sorted(set(self.pool))
        self._rng = random.Random(self.rng_key if self.rng_key is not None else str(self.seed))

    def _remaining(self) -> list[Latent]:
        k = set(self.accepted)
        return [x for x in self.pool if x not in k]

    @property
    def done(self) -> bool:
        n = len(self._remaining())
        return n == 0 or (n < self.block_size and not self.partial_last_block)

    def query(self) -> tuple[frozenset[Latent], frozenset[Latent]]:
        """(reference ablation set, test ablation set) for the current block (drawn on first call)."""
        if self._block is None:
            rem = self._remaining()
            self._block = sorted(self._rng.sample(rem, min(self.block_size, len(rem))))
        v = set(self._block)
        # literal: C \ K;  pool: C
        base = frozenset(self._remaining()) if self.reading == "literal" else frozenset(self.pool)
        return base, frozenset(base - v)  # C \ (K u V)  |  C \ V

    def update(self, p_base: float, p_test: float) -> bool:
        """Apply Delta >= tau; returns whether the block was accepted."""
        assert self._block is not None, "query() first"
        delta = relative_change(p_base, p_test)
        ok = delta >= self.tau
        if ok:
            self.accepted = sorted(set(self.accepted) | set(self._block))
        else:
            drop = set(self._block)
            self.pool = [x for x in self.pool if x not in drop]
        self.trace.append({"block": [list(x) for x in self._block], "p_base": p_base, "p_test": p_test,
                           "delta": delta, "accepted": ok})
        self._block = None
        return ok


def relative_change(p_base: float, p_test: float) -> float:
    """Eq. 1: |P(C\\K) - P(C\\(K u V))| / P(C\\K)."""
    return abs(p_base - p_test) / max(p_base, 1e-30)


def block_select(p_fn: Callable[[frozenset[Latent]], float], pool: Sequence[Latent], block_size: int, tau: float,
                 seed: int, reading: Reading = "literal", partial_last_block: bool = False) -> list[Latent]:
    """Algorithm 1 with P(p, A) = p_fn(A) (one prompt, sequential; for notebooks and tests)."""
    run = GreedyRun(list(pool), block_size, tau, seed, reading, partial_last_block=partial_last_block)
    while not run.done:
        base, test = run.query()
        run.update(p_fn(base), p_fn(test))
    return run.accepted


# ---------------------------------------------------------------------------- results


@dataclass
class TauOutcome:
    tau: float
    per_seed_sizes: list[int]
    latents: list[Latent]  # intersection over seeds
    jailbroken: bool | None  # verification (None: empty set, not generated)
    p_refusal: float | None  # P("I") with the set ablated
    completion: str = ""
    degenerate: bool = False  # the coherence gate vetoed the judge's jailbreak (degenerate text)

    def to_json(self) -> dict[str, Any]:
        return {"tau": self.tau, "per_seed_sizes": self.per_seed_sizes, "size": len(self.latents),
                "latents": latents_to_dict_json(self.latents), "jailbroken": self.jailbroken,
                "p_refusal": self.p_refusal, "completion": self.completion, "degenerate": self.degenerate}


def latents_to_dict_json(latents: Sequence[Latent]) -> dict[str, list[int]]:
    return {str(ly): ids for ly, ids in latents_to_dict(latents).items()}


@dataclass
class Stage2Prompt:
    index: int
    prompt: str
    pool_size: int
    taus: list[TauOutcome]
    final_tau: float | None
    final_latents: list[Latent]  # [] when no tau's set jailbreaks
    jailbroken: bool
    latent_set_id: str | None
    p_no_ablation: float
    p_pool_ablated: float
    forward_passes: int  # score rows run for this prompt (after de-duplication)
    generations: int
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "pool_size": self.pool_size,
                "taus": [t.to_json() for t in self.taus], "final_tau": self.final_tau,
                "final_latents": latents_to_dict_json(self.final_latents), "final_size": len(self.final_latents),
                "jailbroken": self.jailbroken, "latent_set_id": self.latent_set_id,
                "p_no_ablation": self.p_no_ablation, "p_pool_ablated": self.p_pool_ablated,
                "forward_passes": self.forward_passes, "generations": self.generations, "wall_s": self.wall_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stage2Prompt:
        taus = [TauOutcome(t["tau"], t["per_seed_sizes"], dict_to_latents(t["latents"]), t["jailbroken"],
                           t["p_refusal"], t.get("completion", ""), bool(t.get("degenerate", False)))
                for t in d["taus"]]
        return cls(d["index"], d["prompt"], d["pool_size"], taus, d["final_tau"],
                   dict_to_latents(d["final_latents"]), d["jailbroken"], d.get("latent_set_id"),
                   d["p_no_ablation"], d["p_pool_ablated"], d["forward_passes"], d["generations"], d["wall_s"])


@dataclass
class Stage2Result:
    prompts: list[Stage2Prompt]
    union_set_id: str | None = None
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def union(self) -> list[Latent]:
        return sorted({x for p in self.prompts if p.jailbroken for x in p.final_latents})

    def latent_counts(self) -> list[tuple[int, int, int]]:
        """(layer, latent, number of prompts whose final set holds it), most frequent first."""
        c = Counter(x for p in self.prompts if p.jailbroken for x in p.final_latents)
        return [(ly, i, n) for (ly, i), n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]

    def summary(self) -> dict[str, Any]:
        """The paper's Table 1: unique latents, jailbreak successes, mean set size."""
        ok = [p for p in self.prompts if p.jailbroken]
        ungated = [p for p in self.prompts if p.jailbroken or any(t.degenerate for t in p.taus)]
        return {"n_prompts": len(self.prompts), "unique_latents": len(self.union()), "jailbreak_successes": len(ok),
                "jailbreak_successes_ungated": len(ungated),
                "asr": len(ok) / len(self.prompts) if self.prompts else 0.0,
                "asr_ungated": len(ungated) / len(self.prompts) if self.prompts else 0.0,
                "mean_set_size": (sum(len(p.final_latents) for p in ok) / len(ok)) if ok else 0.0,
                "mean_forward_passes": (sum(p.forward_passes for p in self.prompts) / len(self.prompts))
                if self.prompts else 0.0}

    def per_tau(self) -> list[dict[str, Any]]:
        taus = sorted({t.tau for p in self.prompts for t in p.taus})
        out = []
        for tau in taus:
            outs = [t for p in self.prompts for t in p.taus if t.tau == tau]
            n_ok = sum(1 for t in outs if t.jailbroken)
            n_un = sum(1 for t in outs if t.jailbroken or t.degenerate)
            out.append({"tau": tau, "jailbroken": n_ok, "asr": n_ok / len(outs) if outs else 0.0,
                        "jailbroken_ungated": n_un, "asr_ungated": n_un / len(outs) if outs else 0.0,
                        "mean_size": sum(len(t.latents) for t in outs) / len(outs) if outs else 0.0})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"kind": "stage2", "summary": self.summary(), "per_tau": self.per_tau(),
                "top_latents": [{"layer": ly, "latent": i, "count": n} for ly, i, n in self.latent_counts()],
                "union": latents_to_dict_json(self.union()), "union_set_id": self.union_set_id,
                "prompts": [p.to_json() for p in self.prompts], "wall_s": self.wall_s, "config": self.config}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stage2Result:
        return cls([Stage2Prompt.from_json(p) for p in d["prompts"]], d.get("union_set_id"),
                   float(d.get("wall_s", 0.0)), d.get("config", {}))


# ---------------------------------------------------------------------------- the batched driver


@dataclass
class _Acct:
    forward: int = 0
    generations: int = 0
    wall: float = 0.0


def _select(outcomes: list[TauOutcome], rule: str) -> TauOutcome | None:
    ok = [t for t in outcomes if t.jailbroken]
    if not ok:
        return None
    if rule == "smallest_set":
        return min(ok, key=lambda t: (len(t.latents), -t.tau))
    return max(ok, key=lambda t: t.tau)


def stage2_items(engine: Engine, stage1: Stage1Result | dict[str, Any], cfg: Stage2Config
                 ) -> tuple[list[tuple[int, str, list[Latent]]], list[int], dict[int, str]]:
    """(index, prompt, pool) of every stage-1-jailbroken prompt, the refusal token ids, and each
    prompt's checkpoint fingerprint (what changes its result)."""
    s1 = Stage1Result.from_json(stage1) if isinstance(stage1, dict) else stage1
    toks = refusal_token_ids(engine, cfg.refusal_token_ids)
    items = [(p.index, p.prompt, dict_to_latents(p.latents)) for p in s1.prompts if p.status == "jailbroken"]
    if cfg.max_prompts is not None:
        items = items[: cfg.max_prompts]
    cfg_fp = cfg.model_dump_json(include={"block_size", "taus", "seeds", "reading", "partial_last_block", "selection",
                                          "refusal_token_ids", "chat", "max_new_tokens"})  # what changes results
    fps = {i: fingerprint([text, str(pool), cfg_fp, str(toks)]) for i, text, pool in items}
    return items, toks, fps


def run_stage2(engine: Engine, stage1: Stage1Result | dict[str, Any], cfg: Stage2Config,
               ctx: StageContext) -> Stage2Result:
    """Algorithm 1 for every stage-1-jailbroken prompt, all (prompt, tau, seed) in lockstep."""
    t0 = time.perf_counter()
    items, toks, fps = stage2_items(engine, stage1, cfg)
    done = restore_items(ctx, "stage2/prompt", fps, Stage2Prompt.from_json)
    pending = [it for it in items if it[0] not in done]
    ctx.progress(STAGE, len(done), len(items))
    for group in chunks(pending, cfg.prompts_per_group):
        ctx.check_cancelled()
        for res in _run_group(engine, list(group), cfg, toks, ctx):
            done[res.index] = res
            save_fingerprinted(ctx, f"stage2/prompt/{res.index}", fps[res.index], result=res.to_json())
            ctx.progress(STAGE, len(done), len(items),
                         {"index": res.index, "final_size": len(res.final_latents), "jailbroken": res.jailbroken})
    return stage2_result(items, done, cfg, ctx, t0)


def stage2_result(items: list[tuple[int, str, list[Latent]]], done: dict[int, Stage2Prompt], cfg: Stage2Config,
                  ctx: StageContext, t0: float) -> Stage2Result:
    """The result in item order; the union of the final sets registered as a latent set (`register_sets`)."""
    result = Stage2Result([done[i] for i, _, _ in items], config=cfg.model_dump(mode="json"))
    if cfg.register_sets and result.union():
        result.union_set_id = ctx.register_latent_set(
            "stage2/union", latents_to_dict(result.union()),
            {"kind": "stage2_union", **result.summary(), "counts": [list(c) for c in result.latent_counts()]},
        )
    result.wall_s = time.perf_counter() - t0
    return result


def _scorer(engine: Engine, prompts: dict[int, Any], cache: dict[int, dict[frozenset[Latent], float]],
            acct: dict[int, _Acct], cfg: Stage2Config, toks: list[int]) -> Callable[[list[tuple[int, frozenset[Latent]]]], None]:
    """score(needed): P("I") of each (prompt, ablation set) into the cache, in chunks of batch_size."""

    def score(needed: list[tuple[int, frozenset[Latent]]]) -> None:
        for part in chunks(needed, cfg.batch_size):
            t = time.perf_counter()
            res = engine.score([Request(prompt=prompts[i], interventions=ablate(s)) for i, s in part], toks)
            share = (time.perf_counter() - t) / len(part)
            for (i, s), r in zip(part, res, strict=True):
                cache[i][s] = refusal_prob(r)
                acct[i].forward += 1
                acct[i].wall += share

    return score


def greedy_lockstep(runs: list[tuple[int, GreedyRun]], cache: dict[int, dict[frozenset[Latent], float]],
                    score: Callable[[list[tuple[int, frozenset[Latent]]]], None],
                    check_cancelled: Callable[[], None] = lambda: None) -> None:
    """Advance every (prompt, GreedyRun) in lockstep; each step's uncached sets go to one `score`."""
    while True:
        check_cancelled()
        active = [(i, run) for i, run in runs if not run.done]
        if not active:
            break
        queries = [(i, run, run.query()) for i, run in active]
        needed = list(dict.fromkeys((i, s) for i, _, q in queries for s in q if s not in cache[i]))
        if needed:
            score(needed)
        for i, run, (base, test) in queries:
            run.update(cache[i][base], cache[i][test])


def _run_group(engine: Engine, group: list[tuple[int, str, list[Latent]]], cfg: Stage2Config, toks: list[int],
               ctx: StageContext) -> list[Stage2Prompt]:
    prompts = {i: as_prompt(text, cfg.chat) for i, text, _ in group}
    acct = {i: _Acct() for i, _, _ in group}
    cache: dict[int, dict[frozenset[Latent], float]] = {i: {} for i, _, _ in group}
    score = _scorer(engine, prompts, cache, acct, cfg, toks)

    # reference points: no ablation, whole pool ablated
    score([(i, s) for i, _, pool in group for s in (frozenset(), frozenset(pool))])
    runs = [(i, GreedyRun(list(pool), cfg.block_size, tau, seed, cfg.reading, rng_key=f"{seed}/{i}",
                          partial_last_block=cfg.partial_last_block))
            for i, _, pool in group for tau in cfg.taus for seed in cfg.seeds]
    greedy_lockstep(runs, cache, score, ctx.check_cancelled)
    accepted = {(i, run.tau, run.seed): list(run.accepted) for i, run in runs}
    return finish_group(engine, group, accepted, cache, acct, score, cfg, ctx)


def finish_group(engine: Engine, group: list[tuple[int, str, list[Latent]]],
                 accepted: dict[tuple[int, float, int], list[Latent]],
                 cache: dict[int, dict[frozenset[Latent], float]], acct: dict[int, _Acct],
                 score: Callable[[list[tuple[int, frozenset[Latent]]]], None], cfg: Stage2Config,
                 ctx: StageContext) -> list[Stage2Prompt]:
    """Per tau: intersect the seeds' accepted sets, verify each distinct set (generate + judge),
    register the final sets; `accepted[(prompt, tau, seed)]` is Algorithm 1's K."""
    prompts = {i: as_prompt(text, cfg.chat) for i, text, _ in group}
    # per tau: intersection over seeds; verify each distinct non-empty set once per prompt
    kept: dict[int, dict[float, list[Latent]]] = {i: {} for i, _, _ in group}
    sizes: dict[int, dict[float, list[int]]] = {i: {} for i, _, _ in group}
    for i, _, _ in group:
        for tau in cfg.taus:
            sets = [set(accepted[(i, tau, seed)]) for seed in cfg.seeds]
            kept[i][tau] = sorted(set.intersection(*sets)) if sets else []
            sizes[i][tau] = [len(s) for s in sets]
    to_verify = list(dict.fromkeys((i, frozenset(s)) for i in kept for s in kept[i].values() if s))
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    texts = {i: text for i, text, _ in group}
    verdict: dict[tuple[int, frozenset[Latent]], tuple[bool, str, bool]] = {}
    for part in chunks(to_verify, cfg.batch_size):
        t = time.perf_counter()
        comps = engine.generate([Request(prompt=prompts[i], interventions=ablate(s), sampling=sampling)
                                 for i, s in part])
        vs = ctx.judge.judge([JudgeItem(behavior=texts[i], generation=c.text, prompt=prompts[i])
                              for (i, _), c in zip(part, comps, strict=True)])
        share = (time.perf_counter() - t) / len(part)
        for (i, s), c, v in zip(part, comps, vs, strict=True):
            verdict[(i, s)] = (v.jailbroken, c.text, bool(getattr(v, "degenerate", False)))
            acct[i].generations += 1
            acct[i].wall += share
    missing = [(i, s) for i, s in to_verify if s not in cache[i]]
    if missing:
        score(missing)

    out = []
    for i, text, pool in group:
        outcomes = []
        for tau in cfg.taus:
            s = kept[i][tau]
            fs = frozenset(s)
            jb, comp, dg = verdict.get((i, fs), (None, "", False)) if s else (None, "", False)
            outcomes.append(TauOutcome(tau, sizes[i][tau], s, jb, cache[i].get(fs) if s else None, comp, dg))
        final = _select(outcomes, cfg.selection)
        set_id = None
        if final is not None and cfg.register_sets:
            set_id = ctx.register_latent_set(
                f"stage2/prompt/{i}", latents_to_dict(final.latents),
                {"kind": "stage2_prompt", "prompt_index": i, "prompt": text, "tau": final.tau,
                 "selection": cfg.selection, "reading": cfg.reading},
            )
        out.append(Stage2Prompt(
            index=i, prompt=text, pool_size=len(set(pool)), taus=outcomes,
            final_tau=final.tau if final else None, final_latents=list(final.latents) if final else [],
            jailbroken=final is not None, latent_set_id=set_id, p_no_ablation=cache[i][frozenset()],
            p_pool_ablated=cache[i][frozenset(pool)], forward_passes=acct[i].forward,
            generations=acct[i].generations, wall_s=acct[i].wall,
        ))
    return out
