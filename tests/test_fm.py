"""Factorization machine, sparse features and rankings: exact identities and planted cases (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refusal_audit.audit.baselines import draw_random, probe_ranking
from refusal_audit.audit.features import (
    Example,
    FeatureDataset,
    latent_groups,
    pack_keys,
    stratified_split,
    unpack_keys,
)
from refusal_audit.audit.fm import (
    FactorizationMachine,
    SparseRows,
    TrainConfig,
    naive_pairwise,
    train_fm,
    train_logistic,
)
from refusal_audit.audit.stage3 import latent_embeddings, rank_by_similarity

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_rows(rng: np.random.Generator, n: int, d: int, density: float = 0.2) -> SparseRows:
    x = rng.normal(size=(n, d)) * (rng.random((n, d)) < density)
    return SparseRows.from_dense(x.astype(np.float32), rng.integers(0, 2, n).astype(np.float32))


def test_identity_equals_naive_pairwise_sum():
    rng = np.random.default_rng(0)
    d, k = 25, 6
    model = FactorizationMachine(d, k, init_std=0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.w.copy_(torch.randn(d, 1))
        model.w0.fill_(0.3)
    rows = _random_rows(rng, 12, d, 0.3)
    got = model(torch.from_numpy(rows.indices), torch.from_numpy(rows.values), torch.from_numpy(rows.offsets))
    dense = rows.to_dense(d)
    V, w = model.V.detach().numpy(), model.linear_weights()
    want = [naive_pairwise(dense[r], 0.3, w, V) for r in range(rows.n)]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_identity_handles_empty_rows():
    model = FactorizationMachine(5, 3, generator=torch.Generator().manual_seed(0))
    rows = SparseRows(np.array([2, 4]), np.array([1.5, 2.0]), np.array([0, 0, 2]))  # row 0 is empty
    with torch.no_grad():
        got = model(torch.from_numpy(rows.indices), torch.from_numpy(rows.values), torch.from_numpy(rows.offsets))
    V = model.V.detach().numpy()
    assert float(got[0]) == pytest.approx(0.0)
    assert float(got[1]) == pytest.approx(naive_pairwise(rows.to_dense(5)[1], 0.0, np.zeros(5), V), abs=1e-6)


def test_sparse_rows_subsets_and_dense_roundtrip():
    rng = np.random.default_rng(3)
    rows = _random_rows(rng, 9, 7, 0.4)
    dense = rows.to_dense(7)
    sub = rows.rows([4, 0, 8])
    np.testing.assert_array_equal(sub.to_dense(7), dense[[4, 0, 8]])
    np.testing.assert_array_equal(sub.labels, rows.labels[[4, 0, 8]])
    assert rows.rows([]).n == 0


def _xor_rows(rng: np.random.Generator, n: int, d: int = 40) -> SparseRows:
    """Sparse binary features; label = x_0 XOR x_1; three random distractors per row."""
    x = np.zeros((n, d), np.float32)
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x[:, 0], x[:, 1] = a, b
    for r in range(n):
        x[r, rng.choice(np.arange(2, d), 3, replace=False)] = 1.0
    return SparseRows.from_dense(x, (a ^ b).astype(np.float32))


def test_fm_recovers_a_pairwise_interaction_a_linear_probe_cannot():
    rng = np.random.default_rng(0)
    train, val, test = _xor_rows(rng, 600), _xor_rows(rng, 150), _xor_rows(rng, 200)
    cfg = TrainConfig(lr=0.03, epochs=15, batch_size=32, seed=0)
    fm = train_fm(train, val, test, 40, k=4, cfg=cfg)
    probe = train_logistic(train, val, test, 40, cfg=cfg)
    assert fm.test_accuracy is not None and fm.test_accuracy >= 0.95
    assert probe.test_accuracy is not None and probe.test_accuracy <= 0.65  # chance: XOR is not linear
    assert 1 <= fm.best_epoch <= 15 and len(fm.history) == 15
    # the learned interaction of the planted pair is strongly negative (1 XOR 1 = 0)
    V = fm.model.V.detach().numpy()  # type: ignore[union-attr]
    assert float(V[0] @ V[1]) < -1.0


def test_best_validation_epoch_is_restored():
    rng = np.random.default_rng(1)
    train, val = _xor_rows(rng, 200), _xor_rows(rng, 60)
    res = train_fm(train, val, None, 40, k=4, cfg=TrainConfig(lr=0.03, epochs=6, seed=2))
    best = max(res.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert res.best_epoch == best["epoch"]
    assert res.val_accuracy == pytest.approx(best["val_accuracy"])
    assert res.test_accuracy is None


def test_dense_and_sparse_gradients_agree_on_one_step():
    rng = np.random.default_rng(4)
    rows = _random_rows(rng, 8, 10, 0.5)
    t = (torch.from_numpy(rows.indices), torch.from_numpy(rows.values), torch.from_numpy(rows.offsets))
    grads = []
    for sparse in (True, False):
        m = FactorizationMachine(10, 3, generator=torch.Generator().manual_seed(0), sparse=sparse)
        m(*t).sum().backward()
        g = m.V.grad
        grads.append(g.to_dense() if g.is_sparse else g)
    torch.testing.assert_close(grads[0], grads[1])


def test_feature_keys_pack_and_unpack():
    keys = pack_keys(np.array([2, 13, 25]), np.array([0, 16383, 65535]), np.array([-1, -4, -2]))
    np.testing.assert_array_equal(unpack_keys(keys), [[2, 0, -1], [13, 16383, -4], [25, 65535, -2]])
    assert keys[0] < keys[1] < keys[2]


def test_stratified_split_fractions_and_seed():
    labels = [1] * 50 + [0] * 50
    s = stratified_split(labels, (0.8, 0.1, 0.1), seed=0)
    for c in (0, 1):
        part = s[np.array(labels) == c]
        assert (part == 0).sum() == 40 and (part == 1).sum() == 5 and (part == 2).sum() == 5
    np.testing.assert_array_equal(s, stratified_split(labels, (0.8, 0.1, 0.1), seed=0))
    assert not np.array_equal(s, stratified_split(labels, (0.8, 0.1, 0.1), seed=1))


def test_feature_dataset_compact_index_and_maxabs():
    ex = [Example(pack_keys(np.array([2, 3]), np.array([7, 9]), np.array([-1, -1])), np.array([2.0, 4.0], np.float32)),
          Example(pack_keys(np.array([2]), np.array([7]), np.array([-2])), np.array([1.0], np.float32)),
          Example(pack_keys(np.array([3, 2]), np.array([9, 7]), np.array([-1, -1])), np.array([8.0, 1.0], np.float32))]
    ds = FeatureDataset.build(ex, [1, 0, 1], np.array([0, 0, 1], np.int8), [2, 3], 4)
    assert ds.n_features == 3
    assert sorted(map(tuple, ds.keys.tolist())) == [(2, 7, -2), (2, 7, -1), (3, 9, -1)]
    np.testing.assert_array_equal(ds.train_counts()[[list(map(tuple, ds.keys.tolist())).index((3, 9, -1))]], [1])
    t = ds.transformed("maxabs")
    dense = t.rows.to_dense(3)
    col = {tuple(k): j for j, k in enumerate(ds.keys.tolist())}
    assert dense[0, col[(2, 7, -1)]] == pytest.approx(1.0)  # train max of (2,7,-1) is 2.0
    assert dense[2, col[(3, 9, -1)]] == pytest.approx(2.0)  # val value 8 / train max 4
    assert set(np.unique(ds.transformed("binary").rows.values)) == {1.0}
    back = FeatureDataset.from_arrays(ds.arrays(), ds.layers, 4)
    np.testing.assert_array_equal(back.rows.to_dense(3), ds.rows.to_dense(3))


def test_latent_embeddings_and_similarity_ranking():
    keys = np.array([[2, 1, -1], [2, 1, -2], [3, 5, -1], [3, 6, -1], [3, 7, -1]])
    V = np.array([[1.0, 0.0], [1.0, 0.2], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    lk, E = latent_embeddings(V, keys)
    assert lk.tolist() == [[2, 1], [3, 5], [3, 6], [3, 7]]
    np.testing.assert_allclose(E[0], [1.0, 0.1])
    ranking, scores, n_emb = rank_by_similarity(lk, E, [(2, 1)], "max")
    assert n_emb == 1 and ranking == [(3, 5), (3, 6), (3, 7)]
    assert scores[0] > scores[1] > scores[2]
    # stage-2 latents without an embedding are reported, not ranked
    assert rank_by_similarity(lk, E, [(9, 9)], "max") == ([], [], 0)
    assert rank_by_similarity(lk, E, [(2, 1)], "centroid", allowed={(3, 7)})[0] == [(3, 7)]
    _, group = latent_groups(keys, np.array([True, False, True, True, True]))
    assert group[1] == -1


def test_probe_ranking_by_abs_weight():
    keys = np.array([[2, 1, -1], [2, 1, -2], [3, 5, -1], [3, 6, -1]])
    ranking, scores = probe_ranking(np.array([0.1, -0.9, 0.5, 0.0]), keys, None, "max")
    assert ranking == [(2, 1), (3, 5), (3, 6)] and scores[0] == pytest.approx(0.9)
    assert probe_ranking(np.array([0.1, -0.9, 0.5, 0.0]), keys, None, "sum")[1][0] == pytest.approx(1.0)


def test_draw_random_matches_sizes_per_layer():
    rng = np.random.default_rng(0)
    active = [(2, i) for i in range(10)] + [(3, i) for i in range(3)]
    stage2 = [(2, 0), (2, 1), (3, 0), (3, 1)]
    chosen, short = draw_random(active, stage2, rng, stratify=True)
    assert short == 0 and len(chosen) == 4 and not set(chosen) & set(stage2)
    assert sum(ly == 3 for ly, _ in chosen) == 1  # only (3, 2) is left at layer 3: the other from layer 2
    chosen, short = draw_random([(2, 5)], stage2, rng)
    assert chosen == [(2, 5)] and short == 3
