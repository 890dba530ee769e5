"""Tsallis / Shannon entropy and the structural penalty against independent PyTorch code.

* Tsallis ``S_q`` for q in {0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0}: value and gradient
  w.r.t. the logits. The torch reference is the textbook ``(1 − Σ p^q)/(q − 1)`` evaluated
  in float64 (in float32 that form loses ~1e-4 to cancellation near q = 1, which the
  package's expm1 form avoids; a test shows it).
* The structural penalty ``‖∇_A mean_{t∈H} S_q‖²`` on a tiny LoRA layer
  ``y = W0 x + s·B(A x)`` feeding a vocabulary projection: value and its gradient w.r.t.
  ``A`` against torch double backward (``autograd.grad(..., create_graph=True)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alter_jax import entropy as E
from alter_jax import losses as L

QS = [0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0]
TOL = dict(rtol=1e-5, atol=1e-5)


def t_tsallis(logits: torch.Tensor, q: float) -> torch.Tensor:
    p = torch.softmax(logits, -1)
    if q == 1.0:
        return -(p * torch.log_softmax(logits, -1)).sum(-1)
    return (1.0 - (p**q).sum(-1)) / (q - 1.0)


@pytest.fixture(scope="module")
def logits_and_weights():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 5, 40)) * 2.5).astype(np.float32)
    weights = rng.normal(size=(2, 5)).astype(np.float32)
    return logits, weights


@pytest.mark.parametrize("q", QS)
def test_tsallis_value_and_grad_match_torch(q, logits_and_weights):
    logits, w = logits_and_weights
    f = lambda x: jnp.sum(E.tsallis_entropy(x, q) * w)
    j_s = E.tsallis_entropy(jnp.asarray(logits), q)
    j_g = jax.jit(jax.grad(f))(jnp.asarray(logits))

    t_x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t_s = t_tsallis(t_x, q)
    (t_g,) = torch.autograd.grad((t_s * torch.tensor(w, dtype=torch.float64)).sum(), t_x)

    np.testing.assert_allclose(np.asarray(j_s), t_s.detach().numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(j_g), t_g.numpy(), **TOL)


@pytest.mark.parametrize("q", [0.999, 1.001])
def test_expm1_form_beats_naive_float32_near_one(q, logits_and_weights):
    logits, _ = logits_and_weights
    exact = t_tsallis(torch.tensor(logits, dtype=torch.float64), q).numpy()
    naive32 = t_tsallis(torch.tensor(logits), q).numpy()
    ours = np.asarray(E.tsallis_entropy(jnp.asarray(logits), q))
    assert np.abs(ours - exact).max() < 1e-5
    assert np.abs(ours - exact).max() < np.abs(naive32 - exact).max()


@pytest.mark.parametrize("q", QS)
def test_answer_token_entropy_matches_torch_shift(q):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 17)).astype(np.float32)
    labels = rng.integers(0, 17, size=(2, 6))
    labels[0, :2] = -100
    labels[1, 4:] = -100
    ours = np.asarray(E.answer_token_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), q))
    ref = t_tsallis(torch.tensor(logits[:, :-1], dtype=torch.float64), q).numpy()
    ref = np.where(labels[:, 1:] != -100, ref, 0.0)
    np.testing.assert_allclose(ours, ref, **TOL)


# ----------------------------------------------------------------- structural penalty

D_IN, D_OUT, R, VOCAB, N = 6, 5, 3, 11, 8
SCALE = 2.0


@pytest.fixture(scope="module")
def lora_setup():
    rng = np.random.default_rng(2)
    return dict(
        x=rng.normal(size=(N, D_IN)).astype(np.float32),
        w0=(rng.normal(size=(D_OUT, D_IN)) * 0.5).astype(np.float32),
        a=(rng.normal(size=(R, D_IN)) * 0.5).astype(np.float32),
        b=(rng.normal(size=(D_OUT, R)) * 0.5).astype(np.float32),
        u=(rng.normal(size=(VOCAB, D_OUT))).astype(np.float32),
        mask=np.array([1, 0, 1, 1, 0, 1, 1, 0], np.float32),
    )


@pytest.mark.parametrize("q", [1.0, 0.5, 1.5])
def test_structural_penalty_matches_torch_double_backward(q, lora_setup):
    s = lora_setup
    x, w0, b, u, mask = (jnp.asarray(s[k]) for k in ("x", "w0", "b", "u", "mask"))

    def mean_high_entropy(a):
        h = x @ w0.T + SCALE * (x @ a.T) @ b.T  # y = W0 x + s·B(A x)
        logits = h @ u.T
        return L.masked_mean(E.tsallis_entropy(logits, q), mask)

    penalty = lambda a: L.structural_penalty(mean_high_entropy, a)
    j_val, j_grad = jax.jit(jax.value_and_grad(penalty))(jnp.asarray(s["a"]))

    tt = {k: torch.tensor(v) for k, v in s.items()}
    t_a = torch.tensor(s["a"], requires_grad=True)
    h = tt["x"] @ tt["w0"].T + SCALE * (tt["x"] @ t_a.T) @ tt["b"].T
    ent = t_tsallis(h @ tt["u"].T, q)
    mean_ent = (ent * tt["mask"]).sum() / tt["mask"].sum()
    (g_a,) = torch.autograd.grad(mean_ent, t_a, create_graph=True)
    t_pen = (g_a**2).sum()
    (t_grad,) = torch.autograd.grad(t_pen, t_a)

    assert t_pen.item() > 1e-4  # non-trivial setup
    np.testing.assert_allclose(float(j_val), t_pen.item(), **TOL)
    np.testing.assert_allclose(np.asarray(j_grad), t_grad.numpy(), **TOL)
    assert np.abs(t_grad.numpy()).max() > 1e-4
