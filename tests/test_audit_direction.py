"""The refusal direction on a model with a planted refusal direction r (tests/planted.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planted import HARMFUL, HARMLESS, N_LAYERS, CountingEngine, directions, make_engine
from refusal_audit.audit.context import LocalContext
from refusal_audit.audit.datasets import register_dataset
from refusal_audit.audit.refusal_direction import (
    RefusalDirectionConfig,
    RefusalDirectionResult,
    candidate_positions,
    compute_refusal_direction,
    kl_divergence,
    run_refusal_direction,
)
from refusal_audit.audit.stage_utils import refusal_score

pytestmark = pytest.mark.usefixtures("one_thread")
SETS = (HARMFUL[:16], HARMLESS[:16], HARMFUL[16:24], HARMLESS[16:24])


@pytest.fixture(scope="module")
def engine():
    return make_engine()[0]


@pytest.fixture(scope="module")
def found(engine, tmp_path_factory):
    ctx = LocalContext(out_dir=tmp_path_factory.mktemp("direction"))
    counting = CountingEngine(engine)
    res = compute_refusal_direction(counting, *SETS, RefusalDirectionConfig(batch_size=64), ctx)
    return res, ctx, counting


def test_recovers_the_planted_direction(found):
    res, _, _ = found
    r = directions()[0]
    assert float(res.direction @ r) > 0.9
    assert abs(np.linalg.norm(res.direction) - 1) < 1e-5
    assert 1 <= res.layer < 4  # r appears after layer 1; layer 4 is pruned (last 20%)
    assert res.position in (-3, -2, -1) and not res.fallback
    chosen = res.chosen
    assert chosen.filtered is None and chosen.refusal_score < 0 < chosen.steering_score and chosen.kl <= 0.1
    assert res.raw_norm == pytest.approx(chosen.norm)


def test_candidate_table_and_filters(found):
    res, _, _ = found
    assert len(res.candidates) == N_LAYERS * 3  # 3 post-instruction positions of the planted chat template
    by_layer = {(c.layer, c.position): c for c in res.candidates}
    for pos in (-3, -2, -1):
        assert by_layer[(0, pos)].filtered == "steering_score"  # no r before layer 1: adding it does nothing
        assert by_layer[(4, pos)].filtered == "pruned_layer" and by_layer[(4, pos)].refusal_score is None
        # ablating r removes the refusal: harmful val refusal score far below the layer-0 candidates'
        assert by_layer[(2, pos)].refusal_score < by_layer[(0, pos)].refusal_score - 3
    assert res.baseline["harmful_train_refusal_score_mean"] > 0 > res.baseline["harmless_train_refusal_score_mean"]


def test_cosine_by_layer_figure_data(found):
    res, _, _ = found
    assert res.cosine_harmful.shape == (8, N_LAYERS) and res.cosine_harmless.shape == (8, N_LAYERS)
    h, s = res.cosine_harmful.mean(0), res.cosine_harmless.mean(0)
    assert abs(h[0]) < 0.2  # nothing along r before the planted attention
    assert all(h[ly] > 0.5 and abs(s[ly]) < 0.1 for ly in range(1, N_LAYERS))


def test_registered_and_json_round_trip(found):
    res, ctx, _ = found
    values, layer, meta = ctx.directions[res.direction_id]
    assert layer == res.layer and np.allclose(values, res.direction) and meta["position"] == res.position
    d = json.loads(json.dumps(res.to_json()))
    back = RefusalDirectionResult.from_json(d, res.arrays())
    assert back.layer == res.layer and np.allclose(back.direction, res.direction)
    assert [c.to_json() for c in back.candidates] == d["candidates"]
    assert RefusalDirectionResult.from_json(d).cosine_harmful.shape == res.cosine_harmful.shape


def test_batched_and_resumable(found, engine):
    res, ctx, counting = found
    scores = [c for c in counting.calls if c[0] == "score"]
    assert max(n for _, n, _ in scores) == 64 and len(scores) < 12  # many prompts x candidates per call
    assert {k for k in ctx.checkpoints if k.startswith("direction/candidate/")} == {
        f"direction/candidate/{ly}/{p}" for ly in range(4) for p in (-3, -2, -1)}
    again = CountingEngine(engine)
    res2 = compute_refusal_direction(again, *SETS, RefusalDirectionConfig(batch_size=64), ctx)
    assert not any(iv for name, _, iv in again.calls if name == "score")  # no candidate re-scored
    assert not any(name == "residuals" and n == 16 for name, n, _ in again.calls)  # means reloaded
    assert res2.layer == res.layer and np.allclose(res2.direction, res.direction)


def test_fallback_when_every_candidate_is_filtered(engine):
    cfg = RefusalDirectionConfig(kl_threshold=-1.0, layers=[0, 2], cosine_figure=False)
    res = compute_refusal_direction(engine, *SETS, cfg, LocalContext())
    assert res.fallback and res.layer == 2  # best refusal score among the filtered ones
    assert all(c.filtered for c in res.candidates)
    assert res.cosine_harmful.size == 0


def test_job_from_json_config(engine):
    register_dataset("planted:harmful", lambda o: {"train": HARMFUL[:12], "val": HARMFUL[16:22], "test": []})
    register_dataset("planted:harmless", lambda o: {"train": HARMLESS[:12], "val": HARMLESS[16:22], "test": []})
    raw = json.dumps({"harmful_dataset": "planted:harmful", "harmless_dataset": "planted:harmless",
                      "positions": [-1], "layers": [1, 2], "n_val": 4})
    cfg = RefusalDirectionConfig.model_validate_json(raw)
    assert RefusalDirectionConfig.model_validate_json(cfg.model_dump_json()) == cfg
    res = run_refusal_direction(engine, cfg, LocalContext())
    assert res.counts["harmful_val"] == 4 and res.positions == [-1]
    assert float(res.direction @ directions()[0]) > 0.9
    with pytest.raises(ValueError):
        RefusalDirectionConfig.model_validate({"nope": 1})


def test_helpers(engine):
    assert candidate_positions(engine, RefusalDirectionConfig()) == [-3, -2, -1]
    assert candidate_positions(engine, RefusalDirectionConfig(chat=False)) == [-1]
    assert refusal_score(0.5) == pytest.approx(0.0, abs=1e-6)
    assert refusal_score(0.9) == pytest.approx(np.log(9), rel=1e-5)
    p = np.log(np.array([0.5, 0.25, 0.25]))
    assert kl_divergence(p, p) == pytest.approx(0.0)
    assert kl_divergence(p, np.log(np.array([0.25, 0.5, 0.25]))) == pytest.approx(0.25 * np.log(2))


class _MassiveDimEngine:
    """The planted engine whose residual reads carry a Gemma-like massive activation in one
    dimension: +500 everywhere, +40 more on harmful prompts (so a raw difference of means points
    mostly along it)."""

    DIM = 5

    def __init__(self, inner) -> None:
        self.inner = inner
        self.harmful = set(HARMFUL)

    @property
    def info(self):
        return self.inner.info

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def residuals(self, requests, layers=None, positions=(-1,)):
        out = self.inner.residuals(requests, layers, positions).copy()
        for b, r in enumerate(requests):
            text = r.prompt[-1].content if not isinstance(r.prompt, str) else r.prompt
            out[b, :, :, self.DIM] += 500.0 + (40.0 if text in self.harmful else 0.0)
        return out


def test_massive_activation_dims_are_masked(engine):
    """`outlier_dims="mask"` zeroes the massive dimension and still recovers r; "keep" is Arditi's raw
    difference of means (checked against a direct computation) and is dominated by it."""
    wrapped = _MassiveDimEngine(engine)
    base = dict(layers=[2], positions=[-1], cosine_figure=False, filter_by_baseline=False)
    masked = compute_refusal_direction(wrapped, *SETS, RefusalDirectionConfig(**base), LocalContext())
    kept = compute_refusal_direction(wrapped, *SETS, RefusalDirectionConfig(**base, outlier_dims="keep"),
                                     LocalContext())
    r = directions()[0]
    assert masked.chosen.masked_dims == [_MassiveDimEngine.DIM]
    assert masked.direction[_MassiveDimEngine.DIM] == 0.0 and abs(float(masked.direction @ r)) > 0.9
    assert kept.chosen.masked_dims == [] and abs(kept.direction[_MassiveDimEngine.DIM]) > 0.5

    def mean_resid(texts):
        from refusal_audit.audit.spec import Request
        from refusal_audit.audit.stage_utils import as_prompt
        return wrapped.residuals([Request(prompt=as_prompt(t, True)) for t in texts], [2], [-1])[:, 0, 0].mean(0)

    raw = mean_resid(SETS[0]) - mean_resid(SETS[1])
    assert np.allclose(kept.direction, raw / np.linalg.norm(raw), atol=1e-5)
    assert kept.raw_norm == pytest.approx(float(np.linalg.norm(raw)), rel=1e-5)


def test_fallback_prefers_low_kl_over_the_lowest_refusal_score():
    from refusal_audit.audit.refusal_direction import CandidateScore, _fallback

    table = [CandidateScore(5, -1, -18.0, -7.0, 25.0, 100.0, "steering_score"),  # breaks the model
             CandidateScore(10, -1, -5.0, 3.0, 0.5, 100.0, "kl"),
             CandidateScore(12, -1, -1.0, 5.0, 0.2, 100.0, "kl"),
             CandidateScore(17, -1, None, None, None, 100.0, "pruned_layer")]
    cfg = RefusalDirectionConfig()
    assert _fallback(table, cfg).layer == 10
    assert _fallback(table, RefusalDirectionConfig(fallback_kl_threshold=0.3)).layer == 12
    assert _fallback(table[:1], cfg).layer == 5  # nothing within the KL bound: the lowest KL
