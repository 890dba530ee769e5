"""Every ALTER / baseline loss as a small pure function over logits, targets and masks.

Conventions (WORKSPACE.md):

* Model outputs are ``logits: float[B, T, V]``; data carries *unshifted* HF labels
  ``labels: int32[B, T]`` with ``-100`` where a position is not scored. Position ``t``'s
  logits predict ``labels[t + 1]``. :func:`shift_logits_labels` does that alignment once;
  every per-token function below takes **already aligned** ``logits [B, T, V]``,
  ``targets int[B, T]`` and a float ``mask [B, T]`` (1 = scored). The trainer may pass
  any sub-mask (e.g. only the low- or high-entropy answer tokens).
* Softmax / log-softmax are computed in float32 whatever the logits dtype.
* Token means are ``Σ_t m_t ℓ_t / max(Σ_t m_t, 1)``: an empty mask gives a loss of exactly
  0 with a zero gradient (never NaN).
* Per-example vectors (``[B]``) plus reducers keep the baselines composable.
* Two levels: per-token functions of the logits (``token_log_likelihood``,
  ``inverse_hinge_per_token``, ``kl_per_token``, the Tsallis entropy) and losses of those
  per-token values (``*_from_log_likelihood``, :func:`masked_mean`). Each logits-level loss is
  the composition of the two, so the trainer, which evaluates the LM head in chunks of scored
  positions and keeps only ``[B, A]`` token statistics (``train.step.token_statistics``),
  computes the same formula.

References for the baselines:

* GA / GradDiff / KL-min: TOFU (Maini et al., 2024) and open-unlearning
  (``src/trainer/unlearn/grad_diff.py``, ``src/trainer/utils.py``).
* NPO: Zhang et al., 2024, "Negative Preference Optimization: From Catastrophic Collapse
  to Effective Unlearning" (arXiv:2404.05868), Eq. (3).
* SimNPO: Fan et al., 2024, "Simplicity Prevails: Rethinking Negative Preference
  Optimization for LLM Unlearning" (arXiv:2410.07163), Eq. (4).
* IHL: Cha et al., 2024, "Towards Robust and Cost-Efficient Knowledge Unlearning for
  LLMs"; ALTER paper Eq. (8) and ALTER_SPEC.md section 4.
* IdkNLL / IdkDPO: TOFU (Maini et al., 2024, the "I don't know" preference baseline) with
  open-unlearning's DPO (``src/trainer/utils.py::compute_dpo_loss``, ``configs/trainer/DPO.yaml``:
  β = 0.1) and Rafailov et al., 2023, "Direct Preference Optimization" (arXiv:2305.18290), Eq. (7).
* RMU: Li et al., 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use with
  Unlearning" (arXiv:2403.03218), Eq. (1)-(2); the token masking and the per-example mean
  of open-unlearning (``src/trainer/unlearn/rmu.py``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "shift_logits_labels",
    "masked_mean",
    "token_log_likelihood",
    "token_nll",
    "nll_loss",
    "PerExampleNLL",
    "per_example_nll",
    "sequence_log_prob",
    "inverse_hinge_per_token",
    "inverse_hinge_loss",
    "kl_per_token",
    "kl_to_reference",
    "structural_penalty",
    "entropy_drift_penalty",
    "router_cross_entropy",
    "gradient_ascent_loss",
    "grad_diff_loss",
    "kl_min_loss",
    "npo_per_example",
    "npo_loss",
    "npo_from_log_ratio",
    "npo_loss_from_log_likelihood",
    "nll_from_log_likelihood",
    "per_example_nll_from_log_likelihood",
    "simnpo_from_mean_nll",
    "simnpo_loss_from_log_likelihood",
    "simnpo_per_example",
    "simnpo_loss",
    "rmu_activation_loss",
    "example_mean",
    "dpo_from_log_ratios",
    "dpo_loss",
    "dpo_loss_from_log_likelihood",
]


# --------------------------------------------------------------------------- helpers


def shift_logits_labels(
    logits: Float[Array, "b t v"], labels: Int[Array, "b t"]
) -> tuple[Float[Array, "b t1 v"], Int[Array, "b t1"], Float[Array, "b t1"]]:
    """Align HF-style unshifted labels with the logits that predict them.

    Returns ``(logits[:, :-1], labels[:, 1:], mask)`` with ``T1 = T - 1`` and
    ``mask = float32(labels[:, 1:] != -100)``. Ignored targets stay ``-100``: every
    function here treats them safely (they are gathered as index 0 and masked out).
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix([logits, labels], 2)
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).astype(jnp.float32)
    return logits[:, :-1], targets, mask


def _check_aligned(logits, targets, mask) -> None:
    chex.assert_rank(logits, 3)
    chex.assert_rank([targets, mask], 2)
    chex.assert_equal_shape([targets, mask])
    chex.assert_equal_shape_prefix([logits, targets], 2)


def masked_mean(values: Float[Array, "..."], mask: Float[Array, "..."]) -> Float[Array, ""]:
    """``Σ m·v / max(Σ m, 1)`` over all elements; 0 (with zero gradient) for an empty mask.

    ``jnp.where`` (not ``v * m``) keeps NaN/inf at masked-out positions from leaking.
    """
    chex.assert_equal_shape([values, mask])
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, values.astype(jnp.float32) * mask, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _safe_targets(targets: Int[Array, "..."]) -> Int[Array, "..."]:
    return jnp.where(targets < 0, 0, targets).astype(jnp.int32)


def _gather(x: Float[Array, "... v"], targets: Int[Array, "..."]) -> Float[Array, "..."]:
    return jnp.take_along_axis(x, _safe_targets(targets)[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------- NLL


def token_log_likelihood(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"]
) -> Float[Array, "b t"]:
    """``log p(x_t) = log_softmax(logits)[x_t]`` per position (float32); -100 reads index 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return _gather(logp, targets)


def token_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """``ℓ_t = −log p(x_t)`` per position, shape ``[B, T]``."""
    return -token_log_likelihood(logits, targets)


def nll_loss(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """Mean token NLL over masked tokens: ``Σ_{b,t} m ℓ / max(Σ m, 1)``.

    Equals HF's ``model(..., labels=labels).loss`` when ``mask`` is the shifted label mask.
    """
    _check_aligned(logits, targets, mask)
    return nll_from_log_likelihood(token_log_likelihood(logits, targets), mask)


def nll_from_log_likelihood(logp: Float[Array, "b t"], mask: Float[Array, "b t"]) -> Float[Array, ""]:
    """:func:`nll_loss` from the per-token ``log p(x_t)`` (:func:`token_log_likelihood`)."""
    return masked_mean(-logp, mask)


class PerExampleNLL(NamedTuple):
    """Per-example NLL statistics, each ``float32[B]``.

    ``sum = Σ_t m ℓ``, ``count = Σ_t m``, ``mean = sum / max(count, 1)`` (TOFU's
    length-normalised answer loss: its answer probability is ``exp(−mean)``).
    """

    sum: Float[Array, " b"]
    mean: Float[Array, " b"]
    count: Float[Array, " b"]


def per_example_nll(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], mask: Float[Array, "b t"]
) -> PerExampleNLL:
    """Sum and mean NLL per example over its masked tokens (see :class:`PerExampleNLL`)."""
    _check_aligned(logits, targets, mask)
    return per_example_nll_from_log_likelihood(token_log_likelihood(logits, targets), mask)


def per_example_nll_from_log_likelihood(logp: Float[Array, "b t"], mask: Float[Array, "b t"]) -> PerExampleNLL:
    """:func:`per_example_nll` from the per-token ``log p(x_t)``."""
    chex.assert_equal_shape([logp, mask])
    mask = mask.astype(jnp.float32)
    nll = jnp.where(mask > 0, -logp * mask, 0.0)
    total = jnp.sum(nll, axis=-1)
    count = jnp.sum(mask, axis=-1)
    return PerExampleNLL(sum=total, mean=total / jnp.maximum(count, 1.0), count=count)


def sequence_log_prob(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], mask: Float[Array, "b t"]
) -> Float[Array, " b"]:
    """``log π(y|x) = Σ_t m_t log p(x_t)`` per example, ``[B]`` (answer tokens summed)."""
    return -per_example_nll(logits, targets, mask).sum


def example_mean(values: Float[Array, " b"], count: Float[Array, " b"]) -> Float[Array, ""]:
    """Mean of a per-example vector over examples with at least one scored token.

    Examples with ``count == 0`` (e.g. padding rows) are dropped; returns 0 if none is left.
    """
    return masked_mean(values, (count > 0).astype(jnp.float32))


# --------------------------------------------------------------------------- ALTER terms


def inverse_hinge_per_token(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"]
) -> Float[Array, "b t"]:
    """Inverse hinge loss per token, ``[B, T]``:

    ``IHL_t = 1 + p(x_t | x_<t) − max_{v ≠ x_t} p(v | x_<t)``, ``p = softmax(logits_t)``.
    Minimising it lowers the target's probability and raises the best competitor's.
    Range ``[0, 2]``.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    safe = _safe_targets(targets)
    p_target = _gather(p, safe)
    is_target = jnp.arange(p.shape[-1]) == safe[..., None]
    p_other = jnp.max(jnp.where(is_target, -jnp.inf, p), axis=-1)
    return 1.0 + p_target - p_other


def inverse_hinge_loss(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """``L_IHL = mean_{t: m_t=1} IHL_t`` (ALTER's forget loss on low-entropy forget tokens)."""
    _check_aligned(logits, targets, mask)
    return masked_mean(inverse_hinge_per_token(logits, targets), mask)


def kl_per_token(
    logits: Float[Array, "b t v"], ref_logits: Float[Array, "b t v"]
) -> Float[Array, "b t"]:
    """``KL(p_ref ‖ p_θ)_t = Σ_v p_ref(v) (log p_ref(v) − log p_θ(v))`` per position.

    ``ref_logits`` are wrapped in ``stop_gradient`` (the reference is frozen).
    """
    chex.assert_equal_shape([logits, ref_logits])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    ref_p = jnp.exp(ref_logp)
    # p_ref = 0 contributes 0 even where log p_ref = -inf.
    return jnp.sum(jnp.where(ref_p > 0, ref_p * (ref_logp - logp), 0.0), axis=-1)


def kl_to_reference(
    logits: Float[Array, "b t v"], ref_logits: Float[Array, "b t v"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """Mean over masked tokens of ``KL(p_ref ‖ p_θ)`` (forward KL, reference first).

    Direction: open-unlearning's ``compute_kl_divergence`` calls
    ``F.kl_div(current_log_probs, ref_log_probs, log_target=True)``, which is
    ``Σ p_ref (log p_ref − log p_θ) = KL(ref ‖ current)``; we follow it. This is the
    mass-covering direction: the adapted model is penalised wherever the reference puts
    probability it lost, which is what "keep retain behaviour" asks for.
    Departure: open-unlearning divides by *all* B·T positions (prompt and padding
    included, ``batchmean`` on a flattened view); we average over the masked (answer)
    tokens only, consistent with every other loss here.
    """
    chex.assert_rank([logits, mask], [3, 2])
    chex.assert_equal_shape_prefix([logits, mask], 2)
    return masked_mean(kl_per_token(logits, ref_logits), mask)


def structural_penalty(
    entropy_fn: Callable[[chex.ArrayTree], Float[Array, ""]], shared_a: chex.ArrayTree
) -> Float[Array, ""]:
    """``L_struct = ‖∇_A mean_{t∈H} S_q(x_t)‖²`` by double backprop (ALTER Eq. 8, spec §4).

    ``entropy_fn`` maps the shared-``A`` pytree to the scalar mean Tsallis entropy over the
    high-entropy tokens (with everything else closed over, ``B`` stopped). Returns the
    squared Frobenius norm of ``jax.grad(entropy_fn)(A)`` summed over all leaves. The result
    is itself differentiable w.r.t. ``A`` (``jax.grad`` of this function is a Hessian-vector
    product: ``2 ∇²S · ∇S``), so the trainer can take its gradient.
    """
    grads = jax.grad(entropy_fn)(shared_a)
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        raise ValueError("losses.structural_penalty: shared_a has no array leaves (pass the A pytree)")
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves)


def entropy_drift_penalty(
    s_adapted: Float[Array, "b t"], s_base: Float[Array, "b t"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """Cheap structural option: ``mean_{t: m_t=1} (S_q^adapted(t) − S_q^base(t))²``.

    ``s_base`` (frozen backbone) is wrapped in ``stop_gradient``.
    """
    chex.assert_equal_shape([s_adapted, s_base, mask])
    diff = s_adapted.astype(jnp.float32) - jax.lax.stop_gradient(s_base).astype(jnp.float32)
    return masked_mean(jnp.square(diff), mask)


def router_cross_entropy(
    router_logits: Float[Array, "... e"], target_expert: Int[Array, "..."], mask: Float[Array, "..."]
) -> Float[Array, ""]:
    """Routing loss ``L_route = mean_{m=1} −log softmax(router_logits)[e*]``.

    ``router_logits [..., E]``, ``target_expert int[...]`` (0 = retain expert, d = forget
    sub-domain d), ``mask [...]`` (same leading shape).
    """
    chex.assert_equal_shape([target_expert, mask])
    chex.assert_equal_shape_prefix([router_logits, target_expert], target_expert.ndim)
    chex.assert_rank(router_logits, target_expert.ndim + 1)
    logp = jax.nn.log_softmax(router_logits.astype(jnp.float32), axis=-1)
    return masked_mean(-_gather(logp, target_expert), mask)


# --------------------------------------------------------------------------- baselines


def gradient_ascent_loss(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """Gradient ascent on the forget set: ``L_GA = −NLL_forget`` (mean over tokens)."""
    return -nll_loss(logits, targets, mask)


def grad_diff_loss(
    forget_nll: Float[Array, ""], retain_nll: Float[Array, ""], alpha: float = 1.0, gamma: float = 1.0
) -> Float[Array, ""]:
    """GradDiff (Liu et al., 2022; open-unlearning ``GradDiff``):

    ``L = γ·(−NLL_forget) + α·NLL_retain`` (defaults α = γ = 1). ``retain_nll`` may be a
    KL term instead (open-unlearning's ``retain_loss_type="KL"``).
    """
    return -gamma * forget_nll + alpha * retain_nll


def kl_min_loss(
    forget_nll: Float[Array, ""], retain_kl: Float[Array, ""], alpha: float = 1.0, gamma: float = 1.0
) -> Float[Array, ""]:
    """KL-min (TOFU's ``KL`` method): ``L = γ·(−NLL_forget) + α·KL(p_ref ‖ p_θ)_retain``.

    ``retain_kl`` is :func:`kl_to_reference` on retain answer tokens.
    """
    return -gamma * forget_nll + alpha * retain_kl


def npo_per_example(
    logits: Float[Array, "b t v"],
    ref_logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    mask: Float[Array, "b t"],
    beta: float,
) -> Float[Array, " b"]:
    """NPO per example (Zhang et al., 2024, Eq. 3; open-unlearning ``NPO``):

    ``ℓ_i = −(2/β) · log σ(−β · (log π_θ(y_i|x_i) − log π_ref(y_i|x_i)))``, with
    sequence log-probs summed over answer tokens (:func:`sequence_log_prob`). The reference
    is wrapped in ``stop_gradient``. Shape ``[B]``.
    """
    _check_aligned(logits, targets, mask)
    chex.assert_equal_shape([logits, ref_logits])
    ref_log_prob = sequence_log_prob(jax.lax.stop_gradient(ref_logits), targets, mask)
    return npo_from_log_ratio(sequence_log_prob(logits, targets, mask) - ref_log_prob, beta)


def npo_from_log_ratio(log_ratio: Float[Array, " b"], beta: float) -> Float[Array, " b"]:
    """``ℓ_i = −(2/β) · log σ(−β · r_i)`` with ``r_i = log π_θ(y_i|x_i) − log π_ref(y_i|x_i)``
    (NPO, Eq. 3), per example ``[B]``."""
    return -(2.0 / beta) * jax.nn.log_sigmoid(-beta * log_ratio)


def npo_loss(
    logits: Float[Array, "b t v"],
    ref_logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    mask: Float[Array, "b t"],
    beta: float = 0.1,
) -> Float[Array, ""]:
    """``L_NPO = E_i[ℓ_i]`` of :func:`npo_per_example`, over examples with answer tokens."""
    per = npo_per_example(logits, ref_logits, targets, mask, beta)
    return example_mean(per, jnp.sum(mask, axis=-1))


def npo_loss_from_log_likelihood(
    logp: Float[Array, "b t"],
    ref_log_prob: Float[Array, " b"],
    mask: Float[Array, "b t"],
    beta: float = 0.1,
) -> Float[Array, ""]:
    """:func:`npo_loss` from the per-token ``log p_θ(x_t)`` and the reference's sequence
    log-probabilities ``log π_ref(y_i|x_i)`` ``[B]`` (summed over the same answer tokens; the
    trainer computes them once before training, the reference being frozen, so no reference
    forward runs in the step)."""
    chex.assert_shape(ref_log_prob, (logp.shape[0],))
    seq = -per_example_nll_from_log_likelihood(logp, mask).sum
    log_ratio = seq - jax.lax.stop_gradient(ref_log_prob).astype(jnp.float32)
    return example_mean(npo_from_log_ratio(log_ratio, beta), jnp.sum(mask, axis=-1))


def simnpo_per_example(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    mask: Float[Array, "b t"],
    beta: float,
    gamma: float = 0.0,
) -> Float[Array, " b"]:
    """SimNPO per example (Fan et al., 2024, Eq. 4):

    ``ℓ_i = −(2/β) · log σ(−(β/|y_i|) · log π_θ(y_i|x_i) − γ)``, ``|y_i|`` = number of
    answer tokens (guarded ≥ 1). open-unlearning's ``SimNPO`` writes the margin as
    ``β·(NLL/|y| − δ)``, i.e. ``γ = β·δ``. Shape ``[B]``.
    """
    _check_aligned(logits, targets, mask)
    return simnpo_from_mean_nll(per_example_nll(logits, targets, mask).mean, beta, gamma)


def simnpo_from_mean_nll(mean_nll: Float[Array, " b"], beta: float, gamma: float = 0.0) -> Float[Array, " b"]:
    """SimNPO per example from its length-normalised NLL ``−log π_θ(y_i|x_i) / |y_i|``."""
    # −(β/|y|) log π = β · mean NLL.
    return -(2.0 / beta) * jax.nn.log_sigmoid(beta * mean_nll - gamma)


def simnpo_loss(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    mask: Float[Array, "b t"],
    beta: float = 2.5,
    gamma: float = 0.0,
) -> Float[Array, ""]:
    """``L_SimNPO = E_i[ℓ_i]`` of :func:`simnpo_per_example`, over examples with answer tokens."""
    _check_aligned(logits, targets, mask)
    return simnpo_loss_from_log_likelihood(token_log_likelihood(logits, targets), mask, beta, gamma)


def simnpo_loss_from_log_likelihood(
    logp: Float[Array, "b t"], mask: Float[Array, "b t"], beta: float = 2.5, gamma: float = 0.0
) -> Float[Array, ""]:
    """:func:`simnpo_loss` from the per-token ``log p_θ(x_t)``."""
    stats = per_example_nll_from_log_likelihood(logp, mask)
    return example_mean(simnpo_from_mean_nll(stats.mean, beta, gamma), stats.count)


# --------------------------------------------------------------------------- DPO (IdkDPO)


def dpo_from_log_ratios(win_log_ratio: Float[Array, " b"], lose_log_ratio: Float[Array, " b"],
                        beta: float) -> Float[Array, " b"]:
    """DPO per example from the sequence log-ratios ``ρ = log π_θ(y|x) − log π_ref(y|x)``:

    ``ℓ_i = −(2/β) · log σ(β · (ρ_w,i − ρ_l,i))`` (Rafailov et al. 2023, Eq. 7, scaled by 2/β as
    open-unlearning's ``compute_dpo_loss``, so that its gradient at ρ = 0 is that of NLL on
    ``y_w`` minus NLL on ``y_l``). Shape ``[B]``."""
    return -(2.0 / beta) * jax.nn.log_sigmoid(beta * (win_log_ratio - lose_log_ratio))


def dpo_loss(
    win_logits: Float[Array, "b t v"], win_targets: Int[Array, "b t"], win_mask: Float[Array, "b t"],
    win_ref_log_prob: Float[Array, " b"],
    lose_logits: Float[Array, "b t v"], lose_targets: Int[Array, "b t"], lose_mask: Float[Array, "b t"],
    lose_ref_log_prob: Float[Array, " b"],
    beta: float = 0.1,
) -> Float[Array, ""]:
    """IdkDPO's forget term: DPO with the preferred answer ``y_w`` (an "I don't know" answer) over
    the rejected ``y_l`` (the true forget answer), both after the same forget question:

    ``L = mean_i −(2/β) log σ(β [(log π_θ(y_w,i) − log π_ref(y_w,i)) − (log π_θ(y_l,i) − log π_ref(y_l,i))])``

    with ``log π(y|x) = Σ_t m_t log p(y_t | x, y_<t)`` (sums over answer tokens, as
    open-unlearning's ``compute_batch_nll``); mean over examples whose two answers both have
    tokens. ``*_ref_log_prob [B]``: the reference's (frozen) sequence log-probabilities."""
    _check_aligned(win_logits, win_targets, win_mask)
    _check_aligned(lose_logits, lose_targets, lose_mask)
    return dpo_loss_from_log_likelihood(token_log_likelihood(win_logits, win_targets), win_mask, win_ref_log_prob,
                                        token_log_likelihood(lose_logits, lose_targets), lose_mask, lose_ref_log_prob,
                                        beta)


def dpo_loss_from_log_likelihood(
    win_logp: Float[Array, "b t"], win_mask: Float[Array, "b t"], win_ref_log_prob: Float[Array, " b"],
    lose_logp: Float[Array, "b t"], lose_mask: Float[Array, "b t"], lose_ref_log_prob: Float[Array, " b"],
    beta: float = 0.1,
) -> Float[Array, ""]:
    """:func:`dpo_loss` from the per-token ``log p_θ`` of both answers (``[B, A]`` each; the two
    may have different widths) and the reference's sequence log-probabilities ``[B]`` (the
    trainer's pre-pass computes them once with the frozen backbone)."""
    chex.assert_shape(win_ref_log_prob, (win_logp.shape[0],))
    chex.assert_shape(lose_ref_log_prob, (lose_logp.shape[0],))
    sg = jax.lax.stop_gradient
    win = -per_example_nll_from_log_likelihood(win_logp, win_mask).sum - sg(win_ref_log_prob).astype(jnp.float32)
    lose = -per_example_nll_from_log_likelihood(lose_logp, lose_mask).sum - sg(lose_ref_log_prob).astype(jnp.float32)
    both = jnp.minimum(jnp.sum(win_mask, axis=-1), jnp.sum(lose_mask, axis=-1))
    return example_mean(dpo_from_log_ratios(win, lose, beta), both)


# --------------------------------------------------------------------------- RMU


def rmu_activation_loss(
    activations: Float[Array, "b t d"], target: Float[Array, "b t d"], mask: Float[Array, "b t"]
) -> Float[Array, ""]:
    """``E_i [ (1/|m_i|) Σ_t m_it · (1/D) ‖h_it − target_it‖² ]`` (RMU, Eq. 1-2).

    The forget term uses ``target = c·u`` (a fixed random unit vector scaled by the steering
    coefficient), the retain term the frozen model's activations. Mean over the hidden
    dimension, then over each example's scored tokens, then over examples that have any.
    """
    chex.assert_equal_shape([activations, target])
    chex.assert_equal_shape([activations[..., 0], mask])
    sq = jnp.mean(jnp.square(activations.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    count = jnp.sum(mask, axis=-1)
    per = jnp.sum(sq * mask, axis=-1) / jnp.maximum(count, 1.0)
    return example_mean(per, count)
