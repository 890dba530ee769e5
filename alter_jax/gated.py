"""ALTER's entropy-gated inference (ALTER_SPEC.md §2 and §5, Eq. 9 corrected).

Per adapted layer and token: ``a = A x``, ``g = softmax(router([x; S]) / τ)`` with
``τ = tau_high`` (0.8) on high-entropy tokens (``S > θ``) and ``tau_low`` (0.01) else;
high: ``y = W0 x + s · Σ_{e ∈ top-k(g)} ĝ_e B_e a`` (renormalised top-k), low:
``y = W0 x + s · B_{argmax g} a``. The layer math lives in
:func:`alter_jax.adapters.lora.gate_weights` / :class:`~alter_jax.adapters.lora.AsymLoRA`;
this module supplies the per-token entropy ``S`` and its partition, as one jitted
function per use:

* :func:`gated_logits` scores a given text. ONE ``jax.jit`` (graphdef static, model
  state an argument, static shapes, no Python branching on data): a backbone prefill
  (the same model with every adapter detached, i.e. exactly ``W0``), per-token entropy
  :func:`token_entropy_from_logits`, ``high = S > θ``, then the adapted forward with
  ``GatedRouting(S, high)``.
* :func:`gated_generate` decodes with :func:`alter_jax.generate.generate`: prompt tokens get
  their entropy from one backbone prefill (``prefill_ctx``); every generated token gets
  the entropy of the distribution it was drawn from, ``S_q(softmax(last_logits))`` of the
  gated model itself, computed for free in the decode step (``adapter_ctx_fn``). The
  entropy is that of the model's predictive distribution (temperature 1), whatever the
  sampling temperature / top-k / top-p.
* :func:`gated_model_fns` wraps both as the evaluation contract of WORKSPACE.md.

Entropy source when scoring a given text (:attr:`GateConfig.source`):

* ``"base"`` (default, spec §2): every token's ``S`` comes from the frozen backbone, as in
  training (``S_t = S_q(softmax(backbone_logits[t-1]))``).
* ``"self"``: ``S_t`` is the entropy of the *gated model's own* distribution at ``t-1``,
  the quantity decoding uses for generated tokens. It is causal — ``logits[t-1]`` depends
  only on ``S_{≤t-1}`` — so it is the fixed point of ``S ← S_q(gated_logits(S))``
  reached from the backbone entropies by fixed-point passes: after ``k`` passes the
  first ``k`` self-scored positions of every row are exact (position ``t`` needs only
  ``S_{<t}``). Decision: ``self_iters`` passes (default 1: one refinement of the
  backbone entropies; ``None``: ``T − 1`` passes, exact for every position). Positions
  outside ``self_mask`` (e.g. the prompt, whose entropies decoding also takes from the
  backbone) keep the backbone entropy; with ``self_mask`` = the generated positions and
  ``self_iters=None`` (or ≥ the number of generated tokens) scoring reproduces
  decoding exactly. Passes run in a ``lax.fori_loop`` (compiled once).

Entropy alignment: position ``t`` carries the entropy of ``softmax(logits[t-1])``, the
distribution that produced token ``t``; position 0, every padding position and the
first real token after left padding (nothing predicted it) get 0 (thus low entropy for
any ``θ ≥ 0``). Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from alter_jax.adapters.lora import GatedRouting
from alter_jax.entropy import fit_threshold, tsallis_entropy
from alter_jax.generate import GenerationOutput, generate
from alter_jax.models.llama import Transformer, linear_layers

__all__ = [
    "GateConfig",
    "token_entropy_from_logits",
    "gated_logits",
    "gated_generate",
    "gated_model_fns",
    "EntropyCtxFn",
]

EntropySource = Literal["base", "self"]
_SOURCES = ("base", "self")
PromptEntropy = Literal["base", "zero"]
_PROMPT = ("base", "zero")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How tokens are partitioned for Eq. 9.

    q: Tsallis order (1.0 = Shannon), a static float. threshold: θ, a token is
    high-entropy when ``S_q > θ`` (resolve ``quantile`` / ``bimodal`` thresholds with
    :func:`alter_jax.entropy.fit_threshold` first). source: ``"base"`` or ``"self"``
    (module docstring). self_iters: fixed-point passes for ``"self"`` (``None`` = exact).
    prompt_entropy (decoding only): ``"base"`` (default, spec §2: the prompt's entropies from one
    backbone prefill) or ``"zero"`` (no backbone prefill: every prompt token gets ``S = 0``, i.e.
    low-entropy argmax routing, as the first token of any text; a departure measured in
    WORKSPACE.md, never used when scoring a text).
    The router temperatures and top-k are the adapter's own (``AdapterConfig``).
    """

    q: float = 1.0
    threshold: float = 1.2
    source: EntropySource = "base"
    self_iters: int | None = 1
    prompt_entropy: PromptEntropy = "base"

    def __post_init__(self):
        if self.prompt_entropy not in _PROMPT:
            raise ValueError(
                f"alter_jax.gated.GateConfig: field 'prompt_entropy' must be one of {_PROMPT}, got {self.prompt_entropy!r} "
                "('base' = one backbone prefill, the spec; 'zero' = no backbone prefill, prompt tokens low-entropy)"
            )
        if self.source not in _SOURCES:
            raise ValueError(
                f"alter_jax.gated.GateConfig: field 'source' must be one of {_SOURCES}, got {self.source!r} "
                "('base' = backbone entropy as in training, 'self' = the gated model's own distribution)"
            )
        try:
            q, theta = float(self.q), float(self.threshold)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"alter_jax.gated.GateConfig: fields 'q' and 'threshold' must be numbers, got q={self.q!r}, "
                f"threshold={self.threshold!r}"
            ) from err
        if not (q > 0 and math.isfinite(q)):
            raise ValueError(f"alter_jax.gated.GateConfig: field 'q' must be a finite number > 0, got {self.q!r}")
        # Reuses the entropy module's checks: θ >= 0 and reachable (e.g. θ = 1.2 with q = 2 is not: S_2 < 1).
        try:
            fit_threshold("fixed", value=theta, q=q)
        except ValueError as err:
            raise ValueError(f"alter_jax.gated.GateConfig: field 'threshold' (with q={q:g}): {err}") from None
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "threshold", theta)
        if self.self_iters is not None and (not isinstance(self.self_iters, int) or self.self_iters < 1):
            raise ValueError(
                f"alter_jax.gated.GateConfig: field 'self_iters' must be an int >= 1 or None (exact), got {self.self_iters!r}"
            )


def token_entropy_from_logits(
    logits: Float[Array, "b t v"], q: float, attention_mask: Int[Array, "b t"] | None = None
) -> Float[Array, "b t"]:
    """Entropy of the distribution that produced each token: ``S[:, t] = S_q(softmax(logits[:, t-1]))``.

    ``[B, T, V] -> float32[B, T]``. ``S[:, 0] = 0``; with ``attention_mask`` (1 = real
    token) also 0 on padding and on a token whose predecessor is padding (the first real
    token of a left-padded row, which nothing predicted). ``q = 1`` is Shannon.
    """
    b, t = logits.shape[:2]
    s_prev = tsallis_entropy(logits[:, :-1], q)  # [B, T-1]: behind tokens 1..T-1
    s = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), s_prev.astype(jnp.float32)], axis=1)
    if attention_mask is not None:
        m = attention_mask > 0
        prev = jnp.concatenate([jnp.zeros((b, 1), bool), m[:, :-1]], axis=1)
        s = jnp.where(m & prev, s, 0.0)
    return s


def _check_gated_model(model: Transformer, where: str) -> None:
    routed = [p for p, lin in linear_layers(model).items() if lin.adapter is not None]
    if not routed:
        raise ValueError(
            f"alter_jax.gated.{where}: the model has no adapters, so there is nothing to gate. Fix: install them "
            "with alter_jax.adapters.inject.add_adapters(model, AdapterConfig(num_forget_experts=N >= 1)) or load "
            "an ALTER adapter (alter_jax.io.alter)."
        )
    no_router = [p for p, lin in linear_layers(model).items()
                 if lin.adapter is not None and lin.adapter.router is None and lin.adapter.experts().shape[0] > 1]
    if no_router:
        raise ValueError(
            f"alter_jax.gated.{where}: adapted layers {no_router[:3]}{'...' if len(no_router) > 3 else ''} have several "
            "experts but no router; entropy-gated routing needs AdapterConfig.use_router=True."
        )


def _backbone(graphdef, state) -> Transformer:
    """The same model with every adapter detached (exactly the frozen ``W0`` layers)."""
    model = nnx.merge(graphdef, state)
    for lin in linear_layers(model).values():
        lin.adapter = None
    return model


def _gate(entropy: jax.Array, threshold) -> GatedRouting:
    return GatedRouting(entropy=entropy, high=entropy > threshold)


@functools.partial(jax.jit, static_argnames=("graphdef", "q", "source", "self_iters"))
def _gated_logits_jit(graphdef, state, input_ids, attention_mask, threshold, self_mask, entropy, *, q, source, self_iters):
    """The one compiled function behind :func:`gated_logits`. Returns ``(logits, S)``.

    ``entropy`` (float32[B, T] or None) replaces the backbone prefill when given.
    """
    if entropy is None:
        base_logits = _backbone(graphdef, state)(input_ids, attention_mask)
        entropy = token_entropy_from_logits(base_logits, q, attention_mask)
    model = nnx.merge(graphdef, state)

    def adapted(s):
        return model(input_ids, attention_mask, adapter_ctx=_gate(s, threshold))

    if source == "self":
        n = input_ids.shape[1] - 1 if self_iters is None else self_iters
        base = entropy

        def refine(_, s):
            own = token_entropy_from_logits(adapted(s), q, attention_mask)
            return jnp.where(self_mask, own, base)

        entropy = jax.lax.fori_loop(0, n, refine, entropy)
    return adapted(entropy), entropy


def gated_logits(
    model: Transformer,
    input_ids: Int[Array, "b t"],
    attention_mask: Int[Array, "b t"] | None,
    gate: GateConfig,
    *,
    self_mask: Bool[Array, "b t"] | None = None,
    entropy: Float[Array, "b t"] | None = None,
    return_entropy: bool = False,
):
    """Eq. 9 logits ``float32[B, T, V]`` of the ALTER model on a given text.

    input_ids / attention_mask: int[B, T] (left or right padding). ``gate.source="base"``:
    ``S`` from one backbone prefill; ``"self"``: fixed-point passes on the gated model's own
    distribution at positions ``self_mask`` (default: every real token), backbone
    entropy elsewhere. ``entropy``: give ``S [B, T]`` directly (skips the backbone prefill;
    with ``"base"`` used as is). ``return_entropy``: also return the ``S`` used.
    One compiled function per (shapes, q, source, self_iters); θ and data are arguments.
    """
    if not isinstance(gate, GateConfig):
        raise TypeError(f"alter_jax.gated.gated_logits: 'gate' must be a GateConfig, got {type(gate).__name__}")
    _check_gated_model(model, "gated_logits")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"alter_jax.gated.gated_logits: input_ids must be int[B, T], got shape {input_ids.shape}")
    if self_mask is not None and gate.source != "self":
        raise ValueError("alter_jax.gated.gated_logits: 'self_mask' is only used with GateConfig(source='self'); "
                         f"got source={gate.source!r}. Fix: drop self_mask or set source='self'.")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    sm = mask > 0 if self_mask is None else jnp.asarray(self_mask, bool) & (mask > 0)
    for name, arr in (("attention_mask", mask), ("self_mask", sm), ("entropy", entropy)):
        if arr is not None and tuple(jnp.shape(arr)) != tuple(input_ids.shape):
            raise ValueError(
                f"alter_jax.gated.gated_logits: {name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(jnp.shape(arr))}"
            )
    if entropy is not None:
        entropy = jnp.asarray(entropy, jnp.float32)
    graphdef, state = nnx.split(model)
    logits, s = _gated_logits_jit(
        graphdef, state, input_ids, mask, jnp.float32(gate.threshold), sm, entropy,
        q=gate.q, source=gate.source, self_iters=gate.self_iters,
    )
    return (logits, s) if return_entropy else logits


@functools.partial(jax.jit, static_argnames=("graphdef", "q"))
def _prefill_gate(graphdef, state, input_ids, attention_mask, threshold, *, q) -> GatedRouting:
    """Backbone prefill of the prompt -> ``GatedRouting`` for the gated prefill."""
    logits = _backbone(graphdef, state)(input_ids, attention_mask)
    return _gate(token_entropy_from_logits(logits, q, attention_mask), threshold)


@dataclasses.dataclass(frozen=True)
class EntropyCtxFn:
    """``adapter_ctx_fn`` for :func:`alter_jax.generate.generate`: ``last_logits [B, 1, V]`` (the
    distribution the new token was drawn from) -> ``GatedRouting(S_q, S_q > θ)`` for that token.

    A frozen dataclass (hashable by value), so repeated calls reuse the compiled decoder.
    """

    q: float
    threshold: float

    def __call__(self, last_logits: jax.Array) -> GatedRouting:
        return _gate(tsallis_entropy(last_logits, self.q).astype(jnp.float32), self.threshold)


def gated_generate(
    model: Transformer,
    input_ids,
    attention_mask,
    gate: GateConfig,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | int = 0,
    eos_token_ids: tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Entropy-gated decoding after LEFT-padded prompts ``input_ids: int[B, P]``.

    Prompt tokens: entropy from one backbone prefill (jitted; ``gate.prompt_entropy="zero"``:
    none, S = 0); generated tokens: entropy of the distribution they were drawn from
    (``EntropyCtxFn`` in the decode step). ``gate.source`` is not used here (spec §2,
    inference). Returns :class:`~alter_jax.generate.GenerationOutput`.
    """
    if not isinstance(gate, GateConfig):
        raise TypeError(f"alter_jax.gated.gated_generate: 'gate' must be a GateConfig, got {type(gate).__name__}")
    _check_gated_model(model, "gated_generate")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    if gate.prompt_entropy == "zero":  # no backbone prefill: S = 0 on the prompt (low entropy)
        zeros = jnp.zeros(ids.shape, jnp.float32)
        prefill = GatedRouting(entropy=zeros, high=jnp.zeros(ids.shape, bool))
    else:
        prefill = _prefill_gate(graphdef, state, ids, mask, jnp.float32(gate.threshold), q=gate.q)
    return generate(
        model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        rng=rng, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        adapter_ctx_fn=EntropyCtxFn(gate.q, gate.threshold), prefill_ctx=prefill,
    )


def gated_model_fns(model: Transformer, gate: GateConfig):
    """``(LogitsFn, GenerateFn)`` of the gated model over numpy arrays (the contract of
    :func:`alter_jax.generate.model_fns`), so TOFU / MCQ evaluation runs on Eq. 9."""
    _check_gated_model(model, "gated_model_fns")

    def logits_fn(input_ids, attention_mask) -> np.ndarray:
        return np.asarray(gated_logits(model, input_ids, attention_mask, gate))

    def generate_fn(input_ids, attention_mask, max_new_tokens: int) -> np.ndarray:
        return np.asarray(gated_generate(model, input_ids, attention_mask, gate, max_new_tokens).tokens)

    return logits_fn, generate_fn
