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

WHAT = ("forward", "step", "generate", "epoch", "mfu")
ALL = ("forward", "step", "generate")
#: ``--what epoch`` figures written at the top level of ``--json``.
EPOCH_KEYS = ("ours_lora_over_torch_time", "alter_over_ours_lora_time", "first_step_s", "first_step_warm_s", "tokens_per_s")  # "all": the CPU-sized parts; mfu is asked for by name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="all", help="comma list of forward, step, generate, or all (default: %(default)s)")
    p.add_argument("--model", default="bench", help="bench | tiny | smollm2 | a HF folder / registry name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="batch rows (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="sequence length; the prompt length for generate (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per variant; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before timing (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="generate: tokens generated per row (default: %(default)s)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--experts", type=int, default=2, help="ALTER forget experts N (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side of 'step' and 'mfu' (JAX ratios only)")
    p.add_argument("--shape", default="llama-1b", help="mfu: model shape, llama-1b | llama2-7b | mfu-tiny (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="mfu: compute and weight dtype (default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="mfu: rematerialise each layer (jax.checkpoint; gradient checkpointing in PyTorch)")
    p.add_argument("--peak-tflops", type=float, default=None, help="mfu: the device's peak dense TFLOP/s, if not in the built-in table")
    p.add_argument("--tofu-dir", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"),
                   help="epoch: the TOFU folder the SmolLM2 study reads (default: %(default)s)")
    p.add_argument("--length-bucket", type=int, default=32, help="epoch: our trainer's model.length_bucket (default: %(default)s)")
    p.add_argument("--no-first-step", action="store_true", help="epoch: skip the cold/warm first-step subprocesses")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure to this JSON file")
    return p


def parse_what(text: str) -> list[str]:
    parts = [w.strip() for w in text.split(",") if w.strip()]
    if parts == ["all"]:
        return list(ALL)
    bad = [w for w in parts if w not in WHAT]
    if bad or not parts:
        raise CliError(f"--what {text!r}: unknown part(s) {bad}; choose from {', '.join(WHAT)} or all")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    what = parse_what(args.what)
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
