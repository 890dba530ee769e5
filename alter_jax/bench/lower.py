"""Cross-platform lowering and compiled memory of the sharded ALTER step, from shapes alone.

``bin/bench --what lower --shape llama2-7b --platforms cuda,tpu`` builds, with abstract inputs
only (``nnx.eval_shape`` for the model, ``jax.eval_shape`` for Adam's state,
``jax.ShapeDtypeStruct`` for the batch: no weight is ever allocated):

* the full ALTER train step (:func:`alter_jax.train.step.jit_train_step`, the trainer's own jit,
  with the shardings of :func:`alter_jax.sharding.train_step_shardings` on a user mesh, e.g.
  ``fsdp=8`` over 8 simulated CPU devices);
* the entropy-gated generation step (:mod:`alter_jax.gated`: backbone prefill for the prompt's
  entropies, gated prefill, Eq. 9 decode loop; one jitted program) with the model's parameters
  sharded by the same rules and the prompts over the batch axes;

and exports each with ``jax.export.export(..., platforms=[...])``. The XLA attention path is used
(``attention_impl="xla"``): the cuDNN path needs cuDNN at lowering time, which a CPU-only machine
lacks. Per platform it reports success (or the error) and the collectives written in the
exported StableHLO. Sharded ``jit`` programs carry sharding annotations there, not collectives
(SPMD partitioning is part of the target's compiler), so the count of collectives *per step* is
taken from the program compiled for CPU on the same mesh (:func:`compile_step`, the XLA SPMD
partitioner that GPU and TPU use too; their schedulers may combine or split some of them).

:func:`compile_step` also gives ``compiled.memory_analysis()``, compared with the memory planner
(:func:`alter_jax.plan.plan_memory`) by :func:`planner_vs_compiled`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alter_jax.models.config import ModelConfig

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_STABLEHLO = {c: "stablehlo." + c.replace("-", "_") for c in COLLECTIVES}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """A step's data shape: ``per_side`` forget rows + as many retain rows of ``seq`` tokens,
    ``scored`` scored positions per row (the LM head's rows; default ``seq - 1``)."""

    per_side: int = 8
    seq: int = 1024
    scored: int | None = None
    rank: int = 8
    experts: int = 2
    head_chunk: int = 0
    remat: bool = False


def lowering_config(cfg: ModelConfig, *, num_layers: int | None = None, remat: bool = False) -> ModelConfig:
    """``cfg`` with the XLA attention path (module docstring), optionally fewer layers."""
    return dataclasses.replace(cfg, attention_impl="xla", remat=remat,
                               num_layers=cfg.num_layers if num_layers is None else num_layers)


def _adapter_cfg(shape: StepShape):
    from alter_jax.adapters.lora import AdapterConfig

    return AdapterConfig(rank=shape.rank, alpha=2.0 * shape.rank, num_forget_experts=shape.experts, use_router=True)


def abstract_adapted_model(cfg: ModelConfig, shape: StepShape):
    """The ALTER-adapted model as an abstract NNX module (``ShapeDtypeStruct`` leaves)."""
    from alter_jax.adapters.inject import add_adapters
    from alter_jax.models.llama import Transformer

    def build():
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        add_adapters(m, _adapter_cfg(shape))
        return m

    return nnx.eval_shape(build)


def abstract_batch(shape: StepShape) -> dict:
    """``{"forget", "retain"}`` of ``ShapeDtypeStruct``: the keys ``bin/unlearn``'s batches carry."""
    b, t = shape.per_side, shape.seq
    a = (t - 1) if shape.scored is None else shape.scored
    i32, f32 = jnp.int32, jnp.float32
    side = {"input_ids": jax.ShapeDtypeStruct((b, t), i32), "attention_mask": jax.ShapeDtypeStruct((b, t), i32),
            "labels": jax.ShapeDtypeStruct((b, t), i32), "entropy": jax.ShapeDtypeStruct((b, t), f32),
            "expert": jax.ShapeDtypeStruct((b,), i32), "score_pos": jax.ShapeDtypeStruct((b, a), i32)}
    return {"forget": dict(side), "retain": dict(side)}


_DEFAULT = object()


def _traced(fn, mesh, activation_rules):
    from alter_jax.sharding import ACTIVATION_RULES, _Traced

    rules = None if activation_rules is _DEFAULT else activation_rules  # default: as the trainer (off)
    return fn if rules is None else _Traced(fn, mesh, rules)


def alter_step_program(cfg: ModelConfig, shape: StepShape, mesh, *, method: str = "alter", rules=None,
                       activation_rules=_DEFAULT):
    """``(jitted step, abstract args with shardings)`` of the sharded train step of ``method``, traced
    under ``activation_rules`` (default none, as the trainer; e.g. :data:`alter_jax.sharding.ACTIVATION_RULES`)."""
    from alter_jax.config import LossConfig, OptimConfig
    from alter_jax.sharding import PARTITION_RULES, abstract_tree, train_step_shardings
    from alter_jax.train.methods import get_method
    from alter_jax.train.optim import group_learning_rates, make_optimizer
    from alter_jax.train.step import Frozen, StepSettings, init_state, jit_train_step, split_model

    rules = PARTITION_RULES if rules is None else rules
    spec = get_method(method)
    graphdef, trainable, parts = split_model(abstract_adapted_model(cfg, shape), spec.trainable)
    frozen = Frozen(graphdef=graphdef, parts=parts, reference=None)
    optim = OptimConfig()
    tx = make_optimizer(group_learning_rates(spec, optim), optim)
    state = jax.eval_shape(lambda t: init_state(t, tx), trainable)
    batch = abstract_batch(shape)
    in_sh, out_sh = train_step_shardings(state, frozen, batch, mesh, rules)
    settings = StepSettings(method=spec, loss=LossConfig(), q=1.0, threshold=1.2, head_chunk=shape.head_chunk)
    step = jit_train_step(settings, tx, in_shardings=in_sh, out_shardings=out_sh, donate=True)
    args = tuple(abstract_tree(x, s) for x, s in zip((state, frozen, batch), in_sh))
    return _traced(step, mesh, activation_rules), args


def gated_generate_program(cfg: ModelConfig, shape: StepShape, mesh, *, prompt: int = 128, new_tokens: int = 32,
                           threshold: float = 1.2, q: float = 1.0, activation_rules=_DEFAULT):
    """``(jitted fn, abstract args)`` of entropy-gated generation (:func:`alter_jax.gated.gated_generate`'s
    two jitted parts in one program): ``per_side`` prompts of ``prompt`` tokens, ``new_tokens`` decoded."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from alter_jax.gated import EntropyCtxFn, _prefill_gate
    from alter_jax.generate import SamplingConfig, _generate
    from alter_jax.sharding import BATCH_AXES, abstract_tree, axis_sizes, fit_spec, state_shardings

    graphdef, state = nnx.split(abstract_adapted_model(cfg, shape))
    b = shape.per_side
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_ids[0]

    def gated_generate(state, ids, mask):
        gate = _prefill_gate(graphdef, state, ids, mask, jnp.float32(threshold), q=q)
        return _generate(graphdef, state, ids, mask, jax.random.key(0), cfg=SamplingConfig(new_tokens),
                         eos_ids=tuple(cfg.eos_token_ids), pad_id=int(pad), ctx_fn=EntropyCtxFn(q, threshold),
                         prefill_ctx=gate).tokens

    rows = NamedSharding(mesh, fit_spec(P(BATCH_AXES), (b, prompt), axis_sizes(mesh), where="prompts"))
    st_sh = state_shardings(state, mesh)
    fn = jax.jit(gated_generate, in_shardings=(st_sh, rows, rows), out_shardings=rows)
    ids = jax.ShapeDtypeStruct((b, prompt), jnp.int32, sharding=rows)
    return _traced(fn, mesh, activation_rules), (abstract_tree(state, st_sh), ids, ids)


def count_collectives(text: str) -> dict[str, int]:
    """Collective ops in an HLO module's text (``all-reduce(``, ``all-gather-start(`` …) or in a
    StableHLO module (``stablehlo.all_reduce`` …); async start/done pairs count once."""
    out = {}
    for c in COLLECTIVES:
        hlo = len(re.findall(rf"\s{re.escape(c)}(?:-start)?\(", text))
        shlo = len(re.findall(rf"{re.escape(_STABLEHLO[c])}\b", text))
        out[c] = hlo + shlo
    return out


def export_for(fn, args, platforms: tuple[str, ...]) -> dict[str, dict]:
    """Per platform: ``{"ok", "seconds", "collectives_stablehlo", "mlir_bytes"}`` or ``{"ok": False, "error"}``."""
    from jax import export

    from alter_jax.sharding import _Traced, activation_layout

    out = {}
    for plat in platforms:
        t0 = time.perf_counter()
        try:
            if isinstance(fn, _Traced):  # export needs the jax.jit itself; trace it under its layout
                with activation_layout(fn._mesh, fn._rules):
                    exp = export.export(fn.jitted, platforms=[plat])(*args)
            else:
                exp = export.export(fn, platforms=[plat])(*args)
            text = exp.mlir_module()
            out[plat] = {"ok": True, "seconds": time.perf_counter() - t0, "mlir_bytes": len(text),
                         "collectives_stablehlo": count_collectives(text), "devices": exp.nr_devices}
        except Exception as e:  # noqa: BLE001 - reported per platform, never hidden
            out[plat] = {"ok": False, "seconds": time.perf_counter() - t0,
                         "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
    return out


def compile_step(fn, args) -> dict[str, Any]:
    """Compile ``fn`` for the local backend on its mesh: collective counts of the partitioned HLO and
    ``memory_analysis()`` (peak = argument + output - aliased + temp bytes, per device)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    secs = time.perf_counter() - t0
    text = compiled.as_text()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"compile_s": secs, "collectives": count_collectives(text), "peak_bytes": int(peak),
            "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}


def planned_bytes(cfg: ModelConfig, shape: StepShape, mesh_sizes: dict, method: str = "alter") -> int:
    """:func:`alter_jax.plan.plan_memory`'s per-device total for the same step."""
    from alter_jax.config import MeshConfig
    from alter_jax.plan import plan_memory
    from alter_jax.train.methods import get_method

    plan = plan_memory(cfg, _adapter_cfg(shape), get_method(method), 2 * shape.per_side, shape.seq,
                       MeshConfig(**mesh_sizes), remat=shape.remat, head_chunk=shape.head_chunk,
                       scored_len=shape.scored)
    return int(plan.total)


def planner_vs_compiled(cfg: ModelConfig, shape: StepShape, mesh, activation_rules=_DEFAULT) -> dict[str, Any]:
    """Compile the sharded ALTER step on ``mesh`` (abstract inputs) and set its per-device peak
    beside the planner's estimate: ``ratio = planned / compiled``."""
    from alter_jax.sharding import axis_sizes

    step, args = alter_step_program(cfg, shape, mesh, activation_rules=activation_rules)
    c = compile_step(step, args)
    planned = planned_bytes(cfg, shape, axis_sizes(mesh))
    return {**c, "mesh": axis_sizes(mesh), "layers": cfg.num_layers, "planned_bytes": planned,
            "ratio": planned / c["peak_bytes"]}


def lower_all(cfg: ModelConfig, shape: StepShape, mesh, platforms: tuple[str, ...], *, compile_cpu: bool = True,
              prompt: int = 128, new_tokens: int = 32, log=print) -> dict[str, Any]:
    """Export the ALTER step and gated generation for ``platforms``; with ``compile_cpu`` also the
    per-step collectives after SPMD partitioning (CPU compile of the same programs)."""
    from alter_jax.sharding import axis_sizes

    out: dict[str, Any] = {"mesh": axis_sizes(mesh), "layers": cfg.num_layers, "params_b": cfg.num_params() / 1e9,
                           "attention_impl": cfg.attention_impl, "shape": dataclasses.asdict(shape)}
    progs = {"alter_step": alter_step_program(cfg, shape, mesh),
             "gated_generate": gated_generate_program(cfg, shape, mesh, prompt=prompt, new_tokens=new_tokens)}
    for name, (fn, args) in progs.items():
        log(f"[lower] {name}: exporting for {', '.join(platforms)} ...")
        entry = {"platforms": export_for(fn, args, platforms)}
        if compile_cpu:
            log(f"[lower] {name}: compiling for {jax.default_backend()} (collectives after partitioning) ...")
            entry["compiled_" + jax.default_backend()] = compile_step(fn, args)
        out[name] = entry
    out["ok"] = all(p["ok"] for n in progs for p in out[n]["platforms"].values())
    return out


def lower_verdict(result: dict) -> str:
    """One line: success per platform of both programs."""
    plats = list(result["alter_step"]["platforms"])
    parts = [f"{p}: " + ("OK" if all(result[n]["platforms"][p]["ok"] for n in ("alter_step", "gated_generate"))
                         else "FAILED") for p in plats]
    return "lowering ALTER step + gated generation: " + ", ".join(parts)


def format_lower(result: dict) -> str:
    n = result["params_b"]
    size = f"{n:.2f}B" if n >= 0.1 else f"{n * 1e3:.1f}M"
    lines = [f"lowering: {size} parameters, {result['layers']} layers, mesh {result['mesh']}, "
             f"attention {result['attention_impl']} (cuDNN needs cuDNN to lower)"]
    for name in ("alter_step", "gated_generate"):
        e = result[name]
        for plat, r in e["platforms"].items():
            if r["ok"]:
                n = sum(r["collectives_stablehlo"].values())
                lines.append(f"  {name:<15} {plat:<5} OK    ({r['seconds']:.1f} s, {r['mlir_bytes'] / 1e6:.1f} MB "
                             f"StableHLO, {n} explicit collectives: sharding annotations, partitioned by the compiler)")
            else:
                lines.append(f"  {name:<15} {plat:<5} FAILED  {r['error']}")
        for k, v in e.items():
            if k.startswith("compiled_"):
                counts = ", ".join(f"{c} {n}" for c, n in v["collectives"].items())
                how = (f"EXTRAPOLATED linearly from CPU compiles at {v['extrapolated_from_layers']} layers"
                       if "extrapolated_from_layers" in v else f"{k[9:]} compile, {v['compile_s']:.0f} s")
                lines.append(f"  {name:<15} collectives per call after SPMD partitioning ({how}; a loop body counts "
                             f"once): {counts}")
    lines.append(lower_verdict(result))
    return "\n".join(lines)


def summary_counts(result: dict) -> dict[str, Any]:
    """Flat figures for ``--json``."""
    flat: dict[str, Any] = {"lower_ok": result["ok"]}
    for name in ("alter_step", "gated_generate"):
        for plat, r in result[name]["platforms"].items():
            flat[f"lower_{name}_{plat}_ok"] = r["ok"]
        for k, v in result[name].items():
            if k.startswith("compiled_"):
                flat[f"lower_{name}_collectives"] = v["collectives"]
    return flat


def simulated_mesh(sizes: dict, devices=None):
    """A ``Mesh`` over the first ``data*fsdp*tensor`` devices (simulated CPU devices for lowering)."""
    from alter_jax.config import MeshConfig
    from alter_jax.sharding import make_mesh

    n = int(np.prod([sizes.get(a, 1) for a in ("data", "fsdp", "tensor")]))
    devs = jax.devices() if devices is None else devices
    if len(devs) < n:
        raise ValueError(f"mesh {sizes} needs {n} devices, {len(devs)} available: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    return make_mesh(MeshConfig(**{a: sizes.get(a, 1) for a in ("data", "fsdp", "tensor")}), devices=devs[:n])


def _fit_line(xs: list[int], ys: list[float], x: int) -> float:
    """Least-squares line through ``(xs, ys)`` evaluated at ``x`` (the value itself for one point)."""
    if len(set(xs)) < 2:
        return float(ys[0])
    slope, icpt = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(icpt + slope * x)


def lower_report(cfg: ModelConfig, shape: StepShape, sizes: dict, platforms: tuple[str, ...], *, layers: int,
                 devices=None, compile_layers: list[int] | None = (1, 2), prompt: int = 128, new_tokens: int = 32,
                 log=print) -> dict[str, Any]:
    """``bin/bench --what lower``: export both programs of the ``layers``-deep model for ``platforms``;
    count collectives after partitioning from CPU compiles at ``compile_layers`` layers, fitted
    linearly in the layer count and extrapolated to ``layers`` (``None``: compile the full depth)."""
    mesh = simulated_mesh(sizes, devices)
    full = lowering_config(cfg, num_layers=layers, remat=shape.remat)
    res = lower_all(full, shape, mesh, platforms, compile_cpu=compile_layers is None, prompt=prompt,
                    new_tokens=new_tokens, log=log)
    if compile_layers is not None:
        for name, build in (("alter_step", lambda c: alter_step_program(c, shape, mesh)),
                            ("gated_generate", lambda c: gated_generate_program(c, shape, mesh, prompt=prompt,
                                                                                new_tokens=new_tokens))):
            per = {}
            for n in compile_layers:
                log(f"[lower] {name}: compiling {n} layer(s) on CPU (collectives after partitioning) ...")
                per[n] = compile_step(*build(lowering_config(cfg, num_layers=n, remat=shape.remat)))
            xs = sorted(per)
            fitted = {c: int(round(_fit_line(xs, [per[n]["collectives"][c] for n in xs], layers))) for c in COLLECTIVES}
            res[name]["collectives_by_layers"] = {str(n): per[n]["collectives"] for n in xs}
            res[name]["compiled_cpu"] = {"collectives": fitted, "compile_s": sum(v["compile_s"] for v in per.values()),
                                         "extrapolated_from_layers": xs, "layers": layers}
    return res


def memory_report(cfg: ModelConfig, shape: StepShape, layer_counts: list[int], *, devices=None,
                  meshes: tuple[dict, ...] = ({"fsdp": 8}, {"tensor": 8}), log=print) -> dict[str, Any]:
    """``bin/bench --what memory``: planned vs compiled per-device bytes of the ALTER step per mesh
    and layer count; with several layer counts both are fitted linearly in the layer count and the
    ratio is also given at the shape's full depth (``extrapolated``)."""
    from alter_jax.sharding import ACTIVATION_RULES

    rows, out = [], {"shape": dataclasses.asdict(shape), "full_layers": cfg.num_layers, "meshes": []}
    for (sizes, variant) in [(m, v) for m in meshes for v in ("weights", "activations")]:
        mesh = simulated_mesh(sizes, devices)
        rules = ACTIVATION_RULES if variant == "activations" else None
        per = []
        for n in layer_counts:
            log(f"[memory] mesh {sizes}, {variant}: compiling the ALTER step with {n} layer(s) ...")
            r = planner_vs_compiled(lowering_config(cfg, num_layers=n, remat=shape.remat), shape, mesh,
                                    activation_rules=rules)
            per.append(r)
            rows.append(r)
            log(f"[memory]   planned {r['planned_bytes'] / 2**30:.2f} GiB, compiled {r['peak_bytes'] / 2**30:.2f} GiB, "
                f"ratio {r['ratio']:.3f} ({r['compile_s']:.0f} s)")
        entry = {"mesh": per[0]["mesh"], "by_layers": per, "variant": variant}
        xs = [r["layers"] for r in per]
        if cfg.num_layers not in xs:
            comp = _fit_line(xs, [r["peak_bytes"] for r in per], cfg.num_layers)
            plan = planned_bytes(lowering_config(cfg, remat=shape.remat), shape, per[0]["mesh"])
            entry["extrapolated"] = {"layers": cfg.num_layers, "compiled_bytes": comp, "planned_bytes": plan,
                                     "ratio": plan / comp, "from_layers": xs}
        out["meshes"].append(entry)
    return out


def format_memory(result: dict) -> str:
    lines = ["planner vs compiled (per-device peak = argument + output - aliased + temp; ratio = planned / compiled, "
             "goal 0.75-1.25); 'weights': parameters and batch sharded (the trainer's default), 'activations': "
             "+ sharding.ACTIVATION_RULES"]
    for e in result["meshes"]:
        for r in e["by_layers"]:
            lines.append(f"  mesh {e['mesh']} {e['variant']:<11} {r['layers']:>3} layers  planned {r['planned_bytes'] / 2**30:8.2f} GiB  "
                         f"compiled {r['peak_bytes'] / 2**30:8.2f} GiB  ratio {r['ratio']:.3f}")
        if "extrapolated" in e:
            x = e["extrapolated"]
            lines.append(f"  mesh {e['mesh']} {e['variant']:<11} {x['layers']:>3} layers  planned {x['planned_bytes'] / 2**30:8.2f} GiB  "
                         f"compiled {x['compiled_bytes'] / 2**30:8.2f} GiB  ratio {x['ratio']:.3f}  (compiled bytes "
                         f"EXTRAPOLATED linearly from {x['from_layers']} layers)")
    return "\n".join(lines)
