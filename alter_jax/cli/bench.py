"""``bin/bench``: speed figures, measured in one process with the compared sides interleaved.

    bin/bench                                   # everything on the ~29M-parameter random Llama, batch 4 x 128
    bin/bench --what forward --model smollm2 --steps 10
    bin/bench --what step,generate --json bench.json

What is measured (median of ``--steps`` timed calls after ``--warmup`` calls; the first
call's time, compile included, is reported as "first s"):

* ``forward``  — jitted JAX forward vs transformers (float32, ``torch.no_grad``), tokens/s.
* ``step``     — one optimizer step: JAX ALTER (struct penalty ``drift``, and ``none``), JAX
  plain LoRA (``lora_gd``), PyTorch + PEFT LoRA (r=8, the 7 projections, AdamW).
  Goals: (a) JAX ALTER <= 0.7 x PyTorch LoRA time; (b) JAX ALTER <= 1.15 x JAX LoRA time.
* ``generate`` — entropy-gated generation vs merged-weights generation, tokens/s;
  goal (c) gated >= 0.9 x merged.
* ``epoch``    — one unlearning epoch on the SmolLM2 study's forget/retain rows
  (``alter_jax.bench.epoch``): ours LoRA-GD and ALTER (batches as ``bin/unlearn`` makes them:
  length buckets, scored-token head) vs transformers + PEFT LoRA-GD padded to each batch's
  longest, interleaved; plus the first ALTER step in a fresh process, cold and warm
  persistent compilation cache. Goals: ours / PyTorch <= 0.7, ALTER / ours LoRA-GD <= 1.25,
  first step cold <= 15 s, warm <= 3 s. Needs ``--tofu-dir``. Not part of ``all``.

    bin/bench --what epoch --model smollm2 --json epoch.json

* ``mfu``      — (d) for accelerators: JAX ALTER and LoRA steps and the PyTorch + PEFT LoRA
  step on a random-weight model of shape ``--shape`` (llama-1b, llama2-7b) in ``--dtype``
  (bfloat16), built on the device; tokens/s, TFLOP/s and model FLOP utilisation
  (``alter_jax.bench.mfu`` gives the FLOP convention and the peak table). Goal: ALTER MFU
  >= 0.4 for llama2-7b. Not part of ``all``.

    bin/bench --what mfu --shape llama2-7b --batch 8 --seq 1024

* ``lower``    — the full ALTER train step and the entropy-gated generation of ``--shape``, sharded
  on ``--mesh`` (default fsdp=8, simulated CPU devices), lowered with ``jax.export`` for
  ``--platforms`` (default cuda,tpu) from abstract inputs only (no weights; XLA attention, as the
  cuDNN path needs cuDNN to lower); success per platform and the collectives per call after SPMD
  partitioning (``alter_jax.bench.lower``), counted on CPU compiles of ``--compile-layers`` (default
  1,2) layers and fitted linearly to the full depth (``all``: compile it; > 20 min at 7B on 2 cores).
  ``--batch`` rows (half forget), default 16.

    bin/bench --what lower --shape llama2-7b --platforms cuda,tpu

* ``memory``   — planner vs compiler: compiles (never runs) the sharded ALTER step of ``--shape`` on
  fsdp=N and tensor=N (N = 8 simulated devices) with ``--layers`` layers and sets
  ``memory_analysis()``'s per-device peak beside ``alter_jax.plan``'s estimate (ratio planned /
  compiled, goal within 25 %), with and without ``sharding.ACTIVATION_RULES``. A comma list of
  layer counts (default 1,2,4 for deeper shapes) fits peak = a + b·L per mesh and extrapolates to
  the shape's full depth (stated as such in the output). On XLA:CPU bf16 dots run in float32: use
  ``--dtype float32`` to check the plan's structure.

    bin/bench --what memory --shape llama2-7b --dtype float32 --batch 16 --seq 1024

* ``device-check`` — the day an accelerator is there, in one command (``alter_jax.bench.device_check``):
  JAX vs PyTorch logits on the device (float32, bfloat16), cuDNN vs XLA attention, the 1B / 7B
  ALTER step tokens/s and MFU (``mfu``), peak device memory vs the planner. Parts that need an
  accelerator are skipped on CPU with the reason in ``--json``; ``--shape mfu-tiny`` for a CPU test.

    bin/bench --what device-check --json device_check.json

Models: ``bench`` (default; random Llama-shaped, ~29M parameters, written once with
transformers into the cache so both sides load the same weights), ``tiny`` (for tests),
``smollm2`` (the registry's smollm2-135m-instruct), or a Hugging Face folder.
Timings on a shared CPU are noisy: compare ratios, and look at the spread column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from alter_jax.cli.common import CliError

WHAT = ("forward", "step", "generate", "epoch", "mfu", "lower", "memory", "device-check")
#: parts with their own driver and output (one at a time)
SOLO = ("lower", "memory", "device-check")
ALL = ("forward", "step", "generate")
#: ``--what epoch`` figures written at the top level of ``--json``.
EPOCH_KEYS = ("ours_lora_over_torch_time", "alter_over_ours_lora_time", "first_step_s", "first_step_warm_s", "tokens_per_s")  # "all": the CPU-sized parts; mfu is asked for by name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="all", help="comma list of forward, step, generate, or all (default: %(default)s)")
    p.add_argument("--model", default="bench", help="bench | tiny | smollm2 | a HF folder / registry name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="batch rows (default: 4; lower / memory: 16)")
    p.add_argument("--seq", type=int, default=None, help="sequence length; the prompt length for generate "
                   "(default: 128; lower / memory: 1024)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per variant; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before timing (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="generate: tokens generated per row (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--experts", type=int, default=2, help="ALTER forget experts N (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side of 'step' and 'mfu' (JAX ratios only)")
    p.add_argument("--shape", default=None, help="mfu / lower / memory / device-check: model shape, llama-1b | llama2-7b | "
                   "mfu-tiny (default: mfu llama-1b, lower and memory llama2-7b, device-check both 1B and 7B)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="mfu: compute and weight dtype (default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="mfu: rematerialise each layer (jax.checkpoint; gradient checkpointing in PyTorch)")
    p.add_argument("--peak-tflops", type=float, default=None, help="mfu: the device's peak dense TFLOP/s, if not in the built-in table")
    p.add_argument("--tofu-dir", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"),
                   help="epoch: the TOFU folder the SmolLM2 study reads (default: %(default)s)")
    p.add_argument("--length-bucket", type=int, default=32, help="epoch: our trainer's model.length_bucket (default: %(default)s)")
    p.add_argument("--no-first-step", action="store_true", help="epoch: skip the cold/warm first-step subprocesses")
    p.add_argument("--platforms", default="cuda,tpu", help="lower: comma list of jax.export platforms (default: %(default)s)")
    p.add_argument("--mesh", default="fsdp=8", help="lower: mesh sizes, e.g. fsdp=8 or data=2,fsdp=2,tensor=2 (default: %(default)s)")
    p.add_argument("--layers", default=None, help="lower / memory: layer count(s) instead of the shape's (memory: comma list, fitted)")
    p.add_argument("--compile-layers", default="1,2", help="lower: layer counts compiled on CPU to count collectives, "
                   "fitted linearly to the full depth; 'all' compiles the full model (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=128, help="lower: prompt tokens of the gated generation (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    return p


def parse_what(text: str) -> list[str]:
    parts = [w.strip() for w in text.split(",") if w.strip()]
    if parts == ["all"]:
        return list(ALL)
    bad = [w for w in parts if w not in WHAT]
    if bad or not parts:
        raise CliError(f"--what {text!r}: unknown part(s) {bad}; choose from {', '.join(WHAT)} or all")
    solo = [w for w in parts if w in SOLO]
    if solo and len(parts) > 1:
        raise CliError(f"--what {text!r}: {solo[0]} runs alone (its own driver and output); give it by itself")
    return [w for w in WHAT if w in parts]


def environment() -> dict:
    import jax
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def format_table(result: dict) -> str:
    """Plain-text table of the result rows and ratio rows."""
    env, m = result["environment"], result["settings"]
    lines = [f"bin/bench  {env['date']}  {env['host']}  jax {env['jax']} ({env['jax_backend']}), torch {env['torch']} "
             f"({env['torch_threads']} threads), {env['cpu_count']} CPUs",
             f"model {m['model']} ({m['params_m']:.1f}M params)  batch {m['batch']} x seq {m['seq']}  "
             f"median of {m['steps']} (after {m['warmup']} warm-up)  imports: {m.get('import_order')}",
             "",
             f"{'section':<11} {'variant':<36} {'first s':>8} {'median s':>9} {'tokens/s':>10} {'spread':>7}"]
    for r in result["rows"]:
        mfu = ""
        if "tflops_per_s" in r:
            mfu = f"  {r['tflops_per_s']:.1f} TFLOP/s" + ("" if r["mfu"] is None else f"  MFU {r['mfu']:.1%}")
        lines.append(f"{r['section']:<11} {r['name']:<36} {r['compile_s']:8.3f} {r['median_s']:9.4f} "
                     f"{r['tokens_per_s']:10.1f} {r['spread']:7.2f}{mfu}")
    lines += ["", f"{'ratio':<56} {'value':>7} {'goal':>8}  met"]
    for r in result["ratios"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['name']:<56} {r['value']:7.3f} {r['goal'] or '':>8}  {met}")
    extra = {k: v for k, v in result["extra"].items()}
    if extra:
        lines += ["", "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())]
    lines.append("(generate: tokens/s counts generated tokens; 'prefill only' rows count one token per row; "
                 "spread = (max-min)/median of the timed calls)")
    return "\n".join(lines)


def run_bench(what: list[str], spec, *, with_torch: bool = True, mfu=None, epoch: dict | None = None, log=print) -> dict:
    from alter_jax.bench.mfu import MfuSpec, bench_mfu
    from alter_jax.bench.suites import SUITES

    rows, ratios, extra = [], [], {}
    for w in what:
        log(f"[bench] {w} ...")
        if w == "mfu":
            r, q, e = bench_mfu(spec, mfu or MfuSpec(), with_torch=with_torch)
        elif w == "epoch":
            from alter_jax.bench.epoch import bench_epoch

            r, q, e = bench_epoch(spec, with_torch=with_torch, **(epoch or {}))
        else:
            kw = {"with_torch": with_torch} if w == "step" else {}
            r, q, e = SUITES[w](spec, **kw)
        rows += r
        ratios += q
        extra.update(e)
    return {"rows": rows, "ratios": ratios, "extra": extra}


def import_torch_first() -> str:
    """Import PyTorch before JAX. Measured on this 2-core machine: with ``jax`` imported
    first, PyTorch's OpenMP workers stall (PEFT LoRA step on the bench model 5.5 s instead
    of 0.35 s; tiny model 0.75 s instead of 0.004 s); ``OMP_WAIT_POLICY=PASSIVE`` avoids the
    stall but costs PyTorch ~30 %. Imported first, PyTorch runs as fast as alone.
    Returns the order in effect (recorded with the figures)."""
    if "jax" in sys.modules and "torch" not in sys.modules:
        print("warning: jax was imported before torch; PyTorch timings will be far too slow", file=sys.stderr)
        return "jax first (PyTorch timings unreliable)"
    import torch  # noqa: F401

    return "torch first"


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=8"`` / ``"data=2,fsdp=2,tensor=2"`` -> ``{"data", "fsdp", "tensor"}`` sizes."""
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, val = part.partition("=")
        if name not in out or not val.isdigit() or int(val) < 1:
            raise CliError(f"--mesh {text!r}: use axis=size pairs over data, fsdp, tensor (e.g. fsdp=8)")
        out[name] = int(val)
    return out


def _mesh_devices(text: str) -> int:
    sizes = parse_mesh(text)
    return sizes["data"] * sizes["fsdp"] * sizes["tensor"]


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise CliError(f"{flag} {text!r}: give positive integers, e.g. 1,2,4")
    return vals


def _simulate_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices (before JAX starts; a larger count already set is kept)."""
    import re as _re

    flags = os.environ.get("XLA_FLAGS", "")
    m = _re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if m and int(m.group(1)) >= n:
        return
    if "jax" in sys.modules:
        return  # too late to change; the drivers say how many devices they need
    flags = _re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main_solo(part: str, args, order: str) -> int:
    """``lower``, ``memory`` and ``device-check`` (module docstring)."""
    from alter_jax.bench.mfu import SHAPES, shape_config

    if args.shape is None and part != "device-check":
        args.shape = "llama2-7b"
    if args.shape is not None and args.shape not in SHAPES:
        raise CliError(f"--shape {args.shape!r}: choose from {', '.join(SHAPES)}")
    batch = 16 if args.batch is None else args.batch
    seq = (1024 if part != "device-check" else 128) if args.seq is None else args.seq
    if part != "device-check" and (batch < 2 or batch % 2):
        raise CliError(f"--batch {batch}: give an even number >= 2 (half forget, half retain rows)")
    if part == "device-check":
        from alter_jax.bench.device_check import device_check, format_device_check

        result = device_check(args.shape, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                              with_torch=not args.no_torch, log=lambda s: print(s, file=sys.stderr))
        print(format_device_check(result))
    else:
        import jax

        from alter_jax.bench import lower as LW

        cfg = shape_config(args.shape, args.dtype)
        if seq > cfg.max_position_embeddings:
            raise CliError(f"--seq {seq} exceeds {args.shape}'s max_position_embeddings")
        shape = LW.StepShape(per_side=batch // 2, seq=seq, rank=args.rank, experts=args.experts, remat=args.remat)
        cpu = jax.devices("cpu")
        if part == "lower":
            sizes = parse_mesh(args.mesh)
            layers = cfg.num_layers if args.layers is None else _int_list(args.layers, "--layers")[0]
            platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
            result = LW.lower_report(cfg, shape, sizes, platforms, layers=layers, devices=cpu,
                                     compile_layers=None if args.compile_layers == "all"
                                     else _int_list(args.compile_layers, "--compile-layers"),
                                     prompt=args.prompt, new_tokens=args.new_tokens,
                                     log=lambda s: print(s, file=sys.stderr))
            print(LW.format_lower(result))
        else:
            # default: 1, 2, 4 layers fitted to the full depth (a 32-layer CPU compile took > 20 min)
            layers = (([1, 2, 4] if cfg.num_layers > 4 else [cfg.num_layers]) if args.layers is None
                      else _int_list(args.layers, "--layers"))
            result = LW.memory_report(cfg, shape, layers, devices=cpu, log=lambda s: print(s, file=sys.stderr))
            print(LW.format_memory(result))
    result["environment"] = environment()
    result["settings"] = {"what": part, "shape": args.shape, "batch": result.get("batch", batch),
                          "seq": result.get("seq", seq), "import_order": order}
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    what = parse_what(args.what)
    if what[0] in SOLO:
        if what[0] == "device-check":  # JAX and PyTorch share the accelerator, as for mfu
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if what[0] in ("lower", "memory"):
            _simulate_cpu_devices(8 if what[0] == "memory" else max(8, _mesh_devices(args.mesh)))
        order = import_torch_first()
        return main_solo(what[0], args, order)
    args.batch = 4 if args.batch is None else args.batch
    args.shape = "llama-1b" if args.shape is None else args.shape
    args.seq = 128 if args.seq is None else args.seq
    if "mfu" in what:  # JAX and PyTorch share the accelerator: no JAX pre-allocation of 75 % of its memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    order = import_torch_first()
    for name in ("batch", "seq", "steps", "warmup", "new_tokens", "rank", "experts"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for part in ("step", "mfu"):
        if part in what and args.batch < 2:
            raise CliError(f"--batch must be >= 2 for '{part}' (half forget, half retain rows)")
    from alter_jax.bench.mfu import SHAPES, MfuSpec, shape_config
    from alter_jax.bench.models import resolve_bench_model
    from alter_jax.bench.suites import BenchSpec
    from alter_jax.io.hf import load_config

    if "mfu" in what:
        if args.shape not in SHAPES:
            raise CliError(f"--shape {args.shape!r}: choose from {', '.join(SHAPES)}")
        if args.seq > shape_config(args.shape).max_position_embeddings:
            raise CliError(f"--seq {args.seq} exceeds {args.shape}'s max_position_embeddings")
    folder = None
    if any(w != "mfu" for w in what):
        try:
            folder = resolve_bench_model(args.model)
            cfg = load_config(folder)
        except (ValueError, OSError) as e:
            raise CliError(f"--model {args.model}: {e}") from None
    else:
        cfg = shape_config(args.shape, args.dtype)
    if args.seq + args.new_tokens > cfg.max_position_embeddings and "generate" in what:
        raise CliError(f"--seq {args.seq} + --new-tokens {args.new_tokens} exceed the model's "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    spec = BenchSpec(folder=None if folder is None else Path(folder), batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                     rank=args.rank, forget_experts=args.experts, new_tokens=args.new_tokens)
    mfu = MfuSpec(shape=args.shape, dtype=args.dtype, remat=args.remat, peak_tflops=args.peak_tflops)
    epoch = {"tofu_dir": args.tofu_dir, "length_bucket": args.length_bucket, "first_step": not args.no_first_step}
    result = run_bench(what, spec, with_torch=not args.no_torch, mfu=mfu, epoch=epoch,
                       log=lambda s: print(s, file=sys.stderr))
    result["environment"] = environment()
    result["settings"] = {"model": args.model if folder is not None else args.shape, "folder": str(folder), "params_m": cfg.num_params() / 1e6,
                          "import_order": order, "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                          "new_tokens": args.new_tokens, "rank": args.rank, "experts": args.experts, "what": what}
    print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        flat = {k: result["extra"][k] for k in EPOCH_KEYS if k in result["extra"]}  # the epoch figures at top level
        out.write_text(json.dumps({**flat, **result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
