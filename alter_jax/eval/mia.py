"""Membership-inference attack scores, their AUC, and PrivLeak (open-unlearning's definitions).

Every score is signed like a loss (open-unlearning ``evals/metrics/mia``): *higher = less
likely a member*. Token quantities come from :class:`alter_jax.eval.memorization.TokenStats`
(``logp``/``mu``/``sigma`` over the answer tokens without the last one; ``avg_loss`` over all
label tokens):

- ``loss`` (Yeom et al. 2018): avg_loss.
- ``zlib`` (Carlini et al. 2021): avg_loss / len(zlib.compress(text.encode("utf-8"))), text =
  the label tokens decoded with ``skip_special_tokens=True``.
- ``min_k`` (Min-K% Prob, Shi et al. 2024): −mean of the ⌊k·n⌋ (at least 1) lowest logp;
  k = 0.4; 0 for an empty sequence.
- ``min_k_plus_plus`` (Min-K%++, Zhang et al. 2024): per token z_t = (logp_t − mu_t) /
  sqrt(max(sigma_t, 1e-6)), then −mean of the ⌊k·n⌋ (≥ 1) lowest z; k = 0.4.
- ``gradnorm`` (Wang et al. 2024, "Pandora's White-Box", arXiv 2402.17012): mean over parameter tensors of
  ‖∂ℓ/∂θ‖_p of ℓ = −mean logp (p = 2), through a :data:`GradNormFn`.
- ``reference`` (Carlini et al. 2021, comparison with a reference model): avg_loss(target) − avg_loss(reference
  model).

AUC (open-unlearning ``mia_auc``): ``roc_auc_score`` with forget rows labelled 0 and holdout
rows 1, i.e. AUC = P(s(holdout) > s(forget)) + ½ P(tie): ≈ 1 when the forget rows look like
training data, ≈ 0.5 when they look like unseen data. MUSE reports the complement.

PrivLeak (MUSE, Shi et al. 2024) = (AUC'_unlearned − AUC'_retain) / AUC'_retain × 100 in MUSE's
convention AUC' = 1 − AUC; open-unlearning's ``privleak`` computes exactly this from its own
AUCs (``score = 1 − auc``; default AUC_retain = 0.5 without retain-model logs), on the Min-K%
attack.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import numpy as np

from alter_jax.eval.memorization import TokenStats
from alter_jax.eval.muse import roc_auc

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
DEFAULT_K = 0.4
DEFAULT_P = 2.0
PRIVLEAK_ATTACK = "min_k"
PRIVLEAK_DEFAULT_RETAIN_AUC = 0.5

# GradNormFn(input_ids int32[B, T], attention_mask int32[B, T], labels int32[B, T]) -> float[B]:
# for each row, the gradient of the mean NLL of its labelled tokens (unshifted, -100 = not
# scored) w.r.t. the model's parameters, reduced to the mean over parameter tensors of the
# tensor's p-norm. The model side decides which parameters (alter_jax.gradnorm).
GradNormFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def loss_score(s: TokenStats) -> float:
    return float(s.avg_loss)


def zlib_score(s: TokenStats, text: str) -> float:
    return float(s.avg_loss / len(zlib.compress(text.encode("utf-8"))))


def _bottom_k_mean(x: np.ndarray, k: float) -> float:
    num_k = max(1, int(len(x) * k))
    return float(-np.mean(np.sort(x)[:num_k]))


def min_k_score(s: TokenStats, k: float = DEFAULT_K) -> float:
    if s.logp.size == 0:
        return 0.0
    return _bottom_k_mean(s.logp, k)


def min_k_plus_plus_score(s: TokenStats, k: float = DEFAULT_K) -> float:
    if s.logp.size == 0:
        return 0.0
    z = (s.logp - s.mu) / np.sqrt(np.maximum(s.sigma, 1e-6))
    return _bottom_k_mean(z, k)


def reference_score(s: TokenStats, ref: TokenStats) -> float:
    return float(s.avg_loss - ref.avg_loss)


def attack_scores(
    attack: str,
    stats: Sequence[TokenStats],
    *,
    texts: Sequence[str] | None = None,
    ref_stats: Sequence[TokenStats] | None = None,
    grad_norms: Sequence[float] | None = None,
    k: float = DEFAULT_K,
) -> np.ndarray:
    """Scores ``float64[N]`` of one attack (``texts`` for zlib, ``ref_stats`` for reference,
    precomputed ``grad_norms`` for gradnorm)."""
    if attack == "loss":
        return np.array([loss_score(s) for s in stats])
    if attack == "zlib":
        if texts is None:
            raise ValueError("zlib attack needs the decoded label texts")
        return np.array([zlib_score(s, t) for s, t in zip(stats, texts)])
    if attack == "min_k":
        return np.array([min_k_score(s, k) for s in stats])
    if attack == "min_k_plus_plus":
        return np.array([min_k_plus_plus_score(s, k) for s in stats])
    if attack == "reference":
        if ref_stats is None:
            raise ValueError("reference attack needs a reference model (--reference-model)")
        return np.array([reference_score(s, r) for s, r in zip(stats, ref_stats)])
    if attack == "gradnorm":
        if grad_norms is None:
            raise ValueError("gradnorm attack needs a GradNormFn")
        return np.asarray(grad_norms, np.float64)
    raise ValueError(f"unknown MIA attack {attack!r}; choose from {', '.join(ATTACKS)}")


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """open-unlearning's AUC: forget = class 0, holdout = class 1 (≈1: forget rows look seen)."""
    return roc_auc(holdout_scores, forget_scores)


def privleak(auc_unlearned: float, auc_retain: float = PRIVLEAK_DEFAULT_RETAIN_AUC) -> float:
    """PrivLeak (percent) from open-unlearning-convention AUCs: MUSE's (AUC'_u − AUC'_r) / AUC'_r
    × 100 with AUC' = 1 − AUC (open-unlearning adds 1e-10 to the denominator; so do we)."""
    score, ref = 1.0 - auc_unlearned, 1.0 - auc_retain
    return float((score - ref) / (ref + 1e-10) * 100.0)
