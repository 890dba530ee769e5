"""Architectures of the models our configs name, for planning without downloading weights.

``config_folder(name)`` gives a folder holding the model's ``config.json``: a local
folder as is; a GGUF file or registry name through the registry's metadata; a hub id
by downloading ``config.json`` alone; and when the hub cannot be reached, the
architecture from :data:`KNOWN_CONFIGS` (public ``config.json`` values), so that
``--dry-run`` works offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
_LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)
_LLAMA31_8B = dict(_LLAMA3_8B, max_position_embeddings=131072, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})
_ZEPHYR_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
_SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

KNOWN_CONFIGS: dict[str, dict] = {
    "locuslab/tofu_ft_llama2-7b": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "HuggingFaceH4/zephyr-7b-beta": _ZEPHYR_7B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
}


def config_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder with ``config.json`` for ``name`` without fetching weights."""
    from alter_jax.models.registry import default_cache_dir, hub_reachable, locate_model, lookup

    p = Path(name).expanduser()
    if p.is_dir():
        return p
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    hub_id = lookup(name).hub_id if lookup(name) else name
    if hub_reachable():
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(hub_id, "config.json")).parent
        except Exception:  # gated or missing: fall back to the table / local GGUF
            pass
    if p.suffix == ".gguf" or lookup(name):
        try:
            kind, where = locate_model(name)
            if kind == "gguf":
                from alter_jax.io.gguf import read_gguf_config

                return _write(base / "configs" / where.stem, read_gguf_config(where))
            return where
        except Exception:
            pass
    cfg = KNOWN_CONFIGS.get(name) or KNOWN_CONFIGS.get(hub_id)
    if cfg is None:
        raise FileNotFoundError(
            f"cannot get config.json for {name!r}: the hub is not reachable and it is not in the built-in table "
            f"({', '.join(sorted(KNOWN_CONFIGS))}). Pass a local model folder."
        )
    return _write(base / "configs" / hub_id.replace("/", "--"), cfg)


def _write(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder
