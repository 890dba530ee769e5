"""Forget sub-domains: k-means (k-means++ init) in JAX, silhouette, automatic N (spec §3).

Forget examples are embedded with the frozen backbone (mean last hidden state over answer
tokens, computed elsewhere) and clustered here. Everything is seeded by a ``jax.random``
key, so the same key gives the same clusters.

* :func:`kmeans` — k-means++ seeding (Arthur & Vassilvitskii, 2007; greedy-free variant:
  one D²-weighted draw per centre), then Lloyd iterations under ``jax.lax.while_loop``
  until the squared centre shift ``Σ‖c' − c‖² ≤ tol · mean_j Var(x_j)`` (scikit-learn's
  convention) or ``max_iter``; ``n_init`` restarts run in parallel (``vmap``) and the one
  with the lowest inertia ``Σ_i ‖x_i − c_{l(i)}‖²`` is kept. Empty clusters keep their
  previous centre.
* :func:`silhouette_score` — mean over points of ``s(i) = (b − a)/max(a, b)`` with ``a``
  the mean Euclidean distance to the other members of its cluster and ``b`` the lowest
  mean distance to another non-empty cluster (Rousseeuw, 1987); ``s(i) = 0`` for
  singletons. Uses an ``n × n`` distance matrix: fine for forget sets up to a few
  thousand examples.
* :func:`choose_num_clusters` — the ``k`` in an inclusive range with the best silhouette.
* :func:`assign_subdomains` — user-given domain labels when present, else clusters.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = [
    "KMeansResult",
    "kmeans_plusplus_init",
    "kmeans",
    "silhouette_score",
    "choose_num_clusters",
    "SubdomainAssignment",
    "assign_subdomains",
]

_HI = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """``centroids [k, d]``, ``labels int32[n]`` (index of the nearest centroid),
    ``inertia`` = ``Σ_i ‖x_i − c_{labels_i}‖²`` (scalar)."""

    centroids: Float[Array, "k d"]
    labels: Int[Array, " n"]
    inertia: Float[Array, ""]


def _sq_dists(x: Float[Array, "n d"], c: Float[Array, "k d"]) -> Float[Array, "n k"]:
    """``‖x_i − c_j‖²`` via ``‖x‖² − 2 x·c + ‖c‖²`` (clamped at 0), full-precision matmul."""
    x2 = jnp.sum(x * x, axis=1)[:, None]
    c2 = jnp.sum(c * c, axis=1)[None, :]
    return jnp.maximum(x2 - 2.0 * jnp.dot(x, c.T, precision=_HI) + c2, 0.0)


def kmeans_plusplus_init(x: Float[Array, "n d"], k: int, key: jax.Array) -> Float[Array, "k d"]:
    """k-means++ seeding: first centre uniform, each next one drawn with probability
    ``∝ D(x)²`` (squared distance to the nearest chosen centre). Returns ``[k, d]``."""
    n, d = x.shape
    key, first_key = jax.random.split(key)
    first = x[jax.random.randint(first_key, (), 0, n)]
    centroids = jnp.zeros((k, d), x.dtype).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, axis=1)

    def body(i, carry):
        centroids, d2, key = carry
        key, sub = jax.random.split(key)
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        # All points already chosen (duplicates): fall back to a uniform draw.
        logits = jnp.where(jnp.any(d2 > 0), logits, 0.0)
        c = x[jax.random.categorical(sub, logits)]
        return centroids.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=1)), key

    centroids, _, _ = jax.lax.fori_loop(1, k, body, (centroids, d2, key))
    return centroids


def _lloyd(x, init, k: int, max_iter: int, tol_abs):
    def assign(c):
        return jnp.argmin(_sq_dists(x, c), axis=1).astype(jnp.int32)

    def update(c, labels):
        onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)  # [n, k]
        counts = jnp.sum(onehot, axis=0)
        sums = jnp.dot(onehot.T, x, precision=_HI)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    def cond(state):
        _, shift, it = state
        return (it < max_iter) & (shift > tol_abs)

    def body(state):
        c, _, it = state
        new = update(c, assign(c))
        return new, jnp.sum((new - c) ** 2), it + 1

    c, _, _ = jax.lax.while_loop(cond, body, (init, jnp.array(jnp.inf, x.dtype), jnp.array(0, jnp.int32)))
    labels = assign(c)
    inertia = jnp.sum((x - c[labels]) ** 2)
    return KMeansResult(c, labels, inertia)


@partial(jax.jit, static_argnames=("k", "n_init", "max_iter"))
def _kmeans_jit(x, key, tol, *, k: int, n_init: int, max_iter: int) -> KMeansResult:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=0)
    xc = x - mean  # centring improves the ‖x‖² − 2x·c + ‖c‖² expansion
    tol_abs = tol * jnp.mean(jnp.var(xc, axis=0))

    def one_run(run_key):
        return _lloyd(xc, kmeans_plusplus_init(xc, k, run_key), k, max_iter, tol_abs)

    runs = jax.vmap(one_run)(jax.random.split(key, n_init))
    best = jnp.argmin(runs.inertia)
    pick = jax.tree_util.tree_map(lambda a: a[best], runs)
    return KMeansResult(pick.centroids + mean, pick.labels, pick.inertia)


def kmeans(
    x: Float[Array, "n d"],
    k: int,
    key: jax.Array,
    *,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> KMeansResult:
    """k-means with k-means++ init and ``n_init`` seeded restarts (lowest inertia kept).

    Args:
      x: ``[n, d]`` points (cast to float32).
      k: number of clusters (static), ``1 ≤ k ≤ n``.
      key: ``jax.random`` key; the same key gives the same result.
      n_init: restarts (run in parallel with ``vmap``).
      max_iter: cap on Lloyd iterations per restart.
      tol: stop when ``Σ‖Δc‖² ≤ tol · mean per-feature variance``.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"clustering.kmeans: x must be [n, d], got shape {x.shape}")
    n = x.shape[0]
    if not (1 <= int(k) <= n):
        raise ValueError(f"clustering.kmeans: need 1 <= k <= n (number of points {n}), got k={k}")
    if int(n_init) < 1 or int(max_iter) < 1:
        raise ValueError(f"clustering.kmeans: n_init and max_iter must be >= 1, got {n_init}, {max_iter}")
    return _kmeans_jit(x, key, jnp.float32(tol), k=int(k), n_init=int(n_init), max_iter=int(max_iter))


@partial(jax.jit, static_argnames=("k",))
def _silhouette_jit(x, labels, *, k: int):
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0)
    n = x.shape[0]
    dist = jnp.sqrt(_sq_dists(x, x)) * (1.0 - jnp.eye(n, dtype=x.dtype))
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)  # [n, k]
    counts = jnp.sum(onehot, axis=0)  # [k]
    sums = jnp.dot(dist, onehot, precision=_HI)  # [n, k]: Σ distances from i to cluster j
    own_count = counts[labels]
    a = jnp.take_along_axis(sums, labels[:, None], axis=1)[:, 0] / jnp.maximum(own_count - 1.0, 1.0)
    mean_to = jnp.where(counts[None, :] > 0, sums / jnp.maximum(counts, 1.0)[None, :], jnp.inf)
    mean_to = jnp.where(onehot > 0, jnp.inf, mean_to)
    b = jnp.min(mean_to, axis=1)
    denom = jnp.maximum(a, b)
    valid = (own_count > 1) & jnp.isfinite(b) & (denom > 0)
    s = jnp.where(valid, (b - a) / jnp.where(valid, denom, 1.0), 0.0)
    return jnp.mean(s)


def silhouette_score(x: Float[Array, "n d"], labels: Int[Array, " n"], k: int) -> Float[Array, ""]:
    """Mean silhouette coefficient (Euclidean) of a clustering, in ``[-1, 1]``.

    ``labels int[n]`` in ``0..k−1`` (``k`` static). Singletons score 0; if fewer than two
    clusters are non-empty every point scores 0.
    """
    x = jnp.asarray(x)
    labels = jnp.asarray(labels, jnp.int32)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(
            f"clustering.silhouette_score: need x [n, d] and labels [n], got {x.shape} and {labels.shape}"
        )
    return _silhouette_jit(x, labels, k=int(k))


def choose_num_clusters(
    x: Float[Array, "n d"],
    k_range: tuple[int, int] = (2, 6),
    key: jax.Array | None = None,
    *,
    n_init: int = 4,
    max_iter: int = 100,
) -> tuple[int, dict[int, float]]:
    """Pick ``k`` in the inclusive range ``k_range = (k_min, k_max)`` by best silhouette.

    ``k_max`` is capped at ``n − 1`` (silhouette needs ``k < n``). Each ``k`` uses key
    ``fold_in(key, k)``. Returns ``(best_k, {k: silhouette})``; ties go to the smaller ``k``.
    """
    if key is None:
        raise ValueError("clustering.choose_num_clusters: pass key=jax.random.key(seed)")
    n = int(np.shape(x)[0])
    k_min, k_max = int(k_range[0]), int(k_range[1])
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"clustering.choose_num_clusters: k_range must be (k_min >= 2, k_max >= k_min), got {k_range}")
    k_max = min(k_max, n - 1)
    if k_max < k_min:
        raise ValueError(
            f"clustering.choose_num_clusters: only {n} points, too few to score k >= {k_min} clusters; "
            "give a fixed number of sub-domains (num=1 or domain labels) instead"
        )
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        res = kmeans(x, k, jax.random.fold_in(key, k), n_init=n_init, max_iter=max_iter)
        scores[k] = float(silhouette_score(x, res.labels, k))
    best = max(scores, key=lambda kk: (scores[kk], -kk))
    return best, scores


@dataclasses.dataclass(frozen=True)
class SubdomainAssignment:
    """Sub-domain of each forget example.

    ``labels``: ``int32[n]`` in ``0..num−1`` (forget expert ``d+1`` serves sub-domain ``d``);
    ``names``: what each index stands for (the user's domain values, sorted, or
    ``"cluster_i"``); ``silhouette``: ``{k: score}`` when ``num`` was chosen automatically;
    ``centroids``: ``[num, d]`` when clustered.
    """

    labels: np.ndarray
    num: int
    names: tuple
    silhouette: dict[int, float] | None = None
    centroids: np.ndarray | None = None


def _sort_key(v: Any):
    if isinstance(v, (bool, np.bool_)):
        return (1, str(v))
    if isinstance(v, (int, np.integer)):
        return (0, int(v))
    return (1, str(v))


def assign_subdomains(
    embeddings: Float[Array, "n d"] | None = None,
    *,
    num: int | None = None,
    k_range: tuple[int, int] = (2, 6),
    key: jax.Array | None = None,
    labels: Sequence[Any] | None = None,
    n_init: int = 4,
    max_iter: int = 100,
) -> SubdomainAssignment:
    """Forget sub-domains: user labels if given, else k-means on the embeddings.

    * ``labels`` (e.g. each example's ``domain`` field; strings or ints): mapped to
      ``0..N−1`` in sorted order of the distinct values; no clustering.
    * else ``num`` given: ``kmeans(embeddings, num, fold_in(key, num))`` (``num = 1``:
      everything in 0);
    * else: ``N`` = best silhouette over ``k_range`` (inclusive).
    """
    if labels is not None:
        values = list(labels)
        missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and np.isnan(v))]
        if missing:
            raise ValueError(
                f"clustering.assign_subdomains: domain label missing for examples {missing[:10]} "
                "(fill the 'domain' field of every forget example, or drop it everywhere to cluster)"
            )
        names = tuple(sorted(set(values), key=_sort_key))
        index = {v: i for i, v in enumerate(names)}
        if num is not None and int(num) != len(names):
            raise ValueError(
                f"clustering.assign_subdomains: num={num} sub-domains requested but the 'domain' labels have "
                f"{len(names)} distinct values {list(names)[:10]}; drop num or fix the labels"
            )
        if embeddings is not None and int(np.shape(embeddings)[0]) != len(values):
            raise ValueError(
                f"clustering.assign_subdomains: {len(values)} labels but {np.shape(embeddings)[0]} embeddings"
            )
        return SubdomainAssignment(np.array([index[v] for v in values], np.int32), len(names), names)

    if embeddings is None:
        raise ValueError("clustering.assign_subdomains: give either domain labels or embeddings to cluster")
    x = jnp.asarray(embeddings, jnp.float32)
    chex.assert_rank(x, 2)
    n = x.shape[0]
    if num is not None and int(num) == 1:
        return SubdomainAssignment(np.zeros(n, np.int32), 1, ("cluster_0",), None, np.asarray(jnp.mean(x, 0))[None])
    if key is None:
        raise ValueError("clustering.assign_subdomains: clustering needs key=jax.random.key(seed)")
    scores = None
    if num is None:
        k, scores = choose_num_clusters(x, k_range, key, n_init=n_init, max_iter=max_iter)
    else:
        k = int(num)
    # Same key as choose_num_clusters used for this k: the returned clustering is the one scored.
    res = kmeans(x, k, jax.random.fold_in(key, k), n_init=n_init, max_iter=max_iter)
    return SubdomainAssignment(
        np.asarray(res.labels, np.int32),
        k,
        tuple(f"cluster_{i}" for i in range(k)),
        scores,
        np.asarray(res.centroids),
    )
