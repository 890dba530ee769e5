"""The adapter matmuls with the CPU-layout weight gradient equal the plain products and their autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.adapters import thin

CASES = {  # name: (function, plain reference, x shape, w shape)
    "matmul (router)": (thin.matmul, lambda x, w: x @ w, (2, 5, 48), (48, 3)),
    "matmul_t (A)": (thin.matmul_t, lambda x, w: x @ w.T, (2, 5, 48), (4, 48)),
    "matmul_t (B)": (thin.matmul_t, lambda x, w: x @ w.T, (2, 5, 4), (40, 4)),
    "batched_matmul_t (experts)": (thin.batched_matmul_t, lambda x, w: jnp.einsum("btk,bnk->btn", x, w), (2, 5, 4),
                                   (2, 40, 4)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fast_layout", [True, False])
def test_values_and_gradients_equal_the_plain_product(name, fast_layout, monkeypatch):
    monkeypatch.setattr(thin, "_fast_layout", lambda: fast_layout)
    fn, ref, xs, ws = CASES[name]
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (xs, ws))
    probe = jnp.asarray(rng.normal(size=ref(x, w).shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(ref(x, w)))
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w)) * probe))  # noqa: E731
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_the_fast_layout_is_the_transposed_dot_behind_a_barrier_on_cpu():
    x, w = jnp.ones((16, 64)), jnp.ones((64, 3))
    hlo = jax.jit(jax.grad(lambda w: jnp.sum(thin.matmul(x, w)))).lower(w).as_text()
    assert ("optimization_barrier" in hlo) == (jax.default_backend() == "cpu")


def test_bfloat16_gradients_keep_the_parameter_dtype():
    x = jnp.ones((2, 3, 8), jnp.bfloat16)
    w = jnp.ones((16, 8), jnp.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(thin.matmul_t(x, w.astype(jnp.bfloat16)).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gw), 6.0)
