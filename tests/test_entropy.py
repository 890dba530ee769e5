"""Tests for alter_jax.entropy: Shannon/Tsallis values, stability, alignment, thresholds."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax import entropy as E


def _np_tsallis(logits: np.ndarray, q: float) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    if q == 1.0:
        return -(p * np.log(p)).sum(-1)
    return (1.0 - (p**q).sum(-1)) / (q - 1.0)


def test_uniform_distribution_reaches_the_maximum():
    v = 7
    logits = jnp.zeros((2, 3, v))
    np.testing.assert_allclose(E.shannon_entropy(logits), np.full((2, 3), math.log(v)), rtol=1e-6)
    for q in (0.5, 1.0, 2.0, 3.0):
        expected = E.max_tsallis_entropy(q, v)
        np.testing.assert_allclose(E.tsallis_entropy(logits, q), np.full((2, 3), expected), rtol=1e-5)
    assert E.max_tsallis_entropy(2.0, v) == pytest.approx(1 - 1 / v)
    assert E.max_tsallis_entropy(2.0) == pytest.approx(1.0)
    assert E.max_tsallis_entropy(0.5) == math.inf


def test_hand_computed_two_outcome_case():
    # p = (0.75, 0.25): S_2 = 1 - (0.5625 + 0.0625) = 0.375; H = -(.75 ln .75 + .25 ln .25).
    logits = jnp.log(jnp.array([[0.75, 0.25]]))
    assert float(E.tsallis_entropy(logits, 2.0)[0]) == pytest.approx(0.375, abs=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(E.shannon_entropy(logits)[0]) == pytest.approx(h, abs=1e-6)
    s_half = (1 - (math.sqrt(0.75) + math.sqrt(0.25))) / (0.5 - 1)
    assert float(E.tsallis_entropy(logits, 0.5)[0]) == pytest.approx(s_half, abs=1e-6)


@pytest.mark.parametrize("q", [0.3, 0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0, 3.0])
def test_tsallis_matches_float64_reference(q):
    logits = np.random.default_rng(0).normal(size=(3, 4, 50)).astype(np.float32) * 3
    np.testing.assert_allclose(E.tsallis_entropy(jnp.asarray(logits), q), _np_tsallis(logits, q), rtol=2e-5, atol=2e-6)


def test_q_equal_one_is_exactly_shannon_and_continuous_near_one():
    logits = jax.random.normal(jax.random.key(1), (2, 5, 33)) * 2
    h = E.shannon_entropy(logits)
    np.testing.assert_array_equal(E.tsallis_entropy(logits, 1.0), h)
    for eps in (1e-3, 1e-5, 1e-7):
        for q in (1 - eps, 1 + eps):
            s = E.tsallis_entropy(logits, q)
            # dS_q/dq at 1 is -Σ p (log p)^2 / 2: |S_q - H| <= C·eps with C ~ log(V)^2.
            np.testing.assert_allclose(s, h, atol=20 * eps + 1e-6)


@pytest.mark.parametrize("q", [0.05, 0.5, 1.0, 2.0, 5.0])
def test_extreme_logits_stay_finite(q):
    logits = jnp.array([[[1e4, -1e4, 0.0, 3.0]], [[-jnp.inf, 0.0, 0.0, -jnp.inf]]], jnp.float32)
    s = E.tsallis_entropy(logits, q)
    assert bool(jnp.all(jnp.isfinite(s)))
    assert float(s[0, 0]) == pytest.approx(0.0, abs=1e-5)  # a one-hot distribution
    np.testing.assert_allclose(float(s[1, 0]), E.max_tsallis_entropy(q, 2), rtol=1e-5)  # uniform over 2
    g = jax.grad(lambda x: jnp.sum(E.tsallis_entropy(x, q)))(logits[:1])
    assert bool(jnp.all(jnp.isfinite(g)))


def test_q_must_be_static_and_positive():
    with pytest.raises(ValueError, match="q must be a finite number > 0"):
        E.tsallis_entropy(jnp.zeros((1, 3)), 0.0)
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda x, q: E.tsallis_entropy(x, q))(jnp.zeros((1, 3)), 2.0)


def test_answer_token_entropy_alignment_and_jit():
    logits = jax.random.normal(jax.random.key(2), (2, 5, 9))
    labels = jnp.array([[-100, -100, 4, 5, 6], [-100, 1, 2, -100, -100]], jnp.int32)
    out = jax.jit(E.answer_token_entropy, static_argnums=2)(logits, labels, 1.5)
    assert out.shape == (2, 4)
    full = E.tsallis_entropy(logits, 1.5)
    # labels[b, t+1] is produced by logits[b, t]
    scored = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], bool)
    np.testing.assert_allclose(np.where(scored, full[:, :-1], 0.0), out, rtol=1e-6)
    assert np.all(np.asarray(out)[~scored] == 0.0)


def test_fixed_threshold_reachability():
    with pytest.raises(ValueError, match=r"S_2 < 1.*q < 1\.5.*quantile"):
        E.fit_threshold("fixed", value=1.2, q=2.0)
    with pytest.raises(ValueError, match="vocab_size=3"):
        E.fit_threshold("fixed", value=1.2, q=1.0, vocab_size=3)  # log 3 = 1.0986
    assert E.fit_threshold("fixed", value=1.2, q=1.0, vocab_size=32000) == 1.2
    assert E.fit_threshold(E.EntropyThreshold("fixed", 0.9), q=2.0, vocab_size=100) == 0.9
    with pytest.raises(ValueError, match="needs value"):
        E.fit_threshold("fixed", q=1.0)


def test_quantile_threshold_selects_the_top_fraction():
    e = np.random.default_rng(3).gamma(2.0, size=10_000)
    theta = E.fit_threshold("quantile", e, value=0.2, q=1.0)
    frac = np.mean(np.asarray(E.high_entropy_mask(jnp.asarray(e), theta)))
    assert frac == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(ValueError, match="0 < value < 1"):
        E.fit_threshold("quantile", e, value=1.5)
    with pytest.raises(ValueError, match="0 < value < 1"):
        E.EntropyThreshold("quantile", 0.0)


def test_bimodal_threshold_lands_between_the_modes():
    rng = np.random.default_rng(4)
    e = np.concatenate([np.abs(rng.normal(0.15, 0.08, 7000)), rng.normal(2.5, 0.4, 3000)])
    theta = E.EntropyThreshold("bimodal", None).fit(e, q=1.0)
    assert 0.6 < theta < 1.6
    frac_high = np.mean(e > theta)
    assert frac_high == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="all 5 entropies equal"):
        E.fit_threshold("bimodal", np.ones(5))
    with pytest.raises(ValueError, match="kind must be one of"):
        E.EntropyThreshold("otsu", None)


def test_high_entropy_mask_is_strict():
    s = jnp.array([[0.5, 1.2, 1.2001]])
    np.testing.assert_array_equal(E.high_entropy_mask(s, 1.2), [[False, False, True]])
