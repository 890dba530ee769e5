"""Clear errors for bad checkpoint folders (each test asserts the message)."""

from __future__ import annotations

import json
import shutil

import pytest

from alter_jax.io.hf import CheckpointError, load_pretrained
from alter_jax.models.config import ConfigError
from tests.helpers import make_tiny_hf_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("good"), "llama_gqa")


def copy(good, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good, d)
    return d


def test_corrupt_safetensors(good, tmp_path):
    d = copy(good, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file.*corrupt or truncated"):
        load_pretrained(d)


def test_missing_weights(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(d)


def test_missing_config(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_pretrained(d)


def test_corrupt_config(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_pretrained(d)


def test_missing_shard_named(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        load_pretrained(d)


def test_bin_only_folder_refused(good, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    d = tmp_path / "bin"
    AutoModelForCausalLM.from_pretrained(good).save_pretrained(d, safe_serialization=False)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if not list(d.glob("*.bin")):  # newer transformers may ignore safe_serialization=False
        torch.save(AutoModelForCausalLM.from_pretrained(good).state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights.*refuses them by default.*allow_pickle=True"):
        load_pretrained(d)
    assert load_pretrained(d, allow_pickle=True).cfg.num_layers == 2


def test_unsupported_model_type(good, tmp_path):
    d = copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported.*llama, mistral"):
        load_pretrained(d)


def test_shape_mismatch(good, tmp_path):
    d = copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config and weights disagree"):
        load_pretrained(d)
