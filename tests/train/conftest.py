"""A tiny adapted model and a forget/retain batch shared by the train tests."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from alter_jax.adapters.inject import add_adapters
from alter_jax.adapters.lora import AdapterConfig
from alter_jax.models.config import ModelConfig
from alter_jax.models.llama import Transformer

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, eos_token_ids=(2,), pad_token_id=0)


def tiny_model(num_forget_experts=2, use_router=True, seed=0, nonzero_experts=True, cfg: ModelConfig = TINY):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    if num_forget_experts is None:
        return model
    add_adapters(model, AdapterConfig(rank=4, alpha=8, num_forget_experts=num_forget_experts,
                                      use_router=use_router and num_forget_experts > 0), seed=seed + 1)
    if nonzero_experts:  # zero-initialised B would hide A's gradients in the tests
        rng = np.random.default_rng(seed)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
            if path[-1] in ("retain_expert", "forget_experts"):
                var.set_value(rng.normal(0, 0.1, var.shape).astype(np.float32))
    return model


def make_side(rng, n, t, vocab, expert_range):
    ids = rng.integers(3, vocab, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    labels = ids.copy()
    labels[:, : t // 3] = -100  # prompt
    pad = rng.integers(0, 3, n)
    for i, p in enumerate(pad):  # right padding
        if p:
            mask[i, -p:] = 0
            labels[i, -p:] = -100
            ids[i, -p:] = 0
    entropy = np.where(labels != -100, rng.uniform(0.2, 2.5, (n, t)), 0.0).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "entropy": entropy,
            "expert": rng.integers(*expert_range, n).astype(np.int32)}


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return {"forget": make_side(rng, 3, 12, TINY.vocab_size, (1, 3)),
            "retain": make_side(rng, 3, 12, TINY.vocab_size, (0, 1))}


def alter_problem(model):
    """``(settings, tx, state, frozen)`` of ALTER's train step on ``model`` (default loss and
    optimizer settings, θ = 1.2): what the multi-device and multi-process workers step."""
    from alter_jax.config import LossConfig, OptimConfig
    from alter_jax.train.methods import get_method
    from alter_jax.train.optim import group_learning_rates, make_optimizer
    from alter_jax.train.step import Frozen, StepSettings, init_state, split_model

    spec = get_method("alter")
    graphdef, trainable, frozen_parts = split_model(model, spec.trainable)
    frozen = Frozen(graphdef=graphdef, parts=frozen_parts, reference=None)
    settings = StepSettings(method=spec, loss=LossConfig(), q=1.0, threshold=1.2)
    optim = OptimConfig()
    tx = make_optimizer(group_learning_rates(spec, optim), optim)
    return settings, tx, init_state(trainable, tx), frozen
