"""Jitted batched decoding with a KV cache: greedy or sampled, left padding, EOS stop.

The whole loop (prefill + ``lax.while_loop`` over new tokens) is one jitted function of
the model's state; it compiles once per (batch, prompt length, max_new_tokens,
sampling settings). Decoding stops early once every row has produced an EOS; tokens
after a row's EOS are ``pad_token_id`` (as ``transformers.generate``).

``adapter_ctx_fn`` is the hook used by ALTER's entropy-gated inference: it maps the
per-token entropy source (the probabilities the token was drawn from) to the
``adapter_ctx`` threaded through the model (see ``alter_jax.adapters``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.models.llama import KVCache, Transformer, default_positions


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy. ``top_k == 0`` / ``top_p == 1`` disable the filters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


class GenerationOutput(NamedTuple):
    tokens: jax.Array  # int32[B, N] new tokens, pad after EOS
    lengths: jax.Array  # int32[B] number of tokens up to and including EOS


def _filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest set whose mass reaches top_p: keep tokens with cumulative mass before them < top_p
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < cfg.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _next_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_ids", "pad_id", "ctx_fn"))
def _generate(graphdef, state, input_ids, attention_mask, key, *, cfg: SamplingConfig, eos_ids, pad_id, ctx_fn, prefill_ctx):
    model: Transformer = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    n = cfg.max_new_tokens
    cache = KVCache.create(model.cfg, b, p + n)
    positions = default_positions(attention_mask)
    # decoding reads only the last position's logits: the LM head runs there alone (head=False)
    out = model.forward(input_ids, attention_mask, positions=positions, cache=cache, adapter_ctx=prefill_ctx, head=False)
    prefill_logits = model.logits_from_hidden(out.hidden[:, -1])
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, cache, last_logits, last_pos, done, tokens, key = carry
        key, sub = jax.random.split(key)
        tok = _next_token(last_logits, sub, cfg)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, step].set(tok)
        done = done | jnp.isin(tok, eos)
        ctx = None if ctx_fn is None else ctx_fn(last_logits[:, None, :])
        pos = last_pos + 1
        o = model.forward(tok[:, None], jnp.ones((b, 1), jnp.int32), positions=pos[:, None], cache=cache, adapter_ctx=ctx)
        return step + 1, o.cache, o.logits[:, -1], pos, done, tokens, key

    init = (
        jnp.zeros((), jnp.int32),
        out.cache,
        prefill_logits,
        positions[:, -1],
        jnp.zeros((b,), bool),
        jnp.full((b, n), pad_id, jnp.int32),
        key,
    )
    _, _, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, init)
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, n)
    return GenerationOutput(tokens=tokens, lengths=first_eos.astype(jnp.int32))


def generate(
    model: Transformer,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | int = 0,
    eos_token_ids: tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    adapter_ctx_fn: Callable[[jax.Array], Any] | None = None,
    prefill_ctx: Any = None,
) -> GenerationOutput:
    """Decode ``max_new_tokens`` after LEFT-padded prompts ``input_ids: int[B, P]``.

    Greedy when ``temperature == 0`` (token-for-token equal to
    ``transformers.generate(do_sample=False)``), else sampled with temperature / top-k /
    top-p from ``rng``.
    """
    cfg = SamplingConfig(max_new_tokens, float(temperature), int(top_k), float(top_p))
    eos = tuple(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = model.cfg.pad_token_id if pad_token_id is None else pad_token_id
    pad = eos[0] if pad is None else int(pad)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        key,
        cfg=cfg,
        eos_ids=eos,
        pad_id=pad,
        ctx_fn=adapter_ctx_fn,
        prefill_ctx=prefill_ctx,
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def model_fns(model: Transformer):
    """(LogitsFn, GenerateFn) over numpy arrays, for evaluation code (see WORKSPACE.md)."""
    graphdef, state = nnx.split(model)

    def logits_fn(input_ids, attention_mask) -> np.ndarray:
        return np.asarray(_logits(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)))

    def generate_fn(input_ids, attention_mask, max_new_tokens: int) -> np.ndarray:
        return np.asarray(generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens).tokens)

    return logits_fn, generate_fn
