"""Jitted train steps for every method (spec §4 and §6).

The model is split once into pytrees: ``trainable`` (``{group: State}``, the only thing
differentiated and updated), ``frozen`` (the backbone and any adapter group the method
does not train) and ``reference`` (the backbone as it was before unlearning, for KL/NPO).

**ALTER isolation.** Each loss term owns one group:

* ``β·L_forget`` (IHL on low-entropy forget tokens)  -> ``forget_experts``
* ``γ·L_retain`` (NLL or KL on retain answer tokens) -> ``retain_expert``
* ``L_A + λ·L_struct`` (high-entropy tokens)          -> ``shared_a``
* ``μ·L_route`` (router on ``[stop_grad(x); S]``)      -> ``router``

Hard routing sends forget rows through ``B_f^d`` and retain rows through ``B_r``, so the
experts are isolated by construction (a gather's gradient is exactly zero elsewhere). A
and B are isolated with one forward and two cotangents: ``jax.vjp`` of the forward, pulled
back once with ``∂(B-terms)/∂stats`` (keeping the B groups and router) and once with
``∂(A-terms)/∂stats`` (keeping ``shared_a``). This equals the gradient of the
``stop_gradient`` formulation (:func:`alter_isolated_loss`, used by the tests), but never
runs a second forward pass.

**Scored-token head.** No loss reads the logits of prompt or padding positions, so the LM
head runs only at the scored positions of each row (``batch[...]["score_pos"]``, made by
``data.batching.bucket_batch``), and the forward returns per-token statistics ``[B, A]``
(``stats``: log p of the target, IHL, Tsallis entropy, KL to the reference) rather than
logits (:func:`token_statistics`); every loss is a function of those
(``losses.*_from_log_likelihood``). With ``StepSettings.head_chunk`` the head is evaluated in
blocks under ``jax.checkpoint``, bounding the live logits at ``[B, chunk, V]``.

**Token-weighted accumulation.** Each loss term is a mean over its own tokens (or examples).
With ``optim.grad_accum = K`` the loop gives each micro-batch ``i`` of an accumulation window
the weights ``batch["weights"][term] = K·c_i / Σ_j c_j`` (:func:`term_counts` gives ``c``), so
that the mean that ``optax.MultiSteps`` applies is ``Σ_i Σ_t ℓ_t / Σ_i c_i``: the term's mean
over every token of the window, as one batch of all its rows would give, not a mean of
per-micro-batch means.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from alter_jax import losses as L
from alter_jax.adapters.lora import GROUPS, HardRouting, RouterLogits
from alter_jax.config import LossConfig
from alter_jax.entropy import tsallis_entropy
from alter_jax.train.methods import MethodSpec

Batch = dict[str, dict[str, jax.Array]]  # {"forget": {...}, "retain": {...}}


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) settings of a step."""

    method: MethodSpec
    loss: LossConfig
    q: float = 1.0
    threshold: float = 1.2  # θ, already fitted to the data set
    phase: str = "main"  # main | phase1
    head_chunk: int = 0  # scored positions per LM-head block (Scoring.chunk; 0 = all at once)


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict[str, nnx.State]
    opt_state: optax.OptState


@struct.dataclass
class Frozen:
    graphdef: Any = struct.field(pytree_node=False)  # nnx.GraphDef (static)
    parts: dict[str, nnx.State] = None  # backbone + adapter groups not trained + rest
    reference: nnx.State | None = None  # trained backbone parameters before unlearning (KL / NPO / RMU)
    control: jax.Array | None = None  # RMU: the steering target c·u, float32[D]


# ----------------------------------------------------------------------------- model plumbing
def split_model(
    model, trainable_groups: tuple[str, ...], backbone_filter=None
) -> tuple[Any, dict[str, nnx.State], dict[str, nnx.State]]:
    """``(graphdef, trainable, frozen_parts)`` by group name (``backbone`` = ``nnx.Param``).

    ``backbone_filter`` (an NNX filter, e.g. from :func:`alter_jax.train.methods.backbone_filter`)
    narrows ``backbone`` to the parameters it matches; the other ``nnx.Param`` go to the
    frozen part ``backbone_frozen``, so they get neither gradients nor optimizer state.
    """
    if backbone_filter is None:
        graphdef, backbone, *groups, rest = nnx.split(model, nnx.Param, *GROUPS.values(), ...)
        named = {"backbone": backbone}
    else:
        graphdef, backbone, backbone_frozen, *groups, rest = nnx.split(
            model, nnx.All(nnx.Param, backbone_filter), nnx.Param, *GROUPS.values(), ...)
        named = {"backbone": backbone, "backbone_frozen": backbone_frozen}
    named = {**named, **dict(zip(GROUPS, groups)), "rest": rest}
    trainable = {g: named[g] for g in trainable_groups}
    frozen = {g: s for g, s in named.items() if g not in trainable_groups}
    return graphdef, trainable, frozen


def merge_model(graphdef, trainable: dict, frozen: dict):
    order = ["backbone", "backbone_frozen", *GROUPS, "rest"]
    states = {**frozen, **trainable}
    return nnx.merge(graphdef, *[states[k] for k in order if k in states])


def _concat(batch: Batch, key: str, sides=("forget", "retain")) -> jax.Array:
    return jnp.concatenate([batch[s][key] for s in sides], axis=0)


def score_positions(batch: Batch, sides=("forget", "retain")) -> jax.Array:
    """``int32[N, A]``: the logit positions a loss scores (``data.batching.bucket_batch``) of the
    rows of ``sides`` stacked, or every position ``0..T-2`` when the batch carries none (then
    ``A = T - 1``: the full-logits computation, kept for callers that build batches by hand)."""
    if "score_pos" in batch[sides[0]]:
        return _concat(batch, "score_pos", sides)
    ids = _concat(batch, "input_ids", sides)
    return jnp.broadcast_to(jnp.arange(ids.shape[1] - 1, dtype=jnp.int32), (ids.shape[0], ids.shape[1] - 1))


def term_weight(batch: Batch, term: str) -> jax.Array | float:
    """The accumulation weight of a loss term in this micro-batch (1 without accumulation)."""
    w = batch.get("weights")
    return 1.0 if w is None else w[term]


def gather_next(x: jax.Array, pos: jax.Array, fill) -> jax.Array:
    """``x[b, pos + 1]`` (the token a logit position predicts, or its entropy), ``fill`` where
    ``pos < 0``. ``x: [B, T]``, ``pos: int[B, A] -> [B, A]``."""
    got = jnp.take_along_axis(x, jnp.clip(pos + 1, 0, x.shape[1] - 1), axis=1)
    return jnp.where(pos >= 0, got, jnp.asarray(fill, x.dtype))


@dataclasses.dataclass(frozen=True)
class Scoring:
    """Which per-token statistics of the LM head a step needs (static).

    ``want`` ⊆ {``logp`` (log p of the target), ``ihl`` (inverse hinge), ``entropy`` (Tsallis
    ``S_q`` of the adapted distribution), ``kl`` (``KL(p_ref ‖ p_θ)``)}; ``chunk > 0`` evaluates
    the head over blocks of that many scored positions per row under ``jax.checkpoint`` (the
    backward pass recomputes each block's logits), so at most ``[B, chunk, V]`` logits are
    alive at once whatever the data; ``0`` evaluates all scored positions at once.
    """

    want: tuple[str, ...]
    q: float = 1.0
    chunk: int = 0


def gather_hidden(hidden: jax.Array, pos: jax.Array) -> jax.Array:
    """``hidden [B, T, D]`` at the scored positions ``pos [B, A]`` (``-1`` reads position 0 and is
    masked by the targets) ``-> [B, A, D]``."""
    return jnp.take_along_axis(hidden, jnp.maximum(pos, 0)[..., None], axis=1)


def token_statistics(head, h, targets, scoring: Scoring, ref=None) -> dict[str, jax.Array]:
    """Per-token statistics ``{name: float32[B, A]}`` of the LM head at the gathered hidden
    states ``h [B, A, D]`` with targets ``int[B, A]`` (:class:`Scoring`; the losses are functions
    of these, ``losses.*_from_log_likelihood``). ``head``: ``[..., D] -> logits [..., V]``;
    ``ref = (ref_head, ref_h)`` gives the reference distribution for ``kl``. ``[B, T, V]`` is
    never formed; with ``scoring.chunk`` not even ``[B, A, V]``."""

    def stats(h, tg, rh):
        lg = head(h)
        out = {}
        if "logp" in scoring.want:
            out["logp"] = L.token_log_likelihood(lg, tg)
        if "ihl" in scoring.want:
            out["ihl"] = L.inverse_hinge_per_token(lg, tg)
        if "entropy" in scoring.want:
            out["entropy"] = tsallis_entropy(lg, scoring.q)
        if "kl" in scoring.want:
            out["kl"] = L.kl_per_token(lg, ref[0](rh))
        return out

    ref_h = None if ref is None else ref[1]
    b, a = targets.shape
    c = scoring.chunk
    if c <= 0 or c >= a:
        return stats(h, targets, ref_h)
    n = -(-a // c)

    def blocks(x):  # [B, A, ...] -> [n, B, c, ...] (padded with masked positions)
        x = jnp.pad(x, [(0, 0), (0, n * c - a)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (blocks(h), blocks(targets), None if ref_h is None else blocks(ref_h)))
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n * c)[:, :a] for k, v in out.items()}


def forward(graphdef, trainable, frozen, ids, mask, ctx=None, *, sow_router: bool = False, ts=None,
            scoring: Scoring | None = None, ref=None):
    """``(out, router)``. With ``ts`` (:class:`TokenSets`) and ``scoring``: ``out`` is the
    per-token statistics at the scored positions (:func:`token_statistics`); without, the full
    logits ``[B, T, V]``. ``router``: the per-layer router logits ``[L][B, T, E]`` if sown."""
    model = merge_model(graphdef, trainable, frozen)
    out = model.forward(ids, mask, adapter_ctx=ctx, head=ts is None)
    if ts is not None:
        out = token_statistics(model.logits_from_hidden, gather_hidden(out.hidden, ts.pos), ts.targets, scoring, ref)
    else:
        out = out.logits
    router = []
    if sow_router:
        sown = nnx.to_flat_state(nnx.pop(model, RouterLogits))  # path -> Variable holding a tuple
        router = [v.get_value()[0] for _, v in sorted(sown, key=lambda kv: str(kv[0]))]
    return out, router


def reference_head(frozen: Frozen, trainable, ids, mask, pos):
    """The model before unlearning (adapters off), without gradient: ``(head, hidden [B, A, D])``
    at the scored positions ``pos``, the ``ref`` of :func:`token_statistics`."""
    parts = dict(frozen.parts)
    if frozen.reference is not None:
        parts["backbone"] = frozen.reference
    zero_tr = {g: jax.tree_util.tree_map(jnp.zeros_like, s) for g, s in trainable.items() if g != "backbone"}
    zero_fr = {g: jax.tree_util.tree_map(jnp.zeros_like, s) for g, s in parts.items() if g in GROUPS}
    parts.update(zero_fr)
    if "backbone" in trainable:
        zero_tr = {}
    model = merge_model(frozen.graphdef, jax.lax.stop_gradient(zero_tr), jax.lax.stop_gradient(parts))
    hidden = jax.lax.stop_gradient(model.forward(ids, mask, head=False).hidden)
    return (lambda h: jax.lax.stop_gradient(model.logits_from_hidden(h))), gather_hidden(hidden, pos)


# ----------------------------------------------------------------------------- token sets
class TokenSets(NamedTuple):
    targets: jax.Array  # int [2B, A] the scored tokens (-100: none), aligned with the scored logits
    answer: jax.Array  # float [2B, A]
    high: jax.Array  # float [2B, A] high-entropy answer tokens
    low: jax.Array  # float [2B, A]
    base_entropy: jax.Array  # [2B, A] backbone S_q behind each target
    is_forget: jax.Array  # bool [2B]
    real: jax.Array  # float [2B, T] attention mask (every position: the router sees every real token)
    pos: jax.Array  # int32 [2B, A] the scored logit positions (-1: none)


def token_sets(labels, entropy, n_forget: int, settings: StepSettings, attention_mask=None, pos=None) -> TokenSets:
    """The token sets of one batch at the scored positions ``pos`` (``[2B, A]``; ``None``: every
    position, i.e. ``labels[:, 1:]``). ``labels, entropy: [2B, T]`` unshifted (``entropy=None``:
    methods without an entropy split)."""
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(labels.shape[1] - 1, dtype=jnp.int32), (labels.shape[0], labels.shape[1] - 1))
    targets = gather_next(labels, pos, L.IGNORE_INDEX)
    answer = (targets != L.IGNORE_INDEX).astype(jnp.float32)
    base = jnp.zeros_like(answer) if entropy is None else gather_next(entropy.astype(jnp.float32), pos, 0.0)
    if settings.method.entropy:
        high = answer * (base > settings.threshold)
    else:  # AsymLoRA: every token is low-entropy
        high = jnp.zeros_like(answer)
    is_forget = jnp.arange(labels.shape[0]) < n_forget
    real = (labels != L.IGNORE_INDEX) if attention_mask is None else attention_mask > 0
    return TokenSets(targets, answer, high, answer - high, base, is_forget, real.astype(jnp.float32), pos)


# ----------------------------------------------------------------------------- ALTER terms
def alter_scoring(settings: StepSettings) -> Scoring:
    """The token statistics ALTER's terms read (IHL, log p, and the drift entropy / KL if used)."""
    lc = settings.loss
    want = ("logp", "ihl") + (("entropy",) if lc.struct_penalty == "drift" else ()) + \
        (("kl",) if (lc.retain_loss or settings.method.retain_loss) == "kl" else ())
    return Scoring(want=want, q=settings.q, chunk=settings.head_chunk)


def alter_b_terms(stats, router_logits, ts: TokenSets, expert, settings: StepSettings, weights=None):
    """β·IHL(forget, low) + γ·retain + μ·route (owners: forget experts, retain expert, router).

    ``stats``: the per-token statistics at the scored positions (:func:`token_statistics`);
    ``L_forget = mean_{low ∩ forget} IHL_t`` (Eq. 8) [+ ``loss.forget_high_nll`` · mean NLL over
    ``high ∩ forget`` when that weight is > 0; with ``loss.ihl_margin = m < 1`` the hinge
    ``max(0, IHL_t − 1 + m)``: both beyond the spec], or with ``loss.forget_target = "idk"`` the
    mean NLL over every answer token of the forget rows, whose answers are then "I don't know"
    answers (the loop swaps them in); ``L_retain`` = mean NLL (or KL) over retain answer tokens.
    ``weights``: the accumulation weight per term (module doc). Returns ``(total, (metrics, parts))``:
    the accumulation-weighted total, the metrics, and the terms scaled by β, γ, μ without weights."""
    lc = settings.loss
    f = ts.is_forget.astype(jnp.float32)[:, None]
    if lc.forget_target == "idk":  # beyond the paper: the forget rows carry an "I don't know" answer, learnt
        forget = L.nll_from_log_likelihood(stats["logp"], ts.answer * f)  # by the forget expert on every token
    else:
        ihl = stats["ihl"]
        if lc.ihl_margin < 1.0:  # beyond the spec: hinge with margin m (IHL_t − 1 + m, floored at 0)
            ihl = jnp.maximum(ihl - (1.0 - lc.ihl_margin), 0.0)
        forget = L.masked_mean(ihl, ts.low * f)
    extra = {}
    if lc.forget_high_nll > 0:  # beyond the spec: keep the structure words on the forget expert's high tokens
        extra["forget_high_nll"] = L.nll_from_log_likelihood(stats["logp"], ts.high * f)
    retain_kind = lc.retain_loss or settings.method.retain_loss
    if retain_kind == "kl":
        retain = L.masked_mean(stats["kl"], ts.answer * (1 - f))
    else:
        retain = L.nll_from_log_likelihood(stats["logp"], ts.answer * (1 - f))
    route = jnp.zeros((), jnp.float32)
    if router_logits:
        # every real token is routed at inference, prompt included: train the router on all of them
        tgt = jnp.broadcast_to(expert[:, None], ts.real.shape)
        route = sum(L.router_cross_entropy(r, tgt, ts.real) for r in router_logits) / len(router_logits)
    parts = {"forget": lc.beta * forget, "retain": lc.gamma * retain, "route": lc.mu_route * route}
    if extra:
        parts["forget_high"] = lc.beta * lc.forget_high_nll * extra["forget_high_nll"]
    name = "forget_idk_nll" if lc.forget_target == "idk" else "forget_ihl"
    return _weighted_sum(parts, weights), ({name: forget, "retain": retain, "route": route, **extra}, parts)


def _weighted_sum(parts: dict, weights: dict | None):
    """``Σ_t w_t·parts_t`` (``Σ_t parts_t`` without accumulation weights; a term the method does
    not train, e.g. an absent router's, has no count and keeps weight 1)."""
    return sum(parts.values()) if weights is None else sum(weights.get(t, 1.0) * v for t, v in parts.items())


def alter_a_terms(stats, ts: TokenSets, settings: StepSettings, weights=None):
    """L_A (NLL on high-entropy tokens) + λ·drift penalty (owner: shared A), from the per-token
    statistics at the scored positions (both means over the high-entropy tokens: one weight).
    Returns ``(total, (metrics, unweighted total))``."""
    lc = settings.loss
    la = L.nll_from_log_likelihood(stats["logp"], ts.high)
    struct_ = jnp.zeros((), jnp.float32)
    if lc.struct_penalty == "drift":
        struct_ = L.entropy_drift_penalty(stats["entropy"], ts.base_entropy, ts.high)
    plain = la + lc.lambda_struct * struct_
    return _weighted_sum({"a": plain}, weights), ({"nll_high": la, "struct": struct_}, plain)


def struct_grad_penalty(a_state, trainable, frozen: "Frozen", ids, mask, expert, ts: TokenSets, settings: StepSettings):
    """``λ‖∇_A mean_{t∈H} S_q(x_t)‖²`` (spec §4, ``struct_penalty="grad"``): double backprop
    through a forward with every B group stopped; a function of ``A`` only."""
    sg = jax.lax.stop_gradient
    ctx = HardRouting(expert=expert)

    def mean_high_entropy(a):
        tr = {**{g: sg(s) for g, s in trainable.items() if g != "shared_a"}, "shared_a": a}
        stats, _ = forward(frozen.graphdef, tr, frozen.parts, ids, mask, ctx, ts=ts,
                           scoring=Scoring(("entropy",), settings.q, settings.head_chunk))
        return L.masked_mean(stats["entropy"], ts.high)

    return settings.loss.lambda_struct * L.structural_penalty(mean_high_entropy, a_state)


def _ctx(batch: Batch, sow: bool):
    """Hard routing: forget rows to their sub-domain's expert, retain rows to expert 0."""
    n_retain = batch["retain"]["input_ids"].shape[0]
    expert = jnp.concatenate([batch["forget"]["expert"], jnp.zeros((n_retain,), jnp.int32)]).astype(jnp.int32)
    return expert, HardRouting(expert=expert, entropy=_concat(batch, "entropy") if sow else None)


def alter_grads(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """Loss, metrics and isolated gradients of ALTER / AsymLoRA (one forward, two pullbacks)."""
    n_forget = batch["forget"]["input_ids"].shape[0]
    ids, mask, labels = _concat(batch, "input_ids"), _concat(batch, "attention_mask"), _concat(batch, "labels")
    sow = "router" in trainable
    expert, ctx = _ctx(batch, sow)
    ts = token_sets(labels, _concat(batch, "entropy"), n_forget, settings, mask, score_positions(batch))
    scoring = alter_scoring(settings)
    ref = reference_head(frozen, trainable, ids, mask, ts.pos) if "kl" in scoring.want else None

    (stats, router_logits), pullback = jax.vjp(
        lambda tr: forward(frozen.graphdef, tr, frozen.parts, ids, mask, ctx, sow_router=sow, ts=ts, scoring=scoring,
                           ref=ref), trainable
    )
    weights = batch.get("weights")
    (_, (mb, parts_b)), (d_stats_b, d_router) = jax.value_and_grad(
        lambda st, rl: alter_b_terms(st, rl, ts, expert, settings, weights), argnums=(0, 1), has_aux=True
    )(stats, router_logits)
    (grads,) = pullback((d_stats_b, d_router))
    grads = {g: grads[g] for g in trainable if g != "shared_a"}
    loss, ma = sum(parts_b.values()), {}  # the metrics' loss is unweighted
    if "shared_a" in trainable:
        (_, (ma, plain_a)), d_stats_a = jax.value_and_grad(lambda st: alter_a_terms(st, ts, settings, weights),
                                                           has_aux=True)(stats)
        loss = loss + plain_a
        zeros_r = [jnp.zeros_like(r) for r in router_logits]
        (grads_a,) = pullback((d_stats_a, zeros_r))
        grads["shared_a"] = grads_a["shared_a"]
        if settings.loss.struct_penalty == "grad":
            pen, g_pen = jax.value_and_grad(struct_grad_penalty)(
                trainable["shared_a"], trainable, frozen, ids, mask, expert, ts, settings)
            w_a = term_weight(batch, "a")  # the squared norm of a mean: weighted as its tokens, not exact
            grads["shared_a"] = jax.tree_util.tree_map(lambda g, p: g + w_a * p, grads["shared_a"], g_pen)
            loss, ma = loss + pen, {**ma, "struct": pen / max(settings.loss.lambda_struct, 1e-12)}
    metrics = {"loss": loss, **mb, **ma, "high_frac": jnp.sum(ts.high) / jnp.maximum(jnp.sum(ts.answer), 1.0)}
    return loss, metrics, grads


def alter_isolated_loss(trainable, frozen: Frozen, batch: Batch, settings: StepSettings, terms=("forget", "retain", "a", "route")):
    """The ``stop_gradient`` formulation of ALTER's loss (reference for the tests).

    B-terms see ``stop_gradient(A)``, A-terms see ``stop_gradient(B)``; the router input is
    ``stop_gradient(x)``. ``terms`` selects which terms are summed.
    """
    n_forget = batch["forget"]["input_ids"].shape[0]
    ids, mask, labels = _concat(batch, "input_ids"), _concat(batch, "attention_mask"), _concat(batch, "labels")
    sow = "router" in trainable
    expert, ctx = _ctx(batch, sow)
    ts = token_sets(labels, _concat(batch, "entropy"), n_forget, settings, mask, score_positions(batch))
    sg = jax.lax.stop_gradient
    tr_b = {g: (sg(s) if g == "shared_a" else s) for g, s in trainable.items()}
    tr_a = {g: (s if g == "shared_a" else sg(s)) for g, s in trainable.items()}
    scoring = alter_scoring(settings)
    ref = reference_head(frozen, trainable, ids, mask, ts.pos) if "kl" in scoring.want else None
    stats_b, router_b = forward(frozen.graphdef, tr_b, frozen.parts, ids, mask, ctx, sow_router=sow, ts=ts,
                                scoring=scoring, ref=ref)
    stats_a, _ = forward(frozen.graphdef, tr_a, frozen.parts, ids, mask, ctx, sow_router=sow, ts=ts, scoring=scoring,
                         ref=ref)
    _, (_, b_parts) = alter_b_terms(stats_b, router_b, ts, expert, settings)
    _, (_, a_plain) = alter_a_terms(stats_a, ts, settings)
    lc = settings.loss
    parts = {"forget": b_parts["forget"] + b_parts.get("forget_high", 0.0), "retain": b_parts["retain"],
             "route": b_parts["route"], "a": a_plain}
    if lc.struct_penalty == "grad" and "shared_a" in trainable:
        parts["a"] = parts["a"] + struct_grad_penalty(trainable["shared_a"], tr_a, frozen, ids, mask, expert, ts, settings)
    return sum(parts[t] for t in terms)


# ----------------------------------------------------------------------------- other methods
def generic_loss(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """GA / GradDiff / KL / NPO / NPO-GD / NPO-KL / SimNPO, full-parameter or LoRA (E = 1)."""
    spec, lc = settings.method, settings.loss
    n_forget = batch["forget"]["input_ids"].shape[0]
    ids, mask, labels = _concat(batch, "input_ids"), _concat(batch, "attention_mask"), _concat(batch, "labels")
    ts = token_sets(labels, None, n_forget, settings, mask, score_positions(batch))
    m = ts.answer
    f = ts.is_forget.astype(jnp.float32)[:, None]
    mf, mr = m * f, m * (1 - f)
    retain_kind = lc.retain_loss or spec.retain_loss
    # NPO's reference is a per-example sequence log-probability: the pre-pass gives it once
    # (batch["ref_logp"]); only KL needs the reference model, and only its head at scored positions
    npo_ref = _concat(batch, "ref_logp") if "ref_logp" in batch["forget"] else None
    ref = reference_head(frozen, trainable, ids, mask, ts.pos) if (
        (spec.forget_loss == "npo" and npo_ref is None) or retain_kind == "kl") else None
    if spec.forget_loss == "npo" and npo_ref is None:  # the reference's sequence log-probability, by its forward
        ref_lp = token_statistics(ref[0], ref[1], ts.targets, Scoring(("logp",), chunk=settings.head_chunk))["logp"]
        npo_ref = -L.per_example_nll_from_log_likelihood(ref_lp, mf).sum
    scoring = Scoring(("logp",) + (("kl",) if retain_kind == "kl" else ()), chunk=settings.head_chunk)
    stats, _ = forward(frozen.graphdef, trainable, frozen.parts, ids, mask, ts=ts, scoring=scoring, ref=ref)
    lp = stats["logp"]
    if spec.forget_loss == "ga":  # −NLL_forget
        forget = -L.nll_from_log_likelihood(lp, mf)
    elif spec.forget_loss == "npo":
        forget = L.npo_loss_from_log_likelihood(lp, npo_ref, mf, beta=lc.npo_beta)
    elif spec.forget_loss == "simnpo":
        forget = L.simnpo_loss_from_log_likelihood(lp, mf, beta=lc.simnpo_beta, gamma=lc.simnpo_gamma)
    else:
        raise ValueError(f"method {spec.name}: unknown forget loss {spec.forget_loss}")
    retain = jnp.zeros((), jnp.float32)
    if retain_kind == "nll":
        retain = L.nll_from_log_likelihood(lp, mr)
    elif retain_kind == "kl":
        retain = L.masked_mean(stats["kl"], mr)
    total = lc.beta * forget + (lc.gamma * retain if retain_kind else 0.0)
    weighted = lc.beta * term_weight(batch, "forget") * forget + (
        lc.gamma * term_weight(batch, "retain") * retain if retain_kind else 0.0)
    return weighted, {"loss": total, "forget": forget, "retain": retain}


def idk_loss(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """IdkNLL / IdkDPO (full-parameter or LoRA, E = 1). ``batch["idk"]``: the forget questions with an
    "I don't know" answer, row-aligned with ``batch["forget"]`` (same questions, true answers).

    * IdkNLL: ``β·NLL(idk answers) + γ·L_retain``; the true forget answers are not used (not run).
    * IdkDPO: ``β·DPO(y_w = idk, y_l = true answer) + γ·L_retain``
      (:func:`alter_jax.losses.dpo_loss_from_log_likelihood`, β_DPO = ``loss.dpo_beta``); the
      reference log-probabilities of both answers come from the pre-pass (``ref_logp``: the frozen
      backbone, which is the model before unlearning).

    ``L_retain`` = NLL (or KL with ``loss.retain_loss="kl"``) over retain answer tokens. One
    forward over the concatenated rows ``[forget (DPO only); retain; idk]``."""
    spec, lc = settings.method, settings.loss
    dpo = spec.forget_loss == "idk_dpo"
    sides = ("forget", "retain", "idk") if dpo else ("retain", "idk")
    n = {s: batch[s]["input_ids"].shape[0] for s in sides}
    ids, mask, labels = (_concat(batch, k, sides) for k in ("input_ids", "attention_mask", "labels"))
    ts = token_sets(labels, None, 0, settings, mask, score_positions(batch, sides))
    start, rows = 0, {}
    for s in sides:
        rows[s] = jnp.zeros((ids.shape[0],), jnp.float32).at[start:start + n[s]].set(1.0)[:, None]
        start += n[s]
    retain_kind = lc.retain_loss or spec.retain_loss
    ref = reference_head(frozen, trainable, ids, mask, ts.pos) if retain_kind == "kl" else None
    scoring = Scoring(("logp",) + (("kl",) if retain_kind == "kl" else ()), chunk=settings.head_chunk)
    stats, _ = forward(frozen.graphdef, trainable, frozen.parts, ids, mask, ts=ts, scoring=scoring, ref=ref)
    lp = stats["logp"]
    if dpo:
        b_f, b_i = slice(0, n["forget"]), slice(n["forget"] + n["retain"], None)
        m = ts.answer
        forget = L.dpo_loss_from_log_likelihood(lp[b_i], m[b_i], batch["idk"]["ref_logp"],
                                                lp[b_f], m[b_f], batch["forget"]["ref_logp"], beta=lc.dpo_beta)
    else:
        forget = L.nll_from_log_likelihood(lp, ts.answer * rows["idk"])
    mr = ts.answer * rows["retain"]
    retain = L.masked_mean(stats["kl"], mr) if retain_kind == "kl" else L.nll_from_log_likelihood(lp, mr)
    total = lc.beta * forget + lc.gamma * retain
    weighted = lc.beta * term_weight(batch, "forget") * forget + lc.gamma * term_weight(batch, "retain") * retain
    return weighted, {"loss": total, "forget": forget, "retain": retain}


def rmu_loss(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """RMU (Li et al. 2024, Eq. 1-2): ``β·MSE(h_ℓ(forget), c·u) + γ·MSE(h_ℓ(retain), h_ℓ^frozen(retain))``.

    ``h_ℓ`` is the output of decoder layer ``loss.rmu_layer``, scored on answer tokens; only
    the parameters in ``trainable["backbone"]`` (a few MLP kernels) move, and the forward
    stops at layer ℓ (the layers above it and the LM head are never run).
    """
    lc = settings.loss
    n_forget = batch["forget"]["input_ids"].shape[0]
    ids, mask, labels = _concat(batch, "input_ids"), _concat(batch, "attention_mask"), _concat(batch, "labels")

    def activations(tr, rows=slice(None)):
        return merge_model(frozen.graphdef, tr, frozen.parts).layer_output(ids[rows], mask[rows], lc.rmu_layer)

    h = activations(trainable)
    # the frozen model is compared on retain rows only, so its forward runs on those alone
    retain_rows = slice(n_forget, None)
    h_ref = jax.lax.stop_gradient(activations({**trainable, "backbone": frozen.reference}, retain_rows))
    scored = (labels != L.IGNORE_INDEX).astype(jnp.float32)
    f = (jnp.arange(ids.shape[0]) < n_forget).astype(jnp.float32)[:, None]
    forget = L.rmu_activation_loss(h, jnp.broadcast_to(frozen.control.astype(h.dtype), h.shape), scored * f)
    retain = L.rmu_activation_loss(h[retain_rows], h_ref, scored[retain_rows])
    total = lc.beta * forget + lc.gamma * retain
    weighted = lc.beta * term_weight(batch, "forget") * forget + lc.gamma * term_weight(batch, "retain") * retain
    return weighted, {"loss": total, "forget": forget, "retain": retain}


def rmu_control(hidden_size: int, steering: float, seed: int) -> jax.Array:
    """``c·u``: ``u`` uniform on [0, 1)^D, normalised (the WMDP reference), fixed per seed."""
    u = jax.random.uniform(jax.random.key(seed), (hidden_size,), jnp.float32)
    return steering * u / jnp.linalg.norm(u)


def phase1_loss(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """Phase I: a single head ``B_s`` (the retain expert slot) and ``A`` learn next-token
    NLL on the high-entropy answer tokens of forget ∪ retain (spec §4)."""
    n_forget = batch["forget"]["input_ids"].shape[0]
    ids, mask, labels = _concat(batch, "input_ids"), _concat(batch, "attention_mask"), _concat(batch, "labels")
    ts = token_sets(labels, _concat(batch, "entropy"), n_forget, settings, pos=score_positions(batch))
    stats, _ = forward(frozen.graphdef, trainable, frozen.parts, ids, mask, None, ts=ts,
                       scoring=Scoring(("logp",), chunk=settings.head_chunk))
    loss = L.nll_from_log_likelihood(stats["logp"], ts.high)
    metrics = {"loss": loss, "high_frac": jnp.sum(ts.high) / jnp.maximum(jnp.sum(ts.answer), 1.0)}
    return term_weight(batch, "a") * loss, metrics


def loss_and_grads(trainable, frozen: Frozen, batch: Batch, settings: StepSettings):
    """``(loss, metrics, grads)``; ``loss`` and the metrics are this micro-batch's unweighted
    values, ``grads`` carry the accumulation weights (module doc)."""
    if settings.phase == "phase1":
        fn = phase1_loss
    elif settings.method.asymmetric:
        return alter_grads(trainable, frozen, batch, settings)
    else:
        fl = settings.method.forget_loss
        fn = rmu_loss if fl == "rmu" else idk_loss if fl in ("idk_nll", "idk_dpo") else generic_loss
    (_, metrics), grads = jax.value_and_grad(fn, has_aux=True)(trainable, frozen, batch, settings)
    return metrics["loss"], metrics, grads


def term_counts(batch: Batch, settings: StepSettings) -> dict[str, jax.Array]:
    """What each loss term of this micro-batch averages over (float32 scalars): token counts
    for token means, example counts for the per-example losses (NPO, SimNPO, RMU). The
    loop turns them into accumulation weights (module doc)."""
    n_forget = batch["forget"]["input_ids"].shape[0]
    labels, mask = _concat(batch, "labels"), _concat(batch, "attention_mask")
    spec = settings.method
    entropy = _concat(batch, "entropy") if (spec.asymmetric or settings.phase == "phase1") else None
    ts = token_sets(labels, entropy, n_forget, settings, mask, score_positions(batch))
    f = ts.is_forget.astype(jnp.float32)[:, None]
    tokens = lambda m: jnp.sum(m)  # noqa: E731
    examples = lambda m: jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))  # noqa: E731
    if settings.phase == "phase1":
        return {"a": tokens(ts.high)}
    if spec.asymmetric:  # the terms of the groups this method trains
        lc = settings.loss
        counts = {"forget": tokens((ts.answer if lc.forget_target == "idk" else ts.low) * f),
                  "retain": tokens(ts.answer * (1 - f))}
        if lc.forget_high_nll > 0:
            counts["forget_high"] = tokens(ts.high * f)
        if "router" in spec.trainable:
            counts["route"] = tokens(ts.real)
        if "shared_a" in spec.trainable:
            counts["a"] = tokens(ts.high)
        return counts
    if spec.forget_loss == "rmu":
        scored = (labels != L.IGNORE_INDEX).astype(jnp.float32)
        return {"forget": examples(scored * f), "retain": examples(scored * (1 - f))}
    if spec.forget_loss in ("idk_nll", "idk_dpo"):  # the forget term reads the idk answers (row-aligned)
        idk = batch["idk"]
        idk_answer = token_sets(idk["labels"], None, 0, settings, idk["attention_mask"],
                                score_positions(batch, ("idk",))).answer
        if spec.forget_loss == "idk_nll":
            forget = tokens(idk_answer)
        else:  # DPO's per-example mean over rows where both answers have tokens
            true = jnp.sum(ts.answer[:n_forget], axis=-1)
            forget = jnp.sum(((jnp.sum(idk_answer, axis=-1) > 0) & (true > 0)).astype(jnp.float32))
        return {"forget": forget, "retain": tokens(ts.answer * (1 - f))}
    forget = examples if spec.forget_loss in ("npo", "simnpo") else tokens
    return {"forget": forget(ts.answer * f), "retain": tokens(ts.answer * (1 - f))}


def accumulation_weights(counts: list[dict[str, float]]) -> list[dict[str, float]]:
    """``w_i[term] = K·c_i / Σ_j c_j`` for the K micro-batches of one accumulation window
    (0 where a term has no tokens in the whole window)."""
    k = len(counts)
    totals = {t: sum(c[t] for c in counts) for t in counts[0]}
    return [{t: (k * c[t] / totals[t] if totals[t] > 0 else 0.0) for t in c} for c in counts]


def train_step(state: TrainState, frozen: Frozen, batch: Batch, *, settings: StepSettings, tx: optax.GradientTransformation):
    """One optimizer step. Pure; jit it with :func:`jit_train_step`."""
    loss, metrics, grads = loss_and_grads(state.trainable, frozen, batch, settings)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


#: Jitted steps by (settings, optimizer key, shardings, donate): a process that runs several
#: trainings differing only in learning rate or seed (a study's sweep) traces and compiles each
#: step once. Bounded; the oldest entry goes first.
_REUSED_STEPS: dict[tuple, Any] = {}
_MAX_REUSED_STEPS = 8


def _shardings_key(tree) -> tuple | None:
    if tree is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(leaves)


def jit_train_step(settings: StepSettings, tx, *, in_shardings=None, out_shardings=None, donate: bool = True,
                   reuse_key: tuple | None = None):
    """``jax.jit`` of :func:`train_step` with the static settings bound (compiled once).

    ``reuse_key`` (:func:`alter_jax.train.optim.optimizer_key` of ``tx``): return the step jitted
    earlier in this process for the same settings, optimizer key and shardings, whose compiled
    programs JAX then reuses (the learning rates are optimizer state, so the earlier ``tx``'s update
    is this one's). ``None``: a new jit."""
    key = None
    if reuse_key is not None:
        key = (settings, reuse_key, _shardings_key(in_shardings), _shardings_key(out_shardings), donate)
        if key in _REUSED_STEPS:
            return _REUSED_STEPS[key]
    fn = functools.partial(train_step, settings=settings, tx=tx)
    kw = {}
    if in_shardings is not None:
        kw.update(in_shardings=in_shardings, out_shardings=out_shardings)
    step = jax.jit(fn, donate_argnums=(0,) if donate else (), **kw)
    if key is not None:
        while len(_REUSED_STEPS) >= _MAX_REUSED_STEPS:
            _REUSED_STEPS.pop(next(iter(_REUSED_STEPS)))
        _REUSED_STEPS[key] = step
    return step


def init_state(trainable: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))
