"""Multi-device checks for tests/test_sharding.py, run in a subprocess with 8 host devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax starts, so
this runs as ``python -m tests._multidevice_worker OUT_DIR`` and prints one JSON object:

* ``meshes``: for each (data, fsdp, tensor) mesh, the max |difference| of the ALTER step's
  loss, metrics and updated trainable groups against the same step on one device;
* ``shards``: shard shapes of a kernel, a forget expert, Adam's mu and the batch;
* ``checkpoint``: max |difference| after saving on one mesh and restoring onto another.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alter_jax.config import MeshConfig  # noqa: E402
from alter_jax.sharding import (abstract_tree, make_mesh, restore_sharded, save_sharded,  # noqa: E402
                                shard_train_step, state_shardings)
from alter_jax.train.step import jit_train_step  # noqa: E402
from tests.train.conftest import TINY, alter_problem, make_side, tiny_model  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]
KERNEL = "layers/0/mlp/gate_proj/kernel"
EXPERT = "layers/0/mlp/gate_proj/adapter/forget_experts"


def leaf(tree, path):
    from alter_jax.sharding import path_str

    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path_str(p).endswith(path):
            return x
    raise KeyError(path)


def max_diff(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))


def shard_shapes(x):
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def main(out_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    settings, tx, state, frozen = alter_problem(tiny_model())
    rng = np.random.default_rng(0)
    batch = {"forget": make_side(rng, 8, 12, TINY.vocab_size, (1, 3)),
             "retain": make_side(rng, 8, 12, TINY.vocab_size, (0, 1))}
    host = jax.tree_util.tree_map(np.asarray, (state, frozen, batch))

    # reference: one device, no sharding
    one = jax.devices()[0]
    ref_state, ref_metrics = jit_train_step(settings, tx, donate=False)(*jax.device_put(host, one))
    ref_state, ref_metrics = jax.tree_util.tree_map(np.asarray, (ref_state, ref_metrics))
    out = {"devices": jax.device_count(), "meshes": {}, "shards": {}}
    sharded_states = {}
    for shape in MESHES:
        mesh = make_mesh(MeshConfig(*shape))
        step, st, fr, bt = shard_train_step(settings, tx, *host, mesh, donate=True)
        new, metrics = step(st, fr, bt)
        key = "x".join(map(str, shape))
        out["meshes"][key] = {
            "loss": float(metrics["loss"]),
            "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "metrics_diff": max_diff(metrics, ref_metrics),
            "trainable_diff": max_diff(new.trainable, ref_state.trainable),
            "opt_diff": max_diff(new.opt_state, ref_state.opt_state),
            "moved": max_diff(new.trainable, host[0].trainable),
        }
        out["shards"][key] = {
            "kernel": shard_shapes(leaf(fr.parts["backbone"], KERNEL)),
            "kernel_spec": str(leaf(fr.parts["backbone"], KERNEL).sharding.spec),
            "expert": shard_shapes(leaf(new.trainable["forget_experts"], EXPERT)),
            "expert_spec": str(leaf(new.trainable["forget_experts"], EXPERT).sharding.spec),
            "input_donated": leaf(st.trainable["forget_experts"], EXPERT).is_deleted(),
            "mu": shard_shapes(leaf(new.opt_state, "mu/forget_experts/" + EXPERT)),
            "batch": shard_shapes(bt["forget"]["input_ids"]),
        }
        sharded_states[shape] = new

    # checkpoint: save on (1, 2, 4), restore onto (2, 2, 2) and onto (8, 1, 1)
    src = sharded_states[(1, 2, 4)]
    path = save_sharded(os.path.join(out_dir, "ckpt"), src)
    out["checkpoint"] = {}
    for shape in [(2, 2, 2), (8, 1, 1)]:
        mesh = make_mesh(MeshConfig(*shape))
        target = state_shardings(src, mesh)
        restored = restore_sharded(path, abstract_tree(src, target))
        out["checkpoint"]["x".join(map(str, shape))] = {
            "diff": max_diff(restored, src),
            "same_structure": jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(src),
            "expert_spec": str(leaf(restored.trainable["forget_experts"], EXPERT).sharding.spec),
            "expert_mesh": dict(leaf(restored.trainable["forget_experts"], EXPERT).sharding.mesh.shape),
            "expert_shards": shard_shapes(leaf(restored.trainable["forget_experts"], EXPERT)),
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
