"""Entropy-gated inference (alter_jax.gated; ALTER_SPEC.md §2 and §5, Eq. 9 corrected)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alter_jax import gated as G
from alter_jax.adapters.inject import add_adapters
from alter_jax.adapters.lora import AdapterConfig, GatedRouting
from alter_jax.entropy import tsallis_entropy
from alter_jax.models import llama
from alter_jax.models.llama import Transformer, linear_layers
from tests.train.conftest import TINY, tiny_model

V = TINY.vocab_size


def sharpen(model, factor=10.0):
    """Scale embeddings / head so the tiny random model has spread-out entropies and clear argmaxes."""
    model.embed_tokens[...] = model.embed_tokens[...] * factor
    if model.lm_head is not None:
        model.lm_head[...] = model.lm_head[...] * factor
    return model


def gated_tiny(num_forget_experts=4, seed=0, targets=None, expert_std=0.3):
    """Tiny Transformer with ALTER adapters (E = N + 1 experts, top-k 3), non-zero experts."""
    model = sharpen(Transformer(TINY, rngs=nnx.Rngs(seed)))
    cfg = AdapterConfig(rank=4, alpha=8, num_forget_experts=num_forget_experts, top_k=3)
    if targets is not None:
        cfg = AdapterConfig(**{**cfg.__dict__, "target_modules": tuple(targets)})
    add_adapters(model, cfg, seed=seed + 1)
    rng = np.random.default_rng(seed)
    for lin in linear_layers(model).values():
        ad = lin.adapter
        if ad is None:
            continue
        ad.retain_expert[...] = rng.normal(0, expert_std, ad.retain_expert.shape).astype(np.float32)
        ad.forget_experts[...] = rng.normal(0, expert_std, ad.forget_experts.shape).astype(np.float32)
        ad.router[...] = rng.normal(0, 0.3, ad.router.shape).astype(np.float32)
    return model


def backbone_of(model):
    clone = nnx.clone(model)
    for lin in linear_layers(clone).values():
        lin.adapter = None
    return clone


def batch(seed=0, b=3, t=8, left_pad=(0, 2, 0)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i, p in enumerate(left_pad[:b]):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def median_threshold(model, ids, mask, q):
    """θ between two neighbouring backbone entropies near their median (no token sits on θ)."""
    s = np.asarray(G.token_entropy_from_logits(backbone_of(model)(ids, mask), q, mask))
    vals = np.sort(s[s > 0])
    i = len(vals) // 2
    return float(0.5 * (vals[i - 1] + vals[i]))


# ----------------------------------------------------------------------------- entropy alignment
def test_token_entropy_alignment_and_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 2, (2, 5, 11)).astype(np.float32))
    mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    s = np.asarray(G.token_entropy_from_logits(logits, 1.5, mask))
    ref = np.asarray(tsallis_entropy(logits, 1.5))
    np.testing.assert_allclose(s[0, 1:], ref[0, :-1], rtol=1e-6)  # token t <- distribution at t-1
    assert s[0, 0] == 0.0
    np.testing.assert_array_equal(s[1, :3], 0.0)  # left pads and the first real token (nothing predicted it)
    np.testing.assert_allclose(s[1, 3:], ref[1, 2:4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(G.token_entropy_from_logits(logits, 1.5))[1, 1:], ref[1, :-1], rtol=1e-6)


# ----------------------------------------------------------------------------- compile once
def test_compiles_once_per_shape():
    model = gated_tiny()
    gate = G.GateConfig(q=1.0, threshold=3.5)
    jitted = G._gated_logits_jit
    start = jitted._cache_size()
    outs = []
    for seed in range(3):  # new data and a new θ, same shapes: no retrace
        ids, mask = batch(seed)
        outs.append(G.gated_logits(model, ids, mask, G.GateConfig(q=1.0, threshold=3.4 + 0.05 * seed)))
    assert jitted._cache_size() - start == 1
    assert not np.allclose(outs[0], outs[1])
    ids, mask = batch(5, b=2, t=6)
    G.gated_logits(model, ids, mask, gate)
    assert jitted._cache_size() - start == 2


# ----------------------------------------------------------------------------- Eq. 9 on one layer
def _eq9_numpy(x, s, high, w0, a, experts, router, scale, top_k, tau_high, tau_low, retain_bias=0.0):
    """Reference Eq. 9 (spec §5) in float64: x [B,T,d_in] -> y [B,T,d_out], weights [B,T,E].

    Router input ``[x / rms(x); S]``, and ``retain_bias`` added to the retain expert's logit
    (WORKSPACE.md, decision log)."""
    x, w0, a, experts, router = (np.asarray(v, np.float64) for v in (x, w0, a, experts, router))
    xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    z = np.concatenate([xn, np.asarray(s, np.float64)[..., None]], -1) @ router  # [B,T,E]
    z[..., 0] += retain_bias
    e = z.shape[-1]
    w = np.zeros_like(z)
    for idx in np.ndindex(*z.shape[:-1]):
        if high[idx]:
            g = np.exp((z[idx] - z[idx].max()) / tau_high)
            g /= g.sum()
            keep = np.argsort(-g)[:top_k]
            w[idx][keep] = g[keep] / g[keep].sum()
        else:
            g = np.exp((z[idx] - z[idx].max()) / tau_low)
            w[idx][int(np.argmax(g / g.sum()))] = 1.0
    ax = x @ a.T  # [B,T,r]
    delta = np.einsum("bte,edr,btr->btd", w, experts, ax)
    assert e == experts.shape[0]
    return x @ w0 + scale * delta, w, z


@pytest.mark.parametrize("n_forget", [3, 4])  # E = 4 and E = 5, top-k 3
def test_routes_as_specified_on_one_layer(monkeypatch, n_forget):
    target = "layers.1.mlp.down_proj"
    model = gated_tiny(num_forget_experts=n_forget, targets=(target,))
    ad = linear_layers(model)[target].adapter
    d_in = ad.router.shape[0] - 1
    # Hand-set router: a known x part and a strong entropy row, so high/low tokens route differently.
    rng = np.random.default_rng(1)
    router = np.concatenate([rng.normal(0, 0.5, (d_in, n_forget + 1)),  # x is RMS-normalised
                             np.linspace(-1.0, 1.0, n_forget + 1)[None] * 0.5]).astype(np.float32)
    ad.router[...] = router
    ids, mask = batch(0)
    q = 1.3
    gate = G.GateConfig(q=q, threshold=median_threshold(model, ids, mask, q))

    calls = []
    orig = llama.AdaptableLinear.__call__

    def recording(self, x, adapter_ctx=None):
        y = orig(self, x, adapter_ctx)
        if self.adapter is not None:
            calls.append((np.asarray(x), adapter_ctx, np.asarray(y)))
        return y

    monkeypatch.setattr(llama.AdaptableLinear, "__call__", recording)
    with jax.disable_jit():  # run the jitted function eagerly so the layer input can be recorded
        logits, s = G.gated_logits(model, ids, mask, gate, return_entropy=True)
    monkeypatch.undo()

    assert len(calls) == 1  # one adapted layer, one gated forward (the backbone prefill has no adapters)
    x, ctx, y = calls[0]
    assert isinstance(ctx, GatedRouting)
    s_bb = np.asarray(G.token_entropy_from_logits(backbone_of(model)(ids, mask), q, mask))
    np.testing.assert_allclose(np.asarray(ctx.entropy), s_bb, rtol=1e-5, atol=1e-6)  # backbone entropy
    high = np.asarray(ctx.high)
    np.testing.assert_array_equal(high, s_bb > gate.threshold)
    real = mask > 0
    assert high[real].any() and (~high[real]).any(), "need both token kinds in the batch"

    cfg = ad.cfg
    ref, w, z = _eq9_numpy(x, np.asarray(ctx.entropy), high, linear_layers(model)[target].kernel[...],
                           ad.shared_a[...], ad.experts(), router, cfg.scale, cfg.top_k, cfg.tau_high, cfg.tau_low,
                           cfg.retain_bias)
    # no near-ties that would make argmax / top-k ambiguous
    zs = np.sort(z, -1)
    assert np.min((zs[..., -1] - zs[..., -2])[real]) > 1e-4
    assert np.all((w > 0).sum(-1)[high] == 3) and np.all((w > 0).sum(-1)[~high] == 1)
    assert len(set(np.argmax(z, -1)[~high & real].tolist())) >= 2, "low tokens should use different experts"
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # low-entropy tokens: exactly W0 x + s·B_argmax A x
    low = ~high
    arg = np.argmax(z, -1)
    b_arg = np.asarray(ad.experts())[arg[low]]  # [n, d_out, r]
    ax = x[low] @ np.asarray(ad.shared_a[...]).T
    y_low = x[low] @ np.asarray(linear_layers(model)[target].kernel[...]) + cfg.scale * np.einsum("ndr,nr->nd", b_arg, ax)
    np.testing.assert_allclose(y[low], y_low, rtol=1e-5, atol=1e-5)
    # the jitted path gives the same logits as the eager one
    np.testing.assert_allclose(np.asarray(G.gated_logits(model, ids, mask, gate)), np.asarray(logits), atol=1e-4)


def test_gated_logits_is_the_model_under_gated_routing_and_ignores_left_padding():
    model = gated_tiny()
    ids, mask = batch(3)
    q = 1.0
    gate = G.GateConfig(q=q, threshold=median_threshold(model, ids, mask, q))
    logits, s = G.gated_logits(model, ids, mask, gate, return_entropy=True)
    s_bb = G.token_entropy_from_logits(backbone_of(model)(ids, mask), q, mask)
    ref = model(ids, mask, adapter_ctx=GatedRouting(s_bb, s_bb > gate.threshold))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4)
    # row 1 is left-padded by 2: its real tokens score as the same tokens unpadded
    solo = G.gated_logits(model, ids[1:2, 2:], mask[1:2, 2:], gate)
    np.testing.assert_allclose(np.asarray(logits)[1, 2:], np.asarray(solo)[0], atol=1e-4)
    # routing matters: differs from the retain expert alone
    assert np.abs(np.asarray(logits) - np.asarray(model(ids, mask))).max() > 1e-2


def test_all_experts_equal_gives_plain_adapter_output():
    model = gated_tiny()
    for lin in linear_layers(model).values():
        ad = lin.adapter
        ad.forget_experts[...] = jnp.broadcast_to(ad.retain_expert[...], ad.forget_experts.shape)
    ids, mask = batch(1)
    for source in ("base", "self"):
        gate = G.GateConfig(q=1.0, threshold=median_threshold(model, ids, mask, 1.0), source=source)
        out = np.asarray(G.gated_logits(model, ids, mask, gate))
        plain = np.asarray(model(ids, mask))  # adapter_ctx=None: W0 + s·B_0 A
        np.testing.assert_allclose(out[mask > 0], plain[mask > 0], atol=1e-5)


# ----------------------------------------------------------------------------- generation
def test_greedy_generation_matches_rescoring_with_decoding_entropies():
    model = gated_tiny()
    ids, mask = batch(2, b=3, t=6, left_pad=(0, 2, 1))
    n_new = 6
    q = 1.0
    theta = median_threshold(model, ids, mask, q)
    gate = G.GateConfig(q=q, threshold=theta)
    out = G.gated_generate(model, ids, mask, gate, n_new, eos_token_ids=(V + 7,))  # never stops early
    toks = np.asarray(out.tokens)
    assert toks.shape == (3, n_new)
    full = np.concatenate([ids, toks], 1)
    full_mask = np.concatenate([mask, np.ones_like(toks)], 1)
    gen = np.zeros_like(full, bool)
    gen[:, ids.shape[1]:] = True
    # prompt: backbone entropy; generated token t: the gated model's own distribution at t-1. After k
    # fixed-point passes the first k self-scored positions are exact, so n_new passes reproduce decoding.
    score = G.GateConfig(q=q, threshold=theta, source="self", self_iters=n_new)
    logits, s = G.gated_logits(model, full, full_mask, score, self_mask=gen, return_entropy=True)
    logits = np.asarray(logits)
    p = ids.shape[1]
    pred = logits[:, p - 1:-1].argmax(-1)
    np.testing.assert_array_equal(pred, toks)
    s = np.asarray(s)
    assert (s[:, p:] > theta).any() and (s[:, p:] <= theta).any(), "generated tokens of both kinds"
    # the decoding entropies are those of the distributions the tokens were drawn from
    np.testing.assert_allclose(s[:, p:], np.asarray(tsallis_entropy(jnp.asarray(logits[:, p - 1:-1]), q)), atol=1e-4)
    # prompt entropies are the backbone's
    s_bb = np.asarray(G.token_entropy_from_logits(backbone_of(model)(ids, mask), q, mask))
    np.testing.assert_allclose(s[:, :p], s_bb, atol=1e-5)


def test_gated_model_fns_contract():
    model = gated_tiny()
    gate = G.GateConfig(q=1.0, threshold=3.5)
    logits_fn, generate_fn = G.gated_model_fns(model, gate)
    ids, mask = batch(4)  # shapes shared with the tests above: compiled code is reused
    lg = logits_fn(ids, mask)
    assert isinstance(lg, np.ndarray) and lg.shape == (3, 8, V)
    np.testing.assert_allclose(lg, np.asarray(G.gated_logits(model, ids, mask, gate)), atol=1e-6)
    ids, mask = batch(4, b=3, t=6, left_pad=(1, 0, 2))
    toks = generate_fn(ids, mask, 6)
    assert isinstance(toks, np.ndarray) and toks.shape == (3, 6)
    np.testing.assert_array_equal(toks, np.asarray(G.gated_generate(model, ids, mask, gate, 6).tokens))


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="GateConfig: field 'source'"):
        G.GateConfig(source="backbone")
    with pytest.raises(ValueError, match="field 'threshold'.*unreachable"):
        G.GateConfig(q=2.0, threshold=1.2)
    with pytest.raises(ValueError, match="self_iters"):
        G.GateConfig(source="self", self_iters=0)
    ids, mask = batch(0, b=1, t=4, left_pad=(0,))
    with pytest.raises(ValueError, match="no adapters.*add_adapters"):
        G.gated_logits(tiny_model(num_forget_experts=None), ids, mask, G.GateConfig())
    with pytest.raises(ValueError, match="self_mask.*source='self'"):
        G.gated_logits(gated_tiny(), ids, mask, G.GateConfig(), self_mask=np.ones_like(mask, bool))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        G.gated_logits(gated_tiny(), ids, mask[:, :3], G.GateConfig())
