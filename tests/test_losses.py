"""Tests for alter_jax.losses: hand-computed values, empty-mask safety, jit-ability."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax import losses as L


def logits_from_probs(*rows):
    """One example, one position per row: [1, T, V] logits with softmax = the given probs."""
    return jnp.log(jnp.array([rows], jnp.float32))


def log_sigmoid(z):
    return -math.log1p(math.exp(-z))


def test_shift_logits_labels():
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    labels = jnp.array([[-100, 1, 2, -100], [-100, -100, 0, 1]], jnp.int32)
    lg, tg, m = L.shift_logits_labels(logits, labels)
    np.testing.assert_array_equal(lg, logits[:, :3])
    np.testing.assert_array_equal(tg, [[1, 2, -100], [-100, 0, 1]])
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 1]])
    assert m.dtype == jnp.float32


def test_nll_and_per_example_nll_hand_values():
    logits = logits_from_probs([0.25, 0.75], [0.5, 0.5], [0.9, 0.1])
    targets = jnp.array([[1, 0, -100]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(L.nll_loss(logits, targets, mask)) == pytest.approx(expected, abs=1e-6)
    stats = L.per_example_nll(logits, targets, mask)
    assert float(stats.sum[0]) == pytest.approx(2 * expected, abs=1e-6)
    assert float(stats.mean[0]) == pytest.approx(expected, abs=1e-6)
    assert float(stats.count[0]) == 2.0
    assert float(L.sequence_log_prob(logits, targets, mask)[0]) == pytest.approx(-2 * expected, abs=1e-6)
    assert float(L.gradient_ascent_loss(logits, targets, mask)) == pytest.approx(-expected, abs=1e-6)


def test_inverse_hinge_hand_values():
    logits = logits_from_probs([0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1])
    targets = jnp.array([[1, 0, 2]])
    per = L.inverse_hinge_per_token(logits, targets)
    np.testing.assert_allclose(per, [[1 + 0.5 - 0.3, 1 + 0.2 - 0.5, 1 + 0.1 - 0.6]], atol=1e-6)
    mask = jnp.array([[1.0, 0.0, 1.0]])
    assert float(L.inverse_hinge_loss(logits, targets, mask)) == pytest.approx((1.2 + 0.5) / 2, abs=1e-6)


def test_kl_to_reference_direction():
    logits = logits_from_probs([0.25, 0.75])
    ref = logits_from_probs([0.5, 0.5])
    mask = jnp.ones((1, 1))
    kl_ref_cur = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(ref || current)
    assert float(L.kl_to_reference(logits, ref, mask)) == pytest.approx(kl_ref_cur, abs=1e-6)
    assert float(L.kl_to_reference(ref, ref, mask)) == pytest.approx(0.0, abs=1e-7)
    # no gradient flows into the reference
    g = jax.grad(lambda r: L.kl_to_reference(logits, r, mask))(ref)
    np.testing.assert_array_equal(g, 0.0)
    assert float(L.kl_min_loss(jnp.float32(2.0), jnp.float32(0.5), alpha=3.0)) == pytest.approx(-2.0 + 1.5)


def test_npo_and_simnpo_hand_values():
    logits = logits_from_probs([0.25, 0.75], [0.5, 0.5])
    ref = logits_from_probs([0.5, 0.5], [0.5, 0.5])
    targets = jnp.array([[1, 0]])
    mask = jnp.ones((1, 2))
    beta = 0.5
    log_ratio = math.log(0.75 * 0.5) - math.log(0.5 * 0.5)
    npo = -(2 / beta) * log_sigmoid(-beta * log_ratio)
    assert float(L.npo_loss(logits, ref, targets, mask, beta)) == pytest.approx(npo, abs=1e-6)
    # at the reference, NPO = (2/β) log 2
    assert float(L.npo_loss(ref, ref, targets, mask, beta)) == pytest.approx(2 / beta * math.log(2), abs=1e-6)
    gamma = 0.3
    mean_nll = -(math.log(0.75) + math.log(0.5)) / 2
    simnpo = -(2 / beta) * log_sigmoid(beta * mean_nll - gamma)  # -(β/|y|) log π = β·mean NLL
    assert float(L.simnpo_loss(logits, targets, mask, beta, gamma)) == pytest.approx(simnpo, abs=1e-6)


def test_grad_diff_and_router_ce():
    assert float(L.grad_diff_loss(jnp.float32(2.0), jnp.float32(1.0), alpha=0.5)) == pytest.approx(-2.0 + 0.5)
    router = jnp.log(jnp.array([[[0.25, 0.75], [0.6, 0.4]]]))
    target = jnp.array([[1, 0]])
    mask = jnp.array([[1.0, 1.0]])
    expected = (-math.log(0.75) - math.log(0.6)) / 2
    assert float(L.router_cross_entropy(router, target, mask)) == pytest.approx(expected, abs=1e-6)
    # flat [N, E] inputs work too
    assert float(L.router_cross_entropy(router[0], target[0], mask[0])) == pytest.approx(expected, abs=1e-6)


def test_structural_penalty_double_backprop():
    a = {"q": jnp.array([[1.0, -2.0]]), "v": jnp.array([3.0])}

    def entropy_fn(tree):  # gradient 2·A, so penalty 4·ΣA², d penalty/dA = 8·A
        return jnp.sum(tree["q"] ** 2) + jnp.sum(tree["v"] ** 2)

    assert float(L.structural_penalty(entropy_fn, a)) == pytest.approx(4 * (1 + 4 + 9))
    g = jax.grad(lambda t: L.structural_penalty(entropy_fn, t))(a)
    np.testing.assert_allclose(g["q"], 8 * a["q"])
    np.testing.assert_allclose(g["v"], 8 * a["v"])


def test_entropy_drift_penalty():
    s_new = jnp.array([[1.0, 2.0, 5.0]])
    s_base = jnp.array([[0.5, 2.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    assert float(L.entropy_drift_penalty(s_new, s_base, mask)) == pytest.approx(0.25 / 2)
    g = jax.grad(lambda b: L.entropy_drift_penalty(s_new, b, mask))(s_base)
    np.testing.assert_array_equal(g, 0.0)


def _all_token_losses():
    beta = 0.7
    return {
        "nll": lambda lg, rf, tg, m: L.nll_loss(lg, tg, m),
        "ga": lambda lg, rf, tg, m: L.gradient_ascent_loss(lg, tg, m),
        "ihl": lambda lg, rf, tg, m: L.inverse_hinge_loss(lg, tg, m),
        "kl": lambda lg, rf, tg, m: L.kl_to_reference(lg, rf, m),
        "npo": lambda lg, rf, tg, m: L.npo_loss(lg, rf, tg, m, beta),
        "simnpo": lambda lg, rf, tg, m: L.simnpo_loss(lg, tg, m, beta, 0.1),
        "per_example_mean": lambda lg, rf, tg, m: jnp.sum(L.per_example_nll(lg, tg, m).mean),
        "router": lambda lg, rf, tg, m: L.router_cross_entropy(lg, jnp.where(tg < 0, 0, tg), m),
    }


@pytest.mark.parametrize("name", list(_all_token_losses()))
def test_empty_mask_gives_zero_loss_and_zero_gradient(name):
    fn = _all_token_losses()[name]
    key1, key2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(key1, (2, 3, 5))
    ref = jax.random.normal(key2, (2, 3, 5))
    targets = jnp.full((2, 3), -100, jnp.int32)  # nothing scored
    mask = jnp.zeros((2, 3))
    value, grad = jax.jit(jax.value_and_grad(fn))(logits, ref, targets, mask)
    assert float(value) == 0.0
    assert bool(jnp.all(grad == 0.0))


@pytest.mark.parametrize("name", list(_all_token_losses()))
def test_losses_jit_and_ignore_masked_positions(name):
    fn = _all_token_losses()[name]
    key1, key2, key3 = jax.random.split(jax.random.key(1), 3)
    logits = jax.random.normal(key1, (2, 4, 6)) * 2
    ref = jax.random.normal(key2, (2, 4, 6))
    targets = jax.random.randint(key3, (2, 4), 0, 6)
    mask = jnp.array([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    eager = fn(logits, ref, targets, mask)
    jitted = jax.jit(fn)(logits, ref, targets, mask)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    assert bool(jnp.isfinite(jitted))
    # changing a masked-out position (logits and target) changes nothing
    logits2 = logits.at[0, 2].set(100.0)
    targets2 = targets.at[0, 2].set(-100)
    np.testing.assert_allclose(fn(logits2, ref, targets2, mask), eager, rtol=1e-6)
    g = jax.grad(fn)(logits, ref, targets, mask)
    np.testing.assert_array_equal(g[0, 2], 0.0)


def test_rmu_activation_loss_hand_values_and_empty_rows():
    act = jnp.zeros((3, 2, 2), jnp.float32)
    target = jnp.array([[[1.0, 1.0], [2.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]], [[9.0, 9.0], [9.0, 9.0]]])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # row 2 scores nothing: it is left out
    # row 0: mean_d sq = 1 and 2 -> 1.5; row 1: 9 (only its first token) -> mean over rows (1.5 + 9) / 2
    assert float(L.rmu_activation_loss(act, target, mask)) == pytest.approx(5.25)
    g = jax.grad(L.rmu_activation_loss)(act, target, mask)
    assert float(jnp.abs(g[2]).max()) == 0.0 and float(jnp.abs(g[1, 1]).max()) == 0.0
    assert float(L.rmu_activation_loss(act, target, jnp.zeros((3, 2)))) == 0.0
