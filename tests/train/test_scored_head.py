"""Scored-token head and length buckets: the step's losses and gradients are those of the
full-logits computation, and each bucket compiles once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alter_jax.config import LossConfig, OptimConfig
from alter_jax.data.batching import bucket_batch, bucket_width, scored_positions
from alter_jax.train.methods import get_method
from alter_jax.train.optim import group_learning_rates, make_optimizer
from alter_jax.train.step import Frozen, StepSettings, init_state, loss_and_grads, split_model
from tests.train.conftest import TINY, make_side, tiny_model


def _setup(method, head_chunk=0, **loss_kw):
    spec = get_method(method)
    model = tiny_model(num_forget_experts=2 if spec.asymmetric else (0 if spec.adapter else None))
    graphdef, trainable, parts = split_model(model, spec.trainable)
    reference = parts.get("backbone") if not spec.adapter else None
    if "backbone" in trainable:
        reference = jax.tree_util.tree_map(jnp.copy, trainable["backbone"])
    frozen = Frozen(graphdef=graphdef, parts=parts, reference=reference)
    settings = StepSettings(method=spec, loss=LossConfig(**loss_kw), q=1.0, threshold=1.2, head_chunk=head_chunk)
    return trainable, frozen, settings


def _long_batch(seed=0, t=40):
    """Rows much shorter than T (right padding) with short answers, so buckets cut both ways."""
    rng = np.random.default_rng(seed)
    sides = {}
    for side, er in (("forget", (1, 3)), ("retain", (0, 1))):
        s = make_side(rng, 3, t, TINY.vocab_size, er)
        for i, n in enumerate(rng.integers(10, 20, 3)):  # real length n, answer = last third
            s["attention_mask"][i, n:] = 0
            s["input_ids"][i, n:] = 0
            s["labels"][i] = np.where(np.arange(t) >= 2 * n // 3, s["input_ids"][i], -100)
            s["labels"][i, n:] = -100
            s["entropy"][i, n:] = 0
        s["ref_logp"] = np.zeros(3, np.float32)
        sides[side] = s
    return sides


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("method,loss_kw,head_chunk", [
    ("alter", {}, 0), ("alter", {}, 3), ("alter", {"retain_loss": "kl"}, 3), ("alter", {"struct_penalty": "grad"}, 0),
    ("asymlora", {}, 0), ("lora_gd", {}, 0), ("graddiff", {}, 3), ("npo", {}, 0), ("npo_kl", {}, 3), ("simnpo", {}, 3),
])
def test_scored_head_equals_full_logits(method, loss_kw, head_chunk):
    """Scored positions only (and, with head_chunk, the head in rematerialised blocks) give the
    losses, metrics and gradients of the full-logits step."""
    trainable, frozen, settings = _setup(method, head_chunk, **loss_kw)
    full = _long_batch()
    full = {s: {k: v for k, v in full[s].items() if k != "ref_logp"} for s in full}  # reference by forward
    scored = bucket_batch(full, 8)
    longest = max(int(full[s]["attention_mask"].sum(1).max()) for s in full)
    assert scored["forget"]["input_ids"].shape[1] == -(-longest // 8) * 8 < full["forget"]["input_ids"].shape[1]
    assert scored["forget"]["score_pos"].shape[1] < scored["forget"]["input_ids"].shape[1] - 1
    loss_f, m_f, g_f = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, full),
                                      dataclasses.replace(settings, head_chunk=0))
    loss_s, m_s, g_s = loss_and_grads(trainable, frozen, jax.tree_util.tree_map(jnp.asarray, scored), settings)
    assert float(loss_f) != 0.0
    assert abs(float(loss_f) - float(loss_s)) <= 1e-5 * max(1.0, abs(float(loss_f)))
    for k in m_f:
        assert float(m_f[k]) == pytest.approx(float(m_s[k]), abs=1e-5), k
    assert _max_diff(g_f, g_s) <= 1e-5


def test_npo_reference_from_the_prepass_equals_reference_forward():
    from alter_jax.train.prepare import backbone_statistics

    trainable, frozen, settings = _setup("npo_gd")
    full = _long_batch()
    full = {s: {k: v for k, v in full[s].items() if k != "ref_logp"} for s in full}
    model = tiny_model(num_forget_experts=None)  # the same backbone weights (seed 0) as the reference
    for s in full:
        full[s]["ref_logp"] = backbone_statistics(model, full[s], q=1.0, batch_size=2, length_bucket=16)["ref_logp"]
    without = {s: {k: v for k, v in full[s].items() if k != "ref_logp"} for s in full}
    dev = lambda b: jax.tree_util.tree_map(jnp.asarray, bucket_batch(b, 16))  # noqa: E731
    loss_a, _, g_a = loss_and_grads(trainable, frozen, dev(full), settings)
    loss_b, _, g_b = loss_and_grads(trainable, frozen, dev(without), settings)
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-5)
    assert _max_diff(g_a, g_b) <= 1e-5


def test_scored_positions_and_bucket_widths():
    labels = np.array([[-100, -100, 5, 6, -100, -100], [-100, 7, -100, 8, 9, -100]])
    pos = scored_positions(labels, 4)
    assert pos.tolist() == [[1, 2, -1, -1], [0, 2, 3, -1]]  # logit t predicts labels[t + 1]
    assert [bucket_width(n, 32, 128) for n in (1, 32, 33, 100, 200)] == [32, 32, 64, 128, 128]
    assert bucket_width(5, 0, 128) == 128
    with pytest.raises(ValueError, match="more than width"):
        scored_positions(labels, 2)


def test_one_compile_per_bucket():
    trainable, frozen, settings = _setup("alter")
    tx = make_optimizer(group_learning_rates(settings.method, OptimConfig()), OptimConfig())
    from alter_jax.config import MeshConfig
    from alter_jax.sharding import make_mesh, shard_train_step

    example = jax.tree_util.tree_map(jnp.asarray, bucket_batch(_long_batch(0, 24), 8))
    # as the run loop does: explicit shardings on a (1-device) mesh
    step, state, frozen, _ = shard_train_step(settings, tx, init_state(trainable, tx), frozen, example,
                                              make_mesh(MeshConfig()))
    shapes = set()
    for seed in range(6):
        for t in (24, 40):
            b = bucket_batch(_long_batch(seed, t), 8)
            shapes.add((b["forget"]["input_ids"].shape[1], b["forget"]["score_pos"].shape[1]))
            state, _ = step(state, frozen, jax.tree_util.tree_map(jnp.asarray, b))
    assert len(shapes) >= 2  # the data really spans several buckets
    assert step._cache_size() == len(shapes)  # one compile per (width, scored) bucket, none per batch


@pytest.mark.parametrize("method", ["alter", "lora_gd"])
def test_scan_over_layers_equals_the_layer_loop(method):
    """``ModelConfig.scan_layers``: the same losses and gradients (router logits sown inside the
    scan included) as the Python loop over layers."""
    from alter_jax.train.step import merge_model

    trainable, frozen, settings = _setup(method)
    model = merge_model(frozen.graphdef, trainable, frozen.parts)
    model.cfg = model.cfg.replace(scan_layers=True)
    for layer in model.layers:
        layer.self_attn.cfg = model.cfg
    gd_scan, tr_scan, parts_scan = split_model(model, settings.method.trainable)
    frozen_scan = Frozen(graphdef=gd_scan, parts=parts_scan)
    batch = jax.tree_util.tree_map(jnp.asarray, bucket_batch(_long_batch(), 8))
    loss_l, m_l, g_l = loss_and_grads(trainable, frozen, batch, settings)
    loss_s, m_s, g_s = loss_and_grads(tr_scan, frozen_scan, batch, settings)
    hlo = jax.jit(loss_and_grads, static_argnums=3).lower(tr_scan, frozen_scan, batch, settings).as_text()
    assert "stablehlo.while" in hlo  # the layers really ran as a scan
    assert float(loss_l) == pytest.approx(float(loss_s), abs=1e-6)
    for k in m_l:
        assert float(m_l[k]) == pytest.approx(float(m_s[k]), abs=1e-6), k
    assert _max_diff(g_l, g_s) <= 1e-6
    ids = batch["forget"]["input_ids"]
    assert np.allclose(np.asarray(model(ids)), np.asarray(merge_model(frozen.graphdef, trainable, frozen.parts)(ids)),
                       atol=1e-6)
