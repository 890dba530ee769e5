"""The full ALTER adapter checkpoint: every group of every adapted layer, plus its config.

A folder with two files:

* ``alter_adapter.safetensors`` — for each adapted layer (HF-style path, e.g.
  ``model.layers.0.self_attn.q_proj``) one tensor per group present, named
  ``<layer>.<group>`` (groups of :data:`alter_jax.adapters.lora.GROUPS`):

  ====================================  ====================  ========================
  name                                  shape                 group
  ====================================  ====================  ========================
  ``<layer>.shared_a``                  ``[r, d_in]``         :class:`SharedA`
  ``<layer>.retain_expert``             ``[d_out, r]``        :class:`RetainExpert`
  ``<layer>.forget_experts``            ``[N, d_out, r]``     :class:`ForgetExperts`
  ``<layer>.router``                    ``[d_in + 1, N + 1]`` :class:`Router`
  ====================================  ====================  ========================

  (``forget_experts`` only when N >= 1, ``router`` only when the config has one.)
* ``alter_config.json`` — ``{"format": "alter-adapter", "format_version": 1,
  "adapter_config": {AdapterConfig fields}, "layers": [...], "extra": {...}}``; ``extra``
  holds what the caller needs to use the adapter (entropy q, threshold kind/value, ...).

Tensors are stored float32 (the adapter's parameter dtype). The folder appears atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from alter_jax.adapters.inject import adapted_layers, add_adapters
from alter_jax.adapters.lora import GROUPS, AdapterConfig
from alter_jax.io.hf import CheckpointError, atomic_dir
from alter_jax.models.llama import TARGET_MODULES, AdaptableLinear, Transformer, linear_layers

FORMAT_NAME = "alter-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "alter_config.json"
WEIGHTS_FILE = "alter_adapter.safetensors"


class AdapterCheckpointError(CheckpointError):
    """An adapter folder or file that cannot be loaded; the message names file, field and fix."""


# ----------------------------------------------------------------------------- shared helpers
def hf_layer_name(path: str) -> str:
    """Our linear-layer path ``layers.0.self_attn.q_proj`` -> HF module ``model.layers.0.self_attn.q_proj``."""
    return f"model.{path}"


def our_layer_path(hf_name: str) -> str:
    """Inverse of :func:`hf_layer_name`."""
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def target_matches(path: str, target: str) -> bool:
    """The matching rule of :func:`alter_jax.adapters.inject.add_adapters` (name or dotted suffix)."""
    return path == target or path.endswith("." + target)


def require_fresh(model: Transformer, source: Path) -> None:
    """Refuse to load an adapter into a model that already carries one (it would mix the two)."""
    present = adapted_layers(model)
    if present:
        raise AdapterCheckpointError(
            f"{source}: the model already carries adapters (e.g. on {next(iter(present))}). Load the adapter into "
            "a fresh backbone (alter_jax.io.hf.load_pretrained) or fold the old one in first (merged_backbone)."
        )


def read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise AdapterCheckpointError(f"{file}: missing. {what}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterCheckpointError(f"{file}: not valid JSON ({e}). The file is corrupt; save the adapter again.") from None
    if not isinstance(data, dict):
        raise AdapterCheckpointError(f"{file}: expected a JSON object at top level, got {type(data).__name__}.")
    return data


def read_tensors(file: Path, what: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy arrays (bf16/fp16 files are upcast)."""
    if not file.is_file():
        raise AdapterCheckpointError(f"{file}: missing. {what}")
    try:
        # the flax reader understands bfloat16, which numpy does not
        with safe_open(str(file), framework="flax") as fh:
            return {k: np.asarray(jax.device_get(fh.get_tensor(k))).astype(np.float32) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterCheckpointError(f"{file}: cannot read safetensors file ({e}). The file is corrupt or truncated; save the adapter again.") from None


def single_config(layers: dict[str, AdaptableLinear]) -> AdapterConfig:
    """The one AdapterConfig shared by every adapted layer (error if layers disagree)."""
    cfgs = {lin.adapter.cfg for lin in layers.values()}
    if len(cfgs) != 1:
        raise ValueError(f"adapted layers carry {len(cfgs)} different AdapterConfigs; a checkpoint stores exactly one.")
    return cfgs.pop()


def _json_default(o: Any):
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"extra value of type {type(o).__name__} is not JSON serialisable; pass numbers, strings, lists or dicts.")


def nonfinite_tensors(tensors: dict[str, np.ndarray]) -> list[str]:
    """Names of the tensors holding a NaN or an inf (sorted)."""
    return sorted(k for k, v in tensors.items() if not np.all(np.isfinite(v)))


# ----------------------------------------------------------------------------- save
def save_alter_adapter(model: Transformer, out_dir: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write every adapter group of ``model`` and its config to ``out_dir`` (atomically).

    extra: JSON-serialisable settings stored beside the adapter config (entropy ``q``,
    threshold kind/value, sub-domain names, ...); returned unchanged by :func:`load_alter_adapter`.
    """
    out_dir = Path(out_dir)
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_alter_adapter: the model carries no adapters (install them with alter_jax.adapters.add_adapters).")
    cfg = single_config(layers)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_alter_adapter: extra must be a dict, got {type(extra).__name__}.")
    try:
        extra_json = json.loads(json.dumps(extra or {}, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_alter_adapter: extra is not JSON serialisable ({e}).") from None

    tensors: dict[str, np.ndarray] = {}
    names = sorted(layers, key=_natural)
    for path in names:
        ad = layers[path].adapter
        for group in GROUPS:
            var = getattr(ad, group)
            if var is not None:
                arr = np.asarray(jax.device_get(var[...]), dtype=np.float32)
                tensors[f"{hf_layer_name(path)}.{group}"] = np.ascontiguousarray(arr)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"save_alter_adapter: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}); a diverged adapter is never saved. Lower the learning rate.")
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "layers": [hf_layer_name(p) for p in names],
        "extra": extra_json,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def _natural(path: str) -> tuple:
    """Model order: layer index, then projection in :data:`TARGET_MODULES` order (q, k, v, o, gate, up, down)."""
    parts = path.split(".")
    idx = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    name = parts[-1]
    return (idx, TARGET_MODULES.index(name) if name in TARGET_MODULES else len(TARGET_MODULES), path)


# ----------------------------------------------------------------------------- load
def _adapter_config(data: dict, file: Path) -> AdapterConfig:
    fields = data.get("adapter_config")
    if not isinstance(fields, dict):
        raise AdapterCheckpointError(f"{file}: field 'adapter_config' is missing or not an object; save the adapter again.")
    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise AdapterCheckpointError(
            f"{file}: adapter_config has unknown field(s) {unknown}; this adapter was written by a newer alter-jax. "
            "Upgrade alter-jax or remove the fields if you know they are unused."
        )
    fields = dict(fields)
    if "target_modules" in fields:
        fields["target_modules"] = tuple(fields["target_modules"])
    try:
        return AdapterConfig(**fields)
    except TypeError as e:
        raise AdapterCheckpointError(f"{file}: adapter_config is invalid ({e}).") from None


def _expected_shapes(lin: AdaptableLinear, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    r, n = cfg.rank, cfg.num_forget_experts
    shapes = {"shared_a": (r, lin.d_in), "retain_expert": (lin.d_out, r)}
    if n > 0:
        shapes["forget_experts"] = (n, lin.d_out, r)
        if cfg.use_router:
            shapes["router"] = (lin.d_in + 1, n + 1)
    return shapes


def load_alter_adapter(model: Transformer, adapter_dir: str | os.PathLike) -> tuple[Transformer, dict]:
    """Install the adapter saved by :func:`save_alter_adapter` into ``model``; returns ``(model, extra)``.

    ``model`` must be a backbone without adapters whose layers fit the checkpoint. Every
    check (config, format version, layer list, tensor names and shapes, expert count) runs
    before the model is touched, so a failed load leaves it unchanged.
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterCheckpointError(f"{folder}: no such adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it).")
    cfg_file, w_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    hint = "An ALTER adapter folder is written by alter_jax.io.alter.save_alter_adapter."
    data = read_json(cfg_file, hint)
    if data.get("format") != FORMAT_NAME:
        raise AdapterCheckpointError(f"{cfg_file}: field 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}. {hint}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{cfg_file}: format_version {version!r} is not known to this alter-jax (it reads version {FORMAT_VERSION}). "
            "Upgrade alter-jax, or re-save the adapter with this version."
        )
    cfg = _adapter_config(data, cfg_file)
    layer_names = data.get("layers")
    if not isinstance(layer_names, list) or not layer_names or not all(isinstance(x, str) for x in layer_names):
        raise AdapterCheckpointError(f"{cfg_file}: field 'layers' must be a non-empty list of layer names; save the adapter again.")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise AdapterCheckpointError(f"{cfg_file}: field 'extra' must be an object, got {type(extra).__name__}.")

    require_fresh(model, folder)
    linears = linear_layers(model)
    paths = [our_layer_path(n) for n in layer_names]
    absent = [n for n, p in zip(layer_names, paths) if p not in linears]
    if absent:
        raise AdapterCheckpointError(
            f"{cfg_file}: layer(s) {absent[:3]}{' ...' if len(absent) > 3 else ''} do not exist in this model "
            f"({model.cfg.num_layers} layers). The adapter was trained on a different model; load the matching backbone."
        )
    # The config's target_modules must select exactly the listed layers (add_adapters' rule).
    selected = {p for p in linears if any(target_matches(p, t) for t in cfg.target_modules)}
    if selected != set(paths):
        diff = sorted(selected.symmetric_difference(paths), key=_natural)
        raise AdapterCheckpointError(
            f"{cfg_file}: adapter_config.target_modules {list(cfg.target_modules)} select different layers on this model "
            f"than field 'layers' lists (differ on {[hf_layer_name(d) for d in diff[:3]]}). The adapter was trained on a "
            "different model; load the matching backbone."
        )

    tensors = read_tensors(w_file, hint)
    expected: dict[str, tuple[int, ...]] = {}
    for name, path in zip(layer_names, paths):
        for group, shape in _expected_shapes(linears[path], cfg).items():
            expected[f"{name}.{group}"] = shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    # An expert count that differs from the config is the most likely mismatch: name it.
    for key in [k for k in tensors if k.endswith(".forget_experts") or k.endswith(".router")]:
        n_file = tensors[key].shape[0] if key.endswith(".forget_experts") else tensors[key].shape[-1] - 1
        if n_file != cfg.num_forget_experts:
            raise AdapterCheckpointError(
                f"{w_file}: tensor {key!r} holds {n_file} forget expert(s) but {cfg_file} says "
                f"num_forget_experts={cfg.num_forget_experts}. The two files come from different adapters; save the adapter again."
            )
    if cfg.num_forget_experts > 0 and any(k.endswith(".forget_experts") for k in missing):
        raise AdapterCheckpointError(
            f"{w_file}: no forget experts stored but {cfg_file} says num_forget_experts={cfg.num_forget_experts}. "
            "The two files come from different adapters; save the adapter again."
        )
    if missing or unexpected:
        raise AdapterCheckpointError(
            f"{w_file}: tensors do not match {cfg_file}: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}. Save the adapter again."
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterCheckpointError(
                f"{w_file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, this model and {cfg_file} "
                f"(rank {cfg.rank}) imply {shape}. The adapter was trained on a different model; load the matching backbone."
            )

    bad = nonfinite_tensors(tensors)
    if bad:
        raise AdapterCheckpointError(
            f"{w_file}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
            "the run that wrote it diverged. Rerun it with a lower learning rate in a new output_dir."
        )
    add_adapters(model, cfg, abstract=True)  # every variable is filled below: no initialisation to run
    for name, path in zip(layer_names, paths):
        ad = linears[path].adapter
        for group in _expected_shapes(linears[path], cfg):
            getattr(ad, group).set_value(jnp.asarray(tensors[f"{name}.{group}"], jnp.float32))
    return model, extra
