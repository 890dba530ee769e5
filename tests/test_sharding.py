"""Sharding rules, mesh errors, multi-host initialisation, and (in a subprocess with 8 host
devices, see tests/_multidevice_worker.py) the sharded ALTER step and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alter_jax import sharding as S
from alter_jax.config import MeshConfig

REPO = Path(__file__).resolve().parents[1]
SIZES = {"data": 2, "fsdp": 2, "tensor": 4}


@pytest.mark.parametrize(
    "path,shape,spec",
    [
        ("embed_tokens", (64, 32), P("tensor", "fsdp")),
        ("lm_head", (32, 64), P("fsdp", "tensor")),
        ("layers/0/self_attn/q_proj/kernel", (32, 32), P("fsdp", "tensor")),
        ("layers/1/mlp/up_proj/kernel", (32, 48), P("fsdp", "tensor")),
        ("layers/0/self_attn/o_proj/kernel", (32, 32), P("tensor", "fsdp")),
        ("layers/0/mlp/down_proj/kernel", (48, 32), P("tensor", "fsdp")),
        ("layers/0/input_layernorm/weight", (32,), P()),
        ("norm/weight", (32,), P()),
        ("layers/0/self_attn/k_proj/adapter/shared_a", (4, 32), P(None, "fsdp")),
        ("layers/0/self_attn/k_proj/adapter/retain_expert", (16, 4), P("tensor", None)),
        ("layers/0/mlp/gate_proj/adapter/forget_experts", (2, 48, 4), P(None, "tensor", None)),
        ("layers/0/mlp/down_proj/adapter/shared_a", (4, 48), P(None, "tensor")),
        ("layers/0/mlp/down_proj/adapter/forget_experts", (2, 32, 4), P(None, "fsdp", None)),
        ("layers/0/mlp/down_proj/adapter/router", (49, 3), P()),
        # optimizer state ends with the parameter's path
        ("opt_state/inner_states/forget_experts/inner_state/0/0/mu/forget_experts/layers/0/mlp/up_proj/adapter/"
         "forget_experts", (2, 48, 4), P(None, "tensor", None)),
        ("opt_state/inner_states/router/inner_state/0/0/count", (), P()),
    ],
)
def test_rules(path, shape, spec):
    assert S.spec_for(path, shape, SIZES) == spec


def test_non_divisible_dimension_falls_back_to_replication(caplog):
    # 30 rows do not divide over tensor=4: that dim is replicated, the fsdp dim is kept
    with caplog.at_level("WARNING", logger="alter_jax.sharding"):
        assert S.spec_for("layers/0/mlp/down_proj/kernel", (30, 32), SIZES) == P(None, "fsdp")
        assert S.spec_for("layers/0/mlp/down_proj/kernel", (30, 32), SIZES) == P(None, "fsdp")
    assert sum("not divisible" in r.message for r in caplog.records) == 1  # logged once
    assert S.spec_for("layers/0/self_attn/q_proj/kernel", (32, 32), {"data": 1, "fsdp": 1, "tensor": 1}) == P(
        "fsdp", "tensor")


def test_tree_specs_on_a_real_state():
    from alter_jax.train.methods import get_method
    from alter_jax.train.step import split_model
    from tests.train.conftest import tiny_model

    _, trainable, frozen = split_model(tiny_model(), get_method("alter").trainable)
    specs = S.tree_specs({"trainable": trainable, "frozen": frozen}, MeshConfig(1, 2, 4))
    flat = {S.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    assert flat["frozen/backbone/layers/1/self_attn/v_proj/kernel"] == P("fsdp", "tensor")
    assert flat["trainable/forget_experts/layers/1/self_attn/v_proj/adapter/forget_experts"] == P(None, "tensor", None)
    assert flat["trainable/router/layers/0/mlp/up_proj/adapter/router"] == P()


def test_mesh_size_error_names_the_config_keys():
    with pytest.raises(S.MeshError, match=r"mesh\.data=2 x mesh\.fsdp=2 x mesh\.tensor=2 = 8.*1 device"):
        S.make_mesh(MeshConfig(2, 2, 2), devices=jax.devices()[:1])
    mesh = S.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    assert S.initialize_distributed({}) is False and not calls  # single process: no-op
    assert S.initialize_distributed({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is False
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "NUM_PROCESSES": "4", "PROCESS_ID": "2"}
    assert S.initialize_distributed(env) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert S.initialize_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) is True
    assert calls[-1] == {}  # JAX's own cluster detection
    with pytest.raises(ValueError, match="NUM_PROCESSES"):
        S.initialize_distributed({"COORDINATOR_ADDRESS": "h:1"})


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tests._multidevice_worker", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_sharded_alter_step_matches_one_device(multidevice):
    assert multidevice["devices"] == 8
    assert set(multidevice["meshes"]) == {"8x1x1", "2x4x1", "1x2x4", "2x2x2"}
    for mesh, r in multidevice["meshes"].items():
        assert np.isfinite(r["loss"])
        assert r["loss_diff"] <= 1e-5 and r["metrics_diff"] <= 1e-5, (mesh, r)
        assert r["trainable_diff"] <= 1e-5 and r["opt_diff"] <= 1e-5, (mesh, r)
        assert r["moved"] > 1e-4, (mesh, r)  # the step really updated the adapters


def test_parameters_are_really_sharded(multidevice):
    sh = multidevice["shards"]
    # gate_proj kernel [32, 48] on P("fsdp", "tensor"); forget experts [2, 48, 4] on P(None, "tensor", None)
    assert sh["1x2x4"]["kernel"] == [[16, 12]] and sh["1x2x4"]["expert"] == [[2, 12, 4]]
    assert sh["2x2x2"]["kernel"] == [[16, 24]] and sh["2x2x2"]["expert"] == [[2, 24, 4]]
    assert sh["2x4x1"]["kernel"] == [[8, 48]]
    assert sh["8x1x1"]["kernel"] == [[32, 48]]  # pure data parallelism: replicated
    assert sh["1x2x4"]["mu"] == [[2, 12, 4]]  # Adam's moments sharded like their parameter
    # batch of 8 rows per side over data x fsdp
    assert {k: v["batch"] for k, v in sh.items()} == {"8x1x1": [[1, 12]], "2x4x1": [[1, 12]],
                                                     "1x2x4": [[4, 12]], "2x2x2": [[2, 12]]}
    for k, v in sh.items():
        assert v["expert_spec"] == "P(None, 'tensor', None)"  # the output keeps the input's sharding
        assert v["input_donated"], k


def test_checkpoint_restores_onto_another_mesh(multidevice):
    ck = multidevice["checkpoint"]
    assert ck["2x2x2"]["diff"] == 0.0 and ck["8x1x1"]["diff"] == 0.0
    assert ck["2x2x2"]["same_structure"] and ck["8x1x1"]["same_structure"]
    assert ck["2x2x2"]["expert_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert ck["2x2x2"]["expert_shards"] == [[2, 24, 4]]
    assert ck["8x1x1"]["expert_shards"] == [[2, 48, 4]]
