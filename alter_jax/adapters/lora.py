"""Asymmetric LoRA (ALTER §3, spec §1 and §5): shared ``A``, experts ``B``, router.

Per adapted linear layer ``W0: [d_in, d_out]`` (stored input-major) with rank ``r`` and
scale ``s = alpha / r``:

* ``shared_a``       ``[r, d_in]``        :class:`SharedA`       (Kaiming-normal init)
* ``retain_expert``  ``[d_out, r]``       :class:`RetainExpert`  (zeros; expert index 0)
* ``forget_experts`` ``[N, d_out, r]``    :class:`ForgetExperts` (zeros; indices 1..N)
* ``router``         ``[d_in + 1, E]``    :class:`Router`        (small normal), E = N + 1

Each group is its own ``nnx.Variable`` subclass, so ``nnx.split(model, SharedA, ...)``
gives one pytree per group, the optimizer partitions on type, and a gradient is taken
only for the groups a term owns. Together the experts form the spec's
``B: [E, d_out, r]`` (:meth:`AsymLoRA.experts`). Plain LoRA is ``N = 0`` without router.

The layer output is ``s · Σ_e w_e B_e (A x)``; the per-token expert weights ``w`` come
from the ``adapter_ctx`` threaded through the model:

* ``None``                   -> expert 0 only (plain LoRA / the retain path);
* :class:`HardRouting`       -> one expert per example (training, spec §4);
* :class:`GatedRouting`      -> Eq. 9 as corrected in the spec (inference):
  ``g = softmax(router([x; S]) / τ)``, τ = tau_high on high-entropy tokens, else tau_low;
  high entropy: renormalised top-k of ``g``; low entropy: one-hot argmax of ``g``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alter_jax.adapters.thin import batched_matmul_t, matmul, matmul_t


class AdapterParam(nnx.Variable):
    """Base type of every adapter parameter (never a backbone ``nnx.Param``)."""


class SharedA(AdapterParam):
    """Shared LoRA ``A`` [r, d_in]: trained by the high-entropy (structure) terms only."""


class RetainExpert(AdapterParam):
    """Retain expert ``B_r`` [d_out, r]: trained by the retain loss only."""


class ForgetExperts(AdapterParam):
    """Forget experts ``B_f^d`` [N, d_out, r]: expert d trained by sub-domain d's forget loss only."""


class Router(AdapterParam):
    """Router ``W_g`` [d_in + 1, E] on ``[stop_grad(x); S]``: trained by the routing loss only."""


class RouterLogits(nnx.Intermediate):
    """Router logits sown during hard-routed training for the routing loss."""


GROUPS: dict[str, type[AdapterParam]] = {
    "shared_a": SharedA,
    "retain_expert": RetainExpert,
    "forget_experts": ForgetExperts,
    "router": Router,
}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    num_forget_experts: int = 1  # N; 0 = plain LoRA
    use_router: bool = True
    top_k: int = 3
    tau_high: float = 0.8
    tau_low: float = 0.01
    # Logit adjustment at inference (Menon et al., 2021): training pairs forget and retain
    # examples 1:1, deployment sees mostly non-forget text; + retain_bias on the retain
    # expert's router logit sends ambiguous tokens (shared prompt template, function words)
    # to the retain expert. 0 = the paper's router as trained (see WORKSPACE.md).
    retain_bias: float = 2.0
    router_init_std: float = 0.02

    @property
    def num_experts(self) -> int:
        return self.num_forget_experts + 1

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class HardRouting(NamedTuple):
    """Training: example b uses expert ``expert[b]`` (0 retain, d forget sub-domain d).

    With ``entropy: float[B, T]`` (the router input S) the layer also sows its router
    logits (:class:`RouterLogits`) for the routing loss; the output ignores the router.
    """

    expert: jax.Array  # int32[B]
    entropy: jax.Array | None = None  # float32[B, T]


class GatedRouting(NamedTuple):
    """Inference (Eq. 9): per-token entropy ``S`` and its high/low partition."""

    entropy: jax.Array  # float32[B, T]
    high: jax.Array  # bool[B, T]


def gate_weights(router_logits: jax.Array, high: jax.Array, cfg: AdapterConfig) -> jax.Array:
    """Expert weights ``[B, T, E]`` from router logits (Eq. 9, corrected).

    High-entropy tokens: ``softmax(z / tau_high)`` restricted to its top-k, renormalised.
    Low-entropy tokens: one-hot on ``argmax softmax(z / tau_low)`` (= argmax z). Both
    paths are computed and selected with ``where`` (static shapes, no data branching).
    """
    e = router_logits.shape[-1]
    z = router_logits.astype(jnp.float32)
    g_high = jax.nn.softmax(z / cfg.tau_high, axis=-1)
    if cfg.top_k < e:  # k >= E keeps every expert: the top-k mask would be all ones (skipped, same bits)
        top = jax.nn.one_hot(jax.lax.top_k(g_high, cfg.top_k)[1], e, dtype=jnp.float32).sum(-2)  # exactly k experts
        g_high = g_high * top
    g_high = g_high / jnp.sum(g_high, axis=-1, keepdims=True)
    g_low = jax.nn.one_hot(jnp.argmax(z / cfg.tau_low, axis=-1), e, dtype=jnp.float32)
    return jnp.where(high[..., None], g_high, g_low)


class AsymLoRA(nnx.Module):
    """The adapter installed in an :class:`~alter_jax.models.llama.AdaptableLinear`."""

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig, *, rngs: nnx.Rngs, dtype: str = "float32"):
        r, n = cfg.rank, cfg.num_forget_experts
        # Kaiming-normal (fan_in, gain sqrt(2)), as HydraLoRA / PEFT's kaiming option.
        self.shared_a = SharedA(jax.random.normal(rngs.params(), (r, d_in), jnp.float32) * math.sqrt(2.0 / d_in))
        self.retain_expert = RetainExpert(jnp.zeros((d_out, r), jnp.float32))
        self.forget_experts = ForgetExperts(jnp.zeros((n, d_out, r), jnp.float32)) if n > 0 else None
        self.router = (
            Router(jax.random.normal(rngs.params(), (d_in + 1, n + 1), jnp.float32) * cfg.router_init_std)
            if cfg.use_router and n > 0
            else None
        )
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)

    def experts(self) -> jax.Array:
        """All experts as the spec's ``B: [E, d_out, r]`` (index 0 retain)."""
        b_r = self.retain_expert[...][None]
        if self.forget_experts is None:
            return b_r
        return jnp.concatenate([b_r, self.forget_experts[...]], axis=0)

    def router_logits(self, x: jax.Array, entropy: jax.Array) -> jax.Array:
        """``[x̂; S] @ W_g -> [B, T, E]`` with ``x̂ = stop_grad(x) / rms(x)`` (x never receives
        router gradients; the RMS scaling makes one router learning rate fit every layer type)."""
        x = jax.lax.stop_gradient(x).astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)  # scale-free across layer types
        inp = jnp.concatenate([x, entropy[..., None].astype(jnp.float32)], -1)
        return matmul(inp, self.router[...])

    def __call__(self, x: jax.Array, ctx: Any) -> jax.Array:
        """``x: [B, T, d_in] -> s · Σ_e w_e B_e A x : [B, T, d_out]``."""
        cfg = self.cfg
        a = matmul_t(x, self.shared_a[...].astype(self.dtype))  # [B, T, r]
        experts = self.experts().astype(self.dtype)  # [E, d_out, r]
        if ctx is None or experts.shape[0] == 1:
            return cfg.scale * matmul_t(a, experts[0])
        if isinstance(ctx, HardRouting):
            if ctx.entropy is not None and self.router is not None:  # training the router
                self.sow(RouterLogits, "sown_router_logits", self.router_logits(x, ctx.entropy))
            # Per-example expert: gather B_e for each example, exact zeros elsewhere.
            b = experts[ctx.expert]  # [B, d_out, r]
            return cfg.scale * batched_matmul_t(a, b)
        if isinstance(ctx, GatedRouting):
            if self.router is None:
                raise ValueError("GatedRouting needs a router (AdapterConfig.use_router=True and N >= 1).")
            z = self.router_logits(x, ctx.entropy).at[..., 0].add(cfg.retain_bias)
            w = gate_weights(z, ctx.high, cfg).astype(self.dtype)  # [B, T, E]
            # Σ_e w_e B_e a as B_r (w_0 a) + one contraction over (forget expert, rank): the stored
            # [N, d_out, r] experts are read as they are (no [E·r, d_out] copy per call, which a decoding
            # loop paid every step; WORKSPACE.md, gated generation speed)
            retain = matmul_t(a * w[..., :1], self.retain_expert[...].astype(self.dtype))  # [B, T, d_out]
            mixed = w[..., 1:, None] * a[..., None, :]  # [B, T, N, r]
            forget = jnp.einsum("...nr,ndr->...d", mixed, self.forget_experts[...].astype(self.dtype))
            return cfg.scale * (retain + forget)
        raise TypeError(f"unknown adapter_ctx {type(ctx).__name__}")
