"""PEFT LoRA adapters in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT stores, per adapted ``nn.Linear`` of a ``*ForCausalLM`` model,

* ``base_model.model.<module>.lora_A.weight``  ``[r, d_in]``
* ``base_model.model.<module>.lora_B.weight``  ``[d_out, r]``

with ``<module>`` e.g. ``model.layers.0.self_attn.q_proj`` and the update
``ΔW x = s · B (A x)``, ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). These are
exactly our :class:`~alter_jax.adapters.lora.SharedA` ``[r, d_in]`` and
:class:`~alter_jax.adapters.lora.RetainExpert` ``[d_out, r]`` layouts, so no transpose is
needed: a PEFT LoRA loads as a plain LoRA (``num_forget_experts=0``, no router), and any
expert ``e`` of an ALTER adapter exports as the plain LoRA ``(A, B_e)``.

rsLoRA is supported by folding the scale into alpha: ``alpha' = lora_alpha · sqrt(r)`` gives
``alpha' / r = lora_alpha / sqrt(r)``. Options that change the forward pass in ways a plain
LoRA cannot express (DoRA, LoRA bias, modules_to_save, per-layer rank/alpha, ...) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from alter_jax.adapters.inject import adapted_layers, add_adapters
from alter_jax.adapters.lora import AdapterConfig
from alter_jax.io.alter import (
    AdapterCheckpointError,
    hf_layer_name,
    our_layer_path,
    read_json,
    read_tensors,
    require_fresh,
    single_config,
    target_matches,
)
from alter_jax.io.hf import atomic_dir
from alter_jax.models.llama import TARGET_MODULES, Transformer, linear_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_RE = re.compile(r"base_model\.model\.(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight")

# Fields that never change the forward pass of a loaded adapter (metadata, training-time options).
_IGNORED_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "layers_pattern", "exclude_modules", "megatron_core",
    "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "ensure_weight_tying", "r", "lora_alpha", "target_modules", "use_rslora", "bias", "fan_in_fan_out",
    "init_lora_weights",
}
# init_lora_weights values whose saved adapter applies to the unmodified base model
# (pissa / olora / corda / loftq / lora_ga / mica rewrite base weights or the LoRA form).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_FIX = {
    "use_dora": "DoRA adds a magnitude vector; merge it into the base with PEFT's merge_and_unload() and save the full model instead",
    "modules_to_save": "these modules are full fine-tuned copies; merge with PEFT's merge_and_unload() and load the full model instead",
    "layers_to_transform": "re-train with all layers, or merge with PEFT's merge_and_unload() and load the full model",
    "rank_pattern": "per-layer ranks are not supported; merge with PEFT's merge_and_unload() and load the full model",
    "alpha_pattern": "per-layer alphas are not supported; merge with PEFT's merge_and_unload() and load the full model",
    "lora_bias": "LoRA biases are not supported; merge with PEFT's merge_and_unload() and load the full model",
}


def _refuse(file: Path, field: str, value: Any, fix: str) -> AdapterCheckpointError:
    return AdapterCheckpointError(f"{file}: field {field!r} = {value!r} is not supported by alter-jax's LoRA loader; {fix}.")


def _check_peft_config(data: dict, file: Path) -> tuple[int, float, bool, Any]:
    """Validate a PEFT LoraConfig dict; returns ``(r, lora_alpha, use_rslora, target_modules)``."""
    peft_type = data.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _refuse(file, "peft_type", peft_type, "only LoRA adapters (peft_type 'LORA') can be loaded")
    for field in ("r", "lora_alpha", "target_modules"):
        if data.get(field) in (None, "", []):
            raise AdapterCheckpointError(f"{file}: field {field!r} is missing; a PEFT LoRA config must set it (re-save with PEFT).")
    r, alpha = data["r"], data["lora_alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterCheckpointError(f"{file}: field 'r' must be a positive integer, got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterCheckpointError(f"{file}: field 'lora_alpha' must be a number, got {alpha!r}.")
    if data.get("bias", "none") != "none":
        raise _refuse(file, "bias", data["bias"], "only bias='none' is supported; merge with PEFT's merge_and_unload() and load the full model")
    if data.get("fan_in_fan_out", False):
        raise _refuse(file, "fan_in_fan_out", True, "this is for GPT-2 style Conv1D layers; Llama/Mistral adapters use fan_in_fan_out=false")
    init = data.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse(
            file, "init_lora_weights", init,
            "this initialisation changes the base weights; convert the adapter to a plain LoRA with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) first",
        )
    for field, value in data.items():
        if field in _IGNORED_FIELDS or not value:
            continue  # unset options (None, False, {}, []) are harmless
        raise _refuse(
            file, field, value,
            _FIX.get(field, "this option changes the adapter's forward pass beyond a plain LoRA; "
                            "merge with PEFT's merge_and_unload() and load the full model instead"),
        )
    return r, float(alpha), bool(data.get("use_rslora", False)), data["target_modules"]


def _peft_selects(hf_name: str, targets: Any) -> bool:
    """PEFT's target rule: a string is a regex on the full module name, a list matches by name or suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_name) is not None
    return any(target_matches(hf_name, t) for t in targets)


def _compact_targets(paths: set[str], model: Transformer) -> tuple[str, ...]:
    """Module names (``q_proj``...) when they select exactly ``paths`` on ``model``, else the paths."""
    names = [m for m in TARGET_MODULES if any(p.rsplit(".", 1)[-1] == m for p in paths)]
    selected = {p for p in linear_layers(model) if any(target_matches(p, t) for t in names)}
    if selected == paths:
        return tuple(names)
    return tuple(sorted(paths, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")]))


def load_peft_adapter(model: Transformer, adapter_dir: str | os.PathLike) -> Transformer:
    """Install a PEFT LoRA adapter as a plain LoRA (A -> SharedA, B -> RetainExpert); mutates and returns ``model``.

    ``model`` must be a backbone without adapters. All checks run before it is touched.
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"{folder}: no such adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it).")
    cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    hint = "A PEFT adapter folder is written by PeftModel.save_pretrained (safe_serialization=True) or save_peft_adapter."
    if not w_file.exists() and (folder / "adapter_model.bin").exists():
        raise AdapterCheckpointError(
            f"{folder}: only adapter_model.bin (a pickle) found; re-save the adapter with safetensors "
            "(PeftModel.save_pretrained(dir, safe_serialization=True))."
        )
    r, alpha, rslora, targets = _check_peft_config(read_json(cfg_file, hint), cfg_file)
    require_fresh(model, folder)
    tensors = read_tensors(w_file, hint)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = KEY_RE.fullmatch(key)
        if m is None:
            raise AdapterCheckpointError(
                f"{w_file}: tensor {key!r} is not a LoRA A/B weight of a Llama/Mistral projection (DoRA magnitudes, "
                "embedding LoRA, biases and saved modules are not supported). Merge with PEFT's merge_and_unload() "
                "and load the full model instead."
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = arr
    if not pairs:
        raise AdapterCheckpointError(f"{w_file}: holds no LoRA weights. {hint}")
    linears = linear_layers(model)
    for name, ab in sorted(pairs.items()):
        path = our_layer_path(name)
        if set(ab) != {"A", "B"}:
            raise AdapterCheckpointError(f"{w_file}: layer {name} has lora_{''.join(ab)} but not both lora_A and lora_B. Re-save the adapter.")
        if path not in linears:
            raise AdapterCheckpointError(
                f"{w_file}: layer {name} does not exist in this model ({model.cfg.num_layers} layers). "
                "The adapter was trained on a different base model; load the matching backbone."
            )
        if not _peft_selects(name, targets):
            raise AdapterCheckpointError(
                f"{w_file}: layer {name} is not selected by {cfg_file} field 'target_modules' = {targets!r}. "
                "The two files come from different adapters; re-save the adapter."
            )
        lin = linears[path]
        for which, shape in (("A", (r, lin.d_in)), ("B", (lin.d_out, r))):
            if tuple(ab[which].shape) != shape:
                raise AdapterCheckpointError(
                    f"{w_file}: {name}.lora_{which}.weight has shape {tuple(ab[which].shape)}, this model and r={r} "
                    f"in {cfg_file} imply {shape}. The adapter was trained on a different model (or with a "
                    "rank_pattern); load the matching backbone."
                )

    paths = {our_layer_path(n) for n in pairs}
    cfg = AdapterConfig(
        rank=r,
        alpha=alpha * math.sqrt(r) if rslora else alpha,  # alpha'/r = lora_alpha/sqrt(r) for rsLoRA
        target_modules=_compact_targets(paths, model),
        num_forget_experts=0,
        use_router=False,
    )
    add_adapters(model, cfg)
    for name, ab in pairs.items():
        ad = linears[our_layer_path(name)].adapter
        ad.shared_a[...] = jnp.asarray(ab["A"])
        ad.retain_expert[...] = jnp.asarray(ab["B"])
    return model


def save_peft_adapter(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    expert: int = 0,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write expert ``expert`` (0 = retain expert) of the model's adapter as a PEFT LoRA folder.

    The plain LoRA is ``(A, B_expert)`` with ``lora_alpha = alpha`` and ``r = rank``, so
    ``PeftModel.from_pretrained(base, out_dir)`` computes ``W0 x + (alpha/r) B_e A x``,
    the model's output under hard routing to ``expert``. The folder appears atomically.
    """
    out_dir = Path(out_dir)
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model carries no adapters (install them with alter_jax.adapters.add_adapters).")
    cfg = single_config(layers)
    if not (0 <= expert < cfg.num_experts):
        raise ValueError(f"save_peft_adapter: expert={expert} out of range; this adapter has experts 0..{cfg.num_experts - 1} (0 = retain).")
    tensors: dict[str, np.ndarray] = {}
    for path, lin in layers.items():
        ad = lin.adapter
        prefix = f"base_model.model.{hf_layer_name(path)}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(ad.shared_a[...]), np.float32))
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(ad.experts()[expert]), np.float32))
    targets = _compact_targets(set(layers), model)
    if not set(targets) <= set(TARGET_MODULES):
        targets = tuple(hf_layer_name(t) for t in targets)  # full module names; PEFT matches them exactly
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else float(cfg.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir
