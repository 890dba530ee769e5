"""Strict isolation (spec §4): each ALTER loss term moves only its own parameter group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.config import LossConfig, OptimConfig
from alter_jax.train.methods import get_method
from alter_jax.train.optim import group_learning_rates, make_optimizer
from alter_jax.train.step import (Frozen, StepSettings, alter_grads, alter_isolated_loss, init_state,
                                  jit_train_step, split_model)
from tests.train.conftest import tiny_model

OWNER = {"forget": "forget_experts", "retain": "retain_expert", "a": "shared_a", "route": "router"}


def setup(method="alter", **loss_kw):
    spec = get_method(method)
    graphdef, trainable, frozen_parts = split_model(tiny_model(), spec.trainable)
    frozen = Frozen(graphdef=graphdef, parts=frozen_parts, reference=None)
    settings = StepSettings(method=spec, loss=LossConfig(**loss_kw), q=1.0, threshold=1.2)
    return trainable, frozen, settings


def leaves_max(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("struct_penalty", ["drift", "grad"])
@pytest.mark.parametrize("term", list(OWNER))
def test_each_term_only_reaches_its_own_group(batch, term, struct_penalty):
    trainable, frozen, settings = setup(struct_penalty=struct_penalty)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    grads = jax.grad(alter_isolated_loss)(trainable, frozen, batch, settings, terms=(term,))
    assert set(grads) == set(trainable) and "backbone" not in grads  # the backbone is never differentiated
    for group, g in grads.items():
        if group == OWNER[term]:
            assert leaves_max(g) > 0, f"{term} gives no gradient to its own group {group}"
        else:
            for leaf in jax.tree_util.tree_leaves(g):
                assert not np.any(np.asarray(leaf)), f"{term} leaks into {group}"  # bitwise zero


def test_forget_expert_isolation_between_subdomains(batch):
    trainable, frozen, settings = setup()
    batch["forget"]["expert"][:] = 1  # only sub-domain 1 in this batch
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    g = jax.grad(alter_isolated_loss)(trainable, frozen, batch, settings, terms=("forget",))["forget_experts"]
    for leaf in jax.tree_util.tree_leaves(g):  # [N, d_out, r]: expert 2 (index 1) untouched
        assert np.any(np.asarray(leaf[0])) or leaf.shape[1] == 0
        assert not np.any(np.asarray(leaf[1]))


@pytest.mark.parametrize("struct_penalty", ["drift", "none", "grad"])
def test_one_forward_two_pullbacks_equals_stop_gradient_formulation(batch, struct_penalty):
    trainable, frozen, settings = setup(struct_penalty=struct_penalty)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    loss, _, fast = jax.jit(alter_grads, static_argnums=3)(trainable, frozen, batch, settings)
    ref_loss = alter_isolated_loss(trainable, frozen, batch, settings)
    ref = jax.grad(alter_isolated_loss)(trainable, frozen, batch, settings)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for group in ref:
        for a, b in zip(jax.tree_util.tree_leaves(fast[group]), jax.tree_util.tree_leaves(ref[group])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_step_moves_each_group_by_its_own_learning_rate(batch):
    trainable, frozen, settings = setup()
    optim = OptimConfig(lr_a=1e-5, lr_b=1e-3, lr_router=1e-2)
    lrs = group_learning_rates(settings.method, optim)
    tx = make_optimizer(lrs, optim)
    state = init_state(trainable, tx)
    before = jax.tree_util.tree_map(np.asarray, trainable)
    frozen_before = jax.tree_util.tree_map(np.asarray, frozen.parts)
    step = jit_train_step(settings, tx, donate=False)
    new, metrics = step(state, frozen, jax.tree_util.tree_map(jnp.asarray, batch))
    assert np.isfinite(float(metrics["loss"]))
    for group, lr in lrs.items():
        delta = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - b), new.trainable[group], before[group])
        moved = max(float(d.max()) for d in jax.tree_util.tree_leaves(delta))
        # Adam's first step moves every parameter with a non-zero gradient by ~lr.
        assert 0.9 * lr <= moved <= 1.01 * lr, (group, moved, lr)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen.parts, frozen_before)  # backbone untouched


def test_optimizer_has_no_state_for_frozen_groups():
    spec = get_method("asymlora")  # A is frozen in AsymLoRA
    graphdef, trainable, frozen_parts = split_model(tiny_model(), spec.trainable)
    assert "shared_a" not in trainable and "backbone" not in trainable
    tx = make_optimizer(group_learning_rates(spec, OptimConfig()), OptimConfig())
    state = tx.init(trainable)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim > 0)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    assert n_state == 2 * n_train  # Adam's two moments for trained groups only


def test_remat_gives_the_same_loss_and_gradients(batch):
    import dataclasses

    from flax import nnx

    from alter_jax.adapters.inject import add_adapters
    from alter_jax.adapters.lora import AdapterConfig
    from alter_jax.models.llama import Transformer
    from tests.train.conftest import TINY

    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    out = []
    for remat in (False, True):
        model = Transformer(dataclasses.replace(TINY, remat=remat), rngs=nnx.Rngs(0))
        add_adapters(model, AdapterConfig(rank=4, alpha=8, num_forget_experts=2), seed=1)
        spec = get_method("alter")
        graphdef, trainable, frozen_parts = split_model(model, spec.trainable)
        settings = StepSettings(method=spec, loss=LossConfig(), q=1.0, threshold=1.2)
        out.append(jax.jit(alter_grads, static_argnums=3)(trainable, Frozen(graphdef=graphdef, parts=frozen_parts),
                                                           batch, settings))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    assert float(out[1][1]["route"]) > 0  # router logits sown under remat too
    for a, b in zip(jax.tree_util.tree_leaves(out[0][2]), jax.tree_util.tree_leaves(out[1][2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
