"""``bin/finetune``: full-parameter fine-tuning on a TOFU-layout split (TOFU's "full" / "retain" models).

    bin/finetune --model smollm2-135m-instruct --data locuslab/TOFU --split full --out models/tofu_full
    bin/finetune --model demo-tiny --data demo --split retain75 --out models/demo_retain --lr 2e-3 --epochs 3

Next-token NLL on the answer tokens (question masked, as TOFU), AdamW with a linear
warm-up (one epoch by default, TOFU's recipe) and linear decay, one jitted step
(:func:`alter_jax.train.finetune.finetune`). The result is a Hugging Face folder with the
tokenizer (:func:`alter_jax.io.hf.save_pretrained`) that transformers and every
``--model`` option of alter-jax load, plus ``finetune.json`` (settings and losses).

``--data`` is a local TOFU-layout folder, a hub id (``locuslab/TOFU``), ``demo`` (the demo
world's authors) or ``synthetic`` (fictitious authors written into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from alter_jax.cli.common import CliError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, hub id, registry name (smollm2-135m-instruct), .gguf or demo-tiny")
    p.add_argument("--data", default="locuslab/TOFU", help="TOFU-layout folder, hub id, 'demo' or 'synthetic' (default: %(default)s)")
    p.add_argument("--split", default="full", help="split to train on: full, retain90, ... (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (a Hugging Face model folder with tokenizer)")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default: %(default)s, TOFU)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: %(default)s, TOFU)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example, prompt + answer (default: %(default)s)")
    p.add_argument("--prompt-format", default="auto", help="prompt format: auto, plain, llama2, chat, chatml, llama3, zephyr")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s, TOFU)")
    p.add_argument("--warmup-frac", type=float, default=None, help="fraction of steps with linear warm-up (default: one epoch)")
    p.add_argument("--num-rows", type=int, default=0, help="use only the first N rows of the split (0 = all)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise CliError(f"--lr must be > 0, got {args.lr}")
    if args.warmup_frac is not None and not 0.0 <= args.warmup_frac < 1.0:
        raise CliError(f"--warmup-frac must be in [0, 1), got {args.warmup_frac}")
    if args.num_rows < 0:
        raise CliError(f"--num-rows must be >= 0, got {args.num_rows}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


def load_rows(source: str, split: str, tmp: Path) -> list[dict]:
    """Rows of ``split`` from a TOFU source; ``demo`` / ``synthetic`` as :func:`alter_jax.train.loop.load_rows`."""
    from alter_jax.data.tofu import load_tofu_split

    if source == "demo":
        from alter_jax.demo import ensure_demo_model

        source = str(ensure_demo_model().parent / "data")
    elif source == "synthetic":
        from alter_jax.data.synthetic import write_tofu_folder

        write_tofu_folder(tmp / "data", seed=0)
        source = str(tmp / "data")
    return load_tofu_split(split, source)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check_args(args)
    from alter_jax.io.hf import load_pretrained, load_tokenizer, save_pretrained
    from alter_jax.train.finetune import finetune
    from alter_jax.train.loop import resolve_run_model
    from alter_jax.train.prepare import encode

    t0 = time.perf_counter()
    try:
        folder = resolve_run_model(args.model)
        model = load_pretrained(folder, dtype=args.dtype)
        tok = load_tokenizer(folder)
    except (ValueError, OSError) as e:  # resolution / checkpoint errors carry the file and the fix
        raise CliError(f"--model {args.model}: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rows = load_rows(args.data, args.split, Path(tmp))
        except (ValueError, OSError) as e:
            raise CliError(f"--data {args.data} --split {args.split}: {e}") from None
    if args.num_rows:
        rows = rows[: args.num_rows]
    if not rows:
        raise CliError(f"--data {args.data} --split {args.split}: no rows")
    try:
        arrays = encode(tok, rows, args.prompt_format, args.max_length)
    except ValueError as e:
        raise CliError(f"--prompt-format {args.prompt_format}: {e}") from None
    answered = int((arrays["labels"] != -100).any(axis=1).sum())
    if answered == 0:
        raise CliError(f"--max-length {args.max_length} cuts off every answer; raise it")
    print(f"model {folder} ({model.cfg.num_params() / 1e6:.1f}M params); {len(rows)} rows of {args.split!r} "
          f"({answered} with answer tokens within {args.max_length} tokens)")
    warmup = args.warmup_frac if args.warmup_frac is not None else (1.0 / args.epochs if args.epochs > 1 else 0.1)
    model, losses = finetune(model, arrays, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             weight_decay=args.weight_decay, warmup_frac=warmup, seed=args.seed,
                             progress=not args.no_progress, desc=f"finetune[{args.split}]")
    out = save_pretrained(model, args.out, tokenizer=tok)
    info = {"model": str(folder), "data": args.data, "split": args.split, "rows": len(rows), "epochs": args.epochs,
            "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
            "prompt_format": args.prompt_format, "weight_decay": args.weight_decay, "warmup_frac": warmup,
            "seed": args.seed, "steps": len(losses), "first_loss": losses[0] if losses else None,
            "final_loss": float(sum(losses[-5:]) / len(losses[-5:])) if losses else None, "losses": losses,
            "wall_s": time.perf_counter() - t0}
    (Path(out) / "finetune.json").write_text(json.dumps(info, indent=2))
    print(f"{len(losses)} steps, loss {info['first_loss']:.4f} -> {info['final_loss']:.4f}; saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
