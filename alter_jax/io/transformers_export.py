"""ALTER's gated model as a Hugging Face folder that plain transformers runs (issue 18).

``save_transformers_alter(model, out, q=..., threshold=...)`` writes a folder that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads as transformers'
own ``LlamaForCausalLM`` / ``MistralForCausalLM`` with ALTER's entropy-gated adapter in every
adapted projection (``alter_jax/io/hf_remote/modeling_alter.py``, which imports only torch and
transformers and is copied into the folder):

* ``model.safetensors`` (or shards + index): the backbone tensors under the names
  :func:`alter_jax.io.hf.save_pretrained` writes, plus per adapted layer
  ``<layer>.shared_a [r, d_in]``, ``.retain_expert [d_out, r]``, ``.forget_experts [N, d_out, r]``,
  ``.router [d_in + 1, N + 1]`` (the names of :mod:`alter_jax.io.alter`, float32);
* ``config.json``: the backbone's fields, ``model_type`` ``alter_llama`` / ``alter_mistral`` (so
  that loading without ``trust_remote_code`` fails instead of silently giving the backbone,
  which has not forgotten anything), ``auto_map`` and ``alter`` (the adapter and gate settings:
  rank, scale, experts, router, top-k, τ_high / τ_low, retain_bias, q, θ, entropy source);
* ``configuration_alter.py``, ``modeling_alter.py``, the tokenizer (with its chat template) and
  ``README.md`` (the model card, written by the caller).
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from alter_jax.adapters.inject import adapted_layers
from alter_jax.adapters.lora import GROUPS
from alter_jax.io.alter import _natural, hf_layer_name, nonfinite_tensors, single_config
from alter_jax.io.hf import save_pretrained
from alter_jax.models.llama import Transformer

FORMAT = "alter-transformers"  # = modeling_alter.FORMAT
FORMAT_VERSION = 1
REMOTE_FILES = ("configuration_alter.py", "modeling_alter.py")
ARCH = {"llama": ("AlterLlamaForCausalLM", "AlterLlamaConfig"), "mistral": ("AlterMistralForCausalLM", "AlterMistralConfig")}


def remote_source(name: str) -> str:
    """Text of a shipped module (``configuration_alter.py`` / ``modeling_alter.py``)."""
    return resources.files("alter_jax.io.hf_remote").joinpath(name).read_text()


def adapter_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """``(<hf layer>.<group>, float32 array)`` for every adapter group of every adapted layer."""
    layers = adapted_layers(model)
    for path in sorted(layers, key=_natural):
        ad = layers[path].adapter
        for group in GROUPS:
            var = getattr(ad, group)
            if var is not None:
                yield f"{hf_layer_name(path)}.{group}", np.ascontiguousarray(np.asarray(jax.device_get(var[...]), np.float32))


def alter_settings(model: Transformer, *, q: float, threshold: float, entropy_source: str = "base",
                   self_iters: int | None = 1, prompt_entropy: str = "base") -> dict:
    """The ``config.json`` ``alter`` dict that ``modeling_alter.py`` reads."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_transformers_alter: the model carries no adapters; load the run's ALTER adapter first "
                         "(alter_jax.io.alter.load_alter_adapter).")
    cfg = single_config(layers)
    if cfg.num_forget_experts > 0 and not cfg.use_router:
        raise ValueError("save_transformers_alter: the adapter has forget experts but no router (use_router=False); "
                         "Eq. 9 needs the router.")
    if entropy_source not in ("base", "self"):
        raise ValueError(f"save_transformers_alter: entropy_source must be 'base' or 'self', got {entropy_source!r}")
    if prompt_entropy not in ("base", "zero"):
        raise ValueError(f"save_transformers_alter: prompt_entropy must be 'base' or 'zero', got {prompt_entropy!r}")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "layers": [hf_layer_name(p) for p in sorted(layers, key=_natural)],
        "rank": cfg.rank, "alpha": cfg.alpha, "scale": cfg.scale, "num_forget_experts": cfg.num_forget_experts,
        "use_router": cfg.use_router, "top_k": cfg.top_k, "tau_high": cfg.tau_high, "tau_low": cfg.tau_low,
        "retain_bias": cfg.retain_bias, "q": float(q), "threshold": float(threshold),
        "entropy_source": entropy_source, "self_iters": self_iters, "prompt_entropy": prompt_entropy,
        "generated_token_entropy": "the gated model's own distribution the token was drawn from (temperature 1)",
        "adapter_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
    }


def save_transformers_alter(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    q: float,
    threshold: float,
    entropy_source: str = "base",
    self_iters: int | None = 1,
    prompt_entropy: str = "base",
    tokenizer=None,
    dtype: str | None = None,
    readme: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the gated model (backbone + ALTER adapter + remote code) to ``out_dir`` atomically.

    q / threshold: the run's Tsallis order and fitted θ (``alter_config.json`` ``extra``);
    entropy_source / self_iters / prompt_entropy: as :class:`alter_jax.gated.GateConfig`.
    dtype: backbone weight dtype (default the model's parameter dtype); the adapter stays float32.
    """
    settings = alter_settings(model, q=q, threshold=threshold, entropy_source=entropy_source, self_iters=self_iters,
                              prompt_entropy=prompt_entropy)
    tensors = list(adapter_tensors(model))
    bad = nonfinite_tensors(dict(tensors))
    if bad:
        raise ValueError(f"save_transformers_alter: {len(bad)} adapter tensor(s) hold NaN or inf ({', '.join(bad[:3])}); "
                         "a diverged adapter is never exported.")
    cfg = model.cfg if dtype is None else model.cfg.replace(param_dtype=dtype)
    config = cfg.to_hf_dict()
    model_cls, config_cls = ARCH[cfg.model_type]
    config.update(
        model_type=f"alter_{cfg.model_type}", architectures=[model_cls], alter=settings,
        auto_map={"AutoConfig": f"configuration_alter.{config_cls}", "AutoModelForCausalLM": f"modeling_alter.{model_cls}"},
    )

    def files(tmp: Path) -> None:
        for name in REMOTE_FILES:
            (tmp / name).write_text(remote_source(name))
        if readme is not None:
            (tmp / "README.md").write_text(readme)

    return save_pretrained(model, out_dir, dtype=dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                           config=config, extra_tensors=tensors, extra_files=files)

