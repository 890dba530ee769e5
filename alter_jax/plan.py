"""Memory planner: per-device bytes of one training step, before building anything.

``plan_memory(model_cfg, adapter_cfg, method, batch, seq_len, mesh)`` adds up, per device:

* **parameters** per group (backbone, adapter groups, the frozen reference copy that
  full-parameter KL/NPO methods keep), from the model's shapes (``nnx.eval_shape``, no
  weights are allocated) divided exactly as :mod:`alter_jax.sharding`'s rules divide them;
* **gradients**: one copy of the trainable groups (the step's pullbacks write them once);
* **optimizer state**: Adam's two moments, ``2 x`` the trainable groups (frozen groups get
  ``optax.set_to_zero`` and no state, ``train/optim.py``);
* **activations**, estimated from the shapes. With ``b`` local rows (``batch`` over
  ``data x fsdp``), ``T = seq_len``, ``a`` the compute dtype's bytes and ``/t`` where the
  ``tensor`` axis divides a width (heads, intermediate, vocabulary):

  - saved per layer for the backward pass (the residuals ``jax.vjp`` keeps)::

        b·T·a·(4·D + 2·(H+2K)·Dh/t + H·Dh/t + 5·F/t)        residual stream, norms, q/k/v
                                                            before and after RoPE, attention
                                                            output, MLP gate/up/SiLU/product
      + b·(H/t)·T²·(3·4 + 1)                                scores, exp, probabilities in
                                                            float32 + the boolean mask
      + Σ_adapted b·T·r·a                                   A·x of each adapter

    (ALTER pulls back twice through every layer; XLA keeps one more float32 score
    buffer per layer for it, :data:`SCORE_BYTES_SECOND_PULLBACK`), times ``L`` layers;
    with ``remat`` only the layer input ``b·T·D·a`` is kept per layer;
  - the backward working set: :data:`BACKWARD_SCORE_COPIES` float32 score-sized buffers
    per pullback (0 on XLA: cotangents reuse the freed residuals), plus, with ``remat``,
    the one layer whose residuals are rebuilt;
  - logits ``b·A·(V/t)·4`` bytes times 4 (logits, log-softmax, softmax, cotangent), +5
    for ALTER (:data:`ALTER_EXTRA_LOGITS_COPIES`), +1
    when a reference forward is needed (KL), and the final hidden state. ``A`` is the number
    of positions whose logits are live at once: the scored positions per row (the LM head runs
    nowhere else; ``T - 1`` in the worst case) or, with ``head_chunk``, one block of them.

The activation constants were checked against XLA's buffer assignment on CPU for small
models (hidden 32-128, 1-4 layers, vocabulary 64-2048, T 16-128, methods alter, lora_gd,
graddiff, npo_kl): the plan was 0.86-1.21x of ``memory_analysis()``'s peak
(``tests/test_plan.py``). Accelerator compilers fuse differently (and flash attention
keeps no ``T x T`` buffer), so treat the numbers as a plan, not a guarantee.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from alter_jax.adapters.lora import GROUPS, AdapterConfig
from alter_jax.config import MeshConfig
from alter_jax.models.config import ModelConfig
from alter_jax.models.llama import TARGET_MODULES
from alter_jax.sharding import PARTITION_RULES, axis_sizes, path_str, shard_shape, spec_for
from alter_jax.train.methods import MethodSpec

GROUP_NAMES = ("backbone", *GROUPS)
#: Attention buffers of shape ``[b, H/t, T, T]`` saved per layer, in bytes per element:
#: masked scores, exp and probabilities in float32 plus the boolean mask.
SCORE_BYTES_SAVED = 3 * 4 + 1
#: One more float32 score buffer per layer when ALTER pulls back twice (XLA schedules the
#: two pullbacks through each layer together).
SCORE_BYTES_SECOND_PULLBACK = 4
#: float32 score-sized buffers live during one layer's backward pass beyond its saved
#: residuals, per pullback. Measured 0: XLA writes the cotangents into the buffers the
#: layer's residuals free as the backward pass consumes them.
BACKWARD_SCORE_COPIES = 0.0
#: float32 ``[b, A, V]`` buffers around the loss: logits, log-softmax, softmax, cotangent.
LOGITS_COPIES = 4
#: More of them in ALTER's step: the IHL's masked maximum over non-target probabilities, the
#: Tsallis entropy of the drift penalty, the A-terms' cotangent (measured with the token-statistics
#: step on CPU: 8.5-8.8 copies in all, ``tests/test_plan.py``).
ALTER_EXTRA_LOGITS_COPIES = 5


# ----------------------------------------------------------------------------- shapes
@functools.lru_cache(maxsize=32)
def _abstract_groups(model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None) -> dict[str, Any]:
    """``{group: State of ShapeDtypeStruct}`` of the model (with adapters), nothing allocated."""
    from alter_jax.adapters.inject import add_adapters
    from alter_jax.models.llama import Transformer

    def build():
        model = Transformer(model_cfg, rngs=nnx.Rngs(0))
        if adapter_cfg is not None:
            add_adapters(model, adapter_cfg)
        return model

    model = nnx.eval_shape(build)
    _, backbone, *groups, _rest = nnx.split(model, nnx.Param, *GROUPS.values(), ...)
    return {"backbone": backbone, **dict(zip(GROUPS, groups))}


def _adapter_cfg_for(method: MethodSpec, adapter_cfg: AdapterConfig | None) -> AdapterConfig | None:
    if not method.adapter:
        return None
    if adapter_cfg is None:
        raise ValueError(f"method {method.name!r} trains adapters: pass adapter_cfg (config.adapter).")
    return adapter_cfg


def count_parameters(model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None, method: MethodSpec) -> dict[str, int]:
    """Parameter count per group (``backbone``, ``shared_a``, ``retain_expert``,
    ``forget_experts``, ``router``) without building the model (``nnx.eval_shape``).
    Full-parameter methods have no adapter groups (counts 0)."""
    groups = _abstract_groups(model_cfg, _adapter_cfg_for(method, adapter_cfg))
    return {g: int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(groups[g]))) for g in GROUP_NAMES}


def _group_bytes_per_device(state: Any, sizes: dict[str, int]) -> int:
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        spec = spec_for(path_str(path), x.shape, sizes, PARTITION_RULES)
        total += math.prod(shard_shape(x.shape, spec, sizes)) * jnp.dtype(x.dtype).itemsize
    return int(total)


def _layer_bytes_per_device(groups: dict[str, Any], sizes: dict[str, int]) -> int:
    """Bytes per device of every decoder layer's state (backbone and adapters): what a scan over
    layers stacks."""
    total = 0
    for state in groups.values():
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
            p = path_str(path)
            if p.startswith("layers/"):
                spec = spec_for(p, x.shape, sizes, PARTITION_RULES)
                total += math.prod(shard_shape(x.shape, spec, sizes)) * jnp.dtype(x.dtype).itemsize
    return int(total)


def _div(n: int, t: int) -> float:
    """``n / t`` when the tensor axis divides ``n`` (sharded), else ``n`` (replicated)."""
    return n / t if t > 1 and n % t == 0 else float(n)


# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training step, by component (see the module docstring)."""

    components: dict[str, int]
    params: dict[str, int]  # parameter count per group (global)
    trainable: tuple[str, ...]
    mesh: dict[str, int]
    batch: int
    local_batch: int
    seq_len: int
    remat: bool
    device_bytes: int | None = None

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))

    @property
    def activations(self) -> int:
        return int(sum(v for k, v in self.components.items() if k.startswith("activations") or k == "logits"))

    @property
    def fits(self) -> bool | None:
        """``total <= device_bytes`` (``None`` when no device size was given)."""
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: components, totals, parameter counts, mesh and verdict."""
        return {
            "components": dict(self.components),
            "total": self.total,
            "activations": self.activations,
            "params": dict(self.params),
            "trainable": list(self.trainable),
            "mesh": dict(self.mesh),
            "batch": self.batch,
            "local_batch": self.local_batch,
            "seq_len": self.seq_len,
            "remat": self.remat,
            "device_bytes": self.device_bytes,
            "fits": self.fits,
        }

    def table(self) -> str:
        """A printable table: component, per-device bytes, GiB and share of the total."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"memory plan per device (mesh {mesh}; batch {self.batch} -> {self.local_batch} per device, "
            f"seq_len {self.seq_len}, remat {'on' if self.remat else 'off'})",
            f"{'component':<34}{'bytes':>16}{'GiB':>10}{'share':>8}",
        ]
        total = max(self.total, 1)
        for name, b in self.components.items():
            lines.append(f"{name:<34}{b:>16,}{b / 2**30:>10.3f}{100 * b / total:>7.1f}%")
        lines.append(f"{'total':<34}{self.total:>16,}{self.total / 2**30:>10.3f}{100.0:>7.1f}%")
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"device memory {self.device_bytes / 2**30:.2f} GiB: {verdict}")
        counts = ", ".join(f"{g}={n:,}" + ("*" if g in self.trainable else "") for g, n in self.params.items() if n)
        lines.append(f"parameters (* trained): {counts}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _saved_layer_bytes(cfg: ModelConfig, acfg: AdapterConfig | None, b: int, T: int, t: int, pullbacks: int) -> float:
    """Residuals one decoder layer keeps for the backward pass (module docstring)."""
    a = jnp.dtype(cfg.dtype).itemsize
    d, f, h, k, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tok = b * T
    widths = 4 * d + 2 * _div((h + 2 * k) * dh, t) + _div(h * dh, t) + 5 * _div(f, t)
    per_score = SCORE_BYTES_SAVED + (SCORE_BYTES_SECOND_PULLBACK if pullbacks > 1 else 0)
    scores = b * _div(h, t) * T * T * per_score
    adapters = 0.0
    if acfg is not None:  # A·x per adapted projection (the router input is a concat XLA does not keep)
        n_adapted = sum(any(tm == m or tm.endswith("." + m) for tm in acfg.target_modules) for m in TARGET_MODULES)
        adapters = n_adapted * tok * acfg.rank * a
    return tok * a * widths + scores + adapters


def plan_memory(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig | None,
    method: MethodSpec,
    batch: int,
    seq_len: int,
    mesh: MeshConfig | Any,
    *,
    device_bytes: int | None = None,
    remat: bool = False,
    scored_len: int | None = None,
    head_chunk: int = 0,
    scan_layers: bool = False,
) -> MemoryPlan:
    """Per-device memory of one train step of ``method`` (see the module docstring).

    ``batch``: the rows of one forward pass (ALTER and the two-sided methods: forget rows +
    retain rows); ``seq_len``: padded tokens per row; ``mesh``: a ``MeshConfig`` (or a
    ``Mesh`` / ``{"data", "fsdp", "tensor"}`` dict); ``device_bytes``: the device's
    memory, for :attr:`MemoryPlan.fits`; ``remat``: per-layer rematerialisation
    (``ModelSpec.remat``); ``scored_len``: scored positions per row, where the LM head runs
    (default ``seq_len - 1``: every position, the worst case of the scored-token head);
    ``head_chunk``: ``ModelSpec.head_chunk`` (> 0: the head runs in blocks of that many positions,
    so at most ``min(head_chunk, scored_len)`` positions of logits are live); ``scan_layers``:
    ``ModelSpec.scan_layers`` (the layers' weights are stacked once per step: one more copy).
    """
    if batch < 1 or seq_len < 1:
        raise ValueError(f"plan_memory: batch={batch} and seq_len={seq_len} must be >= 1.")
    acfg = _adapter_cfg_for(method, adapter_cfg)
    sizes = axis_sizes(mesh)
    groups = _abstract_groups(model_cfg, acfg)
    per_dev = {g: _group_bytes_per_device(groups[g], sizes) for g in GROUP_NAMES}
    trainable = tuple(g for g in method.trainable if g in per_dev)
    trained_bytes = sum(per_dev[g] for g in trainable)

    needs_ref = method.retain_loss == "kl"  # NPO: reference log-probabilities come from the pre-pass
    comps: dict[str, int] = {"backbone params": per_dev["backbone"]}
    if scan_layers:  # models/llama.py stacks every layer's state for the scan: a copy of the layer weights
        comps["stacked layer weights (scan)"] = _layer_bytes_per_device(groups, sizes)
    adapter_bytes = sum(per_dev[g] for g in GROUPS)
    if adapter_bytes:
        comps["adapter params"] = adapter_bytes
    if needs_ref and not method.adapter:  # a frozen copy of the backbone before unlearning
        comps["reference params"] = per_dev["backbone"]
    comps["gradients"] = trained_bytes
    comps["optimizer state (Adam m, v)"] = 2 * trained_bytes

    # activations: batch over data x fsdp (replicated when it does not divide, as sharding.py)
    n_batch = sizes["data"] * sizes["fsdp"]
    b = batch // n_batch if batch % n_batch == 0 else batch
    t = sizes["tensor"]
    a = jnp.dtype(model_cfg.dtype).itemsize
    pullbacks = 2 if (method.asymmetric and "shared_a" in trainable) else 1
    layer = _saved_layer_bytes(model_cfg, acfg, b, seq_len, t, pullbacks)
    n_layers = model_cfg.num_layers
    if remat:
        comps["activations (saved, remat)"] = int(n_layers * b * seq_len * model_cfg.hidden_size * a)
    else:
        comps["activations (saved per layer)"] = int(n_layers * layer)
    score = b * _div(model_cfg.num_heads, t) * seq_len * seq_len * 4
    working = int(BACKWARD_SCORE_COPIES * pullbacks * score + (layer if remat else 0))
    if working:
        comps["activations (backward working set)"] = working
    # ALTER: + the A-terms' cotangent and the Tsallis entropy of the drift penalty
    n_logits = LOGITS_COPIES + ALTER_EXTRA_LOGITS_COPIES * (pullbacks - 1) + (1 if needs_ref else 0)
    scored = max(1, seq_len - 1) if scored_len is None else max(1, min(scored_len, seq_len))
    live = min(head_chunk, scored) if head_chunk > 0 else scored
    comps["logits"] = int(n_logits * b * live * _div(model_cfg.vocab_size, t) * 4
                          + 2 * b * seq_len * model_cfg.hidden_size * a)
    comps["batch inputs"] = int(b * seq_len * 4 * 4)  # ids, mask, labels, entropy
    return MemoryPlan(
        components=comps,
        params=count_parameters(model_cfg, adapter_cfg, method),
        trainable=trainable,
        mesh=sizes,
        batch=batch,
        local_batch=b,
        seq_len=seq_len,
        remat=remat,
        device_bytes=device_bytes,
    )
