"""Every loss in alter_jax.losses against an independent PyTorch implementation.

The PyTorch side is written here from the formulas (and torch's own ops: cross_entropy,
kl_div, logsigmoid), not translated from the package. Values and gradients w.r.t. the
logits must agree within 1e-5 in float32 on random logits and random masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alter_jax import losses as L

B, T, V = 3, 6, 13
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
    ref = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int64)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[0, :2] = 1.0
    mask[1, :] = 0.0  # an example with no scored token
    targets[mask == 0] = -100  # like shifted HF labels
    return logits, ref, targets, mask


# ----------------------------------------------------------------- torch references


def t_masked_mean(v, m):
    return (v * m).sum() / m.sum().clamp(min=1.0)


def t_token_nll(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


def t_nll(logits, ref, targets, mask):
    return t_masked_mean(t_token_nll(logits, targets), mask)


def t_ga(logits, ref, targets, mask):
    return -t_nll(logits, ref, targets, mask)


def t_per_example_mean(logits, ref, targets, mask):
    nll = t_token_nll(logits, targets) * mask
    return (nll.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()


def t_per_example_sum(logits, ref, targets, mask):
    return (t_token_nll(logits, targets) * mask).sum(-1).pow(2).sum()


def t_ihl(logits, ref, targets, mask):
    p = logits.softmax(-1)
    safe = targets.clamp(min=0)
    onehot = F.one_hot(safe, V).bool()
    p_t = p.gather(-1, safe[..., None])[..., 0]
    p_other = p.masked_fill(onehot, float("-inf")).max(-1).values
    return t_masked_mean(1.0 + p_t - p_other, mask)


def t_kl(logits, ref, targets, mask):
    # F.kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q): KL(ref ‖ current)
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    return t_masked_mean(kl, mask)


def _t_seq_logp(logits, targets, mask):
    return -(t_token_nll(logits, targets) * mask).sum(-1)


def _t_example_mean(per, mask):
    valid = (mask.sum(-1) > 0).float()
    return (per * valid).sum() / valid.sum().clamp(min=1.0)


def t_npo(logits, ref, targets, mask, beta=0.7):
    log_ratio = _t_seq_logp(logits, targets, mask) - _t_seq_logp(ref, targets, mask)
    return _t_example_mean(-2.0 / beta * F.logsigmoid(-beta * log_ratio), mask)


def t_simnpo(logits, ref, targets, mask, beta=0.7, gamma=0.2):
    n = mask.sum(-1).clamp(min=1.0)
    per = -2.0 / beta * F.logsigmoid(-beta / n * _t_seq_logp(logits, targets, mask) - gamma)
    return _t_example_mean(per, mask)


def t_router(logits, ref, targets, mask):
    ce = F.cross_entropy(logits.reshape(-1, V), targets.clamp(min=0).reshape(-1), reduction="none")
    return t_masked_mean(ce.reshape(B, T), mask)


def t_drift(logits, ref, targets, mask):
    s_new = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    s_base = -(ref.softmax(-1) * ref.log_softmax(-1)).sum(-1)
    return t_masked_mean((s_new - s_base) ** 2, mask)


def t_grad_diff(logits, ref, targets, mask):
    return -1.0 * t_nll(logits, ref, targets, mask) + 0.5 * t_nll(ref, ref, targets, mask)


def t_kl_min(logits, ref, targets, mask):
    return -t_nll(logits, ref, targets, mask) + 2.0 * t_kl(logits, ref, targets, mask)


# ----------------------------------------------------------------- the package under test


def _shannon(x):
    logp = jax.nn.log_softmax(x, -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


CASES = {
    "nll": (L.nll_loss, t_nll, False),
    "gradient_ascent": (L.gradient_ascent_loss, t_ga, False),
    "per_example_mean": (lambda lg, tg, m: jnp.sum(L.per_example_nll(lg, tg, m).mean), t_per_example_mean, False),
    "per_example_sum": (lambda lg, tg, m: jnp.sum(L.per_example_nll(lg, tg, m).sum ** 2), t_per_example_sum, False),
    "inverse_hinge": (L.inverse_hinge_loss, t_ihl, False),
    "kl_to_reference": (lambda lg, rf, tg, m: L.kl_to_reference(lg, rf, m), t_kl, True),
    "npo": (lambda lg, rf, tg, m: L.npo_loss(lg, rf, tg, m, 0.7), t_npo, True),
    "simnpo": (lambda lg, tg, m: L.simnpo_loss(lg, tg, m, 0.7, 0.2), t_simnpo, False),
    "router_cross_entropy": (lambda lg, tg, m: L.router_cross_entropy(lg, jnp.maximum(tg, 0), m), t_router, False),
    "entropy_drift": (
        lambda lg, rf, tg, m: L.entropy_drift_penalty(_shannon(lg), _shannon(rf), m),
        t_drift,
        True,
    ),
    "grad_diff": (
        lambda lg, rf, tg, m: L.grad_diff_loss(L.nll_loss(lg, tg, m), L.nll_loss(rf, tg, m), alpha=0.5),
        t_grad_diff,
        True,
    ),
    "kl_min": (
        lambda lg, rf, tg, m: L.kl_min_loss(L.nll_loss(lg, tg, m), L.kl_to_reference(lg, rf, m), alpha=2.0),
        t_kl_min,
        True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_value_and_grad_match_torch(name, batch):
    jax_fn, torch_fn, uses_ref = CASES[name]
    logits, ref, targets, mask = batch

    if uses_ref:
        f = lambda lg: jax_fn(lg, jnp.asarray(ref), jnp.asarray(targets, jnp.int32), jnp.asarray(mask))
    else:
        f = lambda lg: jax_fn(lg, jnp.asarray(targets, jnp.int32), jnp.asarray(mask))
    j_val, j_grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))

    t_logits = torch.tensor(logits, requires_grad=True)
    t_val = torch_fn(t_logits, torch.tensor(ref), torch.tensor(targets), torch.tensor(mask))
    (t_grad,) = torch.autograd.grad(t_val, t_logits)

    assert np.isfinite(float(j_val))
    np.testing.assert_allclose(float(j_val), t_val.item(), **TOL)
    np.testing.assert_allclose(np.asarray(j_grad), t_grad.numpy(), **TOL)
    assert np.abs(t_grad.numpy()).max() > 1e-4  # the comparison is not vacuous


def test_nll_matches_hf_shifted_loss():
    """shift_logits_labels + nll_loss == torch's shifted mean CE with ignore_index (the HF loss)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 7, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(2, 7))
    labels[:, :3] = -100
    labels[1, 6] = -100
    lg, tg, m = L.shift_logits_labels(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    ours = float(L.nll_loss(lg, tg, m))
    ref = F.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, V), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100
    ).item()
    np.testing.assert_allclose(ours, ref, **TOL)


def test_rmu_activation_loss_matches_open_unlearning_formula():
    """RMU's activation MSE against open-unlearning's ``compute_activation_loss`` (torch), value and grad."""
    rng = np.random.default_rng(5)
    act = rng.normal(size=(3, 7, 16)).astype(np.float32)
    target = rng.normal(size=(3, 7, 16)).astype(np.float32)
    mask = (rng.random((3, 7)) < 0.5).astype(np.float32)
    mask[:, 0] = 1.0  # every example scores a token (the torch formula divides by the count)

    def torch_loss(a1, a2, m):
        sq = torch.nn.functional.mse_loss(a1, a2, reduction="none")
        summed = (sq * m.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
        return (summed / m.sum(dim=-1)).mean()

    j_val, j_grad = jax.value_and_grad(L.rmu_activation_loss)(jnp.asarray(act), jnp.asarray(target), jnp.asarray(mask))
    t_act = torch.tensor(act, requires_grad=True)
    t_val = torch_loss(t_act, torch.tensor(target), torch.tensor(mask))
    (t_grad,) = torch.autograd.grad(t_val, t_act)
    np.testing.assert_allclose(float(j_val), t_val.item(), **TOL)
    np.testing.assert_allclose(np.asarray(j_grad), t_grad.numpy(), **TOL)
    assert np.abs(t_grad.numpy()).max() > 1e-4
