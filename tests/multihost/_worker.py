"""Worker of tests/multihost/test_multihost.py: the ALTER step, per-process batches and a
multi-host checkpoint, run either as 2 processes x 4 CPU devices (``multi``, started by
:func:`alter_jax.launch.launch`, coordinator from the environment that
``sharding.initialize_distributed`` reads) or as 1 process x 8 devices (``single``).

    python -m tests.multihost._worker multi OUT     # under bin/launch --processes 2 --cpu-devices 4
    python -m tests.multihost._worker single OUT    # XLA_FLAGS=--xla_force_host_platform_device_count=8

``multi`` writes (process 0) ``OUT/multi.npz`` (per mesh: loss of 2 steps, the trained groups and
Adam's state after each step, gathered from both processes) and ``OUT/multi_rows.json`` (each
process: the batch rows it loaded and the rows its devices hold); every process writes its part
of the Orbax checkpoint ``OUT/ckpt`` (mesh 2x2x2, after step 1). ``single`` writes ``OUT/single.npz``
(the same steps on one process with 8 devices, and step 2 continued from the restored checkpoint)
and ``OUT/single.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import sys

MODE = sys.argv[1] if len(sys.argv) > 1 else "single"
if MODE == "single":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alter_jax import sharding as S  # noqa: E402
from alter_jax.config import MeshConfig  # noqa: E402
from alter_jax.train.checkpoint import RunCheckpointer  # noqa: E402
from tests.train.conftest import TINY, alter_problem, make_side, tiny_model  # noqa: E402

CFG = dataclasses.replace(TINY, num_layers=1)  # one layer: half the compile time of the 2-layer test model

MESHES = [(8, 1, 1), (2, 2, 2)]
CKPT_MESH = (2, 2, 2)
ROWS = 8  # rows per side of the global batch


T0 = time.perf_counter()


def say(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def problem():
    settings, tx, state, frozen = alter_problem(tiny_model(cfg=CFG))  # one layer, non-zero B
    rng = np.random.default_rng(0)
    batches = [{"forget": make_side(rng, ROWS, 12, TINY.vocab_size, (1, 3)),
                "retain": make_side(rng, ROWS, 12, TINY.vocab_size, (0, 1))} for _ in range(2)]
    host = jax.tree_util.tree_map(np.asarray, (state, frozen))
    return settings, tx, host, batches


def local_rows(batch, mesh):
    """This process's rows of ``batch`` only, as a global array (the loop's per-process path)."""
    rows = S.process_batch_rows(mesh, ROWS)
    local = jax.tree_util.tree_map(lambda x: x[rows], batch)
    return rows, local, S.global_batch(local, mesh, ROWS)


def gathered(tree):
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def flat(prefix, tree):
    return {f"{prefix}/{S.path_str(p)}": np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def key(shape):
    return "x".join(map(str, shape))


def run_steps(settings, tx, host, batches, mesh, out, rows_info, ckpt_dir=None):
    step, state, frozen, _ = S.shard_train_step(settings, tx, host[0], host[1], batches[0], mesh, place_batch=False)
    for i, b in enumerate(batches, start=1):
        rows, local, gb = local_rows(b, mesh)
        if rows_info is not None:
            arr = gb["forget"]["input_ids"]
            held = sorted({r for sh in arr.addressable_shards for r in range(*sh.index[0].indices(ROWS))})
            match = all(np.array_equal(np.asarray(sh.data), b["forget"]["input_ids"][sh.index])
                        for sh in arr.addressable_shards)
            rows_info.setdefault(key(mesh.devices.shape), []).append(
                {"step": i, "loaded": rows.tolist(), "local_shape": list(local["forget"]["input_ids"].shape),
                 "held": held, "shards_match": bool(match), "global_shape": list(arr.shape)})
        state, metrics = step(state, frozen, gb)
        say(f"mesh {key(mesh.devices.shape)} step {i} loss {float(metrics['loss']):.6f}")
        g = gathered({"trainable": state.trainable, "opt": state.opt_state})
        out.update(flat(f"{key(mesh.devices.shape)}/step{i}", g))
        out[f"{key(mesh.devices.shape)}/step{i}/loss"] = np.asarray(float(metrics["loss"]))
        if ckpt_dir is not None and i == 1:
            RunCheckpointer(ckpt_dir).save(1, state, {"epoch": 0, "batch": 1})
            say("checkpoint written")
    return step


def main_multi(out_dir):
    assert S.initialize_distributed() is True
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    settings, tx, host, batches = problem()
    out, rows_info = {}, {}
    for shape in MESHES:
        mesh = S.make_mesh(MeshConfig(*shape))
        run_steps(settings, tx, host, batches, mesh, out, rows_info,
                  ckpt_dir=os.path.join(out_dir, "ckpt") if shape == CKPT_MESH else None)
    info = {"process": jax.process_index(), "rows": rows_info,
            "devices": [[d.id, d.process_index] for d in jax.devices()]}
    with open(os.path.join(out_dir, f"multi_rows_p{jax.process_index()}.json"), "w") as fh:
        json.dump(info, fh)
    if S.is_main_process():
        np.savez(os.path.join(out_dir, "multi.npz"), **out)


def main_single(out_dir):
    assert jax.process_count() == 1 and jax.device_count() == 8
    settings, tx, host, batches = problem()
    out, steps = {}, {}
    for shape in MESHES:
        steps[shape] = run_steps(settings, tx, host, batches, S.make_mesh(MeshConfig(*shape)), out, None)
    # restore the 2-process checkpoint (step 1, mesh 2x2x2) here, continue with step 2 on the same mesh
    mesh = S.make_mesh(MeshConfig(*CKPT_MESH))
    ckpt = os.path.join(out_dir, "ckpt")
    deadline = time.monotonic() + float(os.environ.get("MULTIHOST_WAIT_S", "400"))
    while not os.path.isdir(os.path.join(ckpt, "1")):  # Orbax renames the finished step folder into place
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ckpt}/1: the 2-process run wrote no checkpoint")
        time.sleep(0.5)
    restored, meta, step_no = RunCheckpointer(ckpt).restore(host[0])
    restored_step = int(restored.step)
    out.update(flat("restored/step1", {"trainable": restored.trainable, "opt": restored.opt_state}))
    in_sh, _ = S.train_step_shardings(restored, host[1], batches[1], mesh)
    state, frozen = S.place((restored, host[1]), in_sh[:2])
    state, metrics = steps[CKPT_MESH](state, frozen, S.global_batch(batches[1], mesh, ROWS))  # compiled already
    say("continued from the restored checkpoint")
    out.update(flat("restored/step2", gathered({"trainable": state.trainable, "opt": state.opt_state})))
    out["restored/step2/loss"] = np.asarray(float(metrics["loss"]))
    np.savez(os.path.join(out_dir, "single.npz"), **out)
    with open(os.path.join(out_dir, "single.json"), "w") as fh:
        json.dump({"meta": meta, "step": step_no, "restored_step": restored_step}, fh)


if __name__ == "__main__":
    (main_multi if MODE == "multi" else main_single)(sys.argv[2])
