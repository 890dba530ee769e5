"""Adapter matmuls whose weight gradient is computed in the fast layout on XLA:CPU.

A LoRA ``B: [d_out, r]`` (or a router ``W_g: [d_in + 1, E]``) has a tiny minor dimension.
Its gradient ``gᵀ a`` written as one dot with a ``[d_out, r]`` output runs about 4× slower
on XLA:CPU than the same dot with the ``[r, d_out]`` output followed by a transpose
(measured here, 512 tokens, d = 1408, r = 8: 0.96 ms vs 0.22 ms), and XLA folds a plain
transpose back into the dot. On the 26M-parameter bench model the ``B`` gradients were a
quarter of the LoRA train step. These functions are the same products with a
``jax.custom_vjp`` that computes the weight gradient with the larger dimension minor and
transposes it behind ``jax.lax.optimization_barrier`` (CPU only: GPU/TPU matmul libraries
handle either layout, so there the plain product's gradient is kept).

Forward values are exactly ``x @ w`` / ``x @ w.T`` / ``einsum('btk,bnk->btn')``; input
gradients are the usual ones. Forward-mode differentiation (``jax.jvp``) is not defined
for a ``custom_vjp`` and is not used by the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _fast_layout() -> bool:
    return jax.default_backend() == "cpu"


def _outer(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``einsum('...np,...nq->...pq')`` (``lhs[N, p]ᵀ @ rhs[N, q]``, per leading batch index),
    the dot's output laid out with the larger of p, q minor."""
    if _fast_layout() and rhs.shape[-1] < lhs.shape[-1]:
        return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum("...nq,...np->...qp", rhs, lhs)), -1, -2)
    return jnp.einsum("...np,...nq->...pq", lhs, rhs)


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- x @ w, w: [k, n]
@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x: [..., k] @ w: [k, n] -> [..., n]`` (router: ``[x̂; S] @ W_g``)."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return (g @ w.T).astype(x.dtype), _outer(_rows(x), _rows(g)).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ----------------------------------------------------------------------------- x @ w.T, w: [n, k]
@jax.custom_vjp
def matmul_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x: [..., k] @ w.T`` with ``w: [n, k] -> [..., n]`` (LoRA: ``x Aᵀ``, ``a Bᵀ``)."""
    return x @ w.T


def _matmul_t_fwd(x, w):
    return x @ w.T, (x, w)


def _matmul_t_bwd(res, g):
    x, w = res
    return (g @ w).astype(x.dtype), _outer(_rows(g), _rows(x)).astype(w.dtype)


matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


# ----------------------------------------------------------------------------- per-example experts
@jax.custom_vjp
def batched_matmul_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x: [B, T, k]`` times each example's ``w: [B, n, k]`` transposed ``-> [B, T, n]``."""
    return jnp.einsum("btk,bnk->btn", x, w)


def _batched_fwd(x, w):
    return jnp.einsum("btk,bnk->btn", x, w), (x, w)


def _batched_bwd(res, g):
    x, w = res
    return jnp.einsum("btn,bnk->btk", g, w).astype(x.dtype), _outer(g, x).astype(w.dtype)


batched_matmul_t.defvjp(_batched_fwd, _batched_bwd)
