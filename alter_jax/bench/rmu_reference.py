"""Does caching RMU's frozen layer-ℓ activations pay? (issue 13 item 3)

``python -m alter_jax.bench.rmu_reference [smollm2|bench-model]`` times RMU's loss + gradient
(jitted, 4 + 4 rows x 128, ℓ = 7, median of 7, sides interleaved) three ways: the frozen
model's forward on every row (the step before issue 13), on the retain rows only (the step
now: forget rows never need it), and not at all (what a per-row activation cache would
give), and prints the cache's memory per retain row. Decision and figures: WORKSPACE.md.
"""
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alter_jax import losses as L
from alter_jax.io.hf import load_pretrained
from alter_jax.bench.models import resolve_bench_model
from alter_jax.config import LossConfig
from alter_jax.train.methods import backbone_filter, get_method
from alter_jax.train.step import merge_model, rmu_control, split_model


def main(name: str = "smollm2") -> dict:
    model = load_pretrained(resolve_bench_model(name))
    RMU = get_method("rmu")
    loss = LossConfig(rmu_layer=7, gamma=1.0)
    gd, tr, parts = split_model(model, RMU.trainable, backbone_filter(RMU, loss, model.cfg.num_layers))
    ref = jax.tree_util.tree_map(jnp.copy, tr["backbone"])
    control = rmu_control(model.cfg.hidden_size, 6.5, 0)
    B, T = 4, 128
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 1000, (2 * B, T)), jnp.int32)
    mask = jnp.ones((2 * B, T), jnp.int32)
    scored = jnp.asarray(np.arange(T)[None, :] >= T // 2, jnp.float32).repeat(2 * B, 0)
    f = (jnp.arange(2 * B) < B).astype(jnp.float32)[:, None]

    def act(t, rows=slice(None)):
        return merge_model(gd, t, parts).layer_output(ids[rows], mask[rows], 7)

    def loss_fn(t, variant, cached):
        h = act(t)
        forget = L.rmu_activation_loss(h, jnp.broadcast_to(control, h.shape), scored * f)
        if variant == "all":
            h_ref = jax.lax.stop_gradient(act({**t, "backbone": ref}))
            retain = L.rmu_activation_loss(h, h_ref, scored * (1 - f))
        elif variant == "retain":
            h_ref = jax.lax.stop_gradient(act({**t, "backbone": ref}, slice(B, None)))
            retain = L.rmu_activation_loss(h[B:], h_ref, scored[B:])
        else:
            retain = L.rmu_activation_loss(h[B:], cached, scored[B:])
        return forget + retain

    cached = act({**tr, "backbone": ref}, slice(B, None))
    fns = {v: jax.jit(jax.value_and_grad(functools.partial(loss_fn, variant=v))) for v in ("all", "retain", "cache")}
    times = {v: [] for v in fns}
    for v, fn in fns.items():
        jax.block_until_ready(fn(tr, cached=cached))
    for _ in range(7):
        for v, fn in fns.items():
            t0 = time.perf_counter(); jax.block_until_ready(fn(tr, cached=cached)); times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(x) for v, x in times.items()}
    print(f"model {name}, {2*B} rows x {T}, layer 7, loss+grad median of 7 (s):", {v: round(m, 4) for v, m in med.items()})
    print("retain-rows / all-rows:", round(med["retain"] / med["all"], 3), " cache / retain-rows:", round(med["cache"] / med["retain"], 3))
    per_row = T * model.cfg.hidden_size * 4
    print(f"cache memory per retain row: {per_row/2**20:.2f} MiB float32 ({T} tokens x {model.cfg.hidden_size})")
    return med


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2")
