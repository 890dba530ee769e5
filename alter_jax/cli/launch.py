"""``bin/launch``: run a command as N cooperating JAX processes on this host.

    bin/launch --processes 2 --cpu-devices 4 -- bin/unlearn --config configs/demo.py
    bin/launch --processes 8 -- bin/unlearn --config configs/tofu_10.py   # e.g. one process per GPU

Each process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``, which ``bin/unlearn`` passes to ``jax.distributed.initialize``;
``--cpu-devices K`` also gives each process K simulated CPU devices (testing a multi-host mesh
on one machine). Output lines are prefixed ``[p<id>]``. On several hosts set the three variables
on each host yourself, or let SLURM / a Cloud TPU pod provide them (README, "Several hosts").
"""

from __future__ import annotations

import argparse
import sys

from alter_jax.cli.common import CliError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="number of processes (default: %(default)s)")
    p.add_argument("--cpu-devices", type=int, default=None, metavar="K",
                   help="simulate K CPU devices per process (JAX_PLATFORMS=cpu; collectives over gloo)")
    p.add_argument("--timeout", type=float, default=None, help="stop every process after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after '--'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("no command given: bin/launch --processes 2 -- bin/unlearn --config configs/demo.py")
    if args.processes < 1:
        raise CliError(f"--processes must be >= 1, got {args.processes}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise CliError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    from alter_jax.launch import first_failure, launch

    codes = launch(command, args.processes, cpu_devices=args.cpu_devices, timeout=args.timeout)
    if any(codes):
        print(f"launch: exit codes {codes}", file=sys.stderr)
    return first_failure(codes)


if __name__ == "__main__":
    sys.exit(main())
