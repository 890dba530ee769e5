"""Tests for alter_jax.clustering: planted clusters, scipy inertia parity, silhouette, labels."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.cluster.vq import kmeans2
from scipy.special import comb

from alter_jax import clustering as C


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert & Arabie (1985) ARI from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    sum_ij = comb(table, 2).sum()
    sum_a = comb(table.sum(1), 2).sum()
    sum_b = comb(table.sum(0), 2).sum()
    expected = sum_a * sum_b / comb(len(a), 2)
    max_index = 0.5 * (sum_a + sum_b)
    return float((sum_ij - expected) / (max_index - expected))


def planted(k: int, n_per: int = 40, d: int = 6, spread: float = 8.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def test_ari_helper_sanity():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([0, 1, 0, 1, 0, 1])) < 0.1


def test_planted_clusters_are_recovered():
    x, y = planted(4)
    res = C.kmeans(x, 4, jax.random.key(0))
    assert res.centroids.shape == (4, 6) and res.labels.shape == (160,)
    assert adjusted_rand_index(y, np.asarray(res.labels)) >= 0.95
    # inertia is consistent with the returned centroids and labels
    c, lab = np.asarray(res.centroids), np.asarray(res.labels)
    assert float(res.inertia) == pytest.approx(float(((x - c[lab]) ** 2).sum()), rel=1e-4)
    # labels are nearest-centroid assignments
    d = ((x[:, None] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(lab, d.argmin(1))


def test_inertia_matches_scipy_best_of_several():
    # overlapping clusters, so the optimum is not trivial
    x, _ = planted(5, n_per=30, d=4, spread=2.5, seed=1)
    ours = float(C.kmeans(x, 5, jax.random.key(3), n_init=8).inertia)
    best = np.inf
    for seed in range(8):
        cent, lab = kmeans2(x.astype(np.float64), 5, minit="++", seed=seed, iter=100)
        best = min(best, float(((x - cent[lab]) ** 2).sum()))
    assert ours <= best * 1.01


def test_determinism_per_seed():
    x, _ = planted(3, seed=2)
    r1 = C.kmeans(x, 3, jax.random.key(7))
    r2 = C.kmeans(x, 3, jax.random.key(7))
    np.testing.assert_array_equal(r1.labels, r2.labels)
    np.testing.assert_array_equal(r1.centroids, r2.centroids)


def test_silhouette_matches_brute_force():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(25, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=25)
    labels[0] = 3  # a singleton cluster scores 0
    d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    s = np.zeros(25)
    for i in range(25):
        same = labels == labels[i]
        if same.sum() == 1:
            continue
        a = d[i, same].sum() / (same.sum() - 1)
        b = min(d[i, labels == j].mean() for j in set(labels.tolist()) - {labels[i]})
        s[i] = (b - a) / max(a, b)
    assert float(C.silhouette_score(x, labels, 4)) == pytest.approx(s.mean(), abs=1e-5)


def test_silhouette_picks_the_planted_k():
    x, _ = planted(3, n_per=30, seed=6)
    k, scores = C.choose_num_clusters(x, (2, 5), jax.random.key(0), n_init=2)
    assert k == 3
    assert set(scores) == {2, 3, 4, 5} and scores[3] > 0.5


def test_assign_subdomains_auto_and_fixed():
    x, y = planted(3, n_per=20, seed=8)
    auto = C.assign_subdomains(x, key=jax.random.key(1), k_range=(2, 4), n_init=2)
    assert auto.num == 3 and auto.silhouette is not None
    assert adjusted_rand_index(y, auto.labels) >= 0.95
    fixed = C.assign_subdomains(x, num=3, key=jax.random.key(1), n_init=2)
    np.testing.assert_array_equal(fixed.labels, auto.labels)  # same key -> same clustering
    one = C.assign_subdomains(x, num=1)
    assert one.num == 1 and np.all(one.labels == 0)
    with pytest.raises(ValueError, match="key=jax.random.key"):
        C.assign_subdomains(x, num=2)


def test_assign_subdomains_uses_given_labels():
    out = C.assign_subdomains(labels=["chem", "bio", "chem", "cyber", "bio"])
    assert out.names == ("bio", "chem", "cyber") and out.num == 3
    np.testing.assert_array_equal(out.labels, [1, 0, 1, 2, 0])
    ints = C.assign_subdomains(labels=[10, 2, 2])
    assert ints.names == (2, 10)
    np.testing.assert_array_equal(ints.labels, [1, 0, 0])
    with pytest.raises(ValueError, match="2 distinct values"):
        C.assign_subdomains(labels=["a", "b"], num=3)
    with pytest.raises(ValueError, match="domain label missing"):
        C.assign_subdomains(labels=["a", None])


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        C.kmeans(np.zeros((3, 2), np.float32), 4, jax.random.key(0))
    with pytest.raises(ValueError, match="too few"):
        C.choose_num_clusters(np.zeros((2, 2), np.float32), (2, 4), jax.random.key(0))
