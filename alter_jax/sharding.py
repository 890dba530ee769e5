"""Multi-device sharding: the device mesh, partition rules as data, sharded checkpoints.

Mesh axes (``MeshConfig``): ``data`` (pure data parallelism: parameters replicated),
``fsdp`` (data parallelism with parameters, gradients and optimizer state sharded, ZeRO-3
style) and ``tensor`` (Megatron-style model parallelism inside a layer). The batch axis
is sharded over ``("data", "fsdp")``.

Parameters are matched by **rules**: ``(regex, PartitionSpec)`` pairs searched, in
order, against the parameter's path joined with ``/`` (``layers/3/self_attn/q_proj/kernel``,
``layers/0/mlp/down_proj/adapter/forget_experts``). The same rules shard the optimizer
state, whose leaves end with the same path (``.../mu/layers/3/.../kernel``). A path no
rule matches is replicated. A dimension that the mesh axes of its spec do not divide
falls back to replication for that dimension (logged once).

Layout (kernels are stored input-major ``[d_in, d_out]``, see ``models/llama.py``):

* column-parallel ``q/k/v/gate/up`` kernels ``[d_in, d_out]`` -> ``P("fsdp", "tensor")``;
  their adapters follow the output dimension: ``shared_a [r, d_in] -> P(None, "fsdp")``,
  ``retain_expert [d_out, r] -> P("tensor", None)``, ``forget_experts [N, d_out, r] ->
  P(None, "tensor", None)``;
* row-parallel ``o/down`` kernels ``[d_in, d_out]`` -> ``P("tensor", "fsdp")``; adapters
  ``shared_a -> P(None, "tensor")``, ``retain_expert -> P("fsdp", None)``,
  ``forget_experts -> P(None, "fsdp", None)``;
* ``embed_tokens [V, D] -> P("tensor", "fsdp")``, ``lm_head [D, V] -> P("fsdp", "tensor")``;
* norms, routers ``[d_in + 1, E]`` and scalars (step, Adam's count) replicated.

:func:`spec_for` / :func:`tree_specs` need only the axis sizes (no devices), so the
memory planner (``alter_jax.plan``) divides memory exactly as the training run shards it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from alter_jax.config import MeshConfig

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_COL = r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj)"
_ROW = r"(^|/)(o_proj|down_proj)"

#: Partition rules, first match wins: ``(regex over the '/'-joined path, PartitionSpec)``.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # backbone (nnx.Param)
    (r"(^|/)embed_tokens$", P("tensor", "fsdp")),  # [V, D]
    (r"(^|/)lm_head$", P("fsdp", "tensor")),  # [D, V]
    (_COL + r"/kernel$", P("fsdp", "tensor")),  # [d_in, d_out]
    (_COL + r"/bias$", P("tensor")),  # [d_out]
    (_ROW + r"/kernel$", P("tensor", "fsdp")),  # [d_in, d_out]
    (_ROW + r"/bias$", P()),
    (r"(norm|layernorm)/weight$", P()),  # [D]
    # asymmetric LoRA groups (alter_jax.adapters.lora)
    (_COL + r"/adapter/shared_a$", P(None, "fsdp")),  # [r, d_in]
    (_COL + r"/adapter/retain_expert$", P("tensor", None)),  # [d_out, r]
    (_COL + r"/adapter/forget_experts$", P(None, "tensor", None)),  # [N, d_out, r]
    (_ROW + r"/adapter/shared_a$", P(None, "tensor")),
    (_ROW + r"/adapter/retain_expert$", P("fsdp", None)),
    (_ROW + r"/adapter/forget_experts$", P(None, "fsdp", None)),
    (r"/adapter/router$", P()),  # [d_in + 1, E]
)

#: Activation layouts by the kind ``models/llama.py`` marks (``models/constraints.py``), applied
#: as ``with_sharding_constraint`` while a sharded step is traced: rows over the batch axes
#: everywhere (ZeRO-3 / FSDP: the weights are gathered, never the activations), the widths
#: that column-parallel projections produce (and row-parallel ones consume) and the
#: vocabulary over ``tensor`` (Megatron). Without them XLA's partitioner gathers whole-batch
#: activations around the frozen projections and the LM head of the 7B step at fsdp=8
#: (``f32[16, 1024, 11008]``, ``f32[16, 1023, 32000]``); with them it keeps every layer's gathered
#: kernels for the backward pass instead, +0.8 GiB per layer, so they are opt-in
#: (``shard_train_step(activation_rules=ACTIVATION_RULES)``; WORKSPACE, "Measured figures").
ACTIVATION_RULES: tuple[tuple[str, P], ...] = (
    ("residual", P(BATCH_AXES, None, None)),  # [B, T, D] embeddings
    ("col_in", P(BATCH_AXES, None, None)),  # [B, T, D] into q/k/v/gate/up
    ("col_out", P(BATCH_AXES, None, "tensor")),  # [B, T, F] / [B, T, H*Dh]
    ("row_in", P(BATCH_AXES, None, "tensor")),  # [B, T, F] into o/down
    ("row_out", P(BATCH_AXES, None, None)),  # [B, T, D] back on the residual stream
    ("logits", P(BATCH_AXES, None, "tensor")),  # [B, A, V]
)

_LOGGED: set[str] = set()


class MeshError(ValueError):
    """A mesh configuration that does not fit the devices."""


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


# ----------------------------------------------------------------------------- mesh
def axis_sizes(mesh_cfg: MeshConfig | Mesh | Mapping[str, int]) -> dict[str, int]:
    """``{"data": d, "fsdp": f, "tensor": t}`` from a MeshConfig, a Mesh or a dict."""
    if isinstance(mesh_cfg, Mesh):
        return {a: int(mesh_cfg.shape.get(a, 1)) for a in AXES}
    if isinstance(mesh_cfg, Mapping):
        return {a: int(mesh_cfg.get(a, 1)) for a in AXES}
    return {a: int(getattr(mesh_cfg, a)) for a in AXES}


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor)`` over ``devices`` (default: all).

    Raises :class:`MeshError` naming ``mesh.data``, ``mesh.fsdp`` and ``mesh.tensor``
    when their product differs from the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(mesh_cfg)
    bad = [f"mesh.{a}={s}" for a, s in sizes.items() if s < 1]
    if bad:
        raise MeshError(f"config {', '.join(bad)}: every mesh axis size must be >= 1.")
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) != len(devices):
        raise MeshError(
            f"config mesh.data={shape[0]} x mesh.fsdp={shape[1]} x mesh.tensor={shape[2]} = {math.prod(shape)} "
            f"devices, but {len(devices)} device(s) are available ({devices[0].platform}); set the three "
            f"mesh sizes so that their product is {len(devices)}."
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------- rules
def path_str(path: Sequence[Any]) -> str:
    """``'/'``-joined key path; the ``.value`` of an ``nnx.Variable`` is dropped."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(getattr(k, "key", k)))
    return "/".join(parts)


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array, a ``jax.ShapeDtypeStruct`` or a scalar."""
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def _axis_product(entry: Any, sizes: Mapping[str, int]) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(sizes.get(n, 1) for n in names)


def fit_spec(spec: P, shape: Sequence[int], sizes: Mapping[str, int], *, where: str = "") -> P:
    """``spec`` with every dimension the mesh does not divide replaced by ``None``."""
    if len(spec) > len(shape):
        _log_once(f"sharding: rule {spec} has more dims than {where} {tuple(shape)}; replicating it")
        return P()
    out = []
    for dim, entry in zip(shape, spec):
        n = _axis_product(entry, sizes)
        if n > 1 and dim % n:
            _log_once(
                f"sharding: {where} dim {dim} of shape {tuple(shape)} is not divisible by mesh axes "
                f"{entry} (size {n}); that dimension is replicated"
            )
            entry = None
        out.append(entry)
    return P(*out)


def spec_for(path: str, shape: Sequence[int], sizes: Mapping[str, int], rules=PARTITION_RULES) -> P:
    """The fitted PartitionSpec of the leaf at ``path`` (scalars and unmatched paths: ``P()``)."""
    if len(shape) == 0:
        return P()
    for pattern, spec in rules:
        if re.search(pattern, path):
            return fit_spec(spec, shape, sizes, where=path)
    return P()


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of ``shape`` laid out by a fitted ``spec``."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(-(-d // _axis_product(e, sizes)) for d, e in zip(shape, entries))


def tree_specs(tree: Any, sizes: Mapping[str, int] | MeshConfig | Mesh, rules=PARTITION_RULES) -> Any:
    """The pytree of PartitionSpecs for ``tree`` (arrays or ``ShapeDtypeStruct`` leaves)."""
    sizes = axis_sizes(sizes)
    return jax.tree_util.tree_map_with_path(lambda p, x: spec_for(path_str(p), _shape(x), sizes, rules), tree)


def state_shardings(tree: Any, mesh: Mesh, rules=PARTITION_RULES) -> Any:
    """``NamedSharding`` per leaf of any pytree with paths (an ``nnx.State``, a ``TrainState``,
    a ``Frozen``), following :data:`PARTITION_RULES`."""
    sizes = axis_sizes(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), _shape(x), sizes, rules)), tree
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``("data", "fsdp")``, other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Per-leaf :func:`batch_sharding`, replicating leaves whose batch size the
    ``data x fsdp`` devices do not divide (logged once)."""
    sizes = axis_sizes(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, fit_spec(P(BATCH_AXES), _shape(x), sizes, where=f"batch {path_str(p)}"))
        if len(_shape(x)) > 0
        else NamedSharding(mesh, P()),
        batch,
    )


# ----------------------------------------------------------------------------- activations
def activation_constrainer(mesh: Mesh, rules=ACTIVATION_RULES):
    """``(x, kind) -> x`` constrained to ``rules[kind]`` on ``mesh`` (fitted to ``x``'s shape; an
    array of another rank, e.g. a decode step's gathered rows, is left to the partitioner)."""
    table = dict(rules)
    sizes = axis_sizes(mesh)

    def constrain(x, kind):
        spec = table.get(kind)
        if spec is None or getattr(x, "ndim", None) != len(spec):
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, sizes, where=kind)))

    return constrain


def activation_layout(mesh: Mesh | None, rules=ACTIVATION_RULES):
    """Context manager: trace under :data:`ACTIVATION_RULES` on ``mesh`` (``None``: no constraints)."""
    from alter_jax.models.constraints import activation_constraints

    return activation_constraints(None if mesh is None or rules is None else activation_constrainer(mesh, rules))


class _Traced:
    """A jitted function that is traced (called, lowered) under an activation layout."""

    def __init__(self, fn, mesh: Mesh, rules):
        self._fn, self._mesh, self._rules = fn, mesh, rules

    def __call__(self, *args, **kwargs):
        with activation_layout(self._mesh, self._rules):
            return self._fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with activation_layout(self._mesh, self._rules):
            return self._fn.lower(*args, **kwargs)

    @property
    def jitted(self):
        """The plain ``jax.jit`` function (for ``jax.export``, under :func:`activation_layout`)."""
        return self._fn


# ----------------------------------------------------------------------------- train step
def train_step_shardings(state: Any, frozen: Any, batch: Any, mesh: Mesh, rules=PARTITION_RULES):
    """``(in_shardings, out_shardings)`` for ``jit_train_step(settings, tx, ...)``.

    In: ``(TrainState, Frozen, batch)``; out: ``(TrainState, metrics)`` with the new state
    sharded as the old one (so donation reuses the buffers) and metrics replicated.
    """
    state_sh = state_shardings(state, mesh, rules)
    in_sh = (state_sh, state_shardings(frozen, mesh, rules), batch_shardings(batch, mesh))
    return in_sh, (state_sh, replicated(mesh))


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` every leaf onto its sharding (host arrays or arrays on other devices)."""
    return jax.device_put(tree, shardings)


def shard_train_step(settings, tx, state, frozen, batch, mesh: Mesh, *, donate: bool = True, rules=PARTITION_RULES,
                     place_batch: bool = True, activation_rules=None, reuse_key=None):
    """Jit the train step for ``mesh`` and place its inputs.

    Returns ``(step, state, frozen, batch)``: call ``step(state, frozen, batch)``; later
    batches go through ``place(batch, in_shardings[2])``, :func:`batch_shardings` or (each
    process its own rows) :func:`global_batch`. ``place_batch=False``: ``batch`` may be abstract
    (``ShapeDtypeStruct`` leaves: only its structure is used) and is returned as it is.
    ``reuse_key``: see :func:`alter_jax.train.step.jit_train_step`. The step
    traces under ``activation_rules`` (e.g. :data:`ACTIVATION_RULES`; default ``None``: parameters and
    batch sharded, activations left to XLA's partitioner, which measured less memory at 7B depth).
    """
    from alter_jax.train.step import jit_train_step  # train imports nothing from here

    in_sh, out_sh = train_step_shardings(state, frozen, batch, mesh, rules)
    step = jit_train_step(settings, tx, in_shardings=in_sh, out_shardings=out_sh, donate=donate,
                          reuse_key=reuse_key if activation_rules is None else None)
    if activation_rules is not None:
        step = _Traced(step, mesh, activation_rules)
    state, frozen = place((state, frozen), in_sh[:2])
    if place_batch:
        batch = place(batch, in_sh[2])
    return step, state, frozen, batch


# ----------------------------------------------------------------------------- multi-host
_COORD_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_NPROC_VARS = ("JAX_NUM_PROCESSES", "NUM_PROCESSES")
_PID_VARS = ("JAX_PROCESS_ID", "PROCESS_ID")


def _env(names: Sequence[str], env: Mapping[str, str]) -> str | None:
    for n in names:
        if env.get(n):
            return env[n]
    return None


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-process launch; else no-op.

    Explicit: ``JAX_COORDINATOR_ADDRESS`` (or ``COORDINATOR_ADDRESS``) with
    ``NUM_PROCESSES`` and ``PROCESS_ID`` (``JAX_`` prefixes accepted). Automatic
    (JAX's cluster detection): a SLURM job step with more than one task
    (``SLURM_JOB_ID``, ``SLURM_NTASKS > 1``), a Cloud TPU pod (``TPU_WORKER_HOSTNAMES``
    with several hosts) or Open MPI (``OMPI_COMM_WORLD_SIZE > 1``). Returns whether
    initialisation ran. Call it before anything touches ``jax.devices()``.
    """
    env = os.environ if env is None else env
    if distributed_is_initialized():  # a second call (the loop after the CLI) is a no-op
        return True
    coord = _env(_COORD_VARS, env)
    if coord or _cluster_detected(env):
        # CPU processes exchange their collectives over gloo (JAX's default today, set so a changed
        # default cannot silently leave a multi-process CPU mesh without cross-process collectives);
        # GPU / TPU backends ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coord:
        nproc, pid = _env(_NPROC_VARS, env), _env(_PID_VARS, env)
        if nproc is None or pid is None:
            raise ValueError(
                f"environment: {'JAX_COORDINATOR_ADDRESS' if env.get('JAX_COORDINATOR_ADDRESS') else 'COORDINATOR_ADDRESS'}"
                f"={coord} is set but NUM_PROCESSES and/or PROCESS_ID are missing; set both (or unset the "
                "coordinator address for a single-process run)."
            )
        try:
            nproc_i, pid_i = int(nproc), int(pid)
        except ValueError:
            raise ValueError(f"environment: NUM_PROCESSES={nproc!r} and PROCESS_ID={pid!r} must be integers.") from None
        jax.distributed.initialize(coordinator_address=coord, num_processes=nproc_i, process_id=pid_i)
        return True
    if _cluster_detected(env):
        jax.distributed.initialize()
        return True
    return False


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """A SLURM step with several tasks, a multi-host Cloud TPU pod or an Open MPI job."""
    slurm = env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
    tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    return bool(slurm or tpu or mpi)


def distributed_is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` has run in this process."""
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _d  # older JAX

    return _d.global_state.client is not None


def is_main_process() -> bool:
    """Process 0 of a multi-process run (always True in a single process): the one that writes
    run files (config, metrics, exports, reports); checkpoints are written by every process."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- per-process batches
def process_rows(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> np.ndarray:
    """``int64[n_local]``: the rows (leading-axis indices) of a global array of ``shape`` that this
    process's devices hold under ``sharding``, sorted and without repeats: the rows this process
    loads, in the order :func:`jax.make_array_from_process_local_data` expects them. A batch
    axis over ``("data", "fsdp")`` spanning the processes gives each its own block; a replicated
    leading axis gives every process every row."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(tuple(shape)).values():
        first = idx[0] if idx else slice(None)
        rows.update(range(*first.indices(shape[0])))
    return np.asarray(sorted(rows), np.int64)


def global_batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """The sharding :func:`batch_shardings` gives a batch leaf of global ``shape``."""
    if len(shape) == 0:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, fit_spec(P(BATCH_AXES), tuple(shape), axis_sizes(mesh), where="batch"))


def process_batch_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """The rows of a ``[global_rows, ...]`` batch this process loads (every per-row leaf of
    :func:`batch_shardings` is sharded alike): its own block when the batch axis spans the
    processes, every row when the batch is replicated or the processes' devices share a block."""
    return process_rows(global_batch_sharding(mesh, (global_rows,)), (global_rows,))


def global_batch(local: Any, mesh: Mesh, global_rows: int) -> Any:
    """One global ``jax.Array`` per leaf, built from this process's rows only
    (:func:`jax.make_array_from_process_local_data`): each leaf of ``local`` holds the rows
    :func:`process_batch_rows` names (``[n_local, ...]``) of a global batch with ``global_rows``
    rows, laid out as :func:`batch_shardings`. In one process this equals ``jax.device_put`` of the
    whole batch onto :func:`batch_shardings`."""
    def make(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        shape = (global_rows,) + x.shape[1:]
        return jax.make_array_from_process_local_data(global_batch_sharding(mesh, shape), x, shape)

    return jax.tree_util.tree_map(make, local)


# ----------------------------------------------------------------------------- checkpoints
def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` per leaf (with ``shardings``' leaf as its target sharding)."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(_shape(x), x.dtype), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s), tree, shardings)


def save_sharded(path: str | Path, pytree: Any, *, force: bool = True) -> Path:
    """Write ``pytree`` (sharded or not) as an Orbax checkpoint directory; every process
    writes its own shards. Blocks until the write is complete. Returns the path."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, pytree, force=force)
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def restore_sharded(path: str | Path, abstract_pytree: Any) -> Any:
    """Restore a :func:`save_sharded` checkpoint onto the shardings carried by
    ``abstract_pytree`` (``ShapeDtypeStruct`` leaves, see :func:`abstract_tree`), which may
    belong to a different mesh than the one that saved it."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint here; pass the directory that save_sharded wrote.")
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, abstract_pytree)
    finally:
        ckptr.close()
