"""The benchmark model: one set of weights for both sides.

Presets are Llama-shaped random models written once with ``transformers`` (safetensors)
into a cache folder; the JAX side loads them with :func:`alter_jax.io.hf.load_pretrained`
and the PyTorch side with ``LlamaForCausalLM.from_pretrained``, so both run the same
weights. ``smollm2`` is the registry's ``smollm2-135m-instruct`` (installed GGUF,
converted once); any other value is a Hugging Face folder.
"""

from __future__ import annotations

import os
from pathlib import Path

# name -> transformers LlamaConfig fields. "bench": ~29M parameters, the default.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "bench": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048),
}
COMMON = dict(rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_theta=10000.0)
ALIASES = {"smollm2": "smollm2-135m-instruct"}


def _cache_root() -> Path:
    from alter_jax.models.registry import default_cache_dir

    return Path(default_cache_dir()) / "bench"


def preset_folder(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write (once) a random Llama of preset ``name`` and return its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alter_jax.io.hf import atomic_dir

    folder = (Path(cache_dir) if cache_dir else _cache_root()) / f"{name}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, **PRESETS[name]})).eval()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return folder


def resolve_bench_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A HF folder for ``--model``: a preset, ``smollm2`` (registry), or a folder / registry name."""
    if name in PRESETS:
        return preset_folder(name, cache_dir=cache_dir)
    from alter_jax.io.hf import resolve_model_dir

    return resolve_model_dir(ALIASES.get(name, name))


def torch_model(folder: Path):
    """``transformers`` causal LM in float32, eval mode, from the same folder."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
