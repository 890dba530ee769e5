"""One entropy-gated layer (Eq. 9, corrected; ALTER_SPEC.md §5) against independent PyTorch.

The PyTorch side is written here from the spec only, in float64:
``S_t = S_q(softmax(logits[t-1]))`` (textbook Tsallis / Shannon, 0 at t = 0), ``high = S > θ``,
``z = [x; S] W_g``, high: ``softmax(z / 0.8)`` top-3 renormalised, low: one-hot
``argmax softmax(z / 0.01)``, ``y = W0 x + s Σ_e w_e B_e A x`` with ``W0 [d_out, d_in]``,
``A [r, d_in]``, ``B [E, d_out, r]``, ``W_g [d_in + 1, E]``. The JAX side is the package:
:func:`alter_jax.gated.token_entropy_from_logits` and an ``AdaptableLinear`` carrying an
``AsymLoRA`` called with ``GatedRouting`` (what :func:`alter_jax.gated.gated_logits` runs).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alter_jax.adapters.lora import AdapterConfig, AsymLoRA, GatedRouting
from alter_jax.gated import token_entropy_from_logits
from alter_jax.models.llama import AdaptableLinear

B, T, D_IN, D_OUT, R, VOCAB = 3, 7, 12, 10, 4, 29


def torch_entropy(logits: torch.Tensor, q: float) -> torch.Tensor:
    p = torch.softmax(logits, -1)
    if q == 1.0:
        s = -(p * torch.log_softmax(logits, -1)).sum(-1)
    else:
        s = (1.0 - (p**q).sum(-1)) / (q - 1.0)
    return torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)  # token t <- distribution at t-1


def torch_gated_layer(x, s, high, w0, a, experts, router, scale, top_k=3, tau_high=0.8, tau_low=0.01, retain_bias=0.0):
    xn = x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + 1e-6)  # router input [x / rms(x); S]
    z = torch.cat([xn, s[..., None]], -1) @ router  # [B, T, E]
    z = z + torch.nn.functional.one_hot(torch.zeros_like(z[..., 0], dtype=torch.long), z.shape[-1]) * retain_bias
    g_hi = torch.softmax(z / tau_high, -1)
    vals, idx = torch.topk(g_hi, top_k, dim=-1)
    w_hi = torch.zeros_like(g_hi).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
    g_lo = torch.softmax(z / tau_low, -1)
    w_lo = torch.nn.functional.one_hot(g_lo.argmax(-1), z.shape[-1]).to(x.dtype)
    w = torch.where(high[..., None], w_hi, w_lo)
    ax = x @ a.T  # [B, T, r]
    delta = torch.einsum("bte,edr,btr->btd", w, experts, ax)
    return x @ w0.T + scale * delta, z


@pytest.mark.parametrize("num_experts,q", [(4, 1.0), (5, 1.5)])
def test_gated_layer_matches_torch(num_experts, q):
    rng = np.random.default_rng(num_experts)
    x = rng.normal(0, 1, (B, T, D_IN)).astype(np.float32)
    logits = (rng.normal(0, 1, (B, T, VOCAB)) * rng.uniform(0.3, 4.0, (B, T, 1))).astype(np.float32)
    w0 = rng.normal(0, 0.3, (D_OUT, D_IN)).astype(np.float32)
    a = rng.normal(0, 0.5, (R, D_IN)).astype(np.float32)
    experts = rng.normal(0, 0.5, (num_experts, D_OUT, R)).astype(np.float32)
    router = rng.normal(0, 1.0, (D_IN + 1, num_experts)).astype(np.float32)
    cfg = AdapterConfig(rank=R, alpha=8.0, num_forget_experts=num_experts - 1, top_k=3)

    # torch (float64) reference
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    s_t = torch_entropy(t(logits), q)
    vals = np.sort(s_t[:, 1:].numpy().ravel())
    theta = float(0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]))  # median split, no token on θ
    high_t = s_t > theta
    y_t, z_t = torch_gated_layer(t(x), s_t, high_t, t(w0), t(a), t(experts), t(router), cfg.scale,
                                 retain_bias=cfg.retain_bias)
    assert high_t.any() and (~high_t).any()
    zs = torch.sort(z_t, -1).values
    assert float((zs[..., -1] - zs[..., -2]).min()) > 1e-4 and float((zs[..., -3] - zs[..., -4]).min()) > 1e-4

    # JAX: the package's entropy alignment and the gated layer
    s_j = token_entropy_from_logits(jnp.asarray(logits), q)
    np.testing.assert_allclose(np.asarray(s_j), s_t.numpy(), rtol=1e-5, atol=1e-5)
    high_j = s_j > theta
    np.testing.assert_array_equal(np.asarray(high_j), high_t.numpy())
    lin = AdaptableLinear(D_IN, D_OUT, use_bias=False, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.asarray(w0.T)  # the package stores W0 input-major [d_in, d_out]
    lin.adapter = AsymLoRA(D_IN, D_OUT, cfg, rngs=nnx.Rngs(1))
    lin.adapter.shared_a[...] = jnp.asarray(a)
    lin.adapter.retain_expert[...] = jnp.asarray(experts[0])
    lin.adapter.forget_experts[...] = jnp.asarray(experts[1:])
    lin.adapter.router[...] = jnp.asarray(router)
    y_j = lin(jnp.asarray(x), GatedRouting(entropy=s_j, high=high_j))
    np.testing.assert_allclose(np.asarray(y_j), y_t.numpy(), rtol=1e-5, atol=1e-5)
    # the adapter term matters on both token kinds (the check is not dominated by W0 x)
    delta = y_t - t(x) @ t(w0).T
    assert float(delta[high_t].abs().max()) > 0.1 and float(delta[~high_t].abs().max()) > 0.1
