"""Real multi-process runs on this machine: 2 processes x 4 CPU devices, jax.distributed over
127.0.0.1 (gloo collectives), started by ``alter_jax.launch`` exactly as ``bin/launch`` does
(coordinator, process count and id in the environment ``sharding.initialize_distributed`` reads).

* the ALTER step on meshes (8,1,1) and (2,2,2) spanning both processes equals one process with 8
  devices (loss, trained groups, Adam's state) within 1e-5, two steps;
* each process loads only its own rows of a global batch (``jax.make_array_from_process_local_data``);
* a checkpoint written by the 2 processes (Orbax multi-host) restores in 1 process bitwise, and
  the step continued there matches the 2-process continuation;
* ``bin/unlearn --config configs/demo.py`` under ``bin/launch``: one set of run files, written by process 0.

Workers: ``tests/multihost/_worker.py``. Not slow-marked: CI runs them (each test ~1-1.5 min on 2 cores).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alter_jax.launch import free_port, launch, process_env

REPO = Path(__file__).resolve().parents[2]
MESHES = ("8x1x1", "2x2x2")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_PLATFORMS": "cpu"}


def test_process_env_names_the_coordinator_and_devices():
    env = process_env(1, 2, "127.0.0.1:1234", cpu_devices=4,
                      base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo", "PROCESS_ID": "7"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1") and "PROCESS_ID" not in env
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
    assert 0 < free_port() < 65536


def test_launch_stops_the_peers_of_a_failed_process():
    code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)"
    out = io.StringIO()
    t0 = time.perf_counter()
    codes = launch([sys.executable, "-c", code], 2, stdout=out)
    assert codes[1] == 3 and codes[0] != 0 and time.perf_counter() - t0 < 30  # p0 was stopped, not waited for


def _max_diff(a: np.lib.npyio.NpzFile, b, prefix_a: str, prefix_b: str) -> tuple[float, int]:
    keys = [k for k in a.files if k.startswith(prefix_a)]
    assert keys, prefix_a
    d = max(float(np.max(np.abs(a[k].astype(np.float64) - b[prefix_b + k[len(prefix_a):]].astype(np.float64))))
            for k in keys)
    return d, len(keys)


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    """The 2-process worker and, alongside, the 1-process worker (which waits for the checkpoint).
    Run once per session even when pytest-xdist spreads the tests over workers (the pattern of the
    xdist docs: a file lock in the base temp folder all workers share)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker's base temp is a child of one folder
        root = root.parent
    out = root / "multihost_shared"
    with FileLock(str(root / "multihost_shared.lock")):
        if not (out / "single.json").is_file():
            out.mkdir(exist_ok=True)
            _run_workers(out)
    return {"out": out, "multi": np.load(out / "multi.npz"), "single": np.load(out / "single.npz"),
            "rows": [json.loads((out / f"multi_rows_p{p}.json").read_text()) for p in (0, 1)],
            "single_info": json.loads((out / "single.json").read_text())}


def _run_workers(out: Path) -> None:
    env = _env()
    single_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    t0 = time.perf_counter()
    single = subprocess.Popen([sys.executable, "-m", "tests.multihost._worker", "single", str(out)], cwd=REPO,
                              env=single_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = io.StringIO()
    codes = launch([sys.executable, "-m", "tests.multihost._worker", "multi", str(out)], 2, cpu_devices=4, cwd=str(REPO),
                   env=env, timeout=420, stdout=log)
    if any(codes):
        single.kill()
    s_out, _ = single.communicate(timeout=420)
    wall = time.perf_counter() - t0
    assert codes == [0, 0], log.getvalue()[-6000:]
    assert single.returncode == 0, s_out[-6000:]
    print(f"two-process worker + one-process worker: {wall:.1f} s wall")


def test_two_process_alter_step_equals_one_process(two_process_steps):
    m, s = two_process_steps["multi"], two_process_steps["single"]
    for mesh in MESHES:
        for step in (1, 2):
            p = f"{mesh}/step{step}/"
            assert abs(float(m[p + "loss"]) - float(s[p + "loss"])) <= 1e-5, (mesh, step)
            diff, n = _max_diff(m, s, p + "trainable/", p + "trainable/")
            assert n > 20 and diff <= 1e-5, (mesh, step, diff)  # every adapter group of the layer
            diff, n = _max_diff(m, s, p + "opt/", p + "opt/")
            assert diff <= 1e-5, (mesh, step, diff)
        moved, _ = _max_diff(m, m, f"{mesh}/step2/trainable/", f"{mesh}/step1/trainable/")
        assert moved > 1e-4  # the second step really changed the adapters
    assert float(m["8x1x1/step1/loss"]) == pytest.approx(float(m["2x2x2/step1/loss"]), abs=1e-5)


def test_each_process_loads_only_its_rows(two_process_steps):
    rows = two_process_steps["rows"]
    assert [r["process"] for r in rows] == [0, 1]
    assert sorted(p for _, p in rows[0]["devices"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    for mesh in MESHES:
        loaded = []
        for r in rows:
            for rec in r["rows"][mesh]:
                assert rec["global_shape"] == [8, 12]  # the step sees the global batch ...
                assert rec["local_shape"] == [4, 12]  # ... each process loaded half of it
                assert rec["held"] == rec["loaded"] and rec["shards_match"], (mesh, rec)
            loaded.append(set(r["rows"][mesh][0]["loaded"]))
        assert not loaded[0] & loaded[1] and loaded[0] | loaded[1] == set(range(8)), (mesh, loaded)


def test_checkpoint_of_two_processes_restores_in_one(two_process_steps):
    m, s, info = two_process_steps["multi"], two_process_steps["single"], two_process_steps["single_info"]
    assert info["step"] == 1 and info["restored_step"] == 1 and info["meta"] == {"epoch": 0, "batch": 1}
    ck = two_process_steps["out"] / "ckpt" / "1"
    assert (ck / "state").is_dir() and (ck / "meta").is_dir()
    diff, n = _max_diff(s, m, "restored/step1/", "2x2x2/step1/")
    assert n > 20 and diff == 0.0  # restored in 1 process: bitwise the state the 2 processes held
    diff, _ = _max_diff(s, m, "restored/step2/", "2x2x2/step2/")
    # the continued step vs the 2-process run's own step 2: only the all-reduce order differs (gloo
    # across processes vs XLA:CPU within one); measured 3.7e-9
    assert diff <= 1e-6, diff
    diff, _ = _max_diff(s, s, "restored/step2/", "2x2x2/step2/")
    assert diff <= 1e-6, diff


def test_unlearn_demo_under_two_processes(tmp_path):
    """``bin/launch --processes 2 --cpu-devices 4 -- bin/unlearn --config configs/demo.py`` (short)."""
    from alter_jax.demo import ensure_demo_model

    ensure_demo_model(progress=False)  # built once here, not by two processes at once
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "bin" / "launch"), "--processes", "2", "--cpu-devices", "4", "--timeout", "420",
           "--", sys.executable, str(REPO / "bin" / "unlearn"), "--config", str(REPO / "configs" / "demo.py"),
           "--no-progress", f"--config.output_dir={out}", "--config.train.epochs=1", "--config.eval.num_questions=4",
           "--config.eval.max_new_tokens=4", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    print(f"bin/unlearn under 2 processes: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("[p0] report:") for ln in lines) and any(ln.startswith("[p1] report:") for ln in lines)
    assert any(ln.startswith("[p1]") and "process 1 of 2" in ln for ln in lines)  # says process 0 writes
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    # one writer: one metrics row per step (two writers would append each step twice)
    assert [r["step"] for r in metrics] == list(range(1, report["steps"] + 1)) and report["steps"] > 0
    assert (out / "adapter").is_dir() and (out / "plots" / "loss.png").is_file()
    assert (out / "config.json").is_file() and (out / "data_info.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [str(report["steps"])]
    assert report["after"]["forget"]["answer_prob"] < report["before"]["forget"]["answer_prob"]
    assert not [p for p in out.rglob("*") if ".orbax-checkpoint-tmp" in p.name]
