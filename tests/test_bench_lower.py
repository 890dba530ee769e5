"""``bin/bench --what lower`` (cross-platform lowering from abstract inputs) and ``--what memory``
(planner vs compiled bytes) on the tiny shape, in subprocesses with 8 simulated CPU devices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alter_jax.bench.lower import COLLECTIVES, _fit_line, count_collectives

REPO = Path(__file__).resolve().parents[1]


def _bench(*argv, timeout=400):
    return subprocess.run([sys.executable, str(REPO / "bin" / "bench"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_count_collectives_reads_hlo_and_stablehlo():
    hlo = ("  %a = f32[4] all-reduce(f32[4] %x), replica_groups={}\n  %s = (f32[4]) all-gather-start(%y)\n"
           "  %d = f32[8] all-gather-done(%s)\n  %p = f32[2] collective-permute(%z)\n")
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 0,
                                      "collective-permute": 1}
    shlo = '%0 = "stablehlo.all_reduce"(%arg0) ... stablehlo.reduce_scatter ... stablehlo.all_to_all'
    assert count_collectives(shlo)["reduce-scatter"] == 1 and count_collectives(shlo)["all-to-all"] == 1
    assert _fit_line([1, 2], [19.0, 33.0], 32) == pytest.approx(19 + 14 * 31) and _fit_line([4], [7.0], 32) == 7.0


def test_lower_tiny_shape_for_cuda_and_tpu(tmp_path):
    out = tmp_path / "lower.json"
    proc = _bench("--what", "lower", "--shape", "mfu-tiny", "--dtype", "float32", "--seq", "64", "--prompt", "16",
                  "--new-tokens", "4", "--platforms", "cuda,tpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "lowering ALTER step + gated generation: cuda: OK, tpu: OK" in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    assert res["ok"] and res["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and res["attention_impl"] == "xla"
    for name in ("alter_step", "gated_generate"):
        for plat in ("cuda", "tpu"):
            r = res[name]["platforms"][plat]
            assert r["ok"] and r["devices"] == 8 and r["mlir_bytes"] > 10_000, (name, plat, r)
        counts = res[name]["compiled_cpu"]["collectives"]
        assert set(counts) == set(COLLECTIVES)
        # fsdp=8: parameters are gathered for the forward and gradients reduced
        assert counts["all-gather"] > 0 and counts["all-reduce"] > 0, (name, counts)


def test_a_program_that_cannot_be_exported_is_reported_per_platform():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alter_jax.bench.lower import export_for, lower_verdict

    args = (jax.ShapeDtypeStruct((4,), jnp.float32),)
    callback = jax.jit(lambda x: jax.pure_callback(lambda a: np.asarray(a) * 2, args[0], x))  # not serialisable
    bad = export_for(callback, args, ("cuda",))
    assert not bad["cuda"]["ok"] and "Error" in bad["cuda"]["error"], bad  # reported, not raised
    good = export_for(jax.jit(lambda x: x * 2), args, ("cuda", "tpu"))
    assert good["cuda"]["ok"] and good["tpu"]["ok"] and good["tpu"]["collectives_stablehlo"]["all-reduce"] == 0
    res = {"alter_step": {"platforms": {"cuda": good["cuda"], "tpu": good["tpu"]}},
           "gated_generate": {"platforms": {"cuda": bad["cuda"], "tpu": good["tpu"]}}}
    assert lower_verdict(res) == "lowering ALTER step + gated generation: cuda: FAILED, tpu: OK"


def test_solo_parts_refuse_company_and_bad_meshes():
    for argv, needle in ((["--what", "lower,step"], "lower runs alone"),
                         (["--what", "lower", "--mesh", "fsdp=x"], "--mesh 'fsdp=x'"),
                         (["--what", "memory", "--layers", "0"], "--layers '0'")):
        proc = _bench(*argv, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
