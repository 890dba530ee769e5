"""Token entropy (Shannon, Tsallis) and the high/low-entropy partition (ALTER_SPEC.md §2).

For an answer token ``x_t`` its entropy is that of the predictive distribution that
produced it, ``p_t = softmax(logits[t-1])`` (:func:`answer_token_entropy` does the shift).

* Shannon: ``H(p) = −Σ_v p_v log p_v``.
* Tsallis: ``S_q(p) = (1 − Σ_v p_v^q) / (q − 1)``, ``q > 0``; ``S_q → H`` as ``q → 1``.
  Computed from float32 log-probs as ``S_q = −Σ_v p_v · expm1((q−1) log p_v) / (q−1)``
  (``p^q = p · e^{(q−1) log p}``, ``Σ p = 1``), which is exact at ``q = 1`` (Shannon branch)
  and numerically continuous near it (no ``1 − Σ p^q`` cancellation).
* Bounds: ``0 ≤ S_q ≤ (1 − V^{1−q})/(q−1)`` (uniform over ``V``; Shannon ``log V``), and for
  ``q > 1`` always ``S_q < 1/(q−1)``: e.g. ``S_2 < 1``, so the paper's fixed ``θ = 1.2``
  only makes sense for ``q < 1 + 1/θ ≈ 1.83`` (in practice ``q ≲ 1.5``, since ``S_q`` near
  its supremum needs an almost uniform distribution over a large vocabulary).

``q`` is always a static Python float (it selects the formula at trace time).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from alter_jax.losses import shift_logits_labels

__all__ = [
    "token_log_probs",
    "shannon_entropy",
    "tsallis_entropy",
    "answer_token_entropy",
    "max_tsallis_entropy",
    "EntropyThreshold",
    "fit_threshold",
    "otsu_threshold",
    "high_entropy_mask",
]

ThresholdKind = Literal["fixed", "quantile", "bimodal"]
_KINDS = ("fixed", "quantile", "bimodal")
# Above this exponent p·expm1(z) is evaluated as exp(q·logp) − p (no overflow, no loss).
_EXPM1_CLAMP = 30.0


def _static_q(q) -> float:
    try:
        qf = float(q)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"alter_jax.entropy: the Tsallis order q must be a static Python float, got {type(q).__name__}; "
            "pass it as a Python number (e.g. a config value), not a traced array"
        ) from err
    if not (qf > 0.0 and math.isfinite(qf)):
        raise ValueError(f"alter_jax.entropy: the Tsallis order q must be a finite number > 0, got q={q!r}")
    return qf


def token_log_probs(logits: Float[Array, "... v"]) -> Float[Array, "... v"]:
    """``log softmax(logits)`` over the last axis, in float32. Shape unchanged."""
    chex.assert_rank(logits, {1, 2, 3, 4})
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def shannon_entropy(logits: Float[Array, "... v"]) -> Float[Array, "..."]:
    """``H = −Σ_v p_v log p_v`` (nats) per position: ``[B, T, V] -> [B, T]``.

    Terms with ``p_v = 0`` (e.g. ``-inf`` logits) contribute 0.
    """
    logp = token_log_probs(logits)
    p = jnp.exp(logp)
    safe_logp = jnp.where(p > 0, logp, 0.0)
    return -jnp.sum(p * safe_logp, axis=-1)


def tsallis_entropy(logits: Float[Array, "... v"], q: float) -> Float[Array, "..."]:
    """Tsallis entropy ``S_q = (1 − Σ_v p_v^q)/(q − 1)`` per position: ``[B, T, V] -> [B, T]``.

    Evaluated as ``−Σ_v p_v · expm1((q−1)·log p_v) / (q−1)``; exactly Shannon when
    ``q == 1``. For ``q < 1`` large exponents ``(q−1) log p > 30`` switch to the equivalent
    ``p^q − p = exp(q log p) − p`` so nothing overflows. Stable for any static ``q > 0``.
    """
    q = _static_q(q)
    if q == 1.0:
        return shannon_entropy(logits)
    logp = token_log_probs(logits)
    p = jnp.exp(logp)
    z = (q - 1.0) * logp
    if q > 1.0:  # z <= 0: expm1 in [-1, 0]
        term = p * jnp.expm1(z)
    else:
        big = z > _EXPM1_CLAMP
        term = jnp.where(big, jnp.exp(q * logp) - p, p * jnp.expm1(jnp.minimum(z, _EXPM1_CLAMP)))
    return -jnp.sum(term, axis=-1) / (q - 1.0)


def answer_token_entropy(
    logits: Float[Array, "b t v"], labels: Int[Array, "b t"], q: float = 1.0
) -> Float[Array, "b t1"]:
    """Entropy of the distribution that produced each answer token, aligned like the losses.

    ``logits [B, T, V]``, unshifted ``labels [B, T]`` (-100 = not scored). Returns
    ``[B, T−1]``: entry ``t`` is ``S_q(softmax(logits[:, t]))``, the entropy behind target
    ``labels[:, t+1]``, i.e. the same alignment as :func:`alter_jax.losses.shift_logits_labels`.
    Positions that are not scored are 0 (so ``high_entropy_mask`` with ``θ ≥ 0`` is False
    there). ``q = 1`` gives Shannon.
    """
    shifted, _, mask = shift_logits_labels(logits, labels)
    return jnp.where(mask > 0, tsallis_entropy(shifted, q), 0.0)


def max_tsallis_entropy(q: float, vocab_size: int | None = None) -> float:
    """Supremum of ``S_q`` over distributions on ``vocab_size`` outcomes.

    ``(1 − V^{1−q})/(q − 1)`` (uniform distribution; ``log V`` at ``q = 1``). With
    ``vocab_size=None`` the bound over all vocabularies: ``1/(q−1)`` for ``q > 1``, ``inf``
    for ``q ≤ 1``.
    """
    q = _static_q(q)
    if vocab_size is None:
        return 1.0 / (q - 1.0) if q > 1.0 else math.inf
    if int(vocab_size) < 1:
        raise ValueError(f"alter_jax.entropy.max_tsallis_entropy: vocab_size must be >= 1, got {vocab_size}")
    v = float(vocab_size)
    if q == 1.0:
        return math.log(v)
    return -math.expm1((1.0 - q) * math.log(v)) / (q - 1.0)


@dataclasses.dataclass(frozen=True)
class EntropyThreshold:
    """How to split answer tokens into high (``S_q > θ``) and low entropy.

    * ``fixed``: ``θ = value`` (paper: 1.2); checked against the reachable range of ``S_q``.
    * ``quantile``: ``value`` in (0, 1) is the fraction of the data set's answer tokens that
      are high-entropy (``θ`` = the ``1 − value`` quantile).
    * ``bimodal``: Otsu's threshold on the entropy histogram (``value`` unused).
    """

    kind: ThresholdKind = "fixed"
    value: float | None = 1.2

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(
                f"EntropyThreshold.kind must be one of {_KINDS}, got {self.kind!r} (field 'kind' of the entropy threshold)"
            )
        if self.kind in ("fixed", "quantile") and self.value is None:
            raise ValueError(f"EntropyThreshold(kind={self.kind!r}) needs a 'value'")
        if self.kind == "quantile" and not (0.0 < float(self.value) < 1.0):
            raise ValueError(
                f"EntropyThreshold(kind='quantile') needs 0 < value < 1 (fraction of high-entropy tokens), "
                f"got value={self.value!r}"
            )

    def fit(self, entropies: np.ndarray | None = None, *, q: float, vocab_size: int | None = None) -> float:
        """Resolve to a number ``θ`` (see :func:`fit_threshold`)."""
        return fit_threshold(self, entropies, q=q, vocab_size=vocab_size)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample: the histogram bin edge maximising the
    between-class variance ``w0·w1·(μ0 − μ1)²`` (Otsu, 1979). Values ``> θ`` form the
    upper class.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise ValueError(
            f"entropy.fit_threshold(kind='bimodal'): all {values.size} entropies equal {lo:.6g}; "
            "a bimodal threshold is undefined (use kind='fixed' or 'quantile')"
        )
    hist, edges = np.histogram(values, bins=int(bins), range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    hist = hist.astype(np.float64)
    w0 = np.cumsum(hist)[:-1]
    s0 = np.cumsum(hist * centers)[:-1]
    total, total_s = hist.sum(), (hist * centers).sum()
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = s0 / w0
        mu1 = (total_s - s0) / w1
        between = np.where((w0 > 0) & (w1 > 0), w0 * w1 * (mu0 - mu1) ** 2, -1.0)
    i = int(np.argmax(between))
    return float(edges[i + 1])


def fit_threshold(
    kind: ThresholdKind | EntropyThreshold,
    entropies: np.ndarray | None = None,
    *,
    value: float | None = None,
    q: float = 1.0,
    vocab_size: int | None = None,
    bins: int = 256,
) -> float:
    """Resolve an entropy threshold ``θ`` (tokens with ``S_q > θ`` are high-entropy).

    Args:
      kind: ``"fixed"``, ``"quantile"``, ``"bimodal"`` or an :class:`EntropyThreshold`
        (whose ``kind``/``value`` are then used).
      entropies: 1-D array of all answer-token entropies ``S_q`` of the data set (only the
        scored tokens); required for ``quantile`` and ``bimodal``.
      value: ``θ`` for ``fixed``; the high-entropy fraction in (0, 1) for ``quantile``.
      q: the Tsallis order the entropies were computed with (1 = Shannon).
      vocab_size: ``V``; tightens the ``fixed`` reachability check to
        ``θ < (1 − V^{1−q})/(q−1)``.
      bins: histogram bins for ``bimodal`` (Otsu).

    Raises:
      ValueError: an unreachable fixed threshold (e.g. ``θ = 1.2`` with ``q = 2``, since
        ``S_2 < 1``), a bad quantile, or missing/invalid entropies.
    """
    if isinstance(kind, EntropyThreshold):
        kind, value = kind.kind, (kind.value if value is None else value)
    if kind not in _KINDS:
        raise ValueError(f"entropy.fit_threshold: kind must be one of {_KINDS}, got {kind!r}")
    q = _static_q(q)

    if kind == "fixed":
        if value is None:
            raise ValueError("entropy.fit_threshold(kind='fixed') needs value=θ (e.g. 1.2, the paper's default)")
        theta = float(value)
        if not (theta >= 0.0 and math.isfinite(theta)):
            raise ValueError(f"entropy.fit_threshold(kind='fixed'): θ must be a finite number >= 0, got {value!r}")
        if q > 1.0 and theta >= 1.0 / (q - 1.0):
            raise ValueError(
                f"entropy.fit_threshold(kind='fixed'): θ={theta:g} is unreachable with q={q:g}: Tsallis entropy "
                f"always satisfies S_q < 1/(q-1), here S_{q:g} < {1.0 / (q - 1.0):g}, so no token would ever be "
                f"high-entropy. Fix: lower q below {1.0 + 1.0 / theta:.3g} (for θ=1.2 use q < 1.5 in practice, "
                "e.g. the Shannon case q=1), or lower θ, or use kind='quantile' / kind='bimodal' which adapt "
                "to the data."
            )
        if vocab_size is not None:
            s_max = max_tsallis_entropy(q, vocab_size)
            if theta >= s_max:
                raise ValueError(
                    f"entropy.fit_threshold(kind='fixed'): θ={theta:g} is unreachable: with vocab_size={vocab_size} "
                    f"and q={q:g} the largest possible entropy (uniform distribution) is S_q={s_max:.6g}. "
                    "Fix: lower θ or q, or use kind='quantile' / kind='bimodal'."
                )
        return theta

    if entropies is None:
        raise ValueError(f"entropy.fit_threshold(kind={kind!r}) needs the data set's answer-token entropies")
    e = np.asarray(entropies, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError(f"entropy.fit_threshold(kind={kind!r}): got an empty entropy array (no answer tokens?)")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"entropy.fit_threshold(kind={kind!r}): entropies contain NaN/inf ({np.sum(~np.isfinite(e))} values)")

    if kind == "quantile":
        if value is None or not (0.0 < float(value) < 1.0):
            raise ValueError(
                f"entropy.fit_threshold(kind='quantile') needs 0 < value < 1 (the fraction of high-entropy "
                f"tokens), got value={value!r}"
            )
        return float(np.quantile(e, 1.0 - float(value)))

    return otsu_threshold(e, bins=bins)


def high_entropy_mask(entropy: Float[Array, "..."], threshold: float | Float[Array, ""]) -> Bool[Array, "..."]:
    """``entropy > θ`` (strictly greater = high entropy); same shape as ``entropy``."""
    return entropy > threshold
