"""Stages 1 and 2 on planted SAE latents (tests/planted.py): three latents at layer 3 whose decoders
carry the refusal direction and whose joint ablation (only) jailbreaks; decoys aligned with r that
never fire; small random distractors. Generations are real and judged by the SubstringJudge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planted import (
    DECOYS,
    DISTRACTOR_LAYER,
    HARMFUL,
    HARMLESS,
    PLANTED,
    PLANTED_LAYER,
    CountingEngine,
    decoder_weights,
    directions,
    make_engine,
)
from refusal_audit.audit.context import Cancelled, LocalContext
from refusal_audit.audit.errors import InvalidRequest
from refusal_audit.audit.stage1 import Stage1Config, Stage1Result, run_stage1
from refusal_audit.audit.stage2 import GreedyRun, Stage2Config, Stage2Result, block_select, run_stage2

pytestmark = pytest.mark.usefixtures("one_thread")
PLANTED_SET = [(PLANTED_LAYER, i) for i in PLANTED]
PROMPTS = HARMFUL[:6] + HARMLESS[:2]  # the last two are not refused at baseline


@pytest.fixture(scope="module")
def setup():
    engine, saes = make_engine()
    return engine, directions()[0], saes


@pytest.fixture(scope="module")
def stage1(setup):
    engine, cos, _ = setup
    ctx = LocalContext()
    counting = CountingEngine(engine)
    cfg = Stage1Config(exclude_layers=[], max_new_tokens=6, k_max=40)
    return run_stage1(counting, PROMPTS, cos, cfg, ctx), ctx, counting


# ---------------------------------------------------------------------------- stage 1


def test_sae_rows_rank_planted_then_decoys(setup):
    """engine.sae_rows ranks by decoder cosine (checked against numpy on the raw W_dec) and serves rows."""
    engine, v, saes = setup
    rows = engine.sae_rows(direction=v, top_k=5, decoder=False)
    assert set(rows) == {DISTRACTOR_LAYER, PLANTED_LAYER} and rows[PLANTED_LAYER].decoder is None
    rank = rows[PLANTED_LAYER].latents.tolist()
    assert set(rank[:3]) == set(PLANTED) and set(rank[3:5]) == set(DECOYS)
    for ly, W in decoder_weights(saes).items():
        ref = (W.astype(np.float64) @ v) / (np.linalg.norm(W, axis=1) * np.linalg.norm(v))
        order = np.lexsort((np.arange(len(ref)), -ref))[:5]
        assert rows[ly].latents.tolist() == order.tolist()
        np.testing.assert_allclose(rows[ly].cosines, ref[order], atol=1e-6)
    assert np.allclose(rows[PLANTED_LAYER].cosines[:3], 1.0, atol=1e-5)
    absr = engine.sae_rows([DISTRACTOR_LAYER], direction=-v, top_k=3, rank_by="abs_cosine", decoder=False)
    W = decoder_weights(saes)[DISTRACTOR_LAYER]
    ref = np.abs(W.astype(np.float64) @ v) / (np.linalg.norm(W, axis=1) * np.linalg.norm(v))
    assert absr[DISTRACTOR_LAYER].latents.tolist() == np.lexsort((np.arange(len(ref)), -ref))[:3].tolist()
    chosen = engine.sae_rows(latents={PLANTED_LAYER: [7, 2]}, encoder=True)[PLANTED_LAYER]
    np.testing.assert_array_equal(chosen.decoder, saes[PLANTED_LAYER].W_dec.detach().numpy()[[7, 2]])
    np.testing.assert_array_equal(chosen.encoder, saes[PLANTED_LAYER].W_enc.detach().numpy()[:, [7, 2]].T)
    assert chosen.cosines is None and chosen.latents.tolist() == [7, 2]
    for bad in (dict(direction=np.ones(5)), dict(direction=np.zeros(64)), dict(latents={0: [1]}),
                dict(latents={PLANTED_LAYER: [10**6]}), dict(), dict(direction=v, latents={3: [1]}, top_k=2)):
        with pytest.raises(InvalidRequest):
            engine.sae_rows(**bad)


def test_stage1_finds_k_and_pool(stage1):
    res, ctx, counting = stage1
    statuses = [p.status for p in res.prompts]
    assert statuses == ["jailbroken"] * 6 + ["not_refused_at_baseline"] * 2
    assert res.n_evaluated == 6 and res.ks == [10, 20, 30, 40] and res.asr == [1.0] * 4
    for p in res.prompts[:6]:
        assert p.k == 10 and set(PLANTED) <= set(p.latents[PLANTED_LAYER]) and len(p.latents[PLANTED_LAYER]) == 10
        assert "I cannot" in p.baseline_completion and "I cannot" not in p.completion
    # batched: the baseline and K=10 are one generate call each over all open prompts
    assert [(n, c) for n, c, _ in counting.calls] == [("generate", 8), ("generate", 6)]
    assert all(ctx.checkpoint(f"stage1/prompt/{i}") for i in range(8))


def test_stage1_k_grows_until_all_planted_are_ablated(setup):
    """With K stepping by 1, K=1 and K=2 leave a planted latent (still refusing); K=3 jailbreaks."""
    engine, cos, _ = setup
    cfg = Stage1Config(k_start=1, k_step=1, k_max=5, max_new_tokens=6)  # default exclude_layers=[1, 2]
    res = run_stage1(engine, HARMFUL[:4], cos, cfg, LocalContext())
    assert res.layers == [PLANTED_LAYER]  # layer 2 excluded by default
    assert [p.k for p in res.prompts] == [3, 3, 3, 3]
    assert all(set(p.latents[PLANTED_LAYER]) == set(PLANTED) for p in res.prompts)
    assert res.asr == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_stage1_not_jailbroken_by_k_max(setup):
    engine, cos, _ = setup
    res = run_stage1(engine, HARMFUL[:2], cos, Stage1Config(k_start=1, k_step=1, k_max=2, max_new_tokens=4),
                     LocalContext())
    assert [(p.status, p.k, p.latents) for p in res.prompts] == [("not_jailbroken", None, {})] * 2
    assert res.asr == [0.0, 0.0] and "I cannot" in res.prompts[0].completion and res.pools() == {}


def test_stage1_resume_and_json(stage1, setup):
    res, ctx, _ = stage1
    engine, cos, _ = setup
    again = CountingEngine(engine)
    res2 = run_stage1(again, PROMPTS, cos, Stage1Config(exclude_layers=[], max_new_tokens=6, k_max=40), ctx)
    assert again.calls == [] and [p.to_json() for p in res2.prompts] == [p.to_json() for p in res.prompts]
    back = Stage1Result.from_json(json.loads(json.dumps(res.to_json())))
    assert back.pools() == res.pools() and back.asr == res.asr
    cfg = Stage1Config(k_start=5, k_step=5, k_max=20, exclude_layers=[0])
    assert Stage1Config.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValueError):
        Stage1Config(k_start=20, k_max=10)


def test_stage1_cancellation(setup):
    engine, cos, _ = setup
    ctx = LocalContext(cancelled=True)
    with pytest.raises(Cancelled):
        run_stage1(engine, HARMFUL[:2], cos, Stage1Config(max_new_tokens=4), ctx)


# ---------------------------------------------------------------------------- Algorithm 1 (pure)


def test_block_select_literal_reading_on_a_synthetic_p():
    """P(A) drops by a factor 4 for each 'critical' latent ablated; the rest do nothing."""
    critical = {(3, 1), (3, 7), (5, 2)}
    pool = [(3, i) for i in range(10)] + [(5, i) for i in range(10)]

    def p(ablated):
        return 0.9 * 0.25 ** len(critical & set(ablated))

    for seed in range(5):
        got = block_select(p, pool, block_size=1, tau=0.5, seed=seed)
        assert set(got) == critical
    # blocks of 4 accept whole blocks holding a critical latent
    got = set(block_select(p, pool, block_size=4, tau=0.5, seed=0))
    assert critical <= got and len(got) <= 12 and len(got) % 4 == 0


def test_literal_reading_reference_sets_do_not_depend_on_tau():
    """C\\K after a step equals the previous C\\(K u V) whether V was accepted or dropped."""
    pool = [(0, i) for i in range(12)]
    runs = [GreedyRun(pool, 3, tau, seed=1) for tau in (0.0, 10.0)]  # accept-all vs drop-all
    seen: list[list] = [[], []]
    while not runs[0].done:
        for j, run in enumerate(runs):
            base, test = run.query()
            seen[j].append((base, test))
            run.update(1.0, 0.5)
    assert seen[0] == seen[1] and runs[0].done and runs[1].done
    assert len(runs[0].accepted) == 12 and runs[1].accepted == []
    assert [len(b) for b, _ in seen[0]] == [12, 9, 6, 3]


def test_remainder_is_untested_unless_asked():
    pool = [(0, i) for i in range(7)]

    def p(ablated):  # every latent halves P("I")
        return 0.9 * 0.5 ** len(ablated)

    assert len(block_select(p, pool, 5, 0.1, seed=0)) == 5  # the 2 left over are never tested (Algorithm 1)
    assert len(block_select(p, pool, 5, 0.1, seed=0, partial_last_block=True)) == 7


def test_pool_reading_keeps_accepted_latents_ablated():
    run = GreedyRun([(0, i) for i in range(6)], 3, 0.1, seed=0, reading="pool")
    base, test = run.query()
    run.update(1.0, 0.5)  # accepted
    base2, _ = run.query()
    assert base2 == base and len(test) == 3  # accepted V stays in the reference ablation


# ---------------------------------------------------------------------------- stage 2


def test_stage2_single_latent_blocks_recover_exactly_the_planted_set(stage1, setup):
    engine = setup[0]
    s1, _, _ = stage1
    ctx = LocalContext()
    counting = CountingEngine(engine)
    res = run_stage2(counting, s1, Stage2Config(block_size=1, max_new_tokens=6, prompts_per_group=8), ctx)
    assert len(res.prompts) == 6
    for p in res.prompts:
        assert p.jailbroken and sorted(p.final_latents) == PLANTED_SET and p.final_tau is not None
        assert p.pool_size == 20 and p.p_pool_ablated < 0.05 < 0.5 < p.p_no_ablation
        # lockstep + cache: 2 references + 3 seeds x 20 single-latent tests
        assert p.forward_passes <= 2 + 3 * 20 + 1 and p.wall_s > 0
        low = next(t for t in p.taus if t.tau == 0.1)
        assert low.jailbroken and sorted(low.latents) == PLANTED_SET
    scores = [n for name, n, _ in counting.calls if name == "score"]
    # one engine call per lockstep step, holding every (prompt, seed) query (taus share theirs: literal reading)
    assert scores[0] == 12 and scores[1:10] == [6 * 3] * 9 and len(scores) <= 22
    summary = res.summary()
    assert summary == {**summary, "unique_latents": 3, "jailbreak_successes": 6, "mean_set_size": 3.0}
    assert res.latent_counts()[0][2] == 6
    sets, meta = ctx.latent_sets[res.union_set_id]
    assert sets == {PLANTED_LAYER: list(PLANTED)} and meta["jailbreak_successes"] == 6
    assert all(p.latent_set_id in ctx.latent_sets for p in res.prompts)


def test_stage2_paper_blocks_keep_planted_and_prune(stage1, setup):
    """N=5 (the paper): blocks are accepted whole, so co-drawn distractors may survive the seed
    intersection; the planted latents must be kept, most of the pool dropped, and the set jailbreak."""
    engine = setup[0]
    s1, _, _ = stage1
    res = run_stage2(engine, s1.to_json(), Stage2Config(max_new_tokens=6), LocalContext())
    for p in res.prompts:
        assert p.jailbroken and set(PLANTED_SET) <= set(p.final_latents)
        assert len(p.final_latents) <= 10 < p.pool_size
        assert [t.tau for t in p.taus] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    counts = res.latent_counts()  # planted: in every prompt's set; co-drawn distractors: prompt-specific
    assert sorted((ly, i) for ly, i, _ in counts[:3]) == PLANTED_SET and all(n == 6 for *_, n in counts[:3])
    assert all(n < 6 for *_, n in counts[3:])
    back = Stage2Result.from_json(json.loads(json.dumps(res.to_json())))
    assert back.summary() == res.summary() and back.per_tau() == res.per_tau()


def test_stage2_resume_skips_finished_prompts(stage1, setup):
    engine = setup[0]
    s1, _, _ = stage1
    ctx = LocalContext()
    cfg = Stage2Config(block_size=1, max_new_tokens=6, max_prompts=2, taus=[0.5], seeds=[0])
    first = run_stage2(engine, s1, cfg, ctx)
    again = CountingEngine(engine)
    second = run_stage2(again, s1, cfg.model_copy(update={"batch_size": 7}), ctx)  # batch size: not part of the key
    assert again.calls == [] and [p.to_json() for p in second.prompts] == [p.to_json() for p in first.prompts]
    assert Stage2Config.model_validate_json(cfg.model_dump_json()) == cfg


def test_stage2_config_validation():
    assert Stage2Config().taus == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert Stage2Config(taus=[0.5, 0.1, 0.5]).taus == [0.1, 0.5]
    with pytest.raises(ValueError):
        Stage2Config(seeds=[])
    with pytest.raises(ValueError):
        Stage2Config(reading="other")
