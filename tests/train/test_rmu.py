"""RMU (Li et al. 2024) in the shared trainer: only the chosen MLP kernels train, the
forget activations move toward ``c·u`` while the retain ones stay, bad settings are named."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alter_jax import config as C
from alter_jax.config import LossConfig, OptimConfig
from alter_jax.train.methods import backbone_filter, get_method, rmu_default_params
from alter_jax.train.optim import group_learning_rates, make_optimizer
from alter_jax.train.step import (Frozen, StepSettings, init_state, jit_train_step, merge_model, rmu_control,
                                  rmu_loss, split_model)
from tests.train.conftest import TINY, tiny_model

RMU = get_method("rmu")


def setup(layer=1, **loss_kw):
    model = tiny_model(num_forget_experts=None)
    original = nnx.state(model, nnx.Param)
    original = jax.tree_util.tree_map(jnp.copy, original)
    loss = LossConfig(rmu_layer=layer, **loss_kw)
    graphdef, trainable, parts = split_model(model, RMU.trainable, backbone_filter(RMU, loss, TINY.num_layers))
    frozen = Frozen(graphdef=graphdef, parts=parts, reference=jax.tree_util.tree_map(jnp.copy, trainable["backbone"]),
                    control=rmu_control(TINY.hidden_size, loss.rmu_steering, seed=0))
    return model, original, trainable, frozen, StepSettings(method=RMU, loss=loss)


def paths(state):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_only_the_default_mlp_kernels_are_trainable():
    _, _, trainable, frozen, _ = setup(layer=1)
    assert paths(trainable["backbone"]) == {"layers.0.mlp.down_proj.kernel", "layers.1.mlp.down_proj.kernel"}
    assert "layers.1.mlp.up_proj.kernel" in paths(frozen.parts["backbone_frozen"])
    assert rmu_default_params(7) == r"^layers\.(5|6|7)\.mlp\.down_proj\.kernel$"  # the WMDP reference choice
    c = np.asarray(frozen.control)
    assert c.shape == (TINY.hidden_size,) and np.linalg.norm(c) == pytest.approx(6.5, rel=1e-5) and (c >= 0).all()


def test_steps_move_forget_activations_to_the_control_and_touch_nothing_else(batch):
    model, original, trainable, frozen, settings = setup(layer=1, gamma=1.0)
    optim = OptimConfig(lr=1e-1)
    tx = make_optimizer(group_learning_rates(RMU, optim), optim)
    step = jit_train_step(settings, tx)
    state = init_state(trainable, tx)
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    first = None
    for _ in range(40):
        state, m = step(state, frozen, jb)
        first = first or {k: float(v) for k, v in m.items()}
    last = {k: float(v) for k, v in m.items()}
    assert last["forget"] < 0.1 * first["forget"]  # h_ℓ(forget) moved to c·u (1.32 -> 0.03 here)
    assert first["retain"] < 1e-12 and last["retain"] < 0.05 * first["forget"]  # h_ℓ(retain) held (0.015)
    after = nnx.state(merge_model(frozen.graphdef, state.trainable, frozen.parts), nnx.Param)
    changed = set()
    for (p, a), (_, b) in zip(nnx.to_flat_state(after), nnx.to_flat_state(original)):
        if not np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())):
            changed.add(".".join(map(str, p)))
    assert changed == {"layers.0.mlp.down_proj.kernel", "layers.1.mlp.down_proj.kernel"}  # bitwise elsewhere


def test_loss_is_differentiated_only_in_the_chosen_parameters(batch):
    _, _, trainable, frozen, settings = setup(layer=0, rmu_params=r"layers\.0\.self_attn\.o_proj")
    assert paths(trainable["backbone"]) == {"layers.0.self_attn.o_proj.kernel"}
    (loss, metrics), grads = jax.value_and_grad(rmu_loss, has_aux=True)(
        trainable, frozen, jax.tree_util.tree_map(jnp.asarray, batch), settings)
    assert set(grads) == {"backbone"} and paths(grads["backbone"]) == {"layers.0.self_attn.o_proj.kernel"}
    assert float(metrics["retain"]) < 1e-12  # nothing has moved yet: retain activations equal the frozen ones
    assert float(metrics["forget"]) > 0.0 and float(loss) == pytest.approx(float(metrics["forget"]))


def test_retain_term_is_the_formula_over_retain_rows(batch):
    """The frozen model's activations are computed on the retain rows only (its forward is not
    run on forget rows); the term is RMU's per-example mean against them (Eq. 2)."""
    _, _, trainable, frozen, settings = setup(layer=1)
    perturbed = jax.tree_util.tree_map(lambda x: x * 1.1, trainable)  # retain activations now differ
    jb = jax.tree_util.tree_map(jnp.asarray, batch)
    _, metrics = rmu_loss(perturbed, frozen, jb, settings)
    cat = lambda k: np.concatenate([batch["forget"][k], batch["retain"][k]])  # noqa: E731
    ids, mask, labels = cat("input_ids"), cat("attention_mask"), cat("labels")
    h = np.asarray(merge_model(frozen.graphdef, perturbed, frozen.parts).layer_output(ids, mask, 1))
    h0 = np.asarray(merge_model(frozen.graphdef, {**perturbed, "backbone": frozen.reference}, frozen.parts)
                    .layer_output(ids, mask, 1))
    n = len(batch["forget"]["input_ids"])
    per = [((h[i] - h0[i]) ** 2).mean(-1)[labels[i] != -100].mean() for i in range(n, len(ids))]
    assert float(metrics["retain"]) > 0 and float(metrics["retain"]) == pytest.approx(float(np.mean(per)), rel=1e-5)


@pytest.mark.parametrize("loss_kw, message", [
    (dict(rmu_layer=2), r"config.loss.rmu_layer = 2: the model has 2 decoder layers; choose 0..1"),
    (dict(rmu_layer=1, rmu_params="(unclosed"), r"config.loss.rmu_params = '\(unclosed' is not a regular expression"),
])
def test_bad_rmu_settings_name_the_field(loss_kw, message):
    with pytest.raises(C.ConfigValueError, match=message):
        backbone_filter(RMU, LossConfig(**loss_kw), TINY.num_layers)


def test_other_methods_train_the_whole_backbone():
    assert backbone_filter(get_method("graddiff"), LossConfig(rmu_layer=99), TINY.num_layers) is None
