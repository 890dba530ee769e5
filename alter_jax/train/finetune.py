"""Full-parameter fine-tuning on QA pairs (how TOFU's "full" and "retain" models are made).

Next-token NLL on answer tokens (question masked, as TOFU), AdamW with linear warm-up,
one jitted step, seeded shuffling, a progress bar with loss and tokens/s.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from alter_jax import losses as L
from alter_jax.data.batching import batch_indices


def _loss(params, graphdef, rest, ids, mask, labels):
    model = nnx.merge(graphdef, params, rest)
    lg, tg, m = L.shift_logits_labels(model(ids, mask), labels)
    return L.nll_loss(lg, tg, m)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(0, 1))
def _step(params, opt_state, rest, ids, mask, labels, *, graphdef, tx):
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, rest, ids, mask, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def finetune(
    model,
    arrays: dict[str, np.ndarray],
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    desc: str = "finetune",
):
    """Train every backbone parameter; returns ``(model, losses per step)``. ``model`` is updated in place."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = len(arrays["input_ids"])
    steps_per_epoch = len(batch_indices(n, batch_size, drop_last=True)) or 1
    total = steps_per_epoch * epochs
    warmup = max(1, int(total * warmup_frac))
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, max(1, total - warmup))], [warmup]
    )
    tx = optax.adamw(sched, weight_decay=weight_decay)
    opt_state = tx.init(params)
    losses = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    t0, tokens = time.perf_counter(), 0
    for epoch in range(epochs):
        for idx in batch_indices(n, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=n >= batch_size):
            if len(idx) < batch_size:  # tiny data sets: repeat to a static batch shape
                idx = np.resize(idx, batch_size)
            b = {k: jnp.asarray(arrays[k][idx]) for k in ("input_ids", "attention_mask", "labels")}
            params, opt_state, loss = _step(params, opt_state, rest, b["input_ids"], b["attention_mask"], b["labels"],
                                            graphdef=graphdef, tx=tx)
            losses.append(float(loss))
            tokens += int(arrays["attention_mask"][idx].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            bar.update()
    bar.close()
    nnx.update(model, params)
    return model, losses
