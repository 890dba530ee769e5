"""``evaluate``: evaluation commands (one subcommand each).

    bin/evaluate tofu-aggregate --logs DIR [--retain-logs DIR] [--json]
    bin/evaluate tofu --model PATH --out DIR [--data SRC] [--forget-split forget10] ...

Subcommands live in a registry so other modules can add theirs (``mcq``, ``muse``, ...):

    from alter_jax.cli.evaluate import subcommand

    @subcommand("mcq", help="multiple-choice accuracy")
    def _mcq_args(p):            # fills the subparser
        p.add_argument(...)
        return run_mcq           # run(args) -> int exit code

User errors (``ValueError`` subclasses with a message, ``FileNotFoundError``) print
``error: ...`` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

Runner = Callable[[argparse.Namespace], int]
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register a subcommand: the decorated function fills its parser and returns the runner."""

    def deco(fn: Callable[[argparse.ArgumentParser], Runner]):
        _SUBCOMMANDS[name] = (help, fn)
        return fn

    return deco


# ------------------------------------------------------------------ tofu-aggregate


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2e}" if (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"


@subcommand("tofu-aggregate", help="Forget Quality and Model Utility from TOFU log folders")
def _tofu_aggregate_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--logs", required=True, help="folder with eval_log_forget.json, eval_log.json, "
                   "eval_real_author_wo_options.json, eval_real_world_wo_options.json (ours or TOFU's)")
    p.add_argument("--retain-logs", default=None, help="the retain model's log folder (for Forget Quality)")
    p.add_argument("--json", action="store_true", help="print one JSON object "
                   "(forget_quality, model_utility, parts, forget, ks_statistic)")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.tofu import aggregate

        res = aggregate(args.logs, args.retain_logs)
        if args.json:
            print(json.dumps(res))
            return 0
        print(f"logs: {args.logs}")
        if args.retain_logs:
            print(f"Forget Quality (KS p-value vs {args.retain_logs}): {_fmt(res['forget_quality'])}"
                  f"  (KS statistic {_fmt(res['ks_statistic'])})")
        else:
            print("Forget Quality: n/a (pass --retain-logs)")
        print(f"Model Utility: {_fmt(res['model_utility'])}")
        for k, v in res["parts"].items():
            print(f"  {k:<26} {_fmt(v)}")
        for k, v in res["forget"].items():
            print(f"  {k:<26} {_fmt(v)}")
        return 0

    return run


# ----------------------------------------------------------------------------- tofu

TOFU_DEFAULTS = {"data": "locuslab/TOFU", "forget_split": "forget10", "prompt_format": "auto"}


def tofu_settings(args: argparse.Namespace) -> dict:
    """Fill ``--data / --forget-split / --prompt-format`` left unset: from the run's own config with
    ``--run`` (a run is scored as it was trained and measured), else the TOFU defaults. Sets them on
    ``args`` and returns ``{"from": {key: "--flag" | "run" | "default"}}``."""
    run_cfg = None
    if getattr(args, "run", None):
        from pathlib import Path

        from alter_jax import config as C

        cfg_file = Path(args.run) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{args.run}: not a run folder (no config.json); pass the output_dir of bin/unlearn")
        run_cfg = C.build(json.loads(cfg_file.read_text())["config"])
        if run_cfg.data.kind != "qa":
            raise ValueError(f"--run {args.run}: the run trained on plain text (data.kind={run_cfg.data.kind!r}); TOFU "
                             "scores question/answer rows: pass --data and --forget-split of a TOFU source")
    src = {}
    for key, default in TOFU_DEFAULTS.items():
        if getattr(args, key) is not None:
            src[key] = "--" + key.replace("_", "-")
        elif run_cfg is not None:
            from pathlib import Path

            from alter_jax.train.loop import resolve_data_source

            value = {"data": lambda: resolve_data_source(run_cfg.data, Path(args.run)),
                     "forget_split": lambda: run_cfg.data.forget_split,
                     "prompt_format": lambda: run_cfg.model.prompt_format}[key]()
            setattr(args, key, value)
            src[key] = "run"
        else:
            setattr(args, key, default)
            src[key] = "default"
    return {"from": src}



@subcommand("tofu", help="run the TOFU evaluation on a model (writes legacy logs + summary.json)")
def _tofu_args(p: argparse.ArgumentParser) -> Runner:
    _model_args(p)
    p.add_argument("--out", required=True, help="output folder for the logs")
    p.add_argument("--data", default=None, help="TOFU folder or hub id (default: the run's data.source with --run, "
                   f"else {TOFU_DEFAULTS['data']})")
    p.add_argument("--forget-split", default=None, help="forget01 / forget05 / forget10 (default: the run's "
                   f"data.forget_split with --run, else {TOFU_DEFAULTS['forget_split']})")
    p.add_argument("--prompt-format", default=None, help="auto, llama2, chat, chatml, llama3, zephyr, plain (default: "
                   f"the run's model.prompt_format with --run, else {TOFU_DEFAULTS['prompt_format']})")
    p.add_argument("--ds-size", type=int, default=300, help="first N rows per split, as TOFU (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=200, help="scoring length (prompt + answer)")
    p.add_argument("--generation-max-length", type=int, default=200, help="prompt + generated tokens")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--retain-logs", default=None, help="retain model's log folder (for Forget Quality)")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.eval.tofu import evaluate_tofu

        used = tofu_settings(args)
        print("settings: " + ", ".join(f"{k} {getattr(args, k)} ({used['from'][k]})" for k in TOFU_DEFAULTS), file=sys.stderr)
        logits_fn, generate_fn, tok = _load_model(args)
        res = evaluate_tofu(
            logits_fn, generate_fn, tok, args.out, forget_split=args.forget_split, source=args.data,
            fmt=args.prompt_format, ds_size=args.ds_size or None, batch_size=args.batch_size,
            max_length=args.max_length, generation_max_length=args.generation_max_length,
            max_new_tokens=args.max_new_tokens, retain_logs=args.retain_logs, progress=not args.no_progress,
        )
        print(json.dumps({k: res.get(k) for k in ("forget_quality", "model_utility", "parts", "forget")}, indent=2))
        return 0

    return run


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="HF model folder, hub id, registry name or .gguf")
    g.add_argument("--run", help="a bin/unlearn output folder (ALTER/AsymLoRA: entropy-gated forward)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / id (default: the model's)")


def _check_run_folder(args: argparse.Namespace) -> None:
    """A cheap check of ``--run`` before slower work (question sets, the model)."""
    from pathlib import Path

    if getattr(args, "run", None) and not (Path(args.run) / "config.json").is_file():
        raise FileNotFoundError(f"{args.run}: not a run folder (no config.json); pass the output_dir of bin/unlearn")


def _load_model(args: argparse.Namespace):
    """(logits_fn, generate_fn, tokenizer) for --model or --run."""
    from alter_jax.io.hf import load_tokenizer

    if getattr(args, "run", None):
        from alter_jax.train.loop import load_run_result

        _, tok, lf, gf = load_run_result(args.run)
    else:
        from alter_jax.generate import model_fns
        from alter_jax.io.hf import load_pretrained

        lf, gf = model_fns(load_pretrained(args.model, dtype=getattr(args, "dtype", "float32")))
        tok = load_tokenizer(args.model)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    return lf, gf, tok


@subcommand("mcq", help="zero-shot multiple choice (WMDP bio/cyber, MMLU) by answer-letter log-likelihood")
def _mcq_args(p: argparse.ArgumentParser) -> Runner:
    _model_args(p)
    p.add_argument("--tasks", default="wmdp-bio,wmdp-cyber,mmlu",
                   help="comma list: wmdp-bio, wmdp-cyber, mmlu, mmlu:<subject> or local .json/.jsonl/.parquet files")
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        from alter_jax.data.mcq import load_mcq
        from alter_jax.eval.mcq import evaluate_mcq

        _check_run_folder(args)
        tasks = {t: load_mcq(t, limit=args.limit) for t in [t.strip() for t in args.tasks.split(",") if t.strip()]}
        logits_fn, _, tok = _load_model(args)  # after the questions: a bad task name fails before the model loads
        results = {}
        for task, items in tasks.items():
            res = evaluate_mcq(items, logits_fn, tok, batch_size=args.batch_size, progress=not args.no_progress)
            results[task] = {"accuracy": res.accuracy, "macro_accuracy": res.macro_accuracy,
                             "per_subject": res.per_subject}
            print(f"{task:24s} accuracy {res.accuracy:.4f}  (n={len(res.predictions)})")
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        return 0

    return run


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description="alter-jax evaluation commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_, fill) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_run=fill(sp))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
