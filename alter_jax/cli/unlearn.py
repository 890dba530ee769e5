"""``bin/unlearn``: run (or resume) an unlearning job from a Python config file.

    bin/unlearn                                   # the demo (configs/demo.py)
    bin/unlearn --config configs/tofu_10.py --dry-run
    bin/unlearn --config configs/tofu_10.py --config.optim.lr_b=5e-4 --config.output_dir=runs/x

Rerunning the same command resumes from the last checkpoint of ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys

from alter_jax.cli.common import DEFAULT_CONFIG, CliError, build_run_config, split_overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unlearn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config key can be overridden as --config.SECTION.KEY=VALUE (e.g. --config.train.method=lora_gd).",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Python config file with get_config() (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, resolve the model and print the plan; no weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--device-gb", type=float, default=None, help="with --dry-run: say whether the run fits devices of this many GiB")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error (default: one line)")
    return p


def one_line(e: BaseException) -> str:
    """An exception's message on one line (OSError: its strerror and file)."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_overrides(argv)
    args = parser().parse_args(rest)
    run = build_run_config(args.config, overrides)
    if args.dry_run:
        from alter_jax.train.loop import plan

        try:
            info = plan(run, device_bytes=None if args.device_gb is None else int(args.device_gb * 2**30))
        except Exception as e:  # resolution errors carry their own message
            raise CliError(f"{args.config}: model {run.model.name!r}: {e}") from None
        if args.json:
            print(json.dumps({k: v for k, v in info.items() if k != "memory_table"}, indent=2, default=str))
        else:
            print(f"config      {args.config}")
            print(f"model       {run.model.name} -> {info['model']} ({info['model_type']})")
            print(f"method      {info['method']}   output_dir {run.output_dir}")
            print("parameters per group:")
            for g, n in info["param_counts"].items():
                mark = "trainable" if g in info["trainable"] else "frozen"
                print(f"  {g:16s} {n:>15,d}  {mark}")
            if "memory_table" in info:
                print(info["memory_table"])
        return 0
    from alter_jax import config as C
    from alter_jax.train.loop import Diverged, RunConflict, unlearn

    from alter_jax.train.checkpoint import CheckpointCorrupt

    try:
        report = unlearn(run, progress=not args.no_progress)
    except (C.ConfigValueError, RunConflict) as e:  # found once the model is loaded: no traceback
        if args.debug:
            raise
        raise CliError(f"{args.config}: {e}") from None
    except Diverged as e:  # the run itself failed: exit 3, the message names the step and the cause
        if args.debug:
            raise
        raise CliError(f"{args.config}: {e}", code=3) from None
    except (CheckpointCorrupt, ValueError, OSError) as e:  # data, model and checkpoint errors name file and fix
        if args.debug:
            raise
        raise CliError(f"{args.config}: {one_line(e)} (--debug shows the traceback)") from None
    except Exception as e:  # anything else is a bug: one line, exit 1, the traceback on request
        if args.debug:
            raise
        raise CliError(f"{args.config}: internal error {type(e).__name__}: {one_line(e)}; rerun with --debug for the "
                       "traceback and report it", code=1) from None
    print(f"report: {run.output_dir}/report.json   result: {report['result']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
