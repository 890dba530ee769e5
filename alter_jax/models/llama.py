"""Flax NNX decoder for Llama-2/3 and Mistral (Zephyr).

Numerically follows ``transformers``' ``LlamaForCausalLM`` / ``MistralForCausalLM``:
RMSNorm and softmax in float32, rotate-half RoPE (default, linear and ``llama3``
scaling), grouped-query attention, Mistral's sliding window, tied or untied head.

The model knows nothing of ALTER except one hook: every projection is an
:class:`AdaptableLinear` whose ``adapter`` slot (``None`` by default) is called with the
layer input and an ``adapter_ctx`` pytree that the caller threads through the forward
pass (routing information such as per-token entropy or a hard expert index).

Shapes: B batch, T query length, S key length (cache size), D hidden, H query heads,
K key/value heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alter_jax.models.config import ModelConfig
from alter_jax.models.constraints import constrain

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEG_INF = -1e30


# ----------------------------------------------------------------------------- layers
class AdaptableLinear(nnx.Module):
    """``y = x @ kernel (+ bias) (+ adapter(x, ctx))`` with ``kernel: [d_in, d_out]``.

    ``adapter`` is ``None`` for a plain frozen layer; ``alter_jax.adapters`` installs a
    module there. Branching on ``self.adapter is None`` is on the model's static
    structure, never on data.
    """

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, dtype: str, param_dtype: str, rngs: nnx.Rngs,
                 parallel: str = "col"):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.dtype(param_dtype)))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.dtype(param_dtype))) if use_bias else None
        self.adapter: Any = nnx.data(None)  # a data slot: adapters are installed later
        self.dtype = jnp.dtype(dtype)
        self.d_in, self.d_out = d_in, d_out
        self.parallel = parallel  # "col" (q/k/v/gate/up) or "row" (o/down): names the activation layout

    def __call__(self, x: jax.Array, adapter_ctx: Any = None) -> jax.Array:
        x = constrain(x.astype(self.dtype), self.parallel + "_in")
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.adapter is not None:
            y = y + self.adapter(x, adapter_ctx).astype(self.dtype)
        return constrain(y, self.parallel + "_out")


class RMSNorm(nnx.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalisation in float32 (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: str):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[Dh/2]`` with the config's scaling (float32, as HF computes them)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = cfg.rope_scaling_dict()
    if scaling is None:
        return inv_freq.astype(np.float32)
    kind = scaling["rope_type"]
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope type {kind!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. ``x: [B, T, N, Dh]``, ``positions: int[B, T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- cache
@struct.dataclass
class KVCache:
    """Per-layer key/value buffers for decoding.

    ``k[l], v[l]: [B, S, K, Dh]``; ``mask: int32[B, S]`` marks written, non-padding
    slots; ``index``: the next slot to write (the same for every row, since batches are
    left-padded).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, size: int) -> "KVCache":
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, jnp.dtype(cfg.dtype)) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=zeros, mask=jnp.zeros((batch, size), jnp.int32), index=jnp.zeros((), jnp.int32))


def attention_mask_4d(q_index: jax.Array, kv_mask: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean mask ``[B, 1, T, S]``: key j is visible from query slot i when it is a real
    token, ``j <= i`` and (with a window w) ``i - j < w`` (HF's Mistral rule)."""
    kv_index = jnp.arange(kv_mask.shape[1])[None, None, :]  # [1, 1, S]
    qi = q_index[:, :, None]  # [B, T, 1]
    allowed = kv_index <= qi
    if sliding_window is not None:
        allowed &= (qi - kv_index) < sliding_window
    return allowed[:, None] & (kv_mask[:, None, None, :] > 0)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(use_bias=cfg.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = AdaptableLinear(d, h * dh, **lin)
        self.k_proj = AdaptableLinear(d, k * dh, **lin)
        self.v_proj = AdaptableLinear(d, k * dh, **lin)
        self.o_proj = AdaptableLinear(h * dh, d, **lin, parallel="row")  # HF Llama: attention_bias covers o_proj too
        self.cfg = cfg

    def __call__(self, x, positions, inv_freq, mask, kv: tuple[jax.Array, jax.Array] | None, index, adapter_ctx):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x, adapter_ctx).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, adapter_ctx).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, adapter_ctx).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:  # write into the cache at `index`, attend over the whole buffer
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                           implementation=cfg.attention_impl)
        out = self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim), adapter_ctx)
        return out, (k, v)


# config.json hidden_act -> function, as transformers' ACT2FN: "gelu" is the exact (erf) GELU,
# "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = AdaptableLinear(d, f, **lin)
        self.up_proj = AdaptableLinear(d, f, **lin)
        self.down_proj = AdaptableLinear(f, d, **lin, parallel="row")
        self.act = cfg.hidden_act

    def __call__(self, x, adapter_ctx):
        act = ACTIVATIONS[self.act]
        return self.down_proj(act(self.gate_proj(x, adapter_ctx)) * self.up_proj(x, adapter_ctx), adapter_ctx)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, kv, index, adapter_ctx):
        attn, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, kv, index, adapter_ctx)
        x = x + attn.astype(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x), adapter_ctx).astype(x.dtype)
        return x, kv


def _remat_layer(layer, x, positions, inv_freq, mask, index, adapter_ctx):
    """A decoder layer under ``jax.checkpoint`` (activations recomputed in the backward pass).

    The layer is split into a pure function of its state, so this works on models rebuilt
    inside ``jax.vjp``; intermediates sown during the call (router logits) are merged back.
    """
    graphdef, state = nnx.split(layer)

    @jax.checkpoint
    def run(state, x, positions, mask, adapter_ctx):
        lyr = nnx.merge(graphdef, state)
        y, kv = lyr(x, positions, inv_freq, mask, None, index, adapter_ctx)
        return y, kv, nnx.state(lyr, nnx.Intermediate)

    y, kv, sown = run(state, x, positions, mask, adapter_ctx)
    nnx.update(layer, sown)
    return y, kv


def _scan_layers(layers, x, positions, inv_freq, mask, adapter_ctx, remat: bool):
    """The decoder layers as one ``jax.lax.scan`` (``ModelConfig.scan_layers``, no KV cache).

    Each layer is split into its graph and state; the states are stacked on a new leading
    layer axis at trace time and the scan body merges one slice with the (shared) graph, so XLA
    compiles one layer body, not ``len(layers)``. Gradients reach each layer's own parameters
    through the stack. Intermediates sown in the body (router logits) come back stacked and are
    put back into each layer. Returns ``None`` when the layers differ in structure (then the
    caller runs its Python loop).
    """
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    if any(gd != graphdef for gd, _ in splits[1:]):
        return None
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(st for _, st in splits))

    def body(x, state):
        lyr = nnx.merge(graphdef, state)
        y, _ = lyr(x, positions, inv_freq, mask, None, 0, adapter_ctx)
        return y, nnx.state(lyr, nnx.Intermediate)

    x, sown = jax.lax.scan(jax.checkpoint(body) if remat else body, x, stacked)
    for i, layer in enumerate(layers):
        nnx.update(layer, jax.tree_util.tree_map(lambda v: v[i], sown))
    return x


class ModelOutput(NamedTuple):
    logits: jax.Array  # float32[B, T, V]
    hidden: jax.Array  # [B, T, D] final (normed) hidden state
    cache: KVCache | None


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding: ``cumsum(mask) - 1`` (0 on pads), as HF ``generate``."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


class Transformer(nnx.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask) -> float32 logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(
                nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
            )
        )

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        adapter_ctx: Any = None,
        upto_layer: int | None = None,
        head: bool = True,
    ) -> ModelOutput:
        """Full forward. With ``cache`` the new tokens are written at ``cache.index``.

        input_ids: int[B, T]; attention_mask: int[B, T] (1 = real token). With ``upto_layer``
        the layers after it are not run: ``hidden`` is the residual stream after decoder
        layer ``upto_layer`` (un-normed) and ``logits`` is ``None`` (see :meth:`layer_output`).
        With ``head=False`` the vocabulary projection is skipped (``logits`` is ``None``): the
        trainer projects only the positions a loss scores (:meth:`logits_from_hidden`).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        if cache is None:
            kv_mask, q_index, index = attention_mask, jnp.broadcast_to(jnp.arange(t), (b, t)), 0
        else:
            index = cache.index
            kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, index, axis=1)
            q_index = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        mask = attention_mask_4d(q_index, kv_mask, cfg.sliding_window)

        x = constrain(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.dtype(cfg.dtype)), "residual")
        inv_freq = jnp.asarray(rope_inv_freq(cfg))  # a compile-time constant
        new_k, new_v = [], []
        layers = list(self.layers) if upto_layer is None else list(self.layers)[: upto_layer + 1]
        scanned = None
        if cfg.scan_layers and cache is None:
            scanned = _scan_layers(layers, x, positions, inv_freq, mask, adapter_ctx, cfg.remat)
        for i, layer in enumerate([] if scanned is not None else layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if cfg.remat and cache is None:
                x, kv = _remat_layer(layer, x, positions, inv_freq, mask, index, adapter_ctx)
            else:
                x, kv = layer(x, positions, inv_freq, mask, kv, index, adapter_ctx)
            new_k.append(kv[0])
            new_v.append(kv[1])
        if scanned is not None:
            x = scanned
        if upto_layer is not None:
            return ModelOutput(logits=None, hidden=x, cache=None)
        h = self.norm(x)
        logits = self.logits_from_hidden(h) if head else None
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask=kv_mask, index=index + t)
        return ModelOutput(logits=logits, hidden=h, cache=new_cache)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """The LM head: final (normed) hidden states ``[..., D] -> float32 logits [..., V]``
        (tied embeddings or ``lm_head``); any leading shape, e.g. gathered positions ``[B, A, D]``."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return constrain((h @ w.astype(h.dtype)).astype(jnp.float32), "logits")

    def __call__(self, input_ids, attention_mask=None, *, adapter_ctx: Any = None) -> jax.Array:
        return self.forward(input_ids, attention_mask, adapter_ctx=adapter_ctx).logits

    def layer_output(self, input_ids, attention_mask=None, layer: int = 0, *, adapter_ctx: Any = None) -> jax.Array:
        """The residual stream after decoder layer ``layer`` (0-based), ``[B, T, D]``: what a
        forward hook on HF ``model.layers[layer]`` returns (``output_hidden_states[layer + 1]``)."""
        if not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.cfg.num_layers} decoder layers (0..{self.cfg.num_layers - 1})")
        return self.forward(input_ids, attention_mask, adapter_ctx=adapter_ctx, upto_layer=layer).hidden


def linear_layers(model: Transformer) -> dict[str, AdaptableLinear]:
    """Every :class:`AdaptableLinear` by its HF-style dotted path, e.g. ``layers.3.self_attn.q_proj``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, AdaptableLinear):
            out[".".join(str(p) for p in path)] = node
    return out
