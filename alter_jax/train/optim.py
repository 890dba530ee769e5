"""The Optax partition over parameter groups (spec §4: strict isolation, enforced twice).

The trainable pytree is a dict ``{group: nnx.State}``; :func:`make_optimizer` gives each
group its own AdamW and learning rate through ``optax.multi_transform``. Groups that a
method freezes get ``optax.set_to_zero()`` (no optimizer state); the frozen backbone of
adapter methods is not in the trainable pytree at all, so it has neither gradients nor
state.

Each group's learning rate is a value of the optimizer *state* (``optax.inject_hyperparams``),
not a constant of the compiled program: two runs that differ only in learning rates have the
same update rule (:func:`optimizer_key`), so one process reuses one compiled train step for a
learning-rate sweep (``train.step.jit_train_step``'s ``reuse_key``).
"""

from __future__ import annotations

import jax
import optax

from alter_jax.config import OptimConfig
from alter_jax.train.methods import MethodSpec


def group_learning_rates(method: MethodSpec, optim: OptimConfig, phase: str = "main") -> dict[str, float]:
    """Learning rate per group (0 = frozen) for a method and phase."""
    if phase == "phase1":
        return {"shared_a": optim.lr_phase1, "retain_expert": optim.lr_phase1}
    if method.asymmetric:
        lrs = {"shared_a": optim.lr_a, "retain_expert": optim.lr_b, "forget_experts": optim.lr_b, "router": optim.lr_router}
    else:
        lrs = {g: optim.lr for g in ("backbone", "shared_a", "retain_expert")}
    return {g: (lr if g in method.trainable else 0.0) for g, lr in lrs.items()}


def _schedule(lr: float, warmup: int) -> optax.Schedule | float:
    if warmup <= 0:
        return lr
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def optimizer_key(lrs: dict[str, float], optim: OptimConfig) -> tuple | None:
    """A hashable identity of :func:`make_optimizer`'s *update rule*: equal keys give equal updates
    for any learning rates (those live in the optimizer state), so a compiled step built with one
    optimizer serves another with the same key. ``None`` when a warm-up schedule bakes the learning
    rate into the update (no reuse)."""
    if optim.warmup_steps > 0:
        return None
    return (tuple(sorted((g, lr == 0.0) for g, lr in lrs.items())), float(optim.weight_decay),
            float(optim.clip_norm), int(optim.grad_accum))


def make_optimizer(lrs: dict[str, float], optim: OptimConfig) -> optax.GradientTransformation:
    """``multi_transform`` keyed by the top-level group names of the trainable dict."""
    transforms = {}
    for group, lr in lrs.items():
        if lr == 0.0:
            transforms[group] = optax.set_to_zero()
            continue
        chain = [optax.inject_hyperparams(optax.adamw)(learning_rate=_schedule(lr, optim.warmup_steps),
                                                        weight_decay=optim.weight_decay)]
        if optim.clip_norm > 0:
            chain.insert(0, optax.clip_by_global_norm(optim.clip_norm))
        transforms[group] = optax.chain(*chain)

    def labels(params: dict) -> dict:
        missing = sorted(set(params) - set(transforms))
        if missing:
            raise ValueError(f"no optimizer for parameter group(s) {missing}; known groups: {sorted(transforms)}")
        return {g: jax.tree_util.tree_map(lambda _, g=g: g, tree) for g, tree in params.items()}

    tx = optax.multi_transform(transforms, labels)
    if optim.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum)
    return tx
