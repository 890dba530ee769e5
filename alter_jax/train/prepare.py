"""Data preparation before training: encoding, backbone token entropy, sub-domains.

The backbone is frozen, so the entropy of the distribution behind every answer token
(spec §2) is computed once per example here, not in every step; the same pass gives
the answer embeddings used for sub-domain clustering (spec §3).

Arrays are dicts of numpy arrays with a leading example axis: ``input_ids``,
``attention_mask``, ``labels`` (int32 [N, T]), ``entropy`` (float32 [N, T], entry t is
the backbone entropy behind token t, 0 at position 0 and on padding) and ``expert`` (int32 [N]).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.clustering import assign_subdomains
from alter_jax.data.batching import bucket_width, encode_rows, row_lengths
from alter_jax.entropy import tsallis_entropy
from alter_jax.losses import sequence_log_prob

Arrays = dict[str, np.ndarray]


@functools.partial(jax.jit, static_argnames=("graphdef", "q"))
def _backbone_statistics(graphdef, state, ids, mask, labels, *, q: float):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, mask)
    lg = out.logits[:, :-1]
    s = tsallis_entropy(lg, q)  # entropy behind token t+1
    real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)  # every real token (prompt too: the router sees them all)
    entropy = jnp.pad(jnp.where(real, s, 0.0), ((0, 0), (1, 0)))
    answer = (labels != -100).astype(jnp.float32)[..., None]
    emb = jnp.sum(out.hidden.astype(jnp.float32) * answer, 1) / jnp.maximum(jnp.sum(answer, 1), 1.0)
    targets = labels[:, 1:]
    ref_logp = sequence_log_prob(lg, targets, (targets != -100).astype(jnp.float32))
    return entropy, emb, ref_logp


def backbone_statistics(model, arrays: Arrays, q: float, batch_size: int = 16, length_bucket: int = 32) -> Arrays:
    """One pass of the frozen backbone over every example (adapters off: call this before adapters
    are added, or on an unadapted model). Returns

    * ``entropy float32[N, T]``: the backbone ``S_q`` behind each real token (0 at position 0 and
      on padding), the router input and the high/low-entropy split (spec §2);
    * ``embedding float32[N, D]``: the mean final hidden state over answer tokens (sub-domains, §3);
    * ``ref_logp float32[N]``: ``log π_ref(y|x)``, the answer's sequence log-probability under the
      backbone, which is the NPO reference (frozen, so computed once here, not in every step).

    Each batch is cut to its length bucket (``ModelSpec.length_bucket``) before the forward.
    """
    graphdef, state = nnx.split(model)
    n, t = arrays["input_ids"].shape
    out = {"entropy": np.zeros((n, t), np.float32), "embedding": None, "ref_logp": np.zeros((n,), np.float32)}
    embs = []
    for s in range(0, n, batch_size):
        sl = slice(s, min(n, s + batch_size))
        chunk = [arrays[k][sl] for k in ("input_ids", "attention_mask", "labels")]
        pad = batch_size - len(chunk[0])
        if pad:  # static shapes: pad the last batch, drop the rows after
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        width = bucket_width(int(row_lengths(chunk[1]).max(initial=1)), length_bucket, t)
        e, m, lp = _backbone_statistics(graphdef, state, *(jnp.asarray(c[:, :width]) for c in chunk), q=q)
        out["entropy"][sl, :width] = np.asarray(e)[: batch_size - pad]
        out["ref_logp"][sl] = np.asarray(lp)[: batch_size - pad]
        embs.append(np.asarray(m)[: batch_size - pad])
    out["embedding"] = np.concatenate(embs).astype(np.float32)
    return out


def encode(tokenizer, rows: Sequence[dict], fmt: str, max_length: int) -> Arrays:
    return {k: np.asarray(v, np.int32) for k, v in encode_rows(tokenizer, rows, fmt, max_length).items()}


def answer_token_values(arrays: Arrays, key: str = "entropy") -> np.ndarray:
    """All scored answer-token values (1-D), e.g. for fitting an entropy threshold."""
    scored = np.zeros_like(arrays["labels"], bool)
    scored[:, 1:] = arrays["labels"][:, 1:] != -100
    return arrays[key][scored]


def subdomain_experts(
    rows: Sequence[dict], embeddings: np.ndarray, *, domain_field: str, num: int, max_num: int, seed: int
) -> tuple[np.ndarray, int, dict]:
    """Forget expert per example (1..N) from given domain labels or k-means on embeddings.

    Returns ``(expert int32[N], N, info)``.
    """
    labels = [r.get(domain_field) for r in rows] if rows and all(domain_field in r for r in rows) else None
    n = len(embeddings)
    if labels is None and n < 3:
        return np.ones((n,), np.int32), 1, {"source": "single"}
    k_range = (2, max(2, min(max_num, n - 1)))
    result = assign_subdomains(
        None if labels is not None else jnp.asarray(embeddings),
        num=(num or None),
        k_range=k_range,
        key=jax.random.key(seed),
        labels=labels,
    )
    info = {"source": "labels" if labels is not None else "kmeans", "num": int(result.num)}
    if result.silhouette is not None:
        info["silhouette"] = {str(k): float(v) for k, v in result.silhouette.items()}
    return np.asarray(result.labels, np.int32) + 1, int(result.num), info
