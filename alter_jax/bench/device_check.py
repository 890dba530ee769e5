"""``bin/bench --what device-check``: every accelerator-only figure in one command (<= 8 min on one GPU).

Parts, in this order (each records ``status`` = ``ok`` | ``skipped`` | ``failed`` and, when not
``ok``, the ``reason``; nothing is skipped silently):

1. **logits parity** of the bench model (``bench``: a 29M random Llama written once with
   transformers; ``tiny`` with ``--shape mfu-tiny``): our JAX forward vs transformers on the same
   device and weights, in float32 and in bfloat16 (both sides cast to bf16), max |Δ logit| and
   the argmax agreement;
2. **cuDNN vs XLA attention**: the bfloat16 forward with ``attention_impl="cudnn"`` against
   ``"xla"`` on the same weights (needs a CUDA GPU: skipped elsewhere);
3. **ALTER step tokens/s and MFU** for the 1B and 7B shapes (``--what mfu``'s
   :func:`alter_jax.bench.mfu.bench_mfu`: JAX ALTER, JAX LoRA, PyTorch + PEFT LoRA);
   ``--shape mfu-tiny`` runs the tiny shape instead (CPU tests);
4. **peak device memory vs the planner**: ``memory_stats()["peak_bytes_in_use"]`` after each
   shape's step part against :func:`alter_jax.plan.plan_memory` for its ALTER step (one device).
   The peak covers that whole part: the backbone once (the JAX steps share its arrays) plus the
   larger (ALTER) step's working set and both steps' small adapter/Adam states. Backends without
   memory statistics (CPU) are skipped with that reason; the compiled ``memory_analysis()`` of
   the same step is given beside the plan instead.

A time budget (``budget_s``, default 480 s) is checked before each part; a part that would start
past it is skipped with the reason "time budget".
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

ACCEL_SHAPES = ("llama-1b", "llama2-7b")


def _status(ok: bool, **kw) -> dict:
    return {"status": "ok" if ok else "failed", **kw}


def _skip(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _backend() -> str:
    import jax

    return jax.default_backend()


def logits_parity(model_name: str, batch: int, seq: int) -> dict:
    """JAX vs transformers logits on the default device, float32 and bfloat16."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from alter_jax.bench.models import resolve_bench_model, torch_model
    from alter_jax.io.hf import load_pretrained

    folder = resolve_bench_model(model_name)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"model": model_name, "device": str(jax.devices()[0]), "torch_device": str(dev)}
    tm32 = torch_model(folder).to(dev)
    vocab = tm32.config.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    for dtype in ("float32", "bfloat16"):
        model = load_pretrained(folder, dtype=dtype, param_dtype=dtype, attention_impl="xla")
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
        lj = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
        tm = tm32 if dtype == "float32" else torch_model(folder).to(dev, dtype=torch.bfloat16)
        with torch.no_grad():
            lt = tm(input_ids=torch.from_numpy(ids.astype(np.int64)).to(dev),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)).to(dev), use_cache=False).logits
        lt = lt.float().cpu().numpy()
        diff = float(np.max(np.abs(lj - lt)))
        scale = float(np.max(np.abs(lt)))
        out[dtype] = {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / max(scale, 1e-12),
                      "argmax_agree": float(np.mean(lj.argmax(-1) == lt.argmax(-1)))}
        del tm
    # float32 must agree to rounding; bf16 differs by its 8-bit mantissa (each side rounds elsewhere)
    ok = out["float32"]["rel"] < 1e-4 and out["bfloat16"]["rel"] < 5e-2
    return _status(ok, **out)


def attention_paths(model_name: str, batch: int, seq: int) -> dict:
    """cuDNN vs XLA attention (bfloat16) on the same weights; needs a CUDA GPU."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    if _backend() != "gpu":
        return _skip(f"cuDNN attention needs a CUDA GPU; the JAX backend here is {_backend()}")
    from alter_jax.bench.models import resolve_bench_model
    from alter_jax.io.hf import load_pretrained

    folder = resolve_bench_model(model_name)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 200, (batch, seq)).astype(np.int32))
    mask = jnp.ones_like(ids)
    logits = {}
    for impl in ("cudnn", "xla"):
        model = load_pretrained(folder, dtype="bfloat16", param_dtype="bfloat16", attention_impl=impl)
        graphdef, state = nnx.split(model)
        logits[impl] = np.asarray(jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))(state, ids, mask)
                                  .astype(jnp.float32))
    diff = float(np.max(np.abs(logits["cudnn"] - logits["xla"])))
    scale = float(np.max(np.abs(logits["xla"])))
    agree = float(np.mean(logits["cudnn"].argmax(-1) == logits["xla"].argmax(-1)))
    return _status(diff / max(scale, 1e-12) < 5e-2, max_abs_diff=diff, max_abs_logit=scale, argmax_agree=agree)


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def step_part(shape: str, batch: int, seq: int, steps: int, warmup: int, with_torch: bool) -> dict:
    """tokens/s and MFU of the ALTER / LoRA steps of ``shape`` (``--what mfu``), then its peak memory."""
    from alter_jax.bench.mfu import MfuSpec, bench_mfu
    from alter_jax.bench.suites import BenchSpec

    spec = BenchSpec(folder=None, batch=batch, seq=seq, steps=steps, warmup=warmup)
    rows, ratios, extra = bench_mfu(spec, MfuSpec(shape=shape, dtype="bfloat16" if _backend() != "cpu" else "float32"),
                                    with_torch=with_torch)
    out = {"rows": [{k: r[k] for k in ("name", "median_s", "tokens_per_s", "tflops_per_s", "mfu")} for r in rows],
           "ratios": ratios, "extra": extra}
    alter = next(r for r in rows if r["name"].startswith("JAX ALTER"))
    out["alter_tokens_per_s"], out["alter_mfu"] = alter["tokens_per_s"], alter["mfu"]
    if alter["mfu"] is None:
        out["mfu_reason"] = (f"no peak FLOP/s known for device kind {extra['device_kind']!r} (CPU, or pass "
                             "--peak-tflops): tokens/s only")
    return _status(True, **out)


def memory_part(shape: str, batch: int, seq: int, measured_peak: int | None) -> dict:
    """Measured peak device memory (or, on CPU, the compiled step's ``memory_analysis``) vs the plan."""
    from alter_jax.bench.lower import StepShape, alter_step_program, compile_step, lowering_config, planned_bytes
    from alter_jax.bench.mfu import shape_config
    from alter_jax.config import MeshConfig
    from alter_jax.sharding import make_mesh

    import jax

    dtype = "bfloat16" if _backend() != "cpu" else "float32"
    cfg = shape_config(shape, dtype)
    st = StepShape(per_side=batch // 2, seq=seq, rank=8, experts=2)
    plan = planned_bytes(cfg, st, {"data": 1, "fsdp": 1, "tensor": 1})
    out = {"planned_bytes": plan}
    if measured_peak is not None:
        out.update(measured_peak_bytes=measured_peak, ratio_planned_over_measured=plan / measured_peak)
        return _status(True, **out)
    out["measured"] = _skip(f"the {_backend()} backend reports no device memory statistics (memory_stats() is None)")
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    c = compile_step(*alter_step_program(lowering_config(cfg), st, mesh))
    out.update(compiled_peak_bytes=c["peak_bytes"], ratio_planned_over_compiled=plan / c["peak_bytes"])
    return _status(True, **out)


def device_check(shape: str | None = None, *, batch: int | None = None, seq: int | None = None, steps: int = 5,
                 warmup: int = 2, with_torch: bool = True, budget_s: float = 480.0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the four parts (module docstring). ``shape``: ``None`` = the 1B and 7B shapes on an
    accelerator; a named shape (``mfu-tiny`` for CPU tests) runs only that one."""
    import jax

    t0 = time.perf_counter()
    accel = _backend() != "cpu"
    shapes = list(ACCEL_SHAPES) if shape is None else [shape]
    tiny = shapes == ["mfu-tiny"]
    batch = (8 if accel and not tiny else 4) if batch is None else batch
    seq = (1024 if accel and not tiny else 32) if seq is None else seq
    parity_model = "tiny" if tiny else "bench"
    res: dict[str, Any] = {"backend": _backend(), "device_kind": jax.devices()[0].device_kind, "shapes": shapes,
                           "batch": batch, "seq": seq, "budget_s": budget_s, "parts": {}}
    if not accel and not tiny:
        res["note"] = "no accelerator: the 1B / 7B step parts would take hours on CPU; use --shape mfu-tiny here"

    def run(name: str, fn):
        left = budget_s - (time.perf_counter() - t0)
        if left <= 0:
            res["parts"][name] = _skip(f"time budget: {budget_s:.0f} s used before this part")
            return res["parts"][name]
        log(f"[device-check] {name} ...")
        t = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
            r = {"status": "failed", "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        r["seconds"] = time.perf_counter() - t
        res["parts"][name] = r
        return r

    run("logits_parity", lambda: logits_parity(parity_model, 4 if tiny or not accel else 8, 64 if tiny else 128))
    run("attention_cudnn_vs_xla", lambda: attention_paths(parity_model, 4, 128))
    for s in shapes:
        if not accel and not tiny:
            res["parts"][f"step_{s}"] = _skip("no accelerator (JAX backend cpu): a 1B / 7B step is not run on CPU")
            res["parts"][f"memory_{s}"] = _skip("no accelerator (JAX backend cpu)")
            continue
        run(f"step_{s}", lambda s=s: step_part(s, batch, seq, steps, warmup, with_torch))
        peak = _peak_bytes()
        run(f"memory_{s}", lambda s=s, peak=peak: memory_part(s, batch, seq, peak))
    res["wall_s"] = time.perf_counter() - t0
    res["ok"] = not any(p["status"] == "failed" for p in res["parts"].values())
    return res


def format_device_check(res: dict) -> str:
    lines = [f"device-check on {res['backend']} ({res['device_kind']}), shapes {', '.join(res['shapes'])}, "
             f"batch {res['batch']} x seq {res['seq']}, {res['wall_s']:.0f} s"]
    for name, p in res["parts"].items():
        head = f"  {name:<26} {p['status'].upper():<8}"
        if p["status"] != "ok":
            lines.append(f"{head} {p.get('reason', '')}")
            continue
        if name == "logits_parity":
            lines.append(f"{head} float32 max|Δ| {p['float32']['max_abs_diff']:.2e} (argmax agree "
                         f"{p['float32']['argmax_agree']:.3f}), bf16 max|Δ| {p['bfloat16']['max_abs_diff']:.2e} "
                         f"(argmax agree {p['bfloat16']['argmax_agree']:.3f})")
        elif name.startswith("attention"):
            lines.append(f"{head} max|Δ| {p['max_abs_diff']:.2e}, argmax agree {p['argmax_agree']:.3f}")
        elif name.startswith("step_"):
            mfu = "n/a" if p["alter_mfu"] is None else f"{p['alter_mfu']:.1%}"
            lines.append(f"{head} ALTER {p['alter_tokens_per_s']:.0f} tokens/s, MFU {mfu}"
                         + (f" ({p['mfu_reason']})" if "mfu_reason" in p else ""))
        elif name.startswith("memory_"):
            if "measured_peak_bytes" in p:
                lines.append(f"{head} planned {p['planned_bytes'] / 2**30:.2f} GiB, measured peak "
                             f"{p['measured_peak_bytes'] / 2**30:.2f} GiB, ratio {p['ratio_planned_over_measured']:.3f}")
            else:
                lines.append(f"{head} planned {p['planned_bytes'] / 2**20:.1f} MiB, compiled "
                             f"{p['compiled_peak_bytes'] / 2**20:.1f} MiB (ratio "
                             f"{p['ratio_planned_over_compiled']:.3f}); measured: {p['measured']['reason']}")
    return "\n".join(lines)
