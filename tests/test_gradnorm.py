"""GradNorm statistic on our NNX model (alter_jax.gradnorm): backbone parameters only, and
through the entropy-gated forward for ALTER (the torch parity of the plain model is in
tests/crosscheck/test_tofu_mia_torch.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alter_jax import gated as G
from alter_jax.gradnorm import model_gradnorm_fn
from alter_jax.models.llama import linear_layers
from tests.test_gated import backbone_of, batch, gated_tiny


def _labels(ids, mask, start=3):
    lab = np.where(mask > 0, ids, -100).astype(np.int32)
    lab[:, :start] = -100
    return lab


def test_gated_gradnorm_is_the_backbone_one_when_experts_are_zero_and_differs_otherwise():
    model = gated_tiny(num_forget_experts=2)
    ids, mask = batch(b=2, t=10, left_pad=(0, 0))
    labels = _labels(ids, mask)
    gate = G.GateConfig(q=1.0, threshold=1.0)
    fwd = lambda m, i, a: G.gated_logits(m, i, a, gate)  # noqa: E731
    gated = model_gradnorm_fn(model, forward=fwd)(ids, mask, labels)
    plain = model_gradnorm_fn(backbone_of(model))(ids, mask, labels)
    assert gated.shape == (2,) and np.all(np.isfinite(gated)) and np.all(gated > 0)
    assert not np.allclose(gated, plain, rtol=1e-3)
    for lin in linear_layers(model).values():
        if lin.adapter is not None:
            lin.adapter.retain_expert[...] = jnp.zeros_like(lin.adapter.retain_expert[...])
            lin.adapter.forget_experts[...] = jnp.zeros_like(lin.adapter.forget_experts[...])
    zero = model_gradnorm_fn(model, forward=fwd)(ids, mask, labels)
    np.testing.assert_allclose(zero, plain, rtol=1e-5)


def test_gradnorm_norms_and_by_hand():
    model = backbone_of(gated_tiny(num_forget_experts=1))
    ids, mask = batch(b=1, t=8, left_pad=(0,))
    labels = _labels(ids, mask)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    graphdef = nnx.graphdef(model)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        lg = m(jnp.asarray(ids), jnp.asarray(mask))[:, :-1]
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), -1)
        tgt = jnp.asarray(labels)[:, 1:]
        v = tgt != -100
        tok = jnp.take_along_axis(lp, jnp.where(v, tgt, 0)[..., None], -1)[..., 0]
        return -(tok * v).sum() / v.sum()

    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(jax.grad(loss)(params))]
    for p, ref in ((1.0, np.mean([np.abs(g).sum() for g in leaves])),  # p = 2: the torch crosscheck
                   (float("inf"), np.mean([np.abs(g).max() for g in leaves]))):
        assert model_gradnorm_fn(model, p=p)(ids, mask, labels)[0] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="p must be"):
        model_gradnorm_fn(model, p=3)
