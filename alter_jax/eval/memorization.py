"""Teacher-forced token statistics of scored text, Exact Memorization and Extraction Strength.

The model is seen through ``LogitsFn(ids int32[B, T], mask int32[B, T]) -> logits [B, T, V]``
(WORKSPACE.md "Interfaces"); labels are unshifted with -100 on unscored positions, so the
logits at position t score ``labels[t + 1]``.

Per scored sequence (:class:`TokenStats`, one forward pass serves every metric here and
every membership-inference attack of :mod:`alter_jax.eval.mia`):

- ``avg_loss`` = mean NLL over *all* label tokens (the answer and its EOS), as
  open-unlearning's ``evaluate_probability``;
- ``logp``, ``match``, ``mu``, ``sigma`` over the label tokens *without the last one*
  (open-unlearning's ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs`` drop it "to
  ignore eos prediction"; for QA rows the last label is the EOS we append):
  ``logp_t = log p(x_t | x_<t)``, ``match_t = [argmax_v p(v | x_<t) = x_t]``,
  ``mu_t = E_{v~p}[log p(v)]``, ``sigma_t = E_{v~p}[log² p(v)] − mu_t²``.

Metrics (n = number of tokens in ``match``):

- **Exact Memorization** (Tirumala et al. 2022, "Memorization without overfitting"; as
  open-unlearning): EM = (1/n) Σ_t match_t, the teacher-forced share of answer tokens that
  are the greedy (argmax) token. ``None`` when n = 0.
- **Extraction Strength** (Carlini et al. 2021 prefix extraction; in the form of
  open-unlearning's ``extraction_strength``, Yuan et al. 2025): ES = 1 − k/n with k the
  smallest prefix length such that the teacher-forced argmax reproduces the suffix exactly
  (match_t for all t ≥ k). open-unlearning's loop runs k = 0..n−1 and keeps k = n − 1
  when no suffix matches, so a sequence whose last token is wrong scores 1/n, not 0; we
  reproduce that. ES = 0 when n = 0 (as theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from alter_jax.data.prompts import IGNORE_INDEX

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TokenStats:
    """Teacher-forced statistics of one scored sequence (see the module docstring).

    ``label_ids``: every label token (incl. the last); ``logp, match, mu, sigma``:
    ``[n]`` over the label tokens without the last one."""

    avg_loss: float
    n_tokens: int
    loss_sum: float
    label_ids: np.ndarray
    logp: np.ndarray
    match: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def _batch_stats(logits, labels):
    """logits ``[B, T, V]``, labels ``int[B, T]`` -> per shifted position ``[B, T-1]``:
    (target log-prob, argmax == target, mu, sigma, valid)."""
    import jax
    import jax.numpy as jnp

    lg = jnp.asarray(logits)[:, :-1].astype(jnp.float32)
    tgt = jnp.asarray(labels)[:, 1:]
    valid = tgt != IGNORE_INDEX
    logp = jax.nn.log_softmax(lg, axis=-1)
    tok = jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], axis=-1)[..., 0]
    match = jnp.argmax(lg, axis=-1) == tgt
    p = jnp.exp(logp)
    mu = (p * logp).sum(-1)
    sigma = (p * jnp.square(logp)).sum(-1) - jnp.square(mu)
    return tok, match, mu, sigma, valid


_batch_stats_jit = None


def batch_token_stats(logits, labels) -> list[TokenStats]:
    """:class:`TokenStats` of each row of one batch (jitted statistics, numpy out)."""
    global _batch_stats_jit
    if _batch_stats_jit is None:
        import jax

        _batch_stats_jit = jax.jit(_batch_stats)
    tok, match, mu, sigma, valid = (np.asarray(a) for a in _batch_stats_jit(logits, labels))
    labels = np.asarray(labels)
    out = []
    for b in range(len(labels)):
        idx = np.nonzero(valid[b])[0]
        lp_all = tok[b, idx].astype(np.float64)
        n = len(idx)
        core = idx[:-1]
        out.append(TokenStats(
            avg_loss=float(-lp_all.sum() / n) if n else float("nan"), n_tokens=n, loss_sum=float(-lp_all.sum()),
            label_ids=labels[b, idx + 1].astype(np.int64),
            logp=tok[b, core].astype(np.float64), match=match[b, core].astype(bool),
            mu=mu[b, core].astype(np.float64), sigma=sigma[b, core].astype(np.float64)))
    return out


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """Pad the batch axis to ``n`` rows by repeating the last row (static shapes for jit)."""
    if len(a) == n:
        return a
    return np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)], axis=0)


def token_stats(
    logits_fn: LogitsFn,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 8,
    length_bucket: int = 32,
) -> list[TokenStats]:
    """:class:`TokenStats` of every row of right-padded ``int32[N, T]`` arrays, longest rows first in
    ``[batch_size, W]`` batches (the last one padded by repeating its last row), ``W`` the batch's longest
    row rounded up to ``length_bucket`` (0: always ``T``); returned in the rows' order."""
    from alter_jax.data.batching import sorted_row_batches

    n, t = np.shape(input_ids)
    out: list[TokenStats | None] = [None] * n
    for rows, w in sorted_row_batches(np.asarray(attention_mask).sum(axis=1), batch_size, length_bucket, t):
        logits = logits_fn(pad_rows(input_ids[rows, :w], batch_size), pad_rows(attention_mask[rows, :w], batch_size))
        for i, st in zip(rows, batch_token_stats(logits, pad_rows(labels[rows, :w], batch_size))):
            out[i] = st
    return out  # type: ignore[return-value]


def exact_memorization(match: np.ndarray) -> float | None:
    """EM = share of teacher-forced argmax tokens equal to the target (None when empty)."""
    m = np.asarray(match, bool)
    return None if m.size == 0 else float(m.sum() / m.size)


def extraction_strength(match: np.ndarray) -> float:
    """ES = 1 − k/n, k = smallest prefix after which every argmax matches (open-unlearning's
    loop: k stays n − 1 when no suffix matches; 0 for an empty sequence)."""
    m = np.asarray(match, bool)
    n = m.size
    if n == 0:
        return 0.0
    # suffix_ok[k] = all(m[k:]); the first k with suffix_ok, else n - 1
    suffix_ok = np.flip(np.cumprod(np.flip(m))).astype(bool)
    ks = np.nonzero(suffix_ok)[0]
    k = int(ks[0]) if ks.size else n - 1
    return float(1.0 - k / n)


def memorization_scores(stats: Sequence[TokenStats]) -> dict[str, list]:
    """Per-row ``exact_memorization`` (None for rows without tokens) and ``extraction_strength``."""
    return {"exact_memorization": [exact_memorization(s.match) for s in stats],
            "extraction_strength": [extraction_strength(s.match) for s in stats]}


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean over the non-None values (open-unlearning drops None scores), None if none."""
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None
