"""Start N cooperating JAX processes on this host (a local stand-in for N hosts).

``bin/launch --processes 2 --cpu-devices 4 -- bin/unlearn --config configs/demo.py`` runs the
command twice with the environment that :func:`alter_jax.sharding.initialize_distributed` reads:

* ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`` (process 0 serves it),
* ``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=0..N-1``,
* with ``--cpu-devices K``: ``JAX_PLATFORMS=cpu`` and
  ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` (K simulated devices per process;
  the cross-process collectives then run over gloo, see ``initialize_distributed``).

On real hosts nothing of this is needed: start one process per host with those three variables
set by hand, or under SLURM (``srun``) / on a Cloud TPU pod, where ``jax.distributed.initialize()``
finds them itself (README, "Several hosts").

Every line a process prints is prefixed with ``[p<id>]``. When one process fails, the others are
stopped (they would wait for it in the next collective forever); the exit status is the first
non-zero one, else 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Mapping, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_env(process_id: int, num_processes: int, coordinator: str, *, cpu_devices: int | None = None,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id`` of a local launch (module docstring)."""
    env = dict(os.environ if base is None else base)
    for stale in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):  # the JAX_ names below win
        env.pop(stale, None)
    env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    return env


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
    stream.close()


def launch(command: Sequence[str], num_processes: int, *, cpu_devices: int | None = None, cwd: str | None = None,
           env: Mapping[str, str] | None = None, timeout: float | None = None, host: str = "127.0.0.1",
           stdout=None) -> list[int]:
    """Run ``command`` as ``num_processes`` cooperating processes; returns their exit codes.

    Output lines go to ``stdout`` (default ``sys.stdout``) prefixed ``[p<id>] ``. A process that
    exits non-zero stops the others (SIGTERM, then SIGKILL after 10 s); so does ``timeout``
    (seconds, for the whole launch), whose victims report exit code -9 or -15.
    """
    if num_processes < 1:
        raise ValueError(f"launch: num_processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("launch: no command to run (put it after '--')")
    sink = sys.stdout if stdout is None else stdout
    coordinator = f"{host}:{free_port(host)}"
    procs, pumps = [], []
    for pid in range(num_processes):
        p = subprocess.Popen(list(command), cwd=cwd, env=process_env(pid, num_processes, coordinator,
                                                                      cpu_devices=cpu_devices, base=env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{pid}] ", sink), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    codes: list[int | None] = [None] * num_processes
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        failed = any(c not in (None, 0) for c in codes)
        late = deadline is not None and time.monotonic() > deadline
        if (failed or late) and any(c is None for c in codes):
            _stop([p for p, c in zip(procs, codes) if c is None])
            codes = [p.wait() for p in procs]
            break
        time.sleep(0.05)
    for t in pumps:
        t.join(timeout=5)
    return [int(c) for c in codes]


def _stop(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def first_failure(codes: Sequence[int]) -> int:
    """The first non-zero exit code (a signal ``-n`` becomes ``128 + n``), else 0."""
    for c in codes:
        if c:
            return 128 - c if c < 0 else c
    return 0
